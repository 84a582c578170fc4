"""Resuming a ZeRO run on another number of ranks: DeepSpeed universal checkpoints, made on demand.

A ZeRO checkpoint holds each rank's slice of the fp32 weights and AdamW moments, cut for the world size it was
saved with. DeepSpeed's ``ds_to_universal`` conversion rewrites it as one file per parameter and state (``fp32``,
``exp_avg``, ``exp_avg_sq``) plus the optimizer's global state, and an engine configured with
``"checkpoint": {"load_universal": true}`` loads that on any number of ranks and cuts its own slices (ZeRO 1, 2
and 3). When a resumed run finds that its checkpoint was saved on another number of ranks, the launching process
(global rank 0) converts it before training starts; the other ranks wait for the result.

The conversion is written to ``CHECKPOINT/universal/`` (inside the checkpoint directory, so it goes away with the
checkpoint when Lightning rotates old ones; the original files are not touched). It is built in a temp directory
``CHECKPOINT/.universal.tmp-PID`` and renamed into place only when complete, after a record of what it was made
from (``conversion.json``) and the sha256 of every file in it (``SHA256SUMS``, ``sha256sum -c`` format: one list
rather than a ``NAME.sha256`` beside each file, since DeepSpeed's universal loader takes every name in a parameter's
folder that contains ``.pt`` as a state to load). A killed conversion leaves only a temp directory, which the next
attempt deletes; one conversion of a checkpoint runs at a time (a lock file, ``CHECKPOINT/.universal.lock``), so two
concurrent ones never delete each other's temp directory. Before DeepSpeed reads a universal directory without
restrictions, every file is compared with ``SHA256SUMS`` (a damaged one is refused, naming the file) and read with the
restricted unpickler; DeepSpeed is then told to load the tag ``checkpoint`` (``pretrain.strategies``), never the one
``latest_universal`` names.

``python -m pretrain.reshard CHECKPOINT`` runs the same conversion by hand (e.g. ahead of a requeue on fewer
nodes); training does it by itself when needed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from data_prep.atomic_io import write_directory_atomic
from pretrain.checkpointing import safe_load
from pretrain.checkpointing.files import CHECKSUM_SUFFIX, sha256_of
from pretrain.checkpointing.find import (DEEPSPEED_TAG, CheckpointError, is_deepspeed_checkpoint, read_metadata,
                                  verify_checkpoint)

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # CHECKPOINT/universal/: {latest_universal, conversion.json, checkpoint/{*.pt, zero/...}}
RECORD = "conversion.json"
SUMS = "SHA256SUMS"  # CHECKPOINT/universal/SHA256SUMS: "<sha256>  checkpoint/zero/NAME/fp32.pt" per file
LOCK = f".{UNIVERSAL}.lock"
TEMP_PREFIX = f".{UNIVERSAL}.tmp-"
POLL_SECONDS = 2.0


class ReshardError(CheckpointError):
    """A checkpoint that cannot be converted or loaded on another number of ranks; the message says what to do."""


def saved_world_size(checkpoint: Path) -> int:
    """The number of data-parallel ranks a ZeRO checkpoint was saved with."""
    saved = read_metadata(checkpoint).get("dp_world_size")
    if saved is None:
        raise ReshardError(f"{checkpoint}: no dp_world_size in its DeepSpeed record; not a ZeRO training checkpoint")
    return int(saved)


def _record_for(checkpoint: Path) -> dict[str, Any]:
    meta = read_metadata(checkpoint)
    return {"global_step": int(meta["global_step"]), "dp_world_size": int(meta["dp_world_size"]),
            "source_files": sorted(p.name for p in (checkpoint / DEEPSPEED_TAG).glob("*.pt"))}


def _problem(checkpoint: Path, target: Path) -> str | None:
    """Why ``target`` is not a complete universal conversion of ``checkpoint`` (None when it is)."""
    if not target.is_dir():
        return "missing"
    try:
        record = json.loads((target / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"no readable {RECORD} ({err})"
    if record != _record_for(checkpoint):
        return f"{RECORD} describes another checkpoint ({record})"
    if not (target / "latest_universal").is_file() or not (target / DEEPSPEED_TAG / "zero").is_dir():
        return "incomplete (no latest_universal or zero/)"
    if not (target / SUMS).is_file():
        return f"no {SUMS} (converted by an older version, without checksums)"
    return None


def _files(target: Path) -> list[Path]:
    """Every file DeepSpeed may read from a universal directory."""
    return sorted(p for p in (target / DEEPSPEED_TAG).rglob("*") if p.is_file())


def _write_sums(target: Path) -> None:
    lines = [f"{sha256_of(f)}  {f.relative_to(target).as_posix()}\n" for f in _files(target)]
    (target / SUMS).write_text("".join(lines), encoding="utf-8")


def _check_sums(target: Path) -> None:
    """Every file of ``target`` matches the sha256 recorded at conversion, and none is missing or added."""
    sums = target / SUMS
    redo = f"remove {target} and convert again (`python -m pretrain.reshard {target.parent}`; resuming does it too)"
    recorded: dict[str, str] = {}
    try:
        for line in sums.read_bytes().decode("ascii").splitlines():
            digest, _, name = line.partition("  ")
            if len(digest) != 64 or not name:
                raise ValueError(line[:80])
            recorded[name] = digest
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ReshardError(f"{sums}: damaged checksum list ({type(err).__name__}: {err}); {redo}") from None
    present = {f.relative_to(target).as_posix(): f for f in _files(target)}
    for name in sorted(set(recorded) - set(present)):
        raise ReshardError(f"{target / name}: missing from the universal checkpoint (listed in {SUMS}); {redo}")
    for name, file in present.items():
        if name not in recorded:
            raise ReshardError(f"{file}: not written by the conversion (not in {SUMS}); {redo}")
        actual = sha256_of(file)
        if actual != recorded[name]:
            raise ReshardError(f"{file}: its sha256 {actual[:16]}... differs from {recorded[name][:16]}... recorded "
                               f"in {SUMS} at conversion (damaged since); {redo}")


def _verify_files(target: Path) -> None:
    """Check every file against ``SHA256SUMS``, then restricted-read every file DeepSpeed will unpickle without
    restrictions (memory-mapped where possible)."""
    _check_sums(target)
    for file in sorted((target / DEEPSPEED_TAG).rglob("*.pt")):
        try:
            safe_load.load(file, deepspeed=True)
        except safe_load.ForbiddenContentError:
            raise
        except safe_load.UnsafeCheckpointError:
            # a file torch cannot memory-map (legacy, non-zip format) is read whole
            try:
                safe_load.load(file, mmap=False, deepspeed=True)
            except safe_load.UnsafeCheckpointError as err:
                raise ReshardError(str(err)) from None


class _ConversionLock:
    """One conversion of a checkpoint at a time (``fcntl.lockf`` on ``CHECKPOINT/.universal.lock``, dropped by the
    kernel when the holder dies). ``wait=False`` refuses at once when another process holds it."""

    def __init__(self, checkpoint: Path, wait: bool) -> None:
        self.path, self.wait, self.fd = checkpoint / LOCK, wait, None

    def __enter__(self) -> _ConversionLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)  # a filesystem without locks: go on as before (temp names are per process)
                log.warning("%s: the filesystem refuses locks (%s); converting without one", self.path, err.strerror)
                return self
            holder = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip() or "another process"
            if not self.wait:
                os.close(fd)
                raise ReshardError(f"{self.path.parent}: {holder} is converting it now; wait for it to finish (the "
                                   "result is then used as it is)") from None
            log.info("waiting for %s, which is converting %s", holder, self.path.parent)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (deleting it would race a new holder)
            self.fd = None


def remove_stale_temps(checkpoint: Path) -> list[Path]:
    """Delete what killed conversions left in ``checkpoint`` (only our ``.universal.tmp-PID`` directories)."""
    removed = []
    for path in Path(checkpoint).resolve().glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def convert(checkpoint: Path, workers: int | None = None, wait: bool = True) -> Path:
    """Write ``CHECKPOINT/universal`` (unless a complete one is there already) and return its path.

    Runs DeepSpeed's ``ds_to_universal`` into a temp directory beside the result, records the source and the
    checksums, and swaps it in whole (fsynced, :func:`data_prep.atomic_io.write_directory_atomic`), holding the
    checkpoint's conversion lock (``wait``: wait for another holder, else refuse). Memory: DeepSpeed loads one
    rank's optimizer file at a time per worker process."""
    checkpoint = Path(checkpoint).resolve()
    if not is_deepspeed_checkpoint(checkpoint):
        raise ReshardError(f"{checkpoint}: not a DeepSpeed (ZeRO) checkpoint directory; only ZeRO state needs "
                           "re-partitioning (file checkpoints resume on any number of ranks)")
    target = checkpoint / UNIVERSAL
    if _problem(checkpoint, target) is None:
        _verify_files(target)
        return target
    with _ConversionLock(checkpoint, wait):
        return _convert_locked(checkpoint, target, workers)


