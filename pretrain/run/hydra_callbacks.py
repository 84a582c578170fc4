"""Hydra callbacks of the ``python -m pretrain`` command line.

:class:`RunLockCallback` takes the run lock (:mod:`pretrain.run.lock`) when Hydra starts the run, before Hydra
creates the run directory, opens its job log there and writes its config record (``.hydra/``): a second launch on a
live ``output_dir`` then stops with one ``error:`` line (exit 2) naming the process that holds it, and has not
touched a single file of the running run. The lock stays held until the process ends (or the run ends). When
``output_dir/checkpoints`` is a link into another run's folder, that folder's lock is taken too (refused the same
way while the other run is live).
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pretrain.run.lock import RunLock, RunLockedError, checkpoint_folder_lock


class RunLockCallback(Callback):
    def __init__(self) -> None:
        self._locks: list = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        output_dir = config.get("output_dir")
        if not output_dir:
            return
        try:
            for lock in (RunLock(output_dir), checkpoint_folder_lock(output_dir)):
                lock.__enter__()
                self._locks.append(lock)
        except RunLockedError as err:
            self.on_run_end(config)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        while self._locks:
            self._locks.pop().__exit__(None, None, None)
