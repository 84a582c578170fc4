"""``probes.csv``: one row per (model, pretraining step, task, split, seed, metric), and the tables made from it.

Every cell (model, step, task, seed) is written at once: the file is rewritten beside itself with the new rows and
swapped in (``os.replace``), so a probe killed at any point leaves either all of a cell's rows or none, and a
re-run skips exactly the cells whose rows are there.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from data_prep.atomic_io import write_json_atomic, write_text_atomic

RESULTS = "probes.csv"
TASKS = "tasks.json"
COLUMNS = ["model", "step", "task", "split", "seed", "metric", "value"]


class ResultsError(ValueError):
    """An existing results file this probe cannot add to."""


def read_rows(out: Path) -> list[dict[str, str]]:
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ResultsError(f"{path}: header {reader.fieldnames} is not {COLUMNS}; move the file away or pass "
                             "another --out")
        return list(reader)


def cell_key(model: str, step: int | str, task: str, seed: int | str) -> tuple[str, str, str, str]:
    return str(model), str(step), str(task), str(seed)


def done_cells(out: Path) -> set[tuple[str, str, str, str]]:
    return {cell_key(r["model"], r["step"], r["task"], r["seed"]) for r in read_rows(out)}


def append_cell(out: Path, model: str, step: int | str, task: str, seed: int,
                scores: dict[str, dict[str, float]]) -> None:
    """Add one cell's rows (``scores[split][metric]``), atomically."""
    rows = read_rows(out) + [
        {"model": model, "step": str(step), "task": task, "split": split, "seed": str(seed), "metric": metric,
         "value": f"{value:.6g}"}
        for split, metrics in scores.items() for metric, value in metrics.items()]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out) / RESULTS, buffer.getvalue())


def record_task(out: Path, name: str, info: dict[str, Any]) -> None:
    """Keep each task's type, label list (ids index it) and headline metric next to the results."""
    path = Path(out) / TASKS
    import json

    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if known.get(name) != info:
        known[name] = info
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, known)


def summary(rows: list[dict[str, str]], metrics: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (model, step, task, split, metric); ``metrics`` (task -> metric) keeps
    only each task's headline metric."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if metrics and metrics.get(r["task"], r["metric"]) != r["metric"]:
            continue
        step = int(r["step"]) if r["step"].lstrip("-").isdigit() else -1
        groups[(r["model"], step, r["task"], r["split"], r["metric"])].append(float(r["value"]))
    out = []
    for (model, step, task, split, metric), values in sorted(groups.items()):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out.append({"model": model, "step": step, "task": task, "split": split, "metric": metric, "mean": mean,
                    "std": std, "seeds": len(values)})
    return out


def format_table(table: list[dict[str, Any]]) -> str:
    header = ["model", "step", "task", "split", "metric", "mean ± std", "seeds"]
    lines = [[str(t["model"]), "" if t["step"] < 0 else str(t["step"]), t["task"], t["split"], t["metric"],
              f"{t['mean']:.4f} ± {t['std']:.4f}", str(t["seeds"])] for t in table]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *lines])
