"""Finding and reading training checkpoints, whether Lightning files or DeepSpeed ZeRO directories.

A run directory can hold three kinds of resumable checkpoints: ``checkpoints/last.ckpt`` and the periodic
``checkpoints/step-N.ckpt`` (written every ``checkpoint_every_n_steps``), and ``hpc_ckpt_N.ckpt`` (written by
Lightning's SLURM environment when the job gets its pre-timeout signal, just before it requeues itself). Resuming
takes the newest one that is complete and reads back; a damaged one is named with the reason and skipped, so a
truncated ``last.ckpt`` (a kill or a full disk while it was written) or a missing DeepSpeed ``last.ckpt`` link never
turns into a silent restart from step 0 over older good checkpoints. Under DeepSpeed each checkpoint is a
directory: Lightning's own metadata (global step, loops, callbacks, our ``deberta_pretrain`` run record) is
DeepSpeed's *client state*, stored in rank 0's model-states file inside it.

Every file is read with the restricted unpickler (:mod:`pretrain.checkpointing.safe_load`); a file that asks to run code stops
the run instead of being skipped, since it was put there on purpose.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.checkpointing import safe_load
from pretrain.settings import SettingsError

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under


class CheckpointError(SettingsError):
    """A checkpoint that cannot be used; the message says which path and what to do."""


class RefusedCheckpointError(CheckpointError):
    """A checkpoint file that asks to run code when read: never skipped over, the run stops."""


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / DEEPSPEED_TAG).is_dir()


def _rank0_states_file(path: Path) -> Path:
    tag_dir = path / DEEPSPEED_TAG
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{path}: a DeepSpeed checkpoint directory without rank 0's model states in "
                          f"{tag_dir} (interrupted while saving?); resume from an older checkpoint")


def _load(path: Path, deepspeed: bool = False) -> Any:
    try:
        return safe_load.load(path, deepspeed=deepspeed)
    except safe_load.ForbiddenContentError as err:
        raise RefusedCheckpointError(str(err)) from None
    except safe_load.UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from None


def read_metadata(path: Path) -> dict[str, Any]:
    """Lightning's checkpoint dict, read with the restricted unpickler and memory-mapped: for a file,
    everything; for a DeepSpeed directory, DeepSpeed's rank-0 record, which holds Lightning's client state
    (global_step, deberta_pretrain, ...) plus ``dp_world_size``."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        data = _load(_rank0_states_file(path), deepspeed=True)
    elif path.is_file():
        data = _load(path)
    else:
        raise CheckpointError(f"{path}: neither a checkpoint file nor a DeepSpeed checkpoint directory "
                              f"(one with a '{DEEPSPEED_TAG}/' folder)")
    if not isinstance(data, dict) or "global_step" not in data:
        raise CheckpointError(f"{path}: not a training checkpoint (no global_step in it)")
    return data


def verify_checkpoint(path: Path) -> None:
    """Restricted-read every file of a checkpoint before Lightning or DeepSpeed reads it (DeepSpeed unpickles its
    shard files with ``weights_only=False``): a crafted or damaged shard is refused here, naming the file. Each
    file is also compared with the sha256 recorded beside it when it was written (flipped bytes inside a tensor
    read back without error otherwise): the checkpoint file itself, or every ``*.pt`` of a DeepSpeed directory; a
    file copied without its ``.sha256`` is checked against the CRC-32s stored in it instead. Only the tag directory
    ``checkpoint/`` is verified, and only it is loaded: DeepSpeed is told the tag (``pretrain.strategies``), it never
    follows the ``latest`` file, which merely marks a finished save."""
    from pretrain.checkpointing.files import checksum_problem

    path = Path(path)
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    if is_deepspeed_checkpoint(path):
        files = sorted((path / DEEPSPEED_TAG).glob("*.pt"))
        for file in files:
            problem = checksum_problem(file)
            if problem:
                raise CheckpointError(f"{path}: {file.relative_to(path)}: {problem}")
        for file in files:
            _load(file, deepspeed=True)
    else:
        read_metadata(path)


def _complete(path: Path) -> bool:
    """DeepSpeed writes ``latest`` after the shards, so a directory without it was interrupted while saving."""
    if path.is_dir():
        return (path / "latest").is_file() and (path / DEEPSPEED_TAG).is_dir()
    return path.is_file()


