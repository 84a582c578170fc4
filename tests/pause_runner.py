"""Run ``python -m MODULE ARGS`` and hold it at a chosen point until the test lets it go (used by
tests/test_live_shards.py).

``python tests/pause_runner.py POINT FLAG MODULE ARGS...``:

- ``POINT`` ``data``: after the training data module is built (shard sets locked and checked, no shard read
  yet); ``write``: just after ``data_prep shards`` took its shard directory's exclusive lock.
- At that point the process writes its pid to ``FLAG.ready`` and waits until ``FLAG.go`` exists (at most 10
  minutes, so a failed test never leaves it behind for ever), then goes on unchanged.

The production code paths run unchanged; only the moment is chosen. Deterministic: an event, never a time.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

POINT, FLAG, MODULE = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
assert POINT in ("data", "write"), POINT


def _hold() -> None:
    FLAG.with_suffix(".ready").write_text(str(os.getpid()))
    go = FLAG.with_suffix(".go")
    deadline = time.monotonic() + 600
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


if POINT == "data":
    from pretrain import datamodule

    _real_init = datamodule.ShardDataModule.__init__

    def _init(self, *args, **kwargs):
        _real_init(self, *args, **kwargs)
        _hold()

    datamodule.ShardDataModule.__init__ = _init
else:
    from data_prep import shard_lock

    _real_acquire = shard_lock.ShardSetLock.acquire

    def _acquire(self):
        result = _real_acquire(self)
        if self.exclusive:
            _hold()
        return result

    shard_lock.ShardSetLock.acquire = _acquire

sys.argv = [MODULE, *sys.argv[4:]]
runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
