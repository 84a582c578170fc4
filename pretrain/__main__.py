"""``python -m pretrain +experiment=NAME [overrides...]``: Hydra entry point (``--help``, ``--cfg job`` work).

Faults a user can act on (bad settings or shards, an unusable checkpoint, a busy output_dir, a diverged loss, a
full disk) end with one ``error:`` line saying what to do and exit status 2; ``HYDRA_FULL_ERROR=1`` shows the
traceback instead. The overrides (``pretrain.overrides``: every unknown key with its nearest valid ones) and the
settings are checked before Hydra creates the run directory, so a command that cannot start leaves nothing behind.
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


def main() -> None:
    _check_before_hydra(sys.argv[1:])
    _hydra_main()


_EARLY_LOCKS: list = []  # run locks taken before Hydra (held until the process ends; Hydra's and train's nest in)


def _check_before_hydra(arguments: list[str]) -> None:
    """Check the overrides, then the settings, before Hydra composes and creates output_dir with its record in it:
    a misspelt key or an invalid setting ends with one error line and no run directory, and a failed launch on an
    existing run leaves that run's .hydra/ record as it was."""
    if any(argument.startswith("-") for argument in arguments):
        return  # --help, --cfg, --multirun, --config-name...: Hydra's own paths
    from pretrain.overrides import OverrideError, check_overrides

    try:
        checked = check_overrides(arguments)
    except OverrideError as err:
        _fail(str(err))
    sys.argv[1:] = checked.overrides
    if checked.config is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    from omegaconf.errors import OmegaConfBaseException

    try:
        output_dir = checked.config.get("output_dir")
    except OmegaConfBaseException:
        return
    if output_dir and os.path.isdir(output_dir):  # an existing run: refused at once (before torch) if it is live
        from pretrain.run.lock import RunLock, RunLockedError, checkpoint_folder_lock

        try:
            for lock in (RunLock(output_dir), checkpoint_folder_lock(output_dir)):
                lock.__enter__()
                _EARLY_LOCKS.append(lock)
        except RunLockedError as err:
            _fail(str(err))
    from data_prep.errors import DataPrepError
    from pretrain.hf import CheckpointError
    from pretrain.model import ConfigError
    from pretrain.settings import SettingsError, settings_from_config

    try:
        settings_from_config(checked.config, warn=False)  # (its warnings come once, in the run's log)
    except (SettingsError, DataPrepError, CheckpointError, ConfigError) as err:
        _fail(str(err))
    except OmegaConfBaseException:
        return  # e.g. a ${hydra:...} interpolation, resolved only in Hydra's run: train() checks it there


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
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
