"""``python -m pretrain +experiment=NAME [overrides...]``: Hydra entry point (``--help``, ``--cfg job`` work).

Faults a user can act on (bad settings or shards, an unusable checkpoint, a busy output_dir, a diverged loss, a
full disk) end with one ``error:`` line saying what to do and exit status 2; ``HYDRA_FULL_ERROR=1`` shows the
traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

import hydra
from omegaconf import DictConfig


def _fail(message: str) -> None:
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the original message only
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if last.startswith(("data_prep.", "pretrain.")) else last
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # matplotlib (imported by the training stack) announces building its font cache once per machine, at INFO
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from pretrain.run.interrupt import TrainingInterrupted, resume_command
    from pretrain.train import train  # heavy imports after Hydra has parsed the command line

    try:
        _run(train, cfg)
    except TrainingInterrupted as stop:  # Ctrl-C / SIGTERM: checkpoint saved; one line on how to go on
        if stop.announce:
            print(f"{stop}; resume with: {resume_command()}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (start-up, export), or pressed twice
        print(f"SIGINT: stopped without saving; the newest checkpoint (if any) resumes with: {resume_command()}",
              file=sys.stderr, flush=True)
        sys.exit(130)


def _run(train, cfg: DictConfig) -> None:
    from data_prep.errors import DataPrepError
    from pretrain.hf import CheckpointError
    from pretrain.model import ConfigError
    from pretrain.run.lock import RunLockedError
    from pretrain.settings import SettingsError  # (not at the top: the run lock is tried before torch is imported)

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        train(cfg)
        return
    try:
        train(cfg)
    except (SettingsError, DataPrepError, CheckpointError, ConfigError, RunLockedError) as err:
        # bad input (config, shards, checkpoint directories): one message naming what to fix, no traceback
        _fail(str(err))
    except FloatingPointError as err:  # raised before any checkpoint holds the diverged weights
        _fail(str(err))
    except OSError as err:
        where = err.filename or cfg.get("output_dir")
        hint = ("free space there, then re-run the same command: it resumes from the newest complete checkpoint"
                if err.errno in (errno.ENOSPC, errno.EDQUOT) else
                "check the path and its permissions, then re-run the same command to resume")
        _fail(f"{where}: {err.strerror or err}; {hint}")


if __name__ == "__main__":
    main()
