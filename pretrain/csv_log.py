"""A CSV logger that survives resumption: ``metrics.csv`` keeps the rows of the run before it was interrupted.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts. A resumed run instead keeps the rows up
to the step it resumes from and drops the rows the interrupted run logged after its last checkpoint (those steps
are trained again), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if self.resume_step is None:  # a fresh run in a used directory: start a fresh file
            os.remove(path)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < self.resume_step]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``save_dir/metrics.csv``; pass ``resume_step`` (the checkpoint's global step) when
    resuming so earlier rows are kept."""

    def __init__(self, save_dir: str, resume_step: int | None = None, flush_logs_every_n_steps: int = 1,
                 **kwargs) -> None:
        # Flushing at every logging step keeps the file in step with the checkpoints: a killed run loses no rows
        # that a resume would not retrain (appending a line is cheap next to a training step).
        super().__init__(save_dir=save_dir, name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps,
                         **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment  # only global rank 0 touches the file (other ranks, other nodes, get a no-op)
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.resume_step)
        return self._experiment
