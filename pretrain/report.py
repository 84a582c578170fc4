"""``python -m pretrain.report RUN [RUN...]``: one picture of a run (or several, overlaid) from its ``metrics.csv``.

Why: ``metrics.csv`` is always written (no logger service needed), but a table of numbers does not show whether a
run learns. The report draws the objective's parts (v2: MLM loss; v3: the generator's MLM loss, the RTD loss and
their weighted total), the learning rate, throughput, MFU where it was measured, validation loss/perplexity when
the run has a validation set, and for v3 how well the discriminator finds replaced tokens (AUC, precision,
recall). Panels without data in any run are left out. When a run has downstream probes (``RUN/probes/probes.csv``,
written by ``python -m pretrain.probe --watch RUN``), each task gets a panel of its headline metric against the
pretraining step, with a mean ± std band over seeds and the random-init and starting-model baselines as lines.
Training calls :func:`write_report` at its end, so every finished run has ``RUN/report.png``; this command redraws
it at any time, also while the run is still going (or being probed).
"""

from __future__ import annotations

import argparse
import io
import math
from dataclasses import dataclass
from pathlib import Path

from data_prep.atomic_io import write_bytes_atomic
from data_prep.cli_errors import one_line_errors
from pretrain.run.loggers import counts_from_one, read_rows

METRICS_FILE = "metrics.csv"
REPORT_FILE = "report.png"
FORMATS = (".png", ".svg", ".pdf")


class ReportError(Exception):
    """A run directory or output path the report cannot use; the message says what to do."""


@dataclass(frozen=True)
class Series:
    column: str
    label: str  # shown in the legend when a panel holds several series of one run
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    varying: bool = False  # drawn only when the value changes within a run (a plan: stages, batch warm-up)


def _panels() -> tuple[Panel, ...]:
    return (
        Panel("MLM loss (v3: generator)", (Series("train/mlm_loss", "train"), Series("val/mlm_loss", "validation", "--"))),
        Panel("RTD loss (discriminator)", (Series("train/rtd_loss", "train"), Series("val/rtd_loss", "validation", "--"))),
        Panel("total loss (mlm + rtd_weight x rtd)", (Series("train/loss", "train"), Series("val/loss", "validation", "--"))),
        Panel("validation perplexity (MLM)", (Series("val/perplexity", "validation", "--"),)),
        Panel("replaced-token AUC", (Series("train/discriminator_auc", "train"),
                                     Series("val/discriminator_auc", "validation", "--"))),
        Panel("replaced-token precision / recall", (Series("train/discriminator_precision", "precision"),
                                                    Series("train/discriminator_recall", "recall", ":"))),
        Panel("masked-token accuracy", (Series("train/mlm_accuracy", "train"), Series("train/generator_accuracy", "train"),
                                        Series("val/mlm_accuracy", "validation", "--"),
                                        Series("val/generator_accuracy", "validation", "--"))),
        Panel("learning rate", (Series("lr-AdamW/pg1", "lr"),)),
        Panel("tokens/s", (Series("perf/tokens_per_sec", "tokens/s"),)),
        Panel("MFU", (Series("perf/mfu", "MFU"),)),
        Panel("tokens per optimizer step", (Series(TOKENS_PER_STEP, "tokens per step"),), varying=True),
        Panel("sequence length", (Series("data/seq_len", "seq_len"),), varying=True),
    )


TOKENS_SEEN = "data/tokens_seen"
TOKENS_PER_STEP = "data/tokens_per_step"  # data/global_batch x data/seq_len, derived when the run is read
X_AXES = ("step", "tokens")


@dataclass
class Run:
    name: str
    directory: Path
    columns: dict[str, tuple[list[int], list[float]]]  # column -> (steps, values)
    objective: str  # "rtd" or "mlm", from the columns