def _convert_locked(checkpoint: Path, target: Path, workers: int | None) -> Path:
    problem = _problem(checkpoint, target)  # another process may have converted it while this one waited
    if problem is None:
        _verify_files(target)
        return target
    verify_checkpoint(checkpoint)  # DeepSpeed's conversion unpickles every shard without restrictions
    for path in remove_stale_temps(checkpoint):
        log.warning("removed %s, left by a conversion that was interrupted", path)
    if target.exists():
        log.warning("replacing %s: %s", target, problem)
    from deepspeed.checkpoint import ds_to_universal

    workers = workers or max(1, min(4, os.cpu_count() or 1))

    def fill(tmp: Path) -> None:
        source = tmp / "source"  # DeepSpeed's files only: it takes any file named like a shard, NAME.pt.sha256 too
        source.mkdir()
        for file in (checkpoint / DEEPSPEED_TAG).iterdir():
            if not file.name.endswith(CHECKSUM_SUFFIX):
                (source / file.name).symlink_to(file)
        args = SimpleNamespace(input_folder=str(source), output_folder=str(tmp / DEEPSPEED_TAG),
                               num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                               keep_temp_folder=False, strict=True,
                               inject_missing_state=True)  # Lightning records no Megatron layout info: none needed
        try:
            ds_to_universal.main(args)  # writes tmp/checkpoint/... and tmp/latest_universal
        except (AssertionError, KeyError, RuntimeError, NotImplementedError, FileNotFoundError) as err:
            raise ReshardError(f"{checkpoint}: DeepSpeed could not convert it to a universal checkpoint "
                               f"({type(err).__name__}: {err}); resume with the {saved_world_size(checkpoint)} "
                               "ranks it was saved with") from None
        shutil.rmtree(source)
        _write_sums(tmp)
        (tmp / RECORD).write_text(json.dumps(_record_for(checkpoint), indent=2) + "\n", encoding="utf-8")

    started = time.monotonic()
    # assembled in .universal.tmp-PID (what remove_stale_temps removes after a kill), swapped in whole
    write_directory_atomic(target, fill, staging=checkpoint / f"{TEMP_PREFIX}{os.getpid()}",
                           old=checkpoint / f"{TEMP_PREFIX}{os.getpid()}-old")
    log.info("converted %s to a universal checkpoint in %.1f s", checkpoint, time.monotonic() - started)
    return target


