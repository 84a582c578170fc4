"""`python -m pretrain.probe --watch RUN` on a real (tiny) run: while a process holds the run's lock it probes each
checkpoint once it is complete and keeps waiting, and ends when the lock is free; then, SIGKILLed at seeded points
in its output and started again each time, it ends with exactly one row per (checkpoint, task, seed, split,
metric), nothing lost or repeated. A damaged checkpoint is skipped and named, one deleted by the run's rotation is
skipped with a note. A DeepSpeed run's checkpoint directories are probed the same way, reading only. The report
draws the probes, and slurm/probe.sbatch runs the watch."""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import report
from pretrain.run.console import RunSummary
from pretrain.probe import panel, results, watch
from pretrain.train import train
from test_probe_cli import small_task
from test_train import compose_config, tiny_run

REPO = Path(__file__).resolve().parents[1]


def _watch(run: Path, task: Path, seeds: int = 2) -> subprocess.Popen:
    command = [sys.executable, "-u", "-m", "pretrain.probe", "--watch", str(run), "--random-init", "--task", str(task),
               "--seeds", str(seeds), "--epochs", "1", "--max-length", "32", "--poll", "0.2",
               "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until(process: subprocess.Popen, cells: int) -> str:
    """The watch's output up to its ``cells``-th finished cell from now."""
    printed = ""
    while cells:
        line = process.stdout.readline()
        assert line, printed
        printed += line
        cells -= " | seed " in line
    return printed


@pytest.fixture(scope="module")
def watched(shards, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4, plus a damaged and a rotated one) watched to the end
    through five SIGKILLs; its probes land in the default RUN/probes/."""
    tmp_path = tmp_path_factory.mktemp("watch")
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
    out = run / "probes"

    # while a process holds the run's lock (training), the watch probes each checkpoint once it is complete and
    # waits for more; it looks at the lock with F_GETLK, which takes nothing
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in (good.name, good.name + ".sha256"):  # step 4 not written yet
        os.replace(folder / name, hidden / name)
    helper = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pretrain.run.lock import RunLock\n"
         f"with RunLock({str(run)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert helper.stdout.readline().strip() == "held"
    assert watch.lock_held(run) is True
    assert watch.Watch(run, [], _args(out)).state()[0] == "live"
    live = _watch(run, task, seeds=1)
    printed = _until(live, 2)  # step 2 and the random init
    for name in (good.name, good.name + ".sha256"):  # the save of step 4: the file renamed into place, then its checksum
        shutil.copy(hidden / name, folder / f".{name}.tmp-1")
        os.replace(folder / f".{name}.tmp-1", folder / name)
    printed += _until(live, 1)
    assert live.poll() is None  # the run is still live: the watch goes on
    helper.communicate("")  # training ends: the run is finished (a checkpoint at max_steps, hf/export_info.json)
    assert watch.lock_held(run) is False
    assert watch.Watch(run, [], _args(out)).state() == ("finished", "step 4 of max_steps 4 reached")
    rest, stderr = live.communicate(timeout=300)
    assert live.returncode == 0, stderr
    printed += rest
    assert "run finished" in printed
    assert [line.split(" | ")[0] for line in printed.splitlines() if " | seed " in line] == \
        [f"{run} @ step 2", f"random:{run}", f"{run} @ step 4"]

    # then killed at seeded points while adding a second seed, and started again each time
    seed = random.randrange(1 << 16)
    print(f"kill seed {seed}")
    rng = random.Random(seed)
    kills = 0
    while kills < 5:
        process = _watch(run, task)
        lines = rng.randint(1, 3)  # killed once this many lines are out (a cell's row written, or a cell begun)
        for _ in range(lines):
            if not process.stdout.readline():
                break
        process.send_signal(signal.SIGKILL)
        stderr += process.communicate()[1]
        kills += 1
    process = _watch(run, task)
    printed, last = process.communicate(timeout=600)
    stderr += last
    assert process.returncode == 0, last
    return run, seed, printed, stderr, task


def test_watch_killed_at_seeded_points_ends_with_each_row_once(watched):
    run, seed, printed, stderr, _ = watched
    folder, out = run / "checkpoints", run / "probes"
    damaged, rotated = folder / "step-00000003.ckpt", folder / "step-00000001.ckpt"
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


def _stats(rows, model_prefix: str, step: str) -> tuple[float, float]:
    values = [float(r["value"]) for r in rows if r["model"].startswith(model_prefix) and r["step"] == step
              and r["split"] == "dev" and r["metric"] == "accuracy"]
    assert len(values) == 2
    return statistics.mean(values), statistics.stdev(values)


def test_report_draws_the_downstream_panel_with_baselines_and_overlays_runs(watched, tmp_path):
    run = watched[0]
    rows = results.read_rows(run / "probes")
    expected = {step: _stats(rows, str(run), step) for step in ("2", "4")}
    random_init = _stats(rows, "random:", "0")
    # a second run, continued from a released model: its probes.csv also holds that starting model (no step)
    other = tmp_path / "continued"
    (other / "probes").mkdir(parents=True)
    (other / "metrics.csv").write_text((run / "metrics.csv").read_text())
    (other / "probes" / "tasks.json").write_text((run / "probes" / "tasks.json").read_text())
    start = [{**r, "model": "models/start", "step": "-1"} for r in rows if r["model"].startswith("random:")]
    for r in start:
        results.append_cell(other / "probes", r["model"], -1, r["task"], int(r["seed"]),
                            {r["split"]: {r["metric"]: float(r["value"]) + 0.25}})
    for r in rows:  # its checkpoints scored apart by seed, so that its band has a width
        if not r["model"].startswith("random:"):
            value = float(r["value"]) + 0.1 * int(r["seed"]) + 0.01 * int(r["step"])
            results.append_cell(other / "probes", r["model"], r["step"], r["task"], int(r["seed"]),
                                {r["split"]: {r["metric"]: value}})
    continued = {step: _stats(results.read_rows(other / "probes"), str(run), step) for step in ("2", "4")}
    assert all(std > 0.05 for _, std in continued.values())

    fig = report.figure([report.load_run(run), report.load_run(other)])
    axes = [ax for ax in fig.axes if ax.get_title() == "downstream: en_small (dev accuracy)"]
    assert len(axes) == 1
    ax = axes[0]
    assert ax.get_xlabel() == "pretraining step"
    curves = [line for line in ax.lines if list(line.get_xdata()) == [2, 4]]
    assert [line.get_label() for line in curves] == [run.name, "continued"]  # one per run, in its own colour
    assert curves[0].get_color() != curves[1].get_color()
    for line, stats in zip(curves, (expected, continued)):
        assert list(line.get_ydata()) == pytest.approx([stats["2"][0], stats["4"][0]])
    bands = [collection.get_paths()[0].vertices for collection in ax.collections]
    for band, stats in zip(bands, (expected, continued)):
        assert band[:, 1].min() == pytest.approx(min(m - s for m, s in stats.values()))
        assert band[:, 1].max() == pytest.approx(max(m + s for m, s in stats.values()))
    flat = {line.get_label(): line.get_ydata()[0] for line in ax.lines if list(line.get_xdata()) == [0, 1]}
    assert flat == pytest.approx({f"random init ({run.name})": random_init[0],
                                  "start (continued)": random_init[0] + 0.25})

    # the closing summary of a run shows its newest probed checkpoint and the baselines
    lines = RunSummary(run, 4, 4, 0, 512, 10.0, {}, [], None, panel.latest_lines(run)).lines()
    step4 = f"step 4 {expected['4'][0]:.4f} ± {expected['4'][1]:.4f}"
    assert lines[-1] == (f"  downstream  en_small dev accuracy: {step4}, "
                         f"random init {random_init[0]:.4f} ± {random_init[1]:.4f}")


def test_probe_sbatch_runs_the_watch(watched):
    """slurm/probe.sbatch forwards its arguments to the watch (run here without SLURM, as its last step runs): on the
    finished, fully probed run it adds nothing and ends; without a run directory it says what to give."""
    run, *_, task = watched
    before = results.read_rows(run / "probes")
    script = REPO / "slurm" / "probe.sbatch"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "SLURM_SUBMIT_DIR": str(REPO)}
    done = subprocess.run(["bash", str(script), str(run), "--task", str(task), "--seeds", "2", "--epochs", "1",
                           "--max-length", "32", "--poll", "0.2", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "every cell already in" in done.stdout and "run finished" in done.stdout
    assert results.read_rows(run / "probes") == before
    refused = subprocess.run(["bash", str(script), "--task", str(task)], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: give the run directory first")


def test_a_run_stopped_before_its_end_is_waited_for_then_given_up(tmp_path, capsys):
    """No process holds the lock and no checkpoint reached max_steps (a crash, or a job waiting to be requeued):
    the watch waits, and gives up after --give-up-after minutes without a new checkpoint, saying how to go on."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer:\n  max_steps: 8\n", encoding="utf-8")
    args = _args(run / "probes")
    args.give_up_after, args.poll = 0.0, 0.0
    assert watch.Watch(run, [], args).state() == ("stopped", f"not started yet (no {run / '.lock'})")
    (run / ".lock").write_text("pid 1 on a node since ...: python -m pretrain\n")  # left by a run that stopped
    assert watch.Watch(run, [], args).state() == (
        "stopped", f"no process holds {run / '.lock'}, at no checkpoint of max_steps 8")
    watch.watch(run, [], args)
    assert "stopped before its end" in capsys.readouterr().err


