"""What a resumed v3 run with validation prints to a log file (stdout and stderr not a terminal): the project's own
warnings and nobody else's, no escape codes, validation's MLM loss, RTD loss and AUC on the bar and in the summary.

The resume also grows trainer.max_steps (one warning about the LR schedule) and asks for more loader workers than
the cores of a 2-core machine (one warning from the project, none from torch)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from test_train import REPO, compose_config, tiny_run
from pretrain.train import train

PROJECT_LINE = re.compile(r"^\[[^\]]+\]\[(pretrain|data_prep)[\w.]*\]\[(WARNING|INFO)\] - ")
WARNING_SIGNS = re.compile(r"warn|\.py:\d+: |deprecat", re.IGNORECASE)


def test_resumed_v3_run_prints_only_the_projects_warnings(split_shards, tmp_path):
    train_dir, val_dir = split_shards
    run = tmp_path / "run"
    extra = (f"data.val_path={val_dir}", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
             "checkpoint_every_n_steps=2", "model.num_hidden_layers=1", "export_hf=false", "report=false")
    train(compose_config(tiny_run(train_dir, run, "rtd", 4, *extra)))
    args = tiny_run(train_dir, run, "rtd", 6, *extra)
    args[args.index("data.num_workers=0")] = "data.num_workers=3"
    result = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    everything = result.stdout + result.stderr
    assert "resuming from" in everything and "\x1b" not in everything  # no cursor movement in a log file
    lines = [line.split("\r")[-1] for line in everything.split("\n")]
    foreign = [line for line in lines if WARNING_SIGNS.search(line) and not PROJECT_LINE.match(line)]
    assert not foreign, foreign
    ours = [line for line in lines if PROJECT_LINE.match(line) and "[WARNING]" in line]
    assert sum("trainer.max_steps grew from 4 to 6" in line for line in ours) == 1, ours
    if (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) < 3:
        assert sum("data.num_workers=3" in line for line in ours) == 1, ours

    bar = [f for f in result.stderr.replace("\n", "\r").split("\r") if f.startswith("train:")][-1]
    assert all(key in bar for key in ("val_mlm=", "val_rtd=", "val_auc=")) and "val=" not in bar, bar
    summary = result.stdout[result.stdout.index("run finished: "):].splitlines()
    validation = [line for line in summary if line.startswith("  validation  ")]
    assert len(validation) == 1 and re.fullmatch(
        r"  validation  mlm \d+\.\d{4}, rtd \d+\.\d{4}, total \d+\.\d{4}, replaced-token AUC \d\.\d{4}",
        validation[0]), summary