def wait_for(checkpoint: Path, timeout_s: float) -> Path:
    """On ranks other than the launching one: wait until rank 0 has finished the conversion."""
    checkpoint = Path(checkpoint).resolve()
    target = checkpoint / UNIVERSAL
    deadline = time.monotonic() + timeout_s
    while _problem(checkpoint, target) is not None:
        if time.monotonic() > deadline:
            raise ReshardError(
                f"{target}: rank 0 did not finish converting {checkpoint} for another number of ranks within "
                f"{timeout_s / 60:.0f} min (see rank 0's error; strategy.timeout_minutes sets the wait), or run "
                f"`python -m pretrain.reshard {checkpoint}` first")
        time.sleep(POLL_SECONDS)
    _verify_files(target)
    return target


def prepare(checkpoint: Path, world_size: int, launching: bool, timeout_s: float) -> Path:
    """The directory to resume from on ``world_size`` ranks: the universal form of ``checkpoint``, converted by
    the launching process and awaited by the others."""
    saved = saved_world_size(checkpoint)
    if not launching:
        return wait_for(checkpoint, timeout_s)
    log.info("%s was saved on %d ranks, this run has %d: resuming from its universal form (re-partitioned "
             "weights and optimizer state)", checkpoint, saved, world_size)
    return convert(checkpoint)


def enable_universal_load(config: dict) -> None:
    """Tell the DeepSpeed engine (configured from ``config`` when training starts) to load universal checkpoints."""
    config.setdefault("checkpoint", {})["load_universal"] = True
