"""``python -m pretrain.reshard CHECKPOINT``: convert a DeepSpeed ZeRO checkpoint to its universal form by hand.

Training does the same conversion by itself when it resumes on another number of ranks
(:mod:`pretrain.checkpointing.reshard`); running it ahead of time (e.g. before a requeue on fewer nodes) keeps that
work out of the job's start-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_prep.cli_errors import one_line_errors
from pretrain.checkpointing.find import CheckpointError
from pretrain.checkpointing.reshard import ReshardError, convert, saved_world_size


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
    with one_line_errors(CheckpointError, where=args.checkpoint,
                         hint="free space or check permissions, then run the command again") as outcome:
        if not args.checkpoint.exists():
            raise ReshardError(f"{args.checkpoint}: no such checkpoint directory")
        target = convert(args.checkpoint, workers=args.workers, wait=False)
        saved = saved_world_size(args.checkpoint)
        print(f"wrote {target} (saved on {saved} ranks; resumes on any number)")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
