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

``python tests/fault_runner.py --serve ARGS...`` launches the same command many times, once per request, without
importing the training stack (torch, Lightning, DeepSpeed: seconds per launch on 2 cores) again each time: it
imports it once, then reads one JSON request a line from stdin, ``{"point": "KIND:N", "env": {...}, "stderr":
PATH}``, forks a fresh process for it (its own session, so its process group holds the ranks it starts; ``env``
applied, e.g. ``TMPDIR``; stderr to PATH), waits for it, SIGKILLs what is left of its process group, and answers
``{"returncode": ...}`` (negative: killed by that signal). Only start-up is shared; every launch is its own process
that reads its run directory from disk and dies at its kill point.
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

KIND = "write"
KILL_AT = 0
_counts = {"write": 0, "replace": 0, "step": 0}
_real_save = torch.save
_real_move = shutil.move
_real_replace = os.replace


def _arm(point: str) -> None:
    """Set the kill point and install the hooks that count events."""
    global KIND, KILL_AT
    kind, _, count = point.rpartition(":")
    KIND, KILL_AT = kind or "write", int(count)
    assert KIND in ("write", "replace", "step"), point
    torch.save = _save
    shutil.move = _move
    os.replace = _replace
    _patch_training_step()


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


def _run_pretrain(args: list[str]) -> None:
    sys.argv = ["pretrain", *args]
    runpy.run_module("pretrain", run_name="__main__", alter_sys=True)


def _launch(request: dict, args: list[str]) -> int:
    """In the forked process: become a fresh launch of ``python -m pretrain ARGS`` with the request's kill point."""
    import tempfile

    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.environ.update(request.get("env", {}))
    tempfile.tempdir = None  # $TMPDIR is read again, as a fresh process would
    try:
        _arm(request["point"])
        _run_pretrain(args)
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _serve(args: list[str]) -> None:
    import json

    replies = os.fdopen(os.dup(1), "w")  # answers go here; whatever else prints (DeepSpeed on import) goes to stderr
    os.dup2(2, 1)
    import pretrain.run.interrupt  # noqa: F401  the training stack, imported once for every launch
    import pretrain.train  # noqa: F401

    if any(a.startswith("strategy=deepspeed") for a in args):
        import deepspeed  # noqa: F401
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            os._exit(_launch(request, args))
        _, status = os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)  # the ranks it started
        except ProcessLookupError:
            pass
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _serve(sys.argv[2:])
    else:
        _arm(sys.argv[1])
        _run_pretrain(sys.argv[2:])
