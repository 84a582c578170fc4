"""One run per ``output_dir``: an advisory lock held for the run's lifetime.

A job submitted twice, or requeued while the old one is still dying, would otherwise train twice into the same
directory: interleaved checkpoints and ``metrics.csv`` rows, and a ``config.yaml`` describing settings that were not
used. The lock is a POSIX record lock (``fcntl.lockf``: works on local disks and on NFS through the lock manager;
Lustre needs its ``flock`` mount option, without which the lock is skipped with a warning) on ``output_dir/.lock``.
The kernel drops it when the holding process dies, however it dies, so a crash never leaves a stale lock; the
holder's pid, host and command are written into the file only to name it in the second launch's error.

Every rank of one run belongs to the same run, so only the launching process takes the lock: global rank 0 as
told by the launcher's environment (``RANK`` from torchrun, ``SLURM_PROCID`` under srun, ``LOCAL_RANK`` set by
Lightning for the processes it starts itself); the other ranks run under its lock.

The command line takes the lock before Hydra writes its record (``.hydra/``, the job log) into ``output_dir``
(:class:`RunLockCallback`, a Hydra callback), so a second launch changes nothing in a live run directory;
``train()`` takes it again, which within the holding process only counts a nesting level (POSIX locks belong to the
process: a second ``lockf`` on another descriptor would succeed, and closing either descriptor would drop the lock;
locks are therefore keyed by the lock file's real path, so a symlinked spelling of a held directory nests too).

A run writes its checkpoints into ``output_dir/checkpoints``; when that is a link to another folder (another run's
``checkpoints/``, a scratch area), the lock of ``output_dir`` alone would let two runs train into one folder.
:func:`checkpoint_folder_lock` then also takes the lock of the directory that really holds the folder (another
run's ``output_dir``, whose own run holds that same lock), so either run refuses while the other one is live.

Nothing here imports torch: the lock is taken before the training stack is imported, so a refused launch is quick.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from data_prep.cli_errors import fail

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another live process is running in this output_dir. (Not imported from ``pretrain.settings``: this module
    is loaded by the command line's Hydra callback before anything heavy, so that a refused launch is quick.)"""


def launching_process() -> bool:
    """Whether this process is the run's first (global rank 0) before any process group exists."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(key)
        if value not in (None, "", "0"):
            return False
    return True


_held: dict[Path, list] = {}  # lock file -> [descriptor, nesting level], for the locks this process holds


class RunLock:
    """``with RunLock(output_dir):`` holds the lock (a no-op on ranks other than the launching one; nested uses in
    the holding process share the first one's lock)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._key = Path(os.path.realpath(self.path))
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if not launching_process():
            return self
        if self._key in _held:
            _held[self._key][1] += 1
            self._fd = _held[self._key][0]
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "an unknown process"
                os.close(fd)
                raise RunLockedError(self._refusal(holder)) from None
            os.close(fd)
            log.warning("%s: the filesystem refuses locks (%s); running without the one-run-per-output_dir check",
                        self.path, err.strerror)
            return self
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv)[:500]
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{command}\n".encode(), 0)
        self._fd = fd
        _held[self._key] = [fd, 1]
        return self

    def _refusal(self, holder: str) -> str:
        return (f"{self.path.parent} is in use by another run ({holder}); wait for it to end or stop it, or choose "
                "another output_dir. (The lock goes away by itself when that process exits.)")

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        self._fd = None
        entry = _held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self._key]
            os.close(entry[0])  # releases the lock; the file stays (deleting it would race a new holder)


def checkpoint_folder_lock(output_dir: str | os.PathLike) -> RunLock | contextlib.nullcontext:
    """The lock that keeps ``output_dir/checkpoints`` to this run when it is a link elsewhere (see the module
    docstring): a :class:`RunLock` on the real folder's parent directory, or nothing to take when the folder is
    inside ``output_dir``. Raises :class:`RunLockedError` naming the link when another live run holds it."""
    folder = Path(output_dir) / "checkpoints"
    real = Path(os.path.realpath(folder))
    if real == Path(os.path.realpath(output_dir)) / "checkpoints":
        return contextlib.nullcontext()
    return _LinkedFolderLock(folder, real)


class _LinkedFolderLock(RunLock):
    def __init__(self, folder: Path, real: Path) -> None:
        super().__init__(real.parent)
        self.folder, self.real = folder, real

    def _refusal(self, holder: str) -> str:
        return (f"{self.folder} leads to {self.real}, a checkpoint folder in use by another run ({holder}); two runs "
                "cannot train into one folder: give this run its own checkpoints folder (remove the link), or stop "
                "the other run")


class RunLockCallback(Callback):
    """The Hydra callback of ``python -m pretrain`` (``hydra.callbacks.run_lock`` in ``conf/config.yaml``).

    Takes the run lock when Hydra starts the run, before Hydra creates the run directory, opens its job log there
    and writes its config record (``.hydra/``): a second launch on a live ``output_dir`` then stops with one
    ``error:`` line (exit 2) naming the process that holds it, and has not touched a single file of the running run.
    The lock stays held until the process ends (or the run ends). When ``output_dir/checkpoints`` is a link into
    another run's folder, that folder's lock is taken too (refused the same way while the other run is live).
    """

    def __init__(self) -> None:
        self._locks: list = []

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        output_dir = config.get("output_dir")
        if not output_dir:
            return
        try:
            for lock in (RunLock(output_dir), checkpoint_folder_lock(output_dir)):
                lock.__enter__()
                self._locks.append(lock)
        except RunLockedError as err:
            self.on_run_end(config)
            fail(str(err))

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        while self._locks:
            self._locks.pop().__exit__(None, None, None)
