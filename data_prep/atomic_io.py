"""The one atomic file writer and the one directory swap behind every writer of the project.

A file is written to a temp file beside it, flushed, fsynced, renamed over the target with ``os.replace`` (atomic
within one directory) and the directory is fsynced; a directory is assembled beside its destination and swapped
in whole. So a crash leaves either the old file (directory) or the complete new one, never a half-written one
that looks finished, and a failure (a full disk) removes what it wrote and raises ``OSError`` naming the
destination, not a temp name the user never saw.

Each caller keeps its own temp name (the ``temp``/``staging`` parameters): the code that recognises and removes
what a killed writer left (e.g. ``*.tmp`` in a shard directory, ``.NAME.tmp-PID`` beside a checkpoint) matches
those names. ``os.replace`` is called through the ``os`` module, so a test can stop a writer just before it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

TMP_SUFFIX = ".tmp"
STAGING_MARK = ".tmp-"  # ".<name>.tmp-<pid>-<random>": the default directory assembled beside <name>

Content = Union[bytes, str, Callable[[BinaryIO], object]]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename in ``directory`` (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The default temp name of a writer of ``path``: ``NAME.<pid>.tmp``, per process, so two writers never share
    one (it ends with TMP_SUFFIX, which marks it as never trusted)."""
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _named(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` (same errno, so the same ``OSError`` subclass)."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def write_atomic(path: str | os.PathLike, content: Content, temp: str | os.PathLike | None = None) -> None:
    """Write ``content`` to ``path`` through the temp file ``temp`` (default :func:`temp_path`) in its directory.

    ``content`` is bytes, text (written as UTF-8) or a function that writes to the open binary temp file (a
    stream too large to hold, or one hashed while written). The file gets the modes of anything the user creates.
    Any failure removes the temp file and leaves ``path`` as it was; an ``OSError`` is raised naming ``path``."""
    path = Path(path)
    tmp = Path(temp) if temp is not None else temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a full disk, or an interrupt: the partial temp file goes (it holds the space)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise _named(err, path) from None
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Like ``write_text_atomic``, with the temp name ``.NAME.tmp-<pid>`` (hidden while it is written)."""
    write_atomic(path, data, temp=path.with_name(f".{path.name}{TMP_SUFFIX}-{os.getpid()}"))


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_directory_atomic(target: str | os.PathLike, fill: Callable[[Path], object],
                           staging: str | os.PathLike | None = None, old: str | os.PathLike | None = None) -> Path:
    """Assemble a directory with ``fill(staging)`` beside ``target`` and swap it in whole; return ``target``.

    ``staging`` is where it is assembled (default: a fresh ``.NAME.tmp-<pid>-<random>``; a given one left by an
    earlier process of this pid is removed first). Everything in it then gets the modes of anything the user
    creates (a temp directory is made 0700, and copied files keep their source's mode: colleagues could not read
    the result) and is fsynced. An existing ``target`` is exchanged with ``staging`` in one step (Linux
    ``renameat2(RENAME_EXCHANGE)``), so ``target`` is at every moment either the complete old directory or the
    complete new one; the old one, now under the staging name, is then deleted (a kill before that leaves it to
    the caller's clean-up of stale staging directories). Where the system or the filesystem cannot exchange, the
    old directory is first renamed to ``old`` (default ``.NAME.old-<pid>``). A failure removes ``staging``,
    leaves ``target`` as it was and raises; an ``OSError`` (a full disk) names ``target``, the destination (the
    copy of a file would otherwise name its source)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}{os.getpid()}-", dir=target.parent))
    else:
        staging = Path(staging)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    try:
        try:
            fill(staging)
            _settle(staging)
            _swap(staging, target, Path(old) if old else target.with_name(f".{target.name}.old-{os.getpid()}"))
        except OSError as err:
            raise _named(err, target) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _settle(staging: Path) -> None:
    """Give everything under ``staging`` the user's modes and fsync it, deepest first (links are left alone)."""
    umask = _current_umask()
    for directory, _, files in sorted(os.walk(staging), key=lambda entry: -len(Path(entry[0]).parts)):
        for name in files:
            file = Path(directory) / name
            if file.is_symlink():
                continue
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(directory, 0o777 & ~umask)
        fsync_dir(directory)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the
    filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap(staging: Path, target: Path, old: Path) -> None:
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)
    elif target.exists():
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_dir(target.parent)
