"""``metrics.csv`` with exactly one row per logged step, across any number of kills and resumes, and one step
numbering in every logger.

Step numbers: every logger (this CSV file, TensorBoard, wandb) writes a step's values under the number of the
optimizer step just completed, counted from 1: the row logged after the first optimizer step is step 1, the
learning rate in row N is the one step N trained with, and a validation that ran after step N is in row N. The
progress bar, the closing summary, the report and the checkpoint names (``step-N.ckpt``: N steps trained) use the
same number. Lightning hands its loggers ``_batches_that_stepped``, the count of optimizer steps finished before
the one being logged, which Lightning increments only after the step's logging; :class:`CompletedStepNumbers`
adds the one, and :class:`LoggedSteps` keeps that count equal to ``global_step`` at the start of every batch (Lightning
restores it from a checkpoint with guesses about where in a step the checkpoint was saved; a checkpoint saved at
the end of training, or on a stop after a validation, came back one step ahead, and every later row was labelled
and spaced one step off). ``metrics.csv`` lists ``step`` as its first column; a file written before this
numbering (0-based, columns in alphabetical order, ``epoch`` first) is recognised by its header
(:func:`counts_from_one`): the report shifts it by one, and a resume rewrites it in this numbering.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, writes one row per ``log_metrics`` call
(the learning-rate monitor, the training step and validation each add their own row for the same step) and
rewrites the whole file in place when a new column appears (a kill then leaves an empty file). This writer instead:

- merges every call for one step into one row; the row of the step in progress stays open (it is rewritten in
  place, one ``pwrite``, when more values for it arrive) until a later step is logged;
- appends finished rows with one ``write`` and rewrites the file atomically (temp file + ``os.replace``) only when
  the header grows, so a kill leaves every row already written intact;
- on resume keeps the rows of the steps up to the checkpoint's step (one per step, a half-written last line
  dropped) and drops the rows the interrupted run logged after its checkpoint (those steps are trained again);
  TensorBoard is told the same (``purge_step``), so its curves hold each step once too.

Together with :class:`pretrain.checkpointing.callbacks.RunCheckpoint`, which logs a step's metrics before its
checkpoint is written, every step up to a checkpoint's step has its row whenever that checkpoint exists.

The run's other records live here too: :func:`build_loggers` (this CSV file, TensorBoard, wandb with a run id kept
in ``output_dir/wandb_run_id`` so a resumed run continues the same wandb run) and :class:`RunRecordWriter`
(``config.yaml`` and ``config_changes.yaml``).
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from omegaconf import DictConfig, OmegaConf

from data_prep.atomic_io import write_atomic, write_text_atomic
from pretrain.checkpointing.resume import write_change_record
from pretrain.settings import Settings


def metrics_header(keys) -> list[str]:
    """``step`` first, the other columns in alphabetical order (``step`` first also marks the numbering)."""
    return ["step"] + sorted(k for k in keys if k != "step")


def counts_from_one(header: list[str]) -> bool:
    """Whether a ``metrics.csv`` with this header numbers its rows by the optimizer step just completed (1-based).
    Files written before that numbering counted from 0 and listed their columns alphabetically (``epoch`` or an
    ``lr-`` column before ``step``)."""
    return bool(header) and header[0] == "step"


def _encode(rows: list[dict[str, Any]], header: list[str], with_header: bool = False) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def read_rows(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(header, rows) of a metrics file, one row per step (merged), without a half-written last line."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # a kill mid-line: the line was never finished
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")))
    header = list(reader.fieldnames or [])
    merged: dict[int, dict[str, Any]] = {}
    for row in reader:
        if row.get("step") in (None, ""):
            continue
        step = int(float(row["step"]))
        values = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        merged.setdefault(step, {}).update(values)
    return header, [merged[s] for s in sorted(merged)]


class _OneRowPerStepWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        self._open: dict[str, Any] | None = None  # the row of the newest step, still receiving values
        self._open_offset: int | None = None  # where the open row starts in the file, once written
        self._done: list[dict[str, Any]] = []  # finished rows not yet written
        self._dirty = False  # the open row has values not on disk yet
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if self.resume_step is None:  # a fresh run in a used directory (no checkpoint to resume): a fresh file
            os.remove(path)
            return
        header, rows = read_rows(path)
        if not counts_from_one(header):  # written before the 1-based numbering: rewritten in it
            rows = [{**r, "step": int(float(r["step"])) + 1} for r in rows]
        rows = [r for r in rows if int(float(r["step"])) <= self.resume_step]
        self.metrics_keys = metrics_header(header)
        self._write_all(rows)

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        """Atomically replace the file with ``rows`` (+ the open row, whose offset is recorded)."""
        path = self.metrics_file_path
        body = _encode(rows, self.metrics_keys, with_header=True)
        if self._open is not None:
            self._open_offset = len(body)
            body += _encode([self._open], self.metrics_keys)
        write_atomic(path, body, temp=path + ".tmp")

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        values = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics_dict.items()}
        if step is None:
            step = int(self._open["step"]) + 1 if self._open else 0
        if self._open is not None and step <= self._open["step"]:
            if step == self._open["step"] and any(self._open.get(k) != v for k, v in values.items()):
                self._open.update(values)
                self._dirty = True
            return  # (a step already closed cannot come back within one run: never a second row for it)
        if self._open is not None and self._open_offset is not None:
            self.save()  # its final values on disk; the row is finished
        elif self._open is not None:
            self._done.append(self._open)
        self._open, self._open_offset, self._dirty = {**values, "step": step}, None, True

    def _rewrite_open(self) -> None:
        """Write the open row over its earlier version (one pwrite: a kill cannot leave half of it)."""
        data = _encode([self._open], self.metrics_keys)
        fd = os.open(self.metrics_file_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, self._open_offset)
            os.ftruncate(fd, self._open_offset + len(data))
        finally:
            os.close(fd)

    def save(self) -> None:
        if self._open is None or not (self._dirty or self._done):
            return
        rows = self._done + [self._open]
        new_keys = set().union(*rows) - set(self.metrics_keys)
        path = self.metrics_file_path
        if new_keys or not os.path.isfile(path):
            old = []
            if os.path.isfile(path):
                old = [r for r in read_rows(path)[1] if self._open_offset is None
                       or int(float(r["step"])) != self._open["step"]]
            self.metrics_keys = metrics_header(set(self.metrics_keys) | new_keys)
            self._write_all(old + self._done)
        elif self._open_offset is not None and not self._done:
            self._rewrite_open()
        else:
            if self._open_offset is not None:  # cannot happen: rows are finished only after their own save
                raise RuntimeError("metrics.csv: a finished row after a written open row")
            data = _encode(self._done, self.metrics_keys)
            with open(path, "ab") as f:
                start = f.tell()
                f.write(data + _encode([self._open], self.metrics_keys))  # one write
            self._open_offset = start + len(data)
        self._done, self._dirty = [], False


class CompletedStepNumbers:
    """Mixed into each logger: Lightning's step index (``_batches_that_stepped``, the optimizer steps finished
    before the one being logged) + 1, the number of the optimizer step just completed."""

    def log_metrics(self, metrics, step: int | None = None) -> None:
        super().log_metrics(metrics, step if step is None else step + 1)


class LoggedSteps(Callback):
    """Which steps the loggers write, and under which number. First in the callback list: the learning-rate
    monitor logs in the same hook.

    - Lightning's step index is set to ``global_step`` at the start of every batch, as it is throughout a run that
      was never interrupted: a resumed run then logs every step under its own number, and at the same steps
      (``trainer.log_every_n_steps`` counts on that index), whichever hook saved its checkpoint.
    - The last step (``trainer.max_steps``) is always logged, also when it is not a multiple of
      ``trainer.log_every_n_steps``: the closing summary's final values then have their row."""

    def __init__(self) -> None:
        self._every: int | None = None  # the run's log_every_n_steps while the last step is being logged

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        last = trainer.global_step + 1 == trainer.max_steps
        if last and self._every is None and trainer.log_every_n_steps > 0:
            self._every, trainer.log_every_n_steps = trainer.log_every_n_steps, 1

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._every is not None:
            trainer.log_every_n_steps, self._every = self._every, None


