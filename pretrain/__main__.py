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
from omegaconf import DictConfig, OmegaConf

from data_prep.cli_errors import fail


def main() -> None:
    _check_before_hydra(sys.argv[1:])
    _hydra_main()


_EARLY_LOCKS: list = []  # run locks taken before Hydra (held until the process ends; Hydra's and train's nest in)
_CHECKED: dict = {}  # the settings checked before Hydra, and the config they came from (see _checked_settings)


def _check_before_hydra(arguments: list[str]) -> None:
    """Check the overrides, then the settings, before Hydra composes and creates output_dir with its record in it:
    a misspelt key or an invalid setting ends with one error line and no run directory, and a failed launch on an
    existing run leaves that run's .hydra/ record as it was."""
    _CHECKED.clear()  # (a second launch in one process checks its own settings)
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
        composed = OmegaConf.to_container(checked.config, resolve=True)
    except OmegaConfBaseException:
        composed = None  # e.g. a ${hydra:...} interpolation, resolved only in Hydra's run
    try:
        settings = settings_from_config(checked.config, warn=False)  # (its warnings come once, in the run's log)
    except user_errors() as err:
        fail(str(err))
    except OmegaConfBaseException:
        return  # (as above) train() checks the settings there
    if composed is not None:
        _CHECKED.update(composed=composed, settings=settings, vocab_size=checked.config.model.get("vocab_size"))


def _checked_settings(cfg: DictConfig):
    """The settings checked before Hydra, when Hydra composed the same config (every value resolved alike), so the
    run does not check them again (the check reads every shard set's manifest and an init_from checkpoint's
    config.json); else None, and train() checks ``cfg`` itself. A ``model.vocab_size`` the check took from the
    shards is written into ``cfg`` as the check does, so the run record holds the number used."""
    from omegaconf.errors import OmegaConfBaseException

    if not _CHECKED:
        return None
    try:
        if OmegaConf.to_container(cfg, resolve=True) != _CHECKED["composed"]:
            return None
    except OmegaConfBaseException:
        return None
    if cfg.model.get("vocab_size") is None and _CHECKED["vocab_size"] is not None:
        OmegaConf.update(cfg, "model.vocab_size", _CHECKED["vocab_size"], force_add=True)
    return _CHECKED["settings"]


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    # matplotlib (imported by the training stack) announces building its font cache once per machine, at INFO
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from pretrain.run.command import run_training
    from pretrain.run.interrupt import resume_command

    run_training(cfg, resume_command(), _checked_settings(cfg))


if __name__ == "__main__":
    main()
