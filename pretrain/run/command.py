"""How a training command (``python -m pretrain``, ``python -m pretrain.cooldown``) runs ``train(cfg)`` and ends.

Bad input (settings, shards, checkpoint directories, a busy output_dir), a diverged loss and a full disk end with one
``error:`` line and exit status 2 (``data_prep.cli_errors``; ``HYDRA_FULL_ERROR=1`` shows the traceback instead);
Ctrl-C or SIGTERM ends with one line saying how to resume and the shell's status for the signal. Both commands end
the same way, so it is written once here. Nothing heavy is imported at module level: the run lock is tried before
torch is imported.
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from data_prep.cli_errors import one_line_errors


def user_errors() -> tuple[type[Exception], ...]:
    """The project's errors for input the user can fix: settings, shards, checkpoints, a busy output_dir."""
    from data_prep.errors import DataPrepError
    from pretrain.hf import CheckpointError
    from pretrain.model import ConfigError
    from pretrain.run.lock import RunLockedError
    from pretrain.settings import SettingsError

    return SettingsError, DataPrepError, CheckpointError, ConfigError, RunLockedError


def run_training(cfg: DictConfig, resume_with: str, settings=None) -> None:
    """``train(cfg, settings)`` (``settings``: already checked from ``cfg``, or None); every way it can stop short ends
    the process with one line and its status. ``resume_with``: the command line that resumes this run."""
    from pretrain.run.interrupt import TrainingInterrupted
    from pretrain.train import train

    try:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            train(cfg, settings)
            return
        # FloatingPointError: a diverged loss, raised before any checkpoint holds the diverged weights
        with one_line_errors(*user_errors(), FloatingPointError, where=cfg.get("output_dir"),
                             hint="check the path and its permissions, then re-run the same command to resume",
                             disk_full_hint="free space there, then re-run the same command: it resumes from the "
                                            "newest complete checkpoint") as outcome:
            train(cfg, settings)
        outcome.exit_on_error()
    except TrainingInterrupted as stop:  # Ctrl-C / SIGTERM: checkpoint saved; one line on how to go on
        if stop.announce:
            print(f"{stop}; resume with: {resume_with}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (start-up, export), or pressed twice
        print(f"SIGINT: stopped without saving; the newest checkpoint (if any) resumes with: {resume_with}",
              file=sys.stderr, flush=True)
        sys.exit(130)
