"""Run ``python -m pretrain ARGS`` with a fault injected at a chosen checkpoint write (used by test_recovery.py).

``python tests/fault_runner.py N ARGS...`` SIGKILLs the process in the middle of the N-th write of checkpoint
bytes to disk, after half of them are written, wherever the writer puts them: ``torch.save`` into a real file
(our atomic writer's temp file, DeepSpeed's shard files) or a ``shutil.move`` of a finished temp file into the
checkpoint directory (Lightning's fsspec path, which copies across filesystems when ``$TMPDIR`` is elsewhere).
Writes into memory buffers do not count. Deterministic: the kill point is a count, not a time.
"""

from __future__ import annotations

import io
import os
import runpy
import shutil
import signal
import sys

import torch

KILL_AT = int(sys.argv[1])
_count = 0
_real_save = torch.save
_real_move = shutil.move


def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _tick() -> bool:
    global _count
    _count += 1
    return _count == KILL_AT


def _save(obj, f, *args, **kwargs):
    if isinstance(f, io.BytesIO) or not _tick():
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
    if not str(dst).endswith(".ckpt") or not _tick():
        return _real_move(src, dst, *args, **kwargs)
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as out:  # what a cross-filesystem move does: truncate the target, then copy
        out.write(data[: len(data) // 2])
    _kill_now()


torch.save = _save
shutil.move = _move
sys.argv = ["pretrain", *sys.argv[2:]]
runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
