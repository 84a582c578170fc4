"""Hydra callbacks of the ``python -m pretrain`` command line.

:class:`RunLockCallback` takes the run lock (:mod:`pretrain.run_lock`) when Hydra starts the run, before Hydra
creates the run directory, opens its job log there and writes its config record (``.hydra/``): a second launch on a
live ``output_dir`` then stops with one ``error:`` line (exit 2) naming the process that holds it, and has not
touched a single file of the running run. The lock stays held until the process ends (or the run ends).
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pretrain.run_lock import RunLock, RunLockedError


class RunLockCallback(Callback):
    def __init__(self) -> None:
        self._lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        output_dir = config.get("output_dir")
        if not output_dir:
            return
        lock = RunLock(output_dir)
        try:
            lock.__enter__()
        except RunLockedError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        self._lock = lock

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None
