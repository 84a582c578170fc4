"""``python -m pretrain.export CKPT OUT``: turn a training checkpoint into HuggingFace directories.

Writes ``OUT/hf`` (the MLM model for v2; the GDES-merged discriminator for v3) and, for v3, ``OUT/hf_generator``,
each with the tokenizer the shards were made with (checked against the checksum the checkpoint recorded) and
``export_info.json`` naming the checkpoint and its step. An existing, non-empty ``OUT/hf`` is replaced only with
``--overwrite``, and then whole, in one step (never a mix of old and new files). Exports into one OUT take its lock (:mod:`pretrain.run.lock`, shared with training), so what a
killed export left there is removed safely by the next one.

Works on any checkpoint written by ``pretrain``: a Lightning ``.ckpt`` file, or a DeepSpeed ZeRO checkpoint
directory (consolidated to fp32 first).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpointing.find import (DEEPSPEED_TAG, CheckpointError, is_deepspeed_checkpoint, read_metadata,
                                  verify_checkpoint)
from data_prep.cli_errors import one_line_errors
from pretrain import hf
from pretrain.model import DebertaConfig
from pretrain.objectives.base import PretrainingObjective, SpecialTokens
from pretrain.objectives.build import ObjectiveSettings, build_objective
from pretrain.run.lock import RunLock, RunLockedError

log = logging.getLogger(__name__)


class ExportError(ValueError):
    pass


def export_objective(objective: PretrainingObjective, output_dir: Path, tokenizer_dir: Path,
                     info: dict[str, Any] | None = None) -> list[Path]:
    """Write ``output_dir/hf`` (and ``hf_generator``), each replaced whole, with ``info`` (the step it came from) in
    its ``export_info.json``: at the end of training, by this command and by the probes. The caller holds
    ``output_dir``'s run lock, so what an export killed there before left behind (``.hf.tmp-*``: a full model copy)
    is removed first."""
    written = []
    for name, model in objective.export_models().items():
        for stale in hf.remove_stale_staging(output_dir, name):
            log.warning("removed %s, left by an export that was interrupted", stale)
        written.append(hf.save_pretrained(model, output_dir / name, tokenizer=tokenizer_dir, info=info))
    return written


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed ZeRO checkpoint directory (any stage, any number of ranks): DeepSpeed
    merges the per-rank fp32 partitions of the optimizer state, so nothing is lost to half precision."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DEEPSPEED_TAG)
    wrapper = "_forward_module."  # Lightning's wrapper around the LightningModule inside the DeepSpeed engine
    return {k[len(wrapper):] if k.startswith(wrapper) else k: v for k, v in state.items()}


def load_objective(checkpoint_path: Path):
    """The objective with the checkpoint's weights, and the tokenizer directory recorded at training time.

    Accepts a Lightning ``.ckpt`` file or a DeepSpeed checkpoint directory (``last.ckpt`` under a DeepSpeed
    strategy links to one); in the latter the run record sits in DeepSpeed's rank-0 client state."""
    if not checkpoint_path.exists():
        raise ExportError(f"{checkpoint_path}: no such checkpoint file or directory")
    try:
        checkpoint = read_metadata(checkpoint_path)
        verify_checkpoint(checkpoint_path)  # DeepSpeed's consolidation unpickles every shard without restrictions
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    record = checkpoint.get("deberta_pretrain")
    if not record:
        raise ExportError(f"{checkpoint_path}: not a checkpoint written by `python -m pretrain` (no run record)")
    objective = build_objective(DebertaConfig(**record["model"]), ObjectiveSettings(**record["objective"]),
                                SpecialTokens(**record["special_tokens"]))
    weights = (consolidated_state_dict(checkpoint_path) if is_deepspeed_checkpoint(checkpoint_path)
               else checkpoint["state_dict"])
    prefix = "objective."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    objective.load_state_dict(state)
    return objective, Path(record["tokenizer_dir"])


def check_destinations(out: Path, names, overwrite: bool) -> None:
    """A directory the user already has at ``OUT/hf`` (an earlier export, with notes or fine-tuning files beside
    it) is not replaced unless asked."""
    for name in names:
        target = out / name
        if target.exists() and not target.is_dir():
            raise ExportError(f"{target}: exists and is not a directory; move it away or choose another OUT")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise ExportError(f"{target}: exists and is not empty; pass --overwrite to replace it whole (files you "
                              "added there are deleted too), or choose another OUT")


def check_tokenizer(checkpoint_path: Path, tokenizer: Path) -> None:
    """The tokenizer about to be shipped must be the one the checkpoint was trained with (its checksum is in the
    run record): the recorded directory may since hold another tokenizer (shards re-made in place), and a model
    shipped with another tokenizer reads other ids for every token. Checkpoints from before the checksum was
    recorded are not checked."""
    from data_prep.text_tokenizer import tokenizer_checksum

    record = read_metadata(checkpoint_path).get("deberta_pretrain") or {}
    expected = record.get("tokenizer_checksum")
    if not expected:
        return
    actual, files = tokenizer_checksum(tokenizer)
    if actual != expected:
        what = f"checksum {actual[:12]}..." if files else "no tokenizer files"
        raise ExportError(f"{tokenizer}: this tokenizer ({what}) is not the one {checkpoint_path} was trained with "
                          f"(checksum {expected[:12]}...); pass --tokenizer DIR with that tokenizer (the tokenizer/ "
                          "copy of the shard directory the run trained on)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file or DeepSpeed checkpoint directory from output_dir/checkpoints/")
    parser.add_argument("out", type=Path, help="directory to write hf/ (and hf_generator/) into")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, non-empty OUT/hf (and OUT/hf_generator) whole")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory to ship (default: the one recorded in the checkpoint)")
    args = parser.parse_args(argv)
    # an OSError: a full disk, a read-only or missing output directory
    with one_line_errors(ExportError, RunLockedError, where=args.out,
                         hint="free space or choose another OUT") as outcome:
        objective, tokenizer_dir = load_objective(args.checkpoint)
        tokenizer = args.tokenizer or tokenizer_dir
        if not tokenizer.is_dir():
            raise ExportError(f"{tokenizer}: the tokenizer recorded in the checkpoint is gone; pass --tokenizer DIR")
        names = list(objective.export_models())
        step = int(read_metadata(args.checkpoint).get("global_step", 0))
        check_tokenizer(args.checkpoint, tokenizer)
        with RunLock(args.out):  # one export (or run) at a time into OUT
            check_destinations(args.out, names, args.overwrite)
            info = {"step": step, "checkpoint": str(args.checkpoint.resolve())}
            for path in export_objective(objective, args.out, tokenizer, info):
                print(f"wrote {path}")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
