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
from (``conversion.json``); a killed conversion leaves only a temp directory, which the next attempt deletes. Every
file of a universal directory is read with the restricted unpickler before DeepSpeed reads it without restrictions.

``python -m pretrain.reshard CHECKPOINT`` runs the same conversion by hand (e.g. ahead of a requeue on fewer
nodes); training does it by itself when needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from data_prep.atomic_io import fsync_dir
from pretrain import safe_load
from pretrain.checkpoint_io import CHECKSUM_SUFFIX
from pretrain.checkpoints import (DEEPSPEED_TAG, CheckpointError, is_deepspeed_checkpoint, read_metadata,
                                  verify_checkpoint)

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # CHECKPOINT/universal/: {latest_universal, conversion.json, checkpoint/{*.pt, zero/...}}
RECORD = "conversion.json"
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
    return None


def _verify_files(target: Path) -> None:
    """Restricted-read every file DeepSpeed will unpickle without restrictions (memory-mapped where possible)."""
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


def remove_stale_temps(checkpoint: Path) -> list[Path]:
    """Delete what killed conversions left in ``checkpoint`` (only our ``.universal.tmp-PID`` directories)."""
    removed = []
    for path in Path(checkpoint).resolve().glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def convert(checkpoint: Path, workers: int | None = None) -> Path:
    """Write ``CHECKPOINT/universal`` (unless a complete one is there already) and return its path.

    Runs DeepSpeed's ``ds_to_universal`` into a temp directory beside the result, records the source, fsyncs and
    renames it into place. Memory: DeepSpeed loads one rank's optimizer file at a time per worker process."""
    checkpoint = Path(checkpoint).resolve()
    if not is_deepspeed_checkpoint(checkpoint):
        raise ReshardError(f"{checkpoint}: not a DeepSpeed (ZeRO) checkpoint directory; only ZeRO state needs "
                           "re-partitioning (file checkpoints resume on any number of ranks)")
    target = checkpoint / UNIVERSAL
    problem = _problem(checkpoint, target)
    if problem is None:
        _verify_files(target)
        return target
    verify_checkpoint(checkpoint)  # DeepSpeed's conversion unpickles every shard without restrictions
    for path in remove_stale_temps(checkpoint):
        log.warning("removed %s, left by a conversion that was interrupted", path)
    if target.exists():
        log.warning("replacing %s: %s", target, problem)
    from deepspeed.checkpoint import ds_to_universal

    tmp = checkpoint / f"{TEMP_PREFIX}{os.getpid()}"
    source = tmp / "source"  # DeepSpeed's files only: it takes any file named like a shard, NAME.pt.sha256 too
    source.mkdir(parents=True)
    for file in (checkpoint / DEEPSPEED_TAG).iterdir():
        if not file.name.endswith(CHECKSUM_SUFFIX):
            (source / file.name).symlink_to(file)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    args = SimpleNamespace(input_folder=str(source), output_folder=str(tmp / DEEPSPEED_TAG),
                           num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                           keep_temp_folder=False, strict=True,
                           inject_missing_state=True)  # Lightning records no Megatron layout info: none needed
    started = time.monotonic()
    try:
        try:
            ds_to_universal.main(args)  # writes tmp/checkpoint/... and tmp/latest_universal
        except (AssertionError, KeyError, RuntimeError, NotImplementedError, FileNotFoundError) as err:
            raise ReshardError(f"{checkpoint}: DeepSpeed could not convert it to a universal checkpoint "
                               f"({type(err).__name__}: {err}); resume with the {saved_world_size(checkpoint)} "
                               "ranks it was saved with") from None
        shutil.rmtree(source)
        (tmp / RECORD).write_text(json.dumps(_record_for(checkpoint), indent=2) + "\n", encoding="utf-8")
        for file in sorted(tmp.rglob("*")):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        for directory in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
            fsync_dir(directory)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(checkpoint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


class ElasticResume(Callback):
    """Fix-ups after DeepSpeed has loaded a checkpoint into a run with another layout.

    - ZeRO-3's universal loader (``deepspeed/runtime/zero/stage3.py``) gives every parameter group the
      hyperparameters of the first one, which would apply weight decay to biases and LayerNorm weights: the saved
      per-group values are put back. It also stores one and the same ``step`` tensor in the AdamW state of every
      sub-group, which AdamW then increments once per sub-group and step (wrong bias correction): each gets its own.

    (A changed accumulation, the same global batch on another number of ranks, is re-aligned for every strategy by
    ``pretrain.global_batch.AccumulationOnResume``.)
    """

    def __init__(self, universal: Path) -> None:
        self.universal = universal

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._restore_group_hyperparameters(trainer)

    def _restore_group_hyperparameters(self, trainer) -> None:
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None or engine.zero_optimization_stage() != 3:
            return
        saved = safe_load.load(self.universal / DEEPSPEED_TAG / "zero" / "optimizer_state.pt", mmap=False,
                               deepspeed=True)
        groups = saved.get("optimizer_state_dict", saved).get("param_groups") or saved.get("param_groups")
        current = engine.optimizer.optimizer.param_groups
        if groups is None or len(groups) != len(current):
            raise ReshardError(f"{self.universal}: {len(groups or [])} saved parameter groups for "
                               f"{len(current)} in this run")
        for group, saved_group in zip(current, groups):
            for key, value in saved_group.items():
                if key != "params":
                    group[key] = value
        for state in engine.optimizer.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.reshard",
        description="Convert a DeepSpeed ZeRO checkpoint directory to DeepSpeed's universal form "
                    "(CHECKPOINT/universal), so that it resumes on any number of ranks. Training does this by itself "
                    "when it resumes on another number of ranks; run it by hand to do it ahead of time.")
    parser.add_argument("checkpoint", type=Path,
                        help="a ZeRO checkpoint directory: RUN/checkpoints/last.ckpt or RUN/checkpoints/step-N.ckpt")
    parser.add_argument("--workers", type=int, default=None, help="processes extracting rank files (default: up to 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.checkpoint.exists():
            raise ReshardError(f"{args.checkpoint}: no such checkpoint directory")
        target = convert(args.checkpoint, workers=args.workers)
        saved = saved_world_size(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or args.checkpoint}: {err.strerror or err}; free space or check permissions, "
              "then run the command again", file=sys.stderr)
        return 2
    print(f"wrote {target} (saved on {saved} ranks; resumes on any number)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
