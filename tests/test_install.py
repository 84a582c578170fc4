"""The installed package carries its configuration: built as a wheel, installed outside the checkout, the console
script trains from another directory, a user's own config directory joins through Hydra's search path, and the
probe/ group's bundled tasks read the installed package's own data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_train import tiny_run

REPO = Path(__file__).resolve().parents[1]


def test_installed_console_script_trains_from_another_directory(shards, tmp_path):
    wheels, site, workdir = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    workdir.mkdir()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = wheels.glob("deberta_pretrain-*.whl")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert (site / "pretrain" / "conf" / "experiment" / "quickstart.yaml").is_file()

    # A user's own experiment in their own config directory, found through Hydra's search path.
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - /experiment/quickstart\n"
                                    "optim:\n  lr: 1e-3\n")
    # The wheel's copy of the package comes first; its dependencies come from this environment. The checkout is
    # not on the path and the working directory is elsewhere.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "2"}
    overrides = tiny_run(shards, workdir / "run", "mlm", 3, "export_hf=false")
    overrides[overrides.index("+experiment=quickstart")] = "+experiment=mine"
    command = [str(site / "bin" / "deberta-pretrain"), f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
               *overrides]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (workdir / "run" / "metrics.csv").is_file()
    config = (workdir / "run" / "config.yaml").read_text()
    assert "lr: 0.001" in config  # the user's experiment was applied
    probe = subprocess.run([sys.executable, "-c", "import pretrain; print(pretrain.__file__)"], cwd=workdir, env=env,
                           capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(site)), probe.stdout  # the installed copy ran, not the checkout
    tasks = subprocess.run([sys.executable, "-c", "from pretrain.probe.tasks import load_task, task_file\n"
                            "task = load_task(task_file('zh_sentiment'))\n"
                            "print(task.spec.source, task.spec.files['train'], len(task.rows['train']))"],
                           cwd=workdir, env=env, capture_output=True, text=True)
    assert tasks.returncode == 0, tasks.stderr[-2000:]
    source, train_file, count = tasks.stdout.split()
    assert source == str(site / "pretrain" / "conf" / "probe" / "zh_sentiment.yaml")
    assert train_file == str(site / "pretrain" / "probe" / "samples" / "zh_sentiment" / "train.jsonl")
    assert count == "400"
