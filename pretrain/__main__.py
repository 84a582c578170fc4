"""``python -m pretrain +experiment=NAME [overrides...]``: Hydra entry point (``--help``, ``--cfg job`` work).

Faults a user can act on (bad settings or shards, an unusable checkpoint, a busy output_dir, a diverged loss, a
full disk) end with one ``error:`` line saying what to do and exit status 2; ``HYDRA_FULL_ERROR=1`` shows the
traceback instead. The overrides (``pretrain.overrides``: every unknown key with its nearest valid ones) and the
settings are checked before Hydra creates the run directory, so a command that cannot start leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from data_prep.cli_errors import fail


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
        fail(str(err))
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
            fail(str(err))
    from pretrain.run.command import user_errors
    from pretrain.settings import settings_from_config

    try:
        settings_from_config(checked.config, warn=False)  # (its warnings come once, in the run's log)
    except user_errors() as err:
        fail(str(err))
    except OmegaConfBaseException:
        return  # e.g. a ${hydra:...} interpolation, resolved only in Hydra's run: train() checks it there


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    # matplotlib (imported by the training stack) announces building its font cache once per machine, at INFO
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from pretrain.run.command import run_training
    from pretrain.run.interrupt import resume_command

    run_training(cfg, resume_command())


if __name__ == "__main__":
    main()