def _listing(run: Path) -> dict[str, tuple]:
    """Every path under the run with its kind, size, mtime and link target: what a reader must leave as it was."""
    out = {}
    for path in [run, *sorted(run.rglob("*"))]:
        stat = path.lstat()
        out[str(path.relative_to(run))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns,
                                           os.readlink(path) if path.is_symlink() else None)
    return out


def test_watch_a_deepspeed_run_reads_its_checkpoint_directories_and_nothing_else(shards, tmp_path, capsys):
    """A run trained with a DeepSpeed strategy (ZeRO-1 on one CPU rank) stores each checkpoint as a directory, and
    last.ckpt as a link to the newest. The watch probes each step once (the bundled en_sentiment task, by its name
    in the probe/ group) and leaves the run directory exactly as it was. A save whose rank shard is not there yet
    (DeepSpeed's rank 0 writes `latest` without waiting for the other ranks) is passed over while the run is live,
    and probed once it is complete."""
    from test_checkpoint_trust import zero_args
    from test_recovery import cli

    from pretrain.checkpointing.files import checksum_path
    from pretrain.checkpointing.find import read_metadata
    from pretrain.probe import cli as probe_cli
    from pretrain.probe import models

    run = tmp_path / "run"
    trained = cli(zero_args(shards, run, 4, 1), env={"OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step-00000002.ckpt", "step-00000004.ckpt"]
    assert (folder / "step-00000002.ckpt" / "checkpoint").is_dir() and (folder / "last.ckpt").is_symlink()
    before = _listing(run)

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--watch", str(run), "--task", "en_sentiment", "--seeds", "1", "--epochs", "1", "--max-length", "32",
                "--poll", "0.2", "--out", str(out), "--device", "cpu", *extra]

    out = tmp_path / "probes"
    assert probe_cli.main(argv(out, "--random-init")) == 0
    assert _listing(run) == before  # read only: no file, directory, link or timestamp of the run changed
    printed = capsys.readouterr().out
    assert f"{run}: run finished (step 4 of max_steps 4 reached); every checkpoint probed" in printed
    assert [line.split(" | ")[0] for line in printed.splitlines() if " | seed " in line] == \
        [f"{run} @ step 2", f"random:{run}", f"{run} @ step 4"]
    assert "Processing zero checkpoint" not in printed  # DeepSpeed's consolidation progress is not the watch's output
    counts = collections.Counter((r["model"], r["step"], r["task"], r["seed"], r["split"], r["metric"])
                                 for r in results.read_rows(out))
    assert counts == {(model, step, "en_sentiment", "0", "dev", metric): 1
                      for model, step in ((str(run), "2"), (str(run), "4"), (f"random:{run}", "0"))
                      for metric in ("accuracy", "macro_f1")}

    # step 4 as a live reader can find it: `latest` written, the rank's shard still on its way
    step4 = folder / "step-00000004.ckpt"
    shard = step4 / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    os.replace(checksum_path(shard), hidden / checksum_path(shard).name)
    assert models.unfinished_deepspeed_save(step4, read_metadata(step4), live=True) == \
        f"checkpoint/{shard.name} (rank 0's shard) has no {shard.name}.sha256 yet"
    assert models.unfinished_deepspeed_save(step4, read_metadata(step4)) is None  # a run that ended: verified as is
    os.replace(shard, hidden / shard.name)
    assert models.unfinished_deepspeed_save(step4, read_metadata(step4)) == \
        f"checkpoint/{shard.name} (rank 0's shard) is missing"
    args = probe_cli.parse_args(argv(tmp_path / "again"))
    live = watch.Watch(run, probe_cli.load_tasks(args), args)
    assert live.look(live=True) == 1  # step 2; step 4 is looked at again next time
    for name in (shard.name, checksum_path(shard).name):  # the rank's shard arrives, then its checksum
        os.replace(hidden / name, shard.parent / name)
    assert live.look(live=True) == 1
    printed, warnings = capsys.readouterr()
    assert [line.split(" | ")[0] for line in printed.splitlines() if " | seed " in line] == \
        [f"{run} @ step 2", f"{run} @ step 4"]
    assert "skipping" not in warnings
