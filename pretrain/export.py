"""``python -m pretrain.export CKPT OUT``: turn a training checkpoint into HuggingFace directories.

Writes ``OUT/hf`` (the MLM model for v2; the GDES-merged discriminator for v3) and, for v3, ``OUT/hf_generator``,
each with the tokenizer the shards were made with. Works on any Lightning checkpoint written by ``pretrain``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pretrain.model import DebertaConfig
from pretrain.objectives.base import SpecialTokens
from pretrain.settings import ObjectiveSettings
from pretrain.train import build_objective, export


class ExportError(ValueError):
    pass


def load_objective(checkpoint_path: Path):
    if not checkpoint_path.is_file():
        raise ExportError(f"{checkpoint_path}: no such checkpoint file")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    record = checkpoint.get("deberta_pretrain")
    if not record:
        raise ExportError(f"{checkpoint_path}: not a checkpoint written by `python -m pretrain` (no run record)")
    objective = build_objective(DebertaConfig(**record["model"]), ObjectiveSettings(**record["objective"]),
                                SpecialTokens(**record["special_tokens"]))
    prefix = "objective."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    objective.load_state_dict(state)
    return objective, Path(record["tokenizer_dir"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file from output_dir/checkpoints/")
    parser.add_argument("out", type=Path, help="directory to write hf/ (and hf_generator/) into")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory to ship (default: the one recorded in the checkpoint)")
    args = parser.parse_args(argv)
    try:
        objective, tokenizer_dir = load_objective(args.checkpoint)
        tokenizer = args.tokenizer or tokenizer_dir
        if not tokenizer.is_dir():
            raise ExportError(f"{tokenizer}: the tokenizer recorded in the checkpoint is gone; pass --tokenizer DIR")
        for path in export(objective, args.out, tokenizer):
            print(f"wrote {path}")
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
