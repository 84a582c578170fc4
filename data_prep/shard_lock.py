"""Readers and writers of one shard directory kept apart by a lock file in it.

Why: a training run reads its shards for days, each file opened at its first use and its sha256 checked in the
background. ``data_prep shards --overwrite``, or a second ``data_prep shards`` on the same ``--out``, would
otherwise replace files under it: the run would train on text nobody verified, or two writers would interleave
their files. Training holds a shared ``flock`` on ``DIR/.shards.lock`` for as long as it reads the set (every rank
takes its own, DataLoader workers inherit their parent's: shared locks allow any number of readers); ``data_prep
shards`` holds it exclusively for its whole run. Whoever cannot get it stops at once with one line naming the
directory and the holder.

``flock`` works on local filesystems and on NFS (Linux maps it to the lock manager's whole-file locks); Lustre needs
its ``flock`` mount option. Where the filesystem refuses locks, or a read-only shard directory has no lock file, the
set is read without it and a warning says so. The kernel drops a lock when its holder dies, however it dies, so a
lock is never stale. The writer puts its pid and command into the file for the readers' message; readers are named
from ``/proc/locks`` (this host's).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
import time
import weakref
from pathlib import Path

from data_prep.errors import DataPrepError

log = logging.getLogger(__name__)
LOCK_NAME = ".shards.lock"
_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)


class ShardSetLock:
    """``ShardSetLock(dir, exclusive).acquire()`` or ``with ShardSetLock(...)``; ``release()`` closes it.

    Readers (``exclusive=False``) never unlock explicitly: a forked DataLoader worker shares the parent's lock, and
    an explicit unlock in any of them would drop it for all; closing a descriptor only drops this process's hold."""

    def __init__(self, directory: str | os.PathLike, exclusive: bool) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.exclusive = exclusive
        self._fd: int | None = None
        self._close = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> ShardSetLock:
        fd = self._open()
        if fd is None:
            return self
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in _BUSY:
                message = self._busy_message(fd)
                os.close(fd)
                raise DataPrepError(message) from None
            os.close(fd)
            log.warning("%s: the filesystem refuses locks (%s); %s", self.path, err.strerror, self._unguarded)
            return self
        if self.exclusive:  # only for the message of whoever is refused meanwhile
            os.ftruncate(fd, 0)
            command = " ".join(sys.argv)[:300]
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                          f"{command}\n".encode(), 0)
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self.exclusive:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
        self._fd = None
        self._close()

    def __enter__(self) -> ShardSetLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def _unguarded(self) -> str:
        return ("writing the shards without the lock that keeps training runs and other writers out" if self.exclusive
                else "reading the shards without the lock that keeps `data_prep shards` from rewriting them under "
                     "this run")

    def _open(self) -> int | None:
        if not self.exclusive and not self.directory.is_dir():
            return None  # no shard set at all: reading its manifest gives the error
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if self.exclusive:
                raise
            try:  # a read-only shard directory (another user's, a read-only mount): its existing lock file
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                log.warning("%s: cannot create the lock file (%s); %s", self.path, err.strerror, self._unguarded)
                return None

    def _busy_message(self, fd: int) -> str:
        readers = False
        if self.exclusive:
            try:  # refused an exclusive lock: by readers if a shared one is possible, else by another writer
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)  # (this writer's own descriptor: no one else shares it)
                readers = True
            except OSError:
                pass
        if readers:
            who = "; ".join(lock_readers(self.path)) or "a process on another host"
            return (f"shard directory {self.directory} is being read by a live training run ({who}): replacing its "
                    "shards now would change the data under that run; wait for it to end (or stop it), or write the "
                    "new shards to another --out")
        writer = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "an unknown process"
        if self.exclusive:
            return (f"shard directory {self.directory} is being written by another `data_prep shards` ({writer}); "
                    "wait for it to finish, or choose another --out")
        return (f"shard directory {self.directory} is being written right now by `data_prep shards` ({writer}); "
                "wait for it to finish, then start the run")


def lock_readers(path: Path) -> list[str]:
    """``pid N: command`` of each process on this host holding a shared flock on ``path`` (from /proc/locks; the
    inode alone identifies the file: overlay filesystems report another device number there)."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "READ":
            continue
        if fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4] not in found and fields[4] != str(os.getpid()):
            found.append(fields[4])
    described = []
    for pid in found:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode("utf-8", errors="replace").strip()[:200]
        except OSError:
            command = ""
        described.append(f"pid {pid}" + (f": {command}" if command else ""))
    return described