class StepTensorBoardLogger(CompletedStepNumbers, TensorBoardLogger):
    """TensorBoard in the run's step numbering."""


class StepWandbLogger(CompletedStepNumbers, WandbLogger):
    """wandb in the run's step numbering (its ``trainer/global_step``)."""


class ResumableCSVLogger(CompletedStepNumbers, CSVLogger):
    """``CSVLogger`` writing ``save_dir/metrics.csv``, one row per step; pass ``resume_step`` (the checkpoint's
    global step) when resuming so the rows up to it are kept."""

    def __init__(self, save_dir: str, resume_step: int | None = None, flush_logs_every_n_steps: int = 1,
                 **kwargs) -> None:
        # Writing at every logging step keeps the file in step with the checkpoints (one small write per step).
        super().__init__(save_dir=save_dir, name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps,
                         **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment  # only global rank 0 touches the file (other ranks, other nodes, get a no-op)
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _OneRowPerStepWriter(self.log_dir, self.resume_step)
        return self._experiment


def new_wandb_run_id() -> str:
    """A wandb run id (8 characters of [a-z0-9], wandb's own format; ``wandb.util.generate_id`` is gone in 0.31)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def build_loggers(settings: Settings, output_dir: Path, resume_step: int | None) -> list:
    loggers: list = [ResumableCSVLogger(str(output_dir), resume_step=resume_step)]
    if settings.logger.tensorboard:
        # on a resume, the steps after the checkpoint that an interrupted run logged are hidden (trained again)
        purge = {"purge_step": resume_step + 1} if resume_step else {}
        loggers.append(StepTensorBoardLogger(str(output_dir), name="tensorboard", version="", **purge))
    if settings.logger.wandb:
        id_file = output_dir / "wandb_run_id"  # a resumed run continues the same wandb run
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = new_wandb_run_id()
            output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(id_file, run_id + "\n")
        loggers.append(StepWandbLogger(project=settings.logger.wandb_project, entity=settings.logger.wandb_entity,
                                   save_dir=str(output_dir), id=run_id, resume="allow"))
    return loggers


def save_config(cfg: DictConfig, path: Path) -> None:
    """The resolved config, written atomically (a kill never leaves a half config.yaml)."""
    write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True), temp=path.with_name(f".{path.name}.tmp-{os.getpid()}"))


class RunRecordWriter(Callback):
    """Writes ``config.yaml`` and, on a resume with allowed changes, appends to ``config_changes.yaml``: on a
    resume only once the checkpoint has loaded (``on_train_start`` runs after every restore), so a refused or
    failed resume leaves the run record as it was. Rank 0 writes, once."""

    def __init__(self, cfg: DictConfig, output_dir: Path):
        self.cfg, self.output_dir = cfg, output_dir
        self.changes: tuple[Path, int, dict] | None = None
        self.written = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.write(trainer)

    def write(self, trainer) -> None:
        if self.written or not trainer.is_global_zero:
            return
        self.written = True
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.output_dir / "config.yaml")
        if self.changes is not None:
            write_change_record(self.output_dir, *self.changes)