def load_run(directory: Path) -> Run:
    """The run's metrics per column, by step: the optimizer step just completed (step N = after N updates), as
    ``metrics.csv`` numbers its rows; a file written before that numbering (0-based) is shifted by one."""
    path = directory / METRICS_FILE
    if not directory.is_dir():
        raise ReportError(f"{directory}: no such run directory")
    if not path.is_file():
        raise ReportError(f"{directory}: no {METRICS_FILE} in it; a training run writes one "
                          f"(`python -m pretrain ... output_dir={directory}`), give its output_dir")
    header, rows = read_rows(str(path))
    offset = 0 if counts_from_one(header) else 1
    if not rows:
        raise ReportError(f"{path}: no logged step yet; run longer than trainer.log_every_n_steps steps")
    columns: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        step = int(float(row["step"])) + offset
        for key, text in row.items():
            if key in ("step", "epoch"):
                continue
            try:
                value = float(text)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                steps, values = columns.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    if "val/perplexity" not in columns and "val/mlm_loss" in columns:  # perplexity of the masked-token predictions
        steps, losses = columns["val/mlm_loss"]
        columns["val/perplexity"] = (steps, [math.exp(min(v, 50.0)) for v in losses])
    if "data/global_batch" in columns and "data/seq_len" in columns:
        lengths = dict(zip(*columns["data/seq_len"]))
        steps, batches = columns["data/global_batch"]
        kept = [(s, b * lengths[s]) for s, b in zip(steps, batches) if s in lengths]
        columns[TOKENS_PER_STEP] = ([s for s, _ in kept], [t for _, t in kept])
    objective = "rtd" if "train/rtd_loss" in columns else "mlm"
    return Run(directory.name or str(directory), directory, columns, objective)


def tokens_at(run: Run, steps: list[int]) -> list[float]:
    """Tokens seen after each of ``steps``: the logged ``data/tokens_seen`` where the step has a row, linearly
    interpolated between rows elsewhere (e.g. a validation step between two logging steps)."""
    import numpy as np

    if TOKENS_SEEN not in run.columns:
        raise ReportError(f"{run.directory}: its {METRICS_FILE} has no {TOKENS_SEEN} column (the run was made before "
                          "tokens seen were logged); draw it with --x step")
    known_steps, known_tokens = run.columns[TOKENS_SEEN]
    return np.interp(steps, [0, *known_steps], [0.0, *known_tokens]).tolist()  # step 0: no token seen yet