def _interrupted_save(path: Path) -> bool:
    """A DeepSpeed checkpoint directory whose save never finished (DeepSpeed writes ``latest`` last)."""
    return path.is_dir() and not path.is_symlink() and not (path / "latest").exists()


def resume_candidates(output_dir: Path) -> list[Path]:
    """Every resumable checkpoint name in ``output_dir``, in tie-break order: ``checkpoints/last.ckpt``, SLURM's
    ``hpc_ckpt_N.ckpt``, then ``checkpoints/step-N.ckpt`` (a dangling ``last.ckpt`` link is listed too, so that
    it is reported)."""
    checkpoints = output_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    paths = [last] if last.exists() or last.is_symlink() else []
    paths += sorted((p for p in output_dir.glob("hpc_ckpt_*.ckpt") if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", p.name)),
                    key=lambda p: int(p.name[9:-5]), reverse=True)
    paths += sorted((p for p in checkpoints.glob("step-*.ckpt") if re.fullmatch(r"step-\d+\.ckpt", p.name)),
                    reverse=True)
    return paths


@dataclass
class ResumePoint:
    """The checkpoint to resume from, and the newer ones that were skipped with the reason."""

    path: Path
    step: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _step_or_reason(path: Path) -> tuple[int | None, str]:
    if path.is_symlink() and not path.exists():
        return None, "a link to a checkpoint that no longer exists"
    if not _complete(path):
        return None, "incomplete (the save was interrupted: no `latest` file)"
    try:
        return int(read_metadata(path)["global_step"]), ""
    except RefusedCheckpointError:
        raise  # crafted, not damaged: stop rather than skip
    except CheckpointError as err:
        return None, str(err).removeprefix(f"{path}: ")


def newest_checkpoint(output_dir: Path) -> ResumePoint | None:
    """The newest checkpoint that is complete and reads back (highest step; on a tie ``last.ckpt``, then
    ``hpc_ckpt_N``, then ``step-N``). Damaged ones are skipped and listed in ``skipped``; when checkpoints exist
    but none is usable this raises instead of letting the run start again from step 0 (unless they are all
    DeepSpeed saves that never finished: then no checkpoint was ever complete, and the run starts from step 0)."""
    output_dir = Path(output_dir)
    usable: list[tuple[int, int, Path]] = []
    bad: list[tuple[Path, str]] = []
    for order, path in enumerate(resume_candidates(output_dir)):
        step, reason = _step_or_reason(path)
        if step is None:
            bad.append((path, reason))
        else:
            usable.append((step, -order, path))
    for step, _, path in sorted(usable, reverse=True):
        try:
            verify_checkpoint(path)
        except RefusedCheckpointError:
            raise
        except CheckpointError as err:
            bad.append((path, str(err).removeprefix(f"{path}: ")))
            continue
        return ResumePoint(path, step, bad)
    if bad and all(_interrupted_save(p) for p, _ in bad):
        # only saves that never completed (a kill during the first DeepSpeed save): nothing to resume, like the
        # temp file of an interrupted file save; the directories are reported and re-written when reached again
        for path, why in bad:
            log.warning("not resuming from %s: %s; starting from step 0", path, why)
        return None
    if bad:
        listing = "\n  - ".join(f"{p}: {why}" for p, why in bad)
        raise CheckpointError(
            f"{output_dir} holds checkpoints but none can be resumed:\n  - {listing}\nRestore a good checkpoint "
            f"from a backup, or move {output_dir} away (or choose another output_dir) to start from step 0")
    return None


def check_resumable(path: Path, deepspeed: bool, world_size: int) -> bool:
    """Fail before training when the checkpoint cannot be resumed by this strategy; return whether it is ZeRO
    state saved on another number of ranks (to be re-partitioned through its universal form, ``pretrain.reshard``)."""
    if is_deepspeed_checkpoint(path) != deepspeed:
        kind = "a DeepSpeed (ZeRO) checkpoint directory" if is_deepspeed_checkpoint(path) else "a single-file checkpoint"
        raise CheckpointError(
            f"{path} is {kind}, but this run uses {'a DeepSpeed' if deepspeed else 'a non-DeepSpeed'} strategy: "
            "resume with the strategy the run was started with, or export the weights (`python -m pretrain.export "
            f"{path} OUT`) and start a new output_dir from them")
    if not deepspeed:
        return False  # Lightning files hold full states; the data position is global: any number of ranks resumes
    return int(read_metadata(path).get("dp_world_size", world_size)) != world_size
