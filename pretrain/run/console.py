"""What a training run prints: each message once, a step progress bar, and a closing summary.

Why: Lightning prints its INFO lines through its own stderr handler *and* through the root logger that Hydra sets
up (stdout and the run's log file), so each appeared twice; it also prints promotional tips and a model table
whose FLOPs column is always 0 here, and dependencies warn about things only their maintainers can change. The
filters below are specific (one message each), so every other warning still reaches the user. The progress bar
counts optimizer steps against ``trainer.max_steps`` (also after a resume, where Lightning's own bar shows
``60/?``) and shows the objective's parts instead of the total loss alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_TIPS = _DropMessages("💡 Tip")  # Lightning advertising its cloud products (litlogger, litmodels)
# Logged while the step bar is still open, so it lands glued to the bar's line and the bar's close draws the bar a
# second time below it; the closing summary says the same ("steps N / N").
_FIT_STOPPED = _DropMessages("`Trainer.fit` stopped: `max_steps=")


def quiet_console() -> None:
    """Print each message once and drop the noise the user cannot act on (idempotent)."""
    if logging.getLogger().handlers:  # the root logger prints (Hydra's console + log file): not Lightning's own too
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:
                lightning.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for noise in (_TIPS, _FIT_STOPPED):
        if noise not in rank_zero.filters:
            rank_zero.addFilter(noise)
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    # The SLURM scripts (slurm/) launch ranks through srun; a run started by hand on a node where srun exists is
    # deliberate, and Lightning's hint would tell the user to wrap this very command in srun.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used",
                            category=PossibleUserWarning)
    # A resume finds its own checkpoints in checkpoints/: that is how it resumes, not a reason to warn.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty", category=UserWarning)
    # torch's advice on data.num_workers above the cores, once per loader; the run's sanity check (pretrain.run.sanity)
    # says it once, with the value to use.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    # torch deprecated its LeafSpec class; Lightning's pytree helper still builds one (nothing to change here).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def _short(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value / 1000:.0f}k" if magnitude < 1_000_000 else f"{value / 1e6:.1f}M"
    return f"{value:.3g}" if magnitude < 1 else f"{value:.4g}"


# (label on the bar, logged metric): the objective's parts, the validation's, then throughput. v3 validation shows
# its parts (the weighted total, mlm + rtd_weight x rtd, says little beside them); v2's val/loss is the MLM loss (over
# every predicted token), shown alone: its val/mlm_loss (the mean of the batches' means) would repeat it.
BAR_METRICS = (("mlm", "train/mlm_loss"), ("rtd", "train/rtd_loss"), ("auc", "train/discriminator_auc"),
               ("val", "val/loss"), ("val_mlm", "val/mlm_loss"), ("val_rtd", "val/rtd_loss"),
               ("val_auc", "val/discriminator_auc"), ("tok/s", "perf/tokens_per_sec"))
V3_VALIDATION = "val/rtd_loss"  # logged by RTD validation only


def bar_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    """The bar's ``label=value`` pairs from the logged metrics (v3 validation: its parts instead of the total; v2:
    the total, which is its MLM loss)."""
    repeated = "val/loss" if V3_VALIDATION in metrics else "val/mlm_loss" if "val/loss" in metrics else None
    shown = {}
    for label, key in BAR_METRICS:
        if key in metrics and key != repeated:
            shown[label] = _short(float(metrics[key]))
    return shown


class StepProgressBar(TQDMProgressBar):
    """Optimizer steps out of ``trainer.max_steps`` (ETA from this session's pace), with the loss parts."""

    _console: contextlib.ExitStack | None = None  # console logging redirected around the bar (a terminal only)

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(desc="train", total=trainer.max_steps if trainer.max_steps > 0 else None,
                    initial=trainer.global_step, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, smoothing=0, unit="step")

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._side_bar(self.validation_description, has_main_bar, leave=not has_main_bar)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._side_bar(self.sanity_check_description, 0, leave=False)

    def _side_bar(self, description: str, offset: int, leave: bool) -> Tqdm:
        """Lightning's validation bars, on a terminal only: they draw below the step bar with cursor-movement codes
        and erase themselves when done, which in a log file (stdout not a terminal) leaves escape codes and
        half-drawn lines. The step bar shows the validation results when it is over."""
        return Tqdm(desc=description, position=2 * self.process_position + offset,
                    disable=self.is_disabled or not sys.stdout.isatty(), leave=leave, dynamic_ncols=True,
                    file=sys.stdout, bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._redirect_console_logging()

    def _redirect_console_logging(self) -> None:
        """On a terminal, a message logged while the bar is drawn would land glued to the bar's line and the bar
        would be drawn again below it; while the bar is open, console log lines go through ``tqdm.write``, which
        clears the bar, prints the line and redraws the bar under it. Log files are not affected."""
        if self._console is not None or self.is_disabled or not sys.stderr.isatty():
            return
        from tqdm.contrib.logging import _is_console_logging_handler, logging_redirect_tqdm

        loggers = [logger for logger in (logging.getLogger(), logging.getLogger("lightning"))
                   if any(_is_console_logging_handler(h) for h in logger.handlers)]
        self._console = contextlib.ExitStack()
        self._console.enter_context(logging_redirect_tqdm(loggers, tqdm_class=Tqdm))

    def _restore_console_logging(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None

    def on_train_end(self, *args: Any) -> None:
        super().on_train_end(*args)
        self._restore_console_logging()

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        self._restore_console_logging()
        super().teardown(*args, **kwargs)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self._train_progress_bar is None or self._train_progress_bar.disable:
            return
        # Lightning resets the bar to the epoch's batches; here it stays on the run's steps
        bar = self._train_progress_bar
        if bar.n != trainer.global_step:
            bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
            bar.initial = bar.n = trainer.global_step
        bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self._train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable:
            return
        if step % self.refresh_rate == 0 or step == trainer.max_steps:
            _update_n(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # the bar spans the run, not an epoch (closed at the end of training)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            _update_n(bar, trainer.global_step)  # the step reached, also between refreshes
            bar.close()  # before the closing message, not redrawn after it
        self._restore_console_logging()

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        return bar_metrics(trainer.callback_metrics)


@dataclass
class RunSummary:
    """The closing block: what was trained, how fast, how it ended, where the results are."""

    output_dir: Path
    step: int
    max_steps: int
    start_step: int
    tokens_per_step: int
    seconds: float
    metrics: dict[str, float]
    exported: list[Path]
    report: Path | None
    probes: list[str] = field(default_factory=list)  # the newest probed checkpoint per task (pretrain.probe.panel)
    final_step: int | None = None  # the step the final values were logged at, when it is not ``step``
    tokens_seen: int | None = None  # tokens of the stream consumed (stages, batch warm-up); else step x tokens_per_step
    session_tokens: int | None = None  # of those, the tokens this session consumed

    def lines(self) -> list[str]:
        trained = self.step - self.start_step
        tokens = self.step * self.tokens_per_step if self.tokens_seen is None else self.tokens_seen
        session = trained * self.tokens_per_step if self.session_tokens is None else self.session_tokens
        minutes, seconds = divmod(int(round(self.seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        wall = f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"
        speed = session / self.seconds if self.seconds > 0 else 0.0
        out = [f"run finished: {self.output_dir}",
               f"  steps       {self.step:,} / {self.max_steps:,}"
               + (f" (resumed at step {self.start_step:,})" if self.start_step and trained > 0 else ""),
               f"  tokens      {tokens:,} seen"]
        if trained > 0:
            out += [f"  wall time   {wall} this session", f"  tokens/s    {speed:,.0f}"]
        else:  # the same command again after the run ended: say so rather than print a speed of 0
            out.append(f"  this session nothing to train: the run had reached trainer.max_steps={self.max_steps:,}"
                       " (a larger value trains on)")
        parts = [(label, self.metrics.get(key)) for label, key in
                 (("mlm", "train/mlm_loss"), ("rtd", "train/rtd_loss"), ("total", "train/loss"),
                  ("replaced-token AUC", "train/discriminator_auc"))]
        if "train/rtd_loss" not in self.metrics:
            parts = parts[:1]  # v2: the total is the MLM loss
        losses = ", ".join(f"{label} {value:.4f}" for label, value in parts if value is not None)
        if losses:
            out.append(f"  final       {losses} (step {self.final_step or self.step:,})")
        validation = [(label, self.metrics.get(key)) for label, key in
                      (("loss", "val/loss"), ("perplexity", "val/perplexity"))]
        if V3_VALIDATION in self.metrics:  # v3: the parts as in the final line (val/loss is the weighted total)
            validation = [(label, self.metrics.get(key)) for label, key in
                          (("mlm", "val/mlm_loss"), ("rtd", "val/rtd_loss"), ("total", "val/loss"),
                           ("replaced-token AUC", "val/discriminator_auc"))]
        if any(v is not None for _, v in validation):
            out.append("  validation  " + ", ".join(f"{k} {v:.4f}" for k, v in validation if v is not None))
        for path in self.exported:
            out.append(f"  model       {path}")
        if self.report is not None:
            out.append(f"  report      {self.report}")
        for i, line in enumerate(self.probes):
            out.append(f"  {'downstream' if i == 0 else '':<10}  {line}")
        return out
