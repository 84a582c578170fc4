"""Checkpoint writes that a kill or a full disk cannot half-do, on any filesystem layout.

Lightning's default save serialises into memory and then writes through an fsspec transaction, whose temp file
lives in ``$TMPDIR``: on a cluster that is node-local while ``output_dir`` is on Lustre/NFS, so the final move is a
copy that first truncates the old ``last.ckpt``. A kill or ENOSPC during that copy left a 0-byte or partial
``last.ckpt`` and a full-size temp file in ``$TMPDIR``. Here the temp file is created in the destination directory
(mode 0666 minus the umask, like any file the user writes), written, flushed and fsynced, renamed over the target
with ``os.replace`` (atomic within one directory) and the directory is fsynced, so the target is always either the
old complete file or the new complete one. A failed save removes its temp file and raises; the previous
checkpoints are untouched.

DeepSpeed writes its checkpoint directories itself (each ``step-N.ckpt/`` is new, and ``latest`` is written last),
and ``last.ckpt`` is then a link to the newest: Lightning re-creates it by deleting the old link first. Here the new
link is made under a temp name and renamed over the old one, so ``last.ckpt`` never disappears. Each rank's files
go through DeepSpeed's checkpoint engine, which is given the same writer: every ``*.pt`` of a DeepSpeed checkpoint
is written atomically and gets its own ``NAME.pt.sha256`` beside it, written by the rank that wrote the file (no
rank re-reads another's files, and no collective is added to the save).

Nothing here imports Lightning: the Lightning side (``AtomicCheckpointIO``, ``RunCheckpoint``) is
:mod:`pretrain.checkpointing.callbacks`, so the checkpoint files can be written and checked without the training stack.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from data_prep.atomic_io import fsync_dir, write_atomic

TEMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>" beside their target; never a checkpoint candidate


def temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")


CHECKSUM_SUFFIX = ".sha256"  # NAME.ckpt.sha256 beside each file checkpoint, `sha256sum -c` format


class _RecordingWriter:
    """A file wrapper that hashes what is written (the checksum costs no second read) and keeps the ``OSError``
    of a failed write: torch's zip writer turns it into a bare ``RuntimeError: file write failed``, losing the
    errno (ENOSPC, EDQUOT) the user needs to see."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        try:
            written = self.f.write(data)
        except OSError as err:
            self.error = err
            raise
        self.sha256.update(memoryview(data)[:written] if written is not None else data)
        return written

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: Any, target: str | os.PathLike) -> None:
    """``torch.save(obj, target)`` through a temp file in ``target``'s directory (see the module docstring).
    A failed write raises ``OSError`` naming ``target``, and leaves neither a temp file nor a changed target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = None

    def write(f) -> None:
        nonlocal writer
        writer = _RecordingWriter(f)
        torch.save(obj, writer)

    try:
        write_atomic(target, write, temp=temp_path(target))
    except BaseException as err:
        cause = err if isinstance(err, OSError) else (writer.error if writer is not None else None)
        if cause is not None:
            raise OSError(cause.errno, f"saving a checkpoint failed: {cause.strerror}", str(target)) from None
        raise
    _write_text_atomic(checksum_path(target), f"{writer.sha256.hexdigest()}  {target.name}\n")


def checksum_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + CHECKSUM_SUFFIX)


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text, temp=temp_path(path))


def _recorded_sha256(record: Path) -> tuple[str | None, str]:
    """The digest in a ``NAME.sha256`` file, or None and why it cannot be read (empty, not text, not a digest)."""
    try:
        fields = record.read_bytes().decode("ascii").split()
    except OSError as err:
        return None, f"its checksum file {record.name} cannot be read ({err.strerror or err})"
    except UnicodeDecodeError:
        return None, f"its checksum file {record.name} is damaged (not text)"
    if not fields or len(fields[0]) != 64 or any(c not in "0123456789abcdef" for c in fields[0].lower()):
        return None, f"its checksum file {record.name} is damaged ({'empty' if not fields else 'no sha256 in it'})"
    return fields[0].lower(), ""


def embedded_checksum_problem(path: Path) -> str | None:
    """Why ``path`` fails the CRC-32 that torch's zip format stores for every record (tensor data included), or
    None when every record matches. The check for a file whose ``.sha256`` is missing (copied without it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:  # zlib/struct errors
        return (f"no {path.name}{CHECKSUM_SUFFIX} beside it, and it is not a readable torch zip file with checksums "
                f"of its own ({str(err)[:200] or type(err).__name__})")
    if bad is not None:
        return (f"no {path.name}{CHECKSUM_SUFFIX} beside it, and its record {bad} fails the CRC-32 stored in the "
                "file (damaged)")
    return None


def sha256_of(path: Path) -> str:
    """The sha256 of a file (followed through links), read in 16 MiB blocks: checkpoints are gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_problem(checkpoint: Path, required: bool = False) -> str | None:
    """Why ``checkpoint`` (a file) does not match the sha256 recorded when it was written, or None.

    A file without its ``.sha256`` (copied without it, or written by an older version) is checked against the
    CRC-32 values torch's zip format keeps for each record instead, so a flipped byte is never trusted unchecked;
    with ``required`` a missing ``.sha256`` is itself the problem (files this project always checksums). A damaged
    ``.sha256`` (empty, not text) is a problem like a damaged checkpoint: the caller falls back to an older one."""
    record = checksum_path(checkpoint)
    if not checkpoint.is_file():
        return None
    if not record.exists():
        if required:
            return f"no {record.name} beside it (every such file is written with one)"
        return embedded_checksum_problem(checkpoint)
    expected, why = _recorded_sha256(record)
    if expected is None:
        return why
    actual = sha256_of(checkpoint)
    if actual != expected:
        return (f"its sha256 {actual[:16]}... differs from {expected[:16]}... recorded in {record.name} "
                "when it was written (damaged since, or a kill between the file and its checksum)")
    return None


def write_checksum(path: Path) -> None:
    """Write ``NAME.sha256`` beside an existing file (files written by others, e.g. DeepSpeed's conversion)."""
    _write_text_atomic(checksum_path(path), f"{sha256_of(path)}  {path.name}\n")


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files a killed save left in ``directory`` (only ours: ``.<name>.tmp-<pid>`` beside a checkpoint,
    its checksum or a DeepSpeed shard file inside ``step-N.ckpt/checkpoint/``)."""
    removed = []
    if directory.is_dir():
        for pattern in (f".*{TEMP_MARK}*", f"*.ckpt/*/.*{TEMP_MARK}*"):
            for path in directory.glob(pattern):
                if path.is_file() or path.is_symlink():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


class ChecksummedEngineSave:
    """Wraps a DeepSpeed checkpoint engine so that each file it saves goes through :func:`save_atomic` (temp file
    in the destination directory, fsync, rename, ``NAME.sha256`` beside it); everything else is delegated."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def save(self, state_dict, path) -> None:
        save_atomic(state_dict, path)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def checksum_deepspeed_saves(strategy) -> None:
    """Give a DeepSpeed strategy's engine the checksummed atomic writer (no-op for other strategies)."""
    engine = getattr(strategy, "deepspeed_engine", None)
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None or isinstance(checkpoint_engine, ChecksummedEngineSave):
        return
    if type(checkpoint_engine).__name__ != "TorchCheckpointEngine":
        return  # Nebula / decoupled engines write elsewhere or asynchronously: left as configured
    engine.checkpoint_engine = ChecksummedEngineSave(checkpoint_engine)


def replace_link(target: str, linkpath: str) -> None:
    """Point ``linkpath`` at ``target`` (relative), atomically: a new link under a temp name, renamed over."""
    link = Path(linkpath)
    tmp = temp_path(link)
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.is_dir() and not link.is_symlink():  # a real directory from an older layout: rename cannot replace it
        shutil.rmtree(link)
    os.replace(tmp, link)
    fsync_dir(link.parent)
