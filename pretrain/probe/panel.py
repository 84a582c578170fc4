"""The downstream part of a run's report: each task's headline metric against the pretraining step.

A run's probes live in ``RUN/probes/`` (where ``python -m pretrain.probe --watch RUN`` writes by default, or any
``--out RUN/probes``). From its ``probes.csv`` the report draws, per task (headline metric from ``tasks.json``, on
dev, else the first split scored): the mean over seeds at each probed checkpoint with a mean ± std band, and
horizontal lines for the baselines found in the same file: ``random:...`` models (random initialisation, step 0)
and models without a pretraining step (an exported or released directory, e.g. the checkpoint a continued run
started from). Several runs are overlaid, each in its own colour. The end-of-run summary prints the newest
checkpoint's row of the same numbers (:func:`latest_lines`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.probe import results

PROBES_DIR = "probes"


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)


@dataclass
class TaskProbes:
    task: str
    metric: str
    split: str
    curve: Curve  # the run's checkpoints
    baselines: dict[str, tuple[float, float]]  # label -> (mean, std): random init, starting checkpoint


def headline_metrics(out: Path, rows: list[dict[str, str]]) -> dict[str, str]:
    """task -> headline metric: recorded in ``tasks.json``; the first metric of the task's rows otherwise."""
    try:
        known = json.loads((out / results.TASKS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    metrics: dict[str, str] = {}
    for row in rows:
        metrics.setdefault(row["task"], (known.get(row["task"]) or {}).get("metric") or row["metric"])
    return metrics


def load(run: Path) -> list[TaskProbes]:
    """The run's downstream results per task (empty when it has none, or the file cannot be read)."""
    out = Path(run) / PROBES_DIR
    try:
        rows = results.read_rows(out)
    except (results.ResultsError, OSError, ValueError):
        return []
    metrics = headline_metrics(out, rows)
    table = results.summary(rows, metrics)
    found = []
    for task, metric in metrics.items():
        cells = [t for t in table if t["task"] == task]
        splits = sorted({t["split"] for t in cells}, key=lambda s: (s != "dev", s))
        split = splits[0]
        cells = [t for t in cells if t["split"] == split]
        curve, baselines = Curve(), {}
        for t in sorted(cells, key=lambda t: t["step"]):
            if t["model"].startswith("random:"):
                baselines["random init"] = (t["mean"], t["std"])
            elif t["step"] < 0:
                baselines[Path(t["model"].rstrip("/")).name or t["model"]] = (t["mean"], t["std"])
            elif t["step"] > 0 and t["step"] not in curve.steps:
                curve.steps.append(t["step"])
                curve.means.append(t["mean"])
                curve.stds.append(t["std"])
        found.append(TaskProbes(task, metric, split, curve, baselines))
    return found


def draw(ax, task: str, runs: list[tuple[str, list[TaskProbes], str]]) -> None:
    """One task's panel: for each (run name, its probes, colour) the curve with its band, and the baselines."""
    styles = {"random init": ":"}
    title = task
    for name, probes, color in runs:
        for probe in probes:
            if probe.task != task:
                continue
            title = f"downstream: {task} ({probe.split} {probe.metric})"
            curve = probe.curve
            if curve.steps:
                ax.plot(curve.steps, curve.means, "-", color=color, marker="o", markersize=3, linewidth=1.6,
                        label=f"{name}" if len(runs) > 1 else "checkpoints")
                ax.fill_between(curve.steps, [m - s for m, s in zip(curve.means, curve.stds)],
                                [m + s for m, s in zip(curve.means, curve.stds)], color=color, alpha=0.2)
            for label, (mean, _) in probe.baselines.items():
                ax.axhline(mean, color=color, linestyle=styles.get(label, "--"), linewidth=1.2,
                           label=f"{label} ({name})" if len(runs) > 1 else label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")


def latest_lines(run: Path) -> list[str]:
    """The summary's lines: per task, the newest probed checkpoint's mean ± std, and the baselines."""
    lines = []
    for probe in load(run):
        parts = []
        if probe.curve.steps:
            parts.append(f"step {probe.curve.steps[-1]:,} {probe.curve.means[-1]:.4f} ± {probe.curve.stds[-1]:.4f}")
        parts += [f"{label} {mean:.4f} ± {std:.4f}" for label, (mean, std) in probe.baselines.items()]
        if parts:
            lines.append(f"{probe.task} {probe.split} {probe.metric}: " + ", ".join(parts))
    return lines
