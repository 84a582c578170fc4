"""The optional loggers with the real packages pip resolves, no network: wandb offline (one run id across a resume)
and TensorBoard (an event file that TensorBoard itself reads back). Runs are the user's command in a subprocess,
so each has its own wandb process state."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import tiny_run

REPO = Path(__file__).resolve().parents[1]


def run_pretrain(shards: Path, output_dir: Path, steps: int, *extra: str, env_extra: dict | None = None):
    command = [sys.executable, "-m", "pretrain",
               *tiny_run(shards, output_dir, "mlm", steps, "checkpoint_every_n_steps=2", "export_hf=false", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_wandb_offline_run_resumes_the_same_run(shards, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_pretrain(shards, run, 3, "logger.wandb=true", env_extra=offline)
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum() and run_id.islower()
    first = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1 and any(first[0].glob("*.wandb"))  # wandb's own record of the run was written

    run_pretrain(shards, run, 5, "logger.wandb=true", env_extra=offline)  # resume from step 2 to step 5
    assert (run / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # the resume logged to the same run


def test_tensorboard_event_file_is_written_and_readable(shards, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    run_pretrain(shards, run, 4, "logger.tensorboard=true")
    files = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert files, list(run.rglob("*"))
    accumulator = event_accumulator.EventAccumulator(str(files[0].parent))
    accumulator.Reload()
    in_tensorboard = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    with open(run / "metrics.csv", newline="") as f:
        in_csv = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert len(in_csv) == 4 and in_tensorboard.keys() == in_csv.keys()  # every logged step, in both loggers
    for step, loss in in_csv.items():
        assert in_tensorboard[step] == pytest.approx(loss, rel=1e-6)
