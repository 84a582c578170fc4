"""Speed of a downstream probe: one task x N seeds on a model directory, and the padding length grouping saves.

    python bench/probe_bench.py MODEL_DIR [--task zh_sentiment] [--seeds 3] [--max-length 128] [--threads N]

Prints the time per seed (fine-tuning with the recipe's defaults plus dev evaluation) and the share of padded
positions with length-grouped batches against batches in plain random order (the same rows, the same batch size).
A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import hf  # noqa: E402
from pretrain.probe import batching, models  # noqa: E402
from pretrain.probe.finetune import default_settings, finetune  # noqa: E402
from pretrain.probe.tasks import load_task, task_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a DebertaV2 directory with its tokenizer (e.g. RUN/hf)")
    parser.add_argument("--task", default="zh_sentiment")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task(task_file(args.task))
    tokenizer = batching.load_tokenizer(args.model)
    source = models.ModelSource(str(args.model), -1, "hf", args.model)
    factory = models.encoder_factory(source, args.model)
    settings = default_settings(len(task.rows["train"]), hf.load_config(args.model).hidden_size,
                                max_length=args.max_length)
    encoded = {split: batching.encode_split(task, split, tokenizer, settings.max_length) for split in task.rows}
    lengths = encoded["train"].lengths()
    grouped = batching.length_grouped_batches(lengths, settings.batch_size, seed=0)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    plain = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    print(f"task {task.name}: {len(lengths)} train rows; {settings.describe()}; device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"padding: {batching.padding_fraction(lengths, plain):.1%} of positions in random batches, "
          f"{batching.padding_fraction(lengths, grouped):.1%} with length grouping")
    times = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        _, scores = finetune(factory, task, encoded, tokenizer.pad_token_id, settings, seed, args.device)
        times.append(time.perf_counter() - start)
        print(f"seed {seed}: {times[-1]:.1f} s, dev {task.spec.metric} {scores['dev'][task.spec.metric]:.4f}")
    print(f"total {sum(times):.1f} s for {args.seeds} seeds")


if __name__ == "__main__":
    main()
