"""``python -m data_prep split LIST --tasks N --task I``: the inputs array task I of N prepares.

Why in Python: the SLURM array script (``slurm/data_prep_array.sbatch``) prepares one corpus in parallel, one shard
directory ``OUT/part-<I>`` per task, and training reads them together (``data.path='OUT/part-*'``). How the input
list is cut decides what each part holds, so it lives here, where a test runs it for several tasks without SLURM.

The list has one input per line (a file, a directory or a glob, as ``shards --input`` takes them; several
space-separated paths on one line stay together in one task); blank lines and lines starting with ``#`` are
skipped. Task ``I`` of ``N`` takes the contiguous lines ``[I*L//N, (I+1)*L//N)`` of the ``L`` lines: every line
goes to exactly one task, the tasks differ by at most one line, and the parts in task order hold the inputs in
list order. With ``N`` = ``L`` (the default) task ``I`` takes line ``I``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.errors import DataPrepError


def read_input_list(path: str | Path) -> list[list[str]]:
    """The input groups of a list file: one per non-blank, non-comment line, split on whitespace."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataPrepError(f"cannot read the input list {path}: {err.strerror or err}") from None
    groups = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not groups:
        raise DataPrepError(f"the input list {path} names no input (one file, directory or glob per line)")
    return groups


def task_inputs(groups: list[list[str]], task: int, tasks: int | None = None) -> list[str]:
    """The inputs of array task ``task`` of ``tasks`` (default: one task per group)."""
    tasks = len(groups) if tasks is None else tasks
    if tasks < 1 or tasks > len(groups):
        raise DataPrepError(f"--tasks {tasks}: the list has {len(groups)} input line(s), so use 1 to {len(groups)} "
                            "tasks (a task with no input would write an empty part)")
    if not 0 <= task < tasks:
        raise DataPrepError(f"--task {task} is not one of the {tasks} tasks 0..{tasks - 1}: submit with "
                            f"--array=0-{tasks - 1}")
    lines = groups[task * len(groups) // tasks:(task + 1) * len(groups) // tasks]
    return [path for line in lines for path in line]


def part_name(task: int) -> str:
    """The shard directory of one task inside OUT (``part-00003``), which ``OUT/part-*`` matches in task order."""
    return f"part-{task:05d}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("list", metavar="LIST", help="input list: one file, directory or glob per line")
    parser.add_argument("--task", type=int, required=True, metavar="I", help="this array task (0-based)")
    parser.add_argument("--tasks", type=int, default=None, metavar="N",
                        help="number of array tasks the list is split into (default: one per line)")
    parser.add_argument("--part-name", action="store_true",
                        help="print the task's part directory name (part-NNNNN) instead of its inputs")


def run(args: argparse.Namespace) -> int:
    inputs = task_inputs(read_input_list(args.list), args.task, args.tasks)
    print(part_name(args.task) if args.part_name else "\n".join(inputs))
    return 0
