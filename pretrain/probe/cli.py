"""``python -m pretrain.probe MODEL [MODEL...] --task TASK [--task ...]``: what a pretrained model is worth downstream.

Every (model, pretraining step, task, seed) cell fine-tunes a fresh task head, scores dev (and test) and appends
its rows to ``OUT/probes.csv`` in one atomic write; a re-run (after a kill, or with more models) skips the cells
already there. Ends with a mean ± std table over seeds of each task's headline metric.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from data_prep.cli_errors import one_line_errors
from pretrain import hf
from pretrain.probe import models, results
from pretrain.probe.cells import probe_source
from pretrain.probe.tasks import Task, TaskError, group_tasks, load_task, task_file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.probe", description=__doc__.split("\n\n", 1)[0].split(": ", 1)[1],
        epilog="MODEL: an exported hf/ directory or released DebertaV2 directory, a training checkpoint (.ckpt or "
               "DeepSpeed directory), a run directory (every checkpoint in it), or random:PATH (PATH's architecture "
               "with fresh weights).\nTASK: a task YAML's path (see pretrain/probe/tasks.py), or the name of a task "
               f"in the probe/ config group (conf/probe/): {', '.join(group_tasks())}.\n\nexample:\n"
               "  python -m pretrain.probe outputs/quickstart/run random:outputs/quickstart/run/hf --task en_sentiment\n"
               "  python -m pretrain.probe --watch outputs/quickstart/run --random-init --task en_sentiment",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL")
    parser.add_argument("--task", action="append", required=True, metavar="TASK", help="repeat for several tasks")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per cell (default 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default ./probes; RUN/probes with --watch RUN)")
    parser.add_argument("--watch", type=Path, default=None, metavar="RUN",
                        help="follow a training run: probe each checkpoint as it is written, until the run has "
                             "finished (see pretrain/probe/watch.py); MODELs, if any, are probed first")
    parser.add_argument("--random-init", action="store_true",
                        help="with --watch: also probe the run's architecture with fresh weights (random:RUN)")
    parser.add_argument("--poll", type=float, default=30.0, help="with --watch: seconds between looks (default 30)")
    parser.add_argument("--give-up-after", type=float, default=120.0, metavar="MINUTES",
                        help="with --watch: stop when the run has been stopped unfinished this long (default 120)")
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="also save each fine-tuned model as a transformers directory under DIR")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    parser.add_argument("--epochs", type=float, default=None, help="override the recipe's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (pair); longer are truncated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not args.models and args.watch is None:
        parser.error("give at least one MODEL, or --watch RUN")
    if args.out is None:
        args.out = args.watch / "probes" if args.watch is not None else Path("probes")
    return args


def _warnings_to_console() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("pretrain.probe")
    logger.addHandler(handler)
    logger.propagate = False


def load_tasks(args: argparse.Namespace) -> list[Task]:
    """Every task file checked before any training; each task's type, labels and metric recorded beside the rows."""
    tasks: list[Task] = [load_task(task_file(t)) for t in args.task]
    if len({t.name for t in tasks}) != len(tasks):
        raise TaskError(f"two tasks share a name ({[t.name for t in tasks]}); give each task file its own 'name'")
    for task in tasks:
        results.record_task(args.out, task.name, {"type": task.spec.type, "labels": task.labels,
                                                  "metric": task.spec.metric, "source": str(task.spec.source)})
    return tasks


def print_table(args: argparse.Namespace, tasks: list[Task]) -> list[dict]:
    metrics = {t.name: t.spec.metric for t in tasks}
    rows = [r for r in results.read_rows(args.out) if r["task"] in metrics]
    table = results.summary(rows, metrics)
    print(results.format_table(table))
    return table


def probe(args: argparse.Namespace) -> list[dict]:
    tasks = load_tasks(args)
    if args.watch:
        from pretrain.probe.watch import check_run

        check_run(args.watch)  # before any model is probed
    sources = [s for m in args.models for s in models.resolve(m)]
    for source in sources:
        skipped = probe_source(source, tasks, args)
        if skipped:
            print(f"warning: skipping {source.path}: {skipped}", file=sys.stderr)
    if args.watch:
        from pretrain.probe.watch import watch

        watch(args.watch, tasks, args)
    return print_table(args, tasks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _warnings_to_console()
    with one_line_errors(TaskError, models.ModelError, hf.CheckpointError, results.ResultsError) as outcome:
        probe(args)
    return outcome.status
