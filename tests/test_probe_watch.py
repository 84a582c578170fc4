"""`python -m pretrain.probe --watch RUN` on a real (tiny) finished run, SIGKILLed at seeded points in its output
and started again each time: it ends with exactly one row per (checkpoint, task, seed, split, metric), nothing lost
or repeated; a damaged checkpoint is skipped and named, one deleted by the run's rotation is skipped with a note,
and the run's lock is only looked at (a process holding it keeps the watch waiting)."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from pretrain.probe import results, watch
from pretrain.train import train
from test_probe_cli import small_task
from test_train import compose_config, tiny_run

REPO = Path(__file__).resolve().parents[1]


def _watch(run: Path, task: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-u", "-m", "pretrain.probe", "--watch", str(run), "--random-init", "--task", str(task),
               "--out", str(out), "--seeds", "2", "--epochs", "1", "--max-length", "32", "--poll", "0.2",
               "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_killed_at_seeded_points_ends_with_each_row_once(shards, tmp_path):
    run = tmp_path / "run"
    train(compose_config(tiny_run(shards, run, "mlm", 4, "checkpoint_every_n_steps=2")))
    folder = run / "checkpoints"
    good = folder / "step-00000004.ckpt"
    damaged = folder / "step-00000003.ckpt"  # bytes flipped after its checksum was written
    data = bytearray(good.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    damaged.write_bytes(bytes(data))
    (folder / "step-00000003.ckpt.sha256").write_text((folder / "step-00000004.ckpt.sha256").read_text())
    rotated = folder / "step-00000001.ckpt"  # listed, then deleted by save_top_k before the watch read it
    rotated.symlink_to(folder / "gone.ckpt")
    (folder / "step-00000001.ckpt.sha256").write_text("0" * 64 + "  step-00000001.ckpt\n")
    task = small_task(tmp_path / "task")
    out = tmp_path / "probes"

    # a process holding the run's lock keeps the watch waiting (the watch looks with F_GETLK and takes nothing)
    # a process holding the run's lock keeps the watch waiting (the watch looks with F_GETLK and takes nothing)
    helper = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pretrain.run_lock import RunLock\n"
         f"with RunLock({str(run)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert helper.stdout.readline().strip() == "held"
    assert watch.lock_held(run) is True
    assert watch.Watch(run, [], _args(out)).state()[0] == "live"
    helper.communicate("")  # released: the run is finished (a checkpoint at max_steps, hf/export_info.json)
    assert watch.lock_held(run) is False
    assert watch.Watch(run, [], _args(out)).state() == ("finished", "step 4 of max_steps 4 reached")

    seed = random.randrange(1 << 16)
    print(f"kill seed {seed}")
    rng = random.Random(seed)
    kills, stderr = 0, ""
    while kills < 5:
        process = _watch(run, task, out)
        lines = rng.randint(1, 3)  # killed once this many lines are out (a cell's row written, or a cell begun)
        for _ in range(lines):
            if not process.stdout.readline():
                break
        process.send_signal(signal.SIGKILL)
        stderr += process.communicate()[1]
        kills += 1
    process = _watch(run, task, out)
    printed, last = process.communicate(timeout=600)
    stderr += last
    assert process.returncode == 0, last
    assert "run finished" in printed and "mean ± std" in printed

    rows = results.read_rows(out)
    counts = collections.Counter((r["model"], r["step"], r["task"], r["seed"], r["split"], r["metric"]) for r in rows)
    expected = {(model, step, "en_small", str(s), "dev", metric) for model, step in
                ((str(run), "2"), (str(run), "4"), (f"random:{run}", "0"))
                for s in range(2) for metric in ("accuracy", "macro_f1")}
    assert set(counts) == expected, (seed, sorted(counts))
    assert set(counts.values()) == {1}, seed
    assert f"warning: skipping {damaged}: its sha256" in stderr
    assert f"note: {rotated} was removed by the run" in stderr
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # nothing written into the run's checkpoints


def _args(out: Path):
    from pretrain.probe.cli import parse_args

    return parse_args(["--watch", "x", "--task", "t", "--out", str(out)])
