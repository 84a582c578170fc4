"""Finding and reading training checkpoints, whether Lightning files or DeepSpeed ZeRO directories.

A run directory can hold two kinds of resumable checkpoints: ``checkpoints/last.ckpt`` (written every
``checkpoint_every_n_steps``) and ``hpc_ckpt_N.ckpt`` (written by Lightning's SLURM environment when the job gets
its pre-timeout signal, just before it requeues itself). Resuming must take whichever is newest. Under DeepSpeed
each "checkpoint" is a directory: Lightning's own metadata (global step, loops, callbacks, our ``deberta_pretrain``
run record) is DeepSpeed's *client state*, stored in rank 0's model-states file inside it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pretrain.settings import SettingsError

DEEPSPEED_TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under


class CheckpointError(SettingsError):
    """A checkpoint that cannot be used; the message says which path and what to do."""


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / DEEPSPEED_TAG).is_dir()


def _rank0_states_file(path: Path) -> Path:
    tag_dir = path / DEEPSPEED_TAG
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{path}: a DeepSpeed checkpoint directory without rank 0's model states in "
                          f"{tag_dir} (interrupted while saving?); resume from an older checkpoint")


def read_metadata(path: Path) -> dict[str, Any]:
    """Lightning's checkpoint dict without the weights' guarantee: for a file, everything (memory-mapped); for a
    DeepSpeed directory, DeepSpeed's rank-0 record, which holds Lightning's client state (global_step,
    deberta_pretrain, ...) plus ``dp_world_size``."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        return torch.load(_rank0_states_file(path), map_location="cpu", weights_only=False, mmap=True)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    raise CheckpointError(f"{path}: neither a checkpoint file nor a DeepSpeed checkpoint directory "
                          f"(one with a '{DEEPSPEED_TAG}/' folder)")


def _complete(path: Path) -> bool:
    """DeepSpeed writes ``latest`` after the shards, so a directory without it was interrupted while saving."""
    if path.is_dir():
        return (path / "latest").is_file() and (path / DEEPSPEED_TAG).is_dir()
    return path.is_file()


def resume_candidates(output_dir: Path) -> list[Path]:
    """``checkpoints/last.ckpt`` and the SLURM requeue checkpoints ``hpc_ckpt_N.ckpt``, complete ones only."""
    paths = [output_dir / "checkpoints" / "last.ckpt"]
    paths += [p for p in output_dir.glob("hpc_ckpt_*.ckpt") if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", p.name)]
    return [p for p in paths if _complete(p)]


def newest_checkpoint(output_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint to resume from and its global step: the highest step; on a tie ``last.ckpt`` (listed
    first), so a run that was never signalled resumes exactly as before."""
    best: tuple[Path, int] | None = None
    for path in resume_candidates(Path(output_dir)):
        step = int(read_metadata(path)["global_step"])
        if best is None or step > best[1]:
            best = (path, step)
    return best


def check_resumable(path: Path, deepspeed: bool, world_size: int) -> None:
    """Fail before training when the checkpoint cannot be resumed by this strategy and number of ranks."""
    if is_deepspeed_checkpoint(path) != deepspeed:
        kind = "a DeepSpeed (ZeRO) checkpoint directory" if is_deepspeed_checkpoint(path) else "a single-file checkpoint"
        raise CheckpointError(
            f"{path} is {kind}, but this run uses {'a DeepSpeed' if deepspeed else 'a non-DeepSpeed'} strategy: "
            "resume with the strategy the run was started with, or export the weights (`python -m pretrain.export "
            f"{path} OUT`) and start a new output_dir from them")
    if not deepspeed:
        return  # Lightning files hold full states; the data position is global: any number of ranks resumes
    saved = int(read_metadata(path).get("dp_world_size", world_size))
    if saved != world_size:
        raise CheckpointError(
            f"{path} holds ZeRO state partitioned over {saved} ranks, but this run has {world_size} "
            "(trainer.devices x trainer.num_nodes): ZeRO cannot re-partition optimizer state. Resume with "
            f"{saved} ranks, or consolidate the weights (`python -m pretrain.export {path} OUT`) and start a new "
            "output_dir from them (the optimizer state is then lost)")
