"""Run ``python -m pretrain ARGS`` and SIGKILL it at a chosen event (used by the recovery tests).

``python tests/fault_runner.py KIND:N ARGS...`` kills the process at the N-th event of KIND in this process:

- ``write:N``   halfway through the N-th write of checkpoint bytes to a real file, wherever the writer puts them:
  ``torch.save`` into a file (our atomic writer's temp file, DeepSpeed's shard files through its checkpoint engine)
  or a ``shutil.move`` of a finished temp file into the checkpoint directory (Lightning's fsspec path, which copies
  across filesystems when ``$TMPDIR`` is elsewhere). Writes into memory buffers do not count.
- ``replace:N`` just before the N-th ``os.replace`` into a ``checkpoints`` directory: a complete, fsynced temp file
  (or a new ``last.ckpt`` link) about to be renamed over its target, or a checksum file about to be put beside
  a checkpoint that is already in place.
- ``step:N``    at the start of the N-th training step this process runs (mid-step: the batch is drawn, nothing
  is trained on it yet).

A bare number means ``write:N``. The production code paths run unchanged; only the moment of death is chosen.
Deterministic: the kill point is a count, not a time. Under a multi-process strategy only the launching process
runs this file (the ranks it starts are plain ``python -m pretrain``), so the test ends the others itself.
"""

from __future__ import annotations

import functools
import io
import os
import runpy
import shutil
import signal
import sys

import torch

KIND, _, COUNT = sys.argv[1].rpartition(":")
KIND = KIND or "write"
KILL_AT = int(COUNT)
assert KIND in ("write", "replace", "step"), sys.argv[1]
_counts = {"write": 0, "replace": 0, "step": 0}
_real_save = torch.save
_real_move = shutil.move
_real_replace = os.replace


def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _tick(kind: str) -> bool:
    _counts[kind] += 1
    return kind == KIND and _counts[kind] == KILL_AT


def _save(obj, f, *args, **kwargs):
    if isinstance(f, io.BytesIO) or not _tick("write"):
        return _real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    _real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    if hasattr(f, "write"):
        f.write(data[: len(data) // 2])
        f.flush()
    else:
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
    _kill_now()


def _move(src, dst, *args, **kwargs):
    if not str(dst).endswith(".ckpt") or not _tick("write"):
        return _real_move(src, dst, *args, **kwargs)
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as out:  # what a cross-filesystem move does: truncate the target, then copy
        out.write(data[: len(data) // 2])
    _kill_now()


def _replace(src, dst, *args, **kwargs):
    if "checkpoints" in os.fspath(dst).split(os.sep) and _tick("replace"):
        _kill_now()
    return _real_replace(src, dst, *args, **kwargs)


def _patch_training_step() -> None:
    from pretrain.lightning_module import PretrainingModule

    real_step = PretrainingModule.training_step

    @functools.wraps(real_step)
    def training_step(self, *args, **kwargs):
        if _tick("step"):
            _kill_now()
        return real_step(self, *args, **kwargs)

    PretrainingModule.training_step = training_step


torch.save = _save
shutil.move = _move
os.replace = _replace
_patch_training_step()
sys.argv = ["pretrain", *sys.argv[2:]]
runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