def _unique_names(runs: list[Run]) -> None:
    """Label runs by directory name, or by more of the path where two names collide."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        for run in runs:
            run.name = str(run.directory)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points: per-step losses are noisy; the trend is what the eye needs."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def select_panels(runs: list[Run]) -> list[Panel]:
    """The panels with data in at least one run (a plan's panel: data that changes within a run)."""
    panels = []
    for panel in _panels():
        if panel.title.startswith("total loss") and all(r.objective == "mlm" for r in runs):
            continue  # v2: the total is the MLM loss
        present = [r.columns[s.column][1] for s in panel.series for r in runs if s.column in r.columns]
        if any(len(set(values)) > (1 if panel.varying else 0) for values in present):
            panels.append(panel)
    return panels


def figure(runs: list[Run], title: str | None = None, x: str = "step"):
    """The report as a matplotlib figure: the training panels, then one downstream panel per probed task
    (:mod:`pretrain.probe.panel`) when a run has ``RUN/probes/probes.csv``. ``x="tokens"`` draws the training panels
    against the tokens seen (runs with other batch sizes, stages or a batch warm-up compare at equal data)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed (clusters, CI)
    import matplotlib.pyplot as plt

    from pretrain.probe import panel as downstream

    panels = select_panels(runs)
    probes = [downstream.load(r.directory) for r in runs]
    tasks = list(dict.fromkeys(p.task for found in probes for p in found))
    if not panels and not tasks:
        raise ReportError(f"{', '.join(str(r.directory) for r in runs)}: nothing to draw: no column of "
                          f"{METRICS_FILE} is one the report knows (losses, learning rate, throughput)")
    if x == "tokens":
        for run in runs:
            tokens_at(run, [])  # a run without tokens seen is named before anything is drawn
    ncols = min(3, len(panels) + len(tasks))
    nrows = math.ceil((len(panels) + len(tasks)) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.1 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(list(axes.flat)[len(panels):], tasks):
        downstream.draw(ax, task, [(r.name, found, colors[i % len(colors)]) for i, (r, found) in
                                   enumerate(zip(runs, probes))])
        ax.set_xlabel("pretraining step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax, panel in zip(axes.flat, panels):
        labelled_parts = set()
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for series in panel.series:
                if series.column not in run.columns:
                    continue
                steps, values = run.columns[series.column]
                if x == "tokens":
                    steps = tokens_at(run, steps)
                window = max(1, len(values) // 40)
                if window > 1:  # the raw points faint, their trailing mean on top
                    ax.plot(steps, values, series.style, color=color, alpha=0.25, linewidth=0.8)
                    values = _smooth(values, window)
                marker = "o" if len(steps) < 30 else None
                ax.plot(steps, values, series.style, color=color, linewidth=1.6, marker=marker, markersize=3)
                labelled_parts.add((series.label, series.style))
        if len(labelled_parts) > 1:  # e.g. train and validation: a legend of line styles, in black
            handles = [plt.Line2D([], [], color="black", linestyle=style, label=label)
                       for label, style in sorted(labelled_parts, key=lambda p: p[1] != "-")]
            ax.legend(handles=handles, fontsize=8, loc="best")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("tokens seen" if x == "tokens" else "step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) + len(tasks):]:
        ax.set_visible(False)
    if len(runs) > 1:
        handles = [plt.Line2D([], [], color=colors[i % len(colors)], linewidth=2, label=r.name) for i, r in enumerate(runs)]
        fig.legend(handles=handles, loc="upper center", ncol=min(4, len(runs)), fontsize=9, frameon=False)
    heading = title or (str(runs[0].directory) if len(runs) == 1 else None)
    if heading:
        fig.suptitle(heading, fontsize=11, y=0.995 if len(runs) == 1 else 0.96)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if len(runs) > 1 else 0.97))
    return fig


def render(runs: list[Run], title: str | None = None, image_format: str = "png", x: str = "step") -> bytes:
    """The report figure as bytes of ``image_format``."""
    import matplotlib.pyplot as plt

    fig = figure(runs, title, x)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def write_report(run_dirs: list[Path], out: Path | None = None, title: str | None = None, x: str = "step") -> Path:
    """Draw ``run_dirs`` into ``out`` (default ``RUN/report.png`` for one run), atomically; returns the path."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    if out is None:
        if len(run_dirs) > 1:
            raise ReportError("several runs are drawn into one picture: say where it goes with --out FILE.png")
        out = run_dirs[0] / REPORT_FILE
    if out.suffix.lower() not in FORMATS:
        raise ReportError(f"--out {out}: name a {', '.join(FORMATS)} file")
    if not out.parent.is_dir():
        raise ReportError(f"--out {out}: the directory {out.parent} does not exist")
    _unique_names(runs)
    write_bytes_atomic(out, render(runs, title, out.suffix.lower().lstrip("."), x))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.report",
        description="Plot a training run's metrics.csv: loss parts, learning rate, tokens/s, MFU, validation "
                    "loss/perplexity and, for v3, replaced-token AUC/precision/recall; and, when RUN/probes/probes.csv "
                    "exists, each probed task's metric per checkpoint. Several runs are overlaid.",
        epilog="examples:\n  python -m pretrain.report outputs/quickstart/run            # -> outputs/quickstart/run/report.png\n"
               "  python -m pretrain.report runs/a runs/b --out compare.png\n"
               "  python -m pretrain.report runs/a runs/b --x tokens --out by-tokens.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run directory (the output_dir of training)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"image to write (.png, .svg or .pdf); default RUN/{REPORT_FILE} for one run")
    parser.add_argument("--title", default=None, help="heading of the figure (default: the run's name)")
    parser.add_argument("--x", choices=X_AXES, default="step",
                        help="x-axis of the training panels: the optimizer step (default), or the tokens seen, to "
                             "compare runs with other batch sizes, sequence-length stages or a batch warm-up")
    args = parser.parse_args(argv)
    with one_line_errors(ReportError, where=args.out, disk_full_hint="free space there or choose another --out, then "
                                                                     "run the command again") as outcome:
        print(write_report(args.runs, args.out, args.title, args.x))
    outcome.exit_on_error()


if __name__ == "__main__":
    main()
