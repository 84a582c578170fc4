"""Signals as a cluster sends them, export directories, and a checkpoint folder shared through a link.

- ``scancel`` sends SIGTERM to every process of a job step, DataLoader workers included: the run still saves at the
  step it reached, exits 143 with the resume line, and the resumed run's losses equal an uninterrupted run's.
- A SIGTERM during a validation lets that evaluation finish: its ``val/loss`` is in ``metrics.csv``.
- Ctrl-C pressed twice stops at once, without saving, with the project's line and status 130.
- ``pretrain.export`` leaves a non-empty ``OUT/hf`` alone unless ``--overwrite``; then it is replaced whole; a
  killed export leaves nothing after the next one; ``hf/export_info.json`` names the step.
- A run whose ``checkpoints/`` leads into another live run's folder is refused.

Signals are sent from a process outside the group at a chosen training or validation step
(tests/signal_runner.py), never after a time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import hf
from pretrain.run.lock import RunLockedError
from pretrain.train import train
from test_recovery import REPO, cli, compose_config, metric_rows

STEPS = 6
RUNNER = str(REPO / "tests" / "signal_runner.py")


def run_args(data: tuple[Path, Path], run_dir: Path, *extra: str) -> list[str]:
    """Two DataLoader workers, and a validation at steps 3 and 6 (two batches each)."""
    train_dir, val_dir = data
    return ["+experiment=quickstart", "objective=mlm", f"data.path={train_dir}", f"data.val_path={val_dir}",
            f"output_dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "data.batch_size=8",
            "data.num_workers=2", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
            "trainer.num_sanity_val_steps=0", "model.vocab_size=1024", "model.max_position_embeddings=64",
            "model.position_buckets=16", "model.hidden_dropout_prob=0.1", "optim.warmup_steps=2",
            "checkpoint_every_n_steps=2", "optim.min_lr_ratio=1.0", "export_hf=false", "report=false", *extra]


def history(run_dir: Path) -> dict[int, tuple[str, str]]:
    """step -> (train/loss, val/loss) exactly as written (the text of the float: equal text, equal bits)."""
    return {int(r["step"]): (r["train/loss"], r.get("val/loss") or "") for r in metric_rows(run_dir)}


@pytest.fixture(scope="module")
def reference(split_shards, tmp_path_factory) -> Path:
    """An uninterrupted run (in this process; the command line runs with the same thread count)."""
    run = tmp_path_factory.mktemp("signals") / "reference"
    train(compose_config(run_args(split_shards, run)))
    rows = history(run)
    assert sorted(rows) == list(range(1, STEPS + 1)) and rows[3][1] and rows[6][1]  # validations after steps 3 and 6
    return run


def signalled(kind: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m pretrain ARGS`` as the leader of its own process group, signalled at ``kind`` (see
    tests/signal_runner.py). Returns once every process of the group (DataLoader workers included) is gone."""
    threads = str(torch.get_num_threads())
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": threads}
    proc = subprocess.Popen([sys.executable, RUNNER, kind, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
        deadline = time.monotonic() + 120  # a generous bound for exiting workers, not a measurement
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "processes of the run's group outlived it"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.rstrip("\n").rsplit("\n", 1)[-1]


def assert_stopped_and_resumable(result, run: Path, step: int, args: list[str]) -> None:
    assert result.returncode == 143, result.stderr[-3000:]
    assert "killed by signal" not in result.stderr and "Traceback" not in result.stderr
    checkpoint = run / "checkpoints" / f"step-{step:08d}.ckpt"
    assert last_line(result) == (f"SIGTERM: stopped at step {step}/{STEPS}, checkpoint {checkpoint}; resume with: "
                                 f"python -m pretrain {shlex.join(args)}")
    assert checkpoint.is_file()


def test_sigterm_to_the_whole_group_saves_and_resumes_exactly(split_shards, reference, tmp_path):
    """SIGTERM to the run and its two DataLoader workers at once (what ``scancel`` does) in the middle of step 3:
    the workers used to die first ("DataLoader worker ... killed by signal: Terminated", status 1, nothing saved).
    Now step 3 is finished and saved, and the resumed run (which also replaces its own ``hf/``, user file and all,
    at the end) has the uninterrupted run's losses bit for bit."""
    run = tmp_path / "run"
    args = run_args(split_shards, run)
    result = signalled("term:3", args)
    assert_stopped_and_resumable(result, run, 3, args)
    assert sorted(history(run)) == [1, 2, 3]

    (run / "hf").mkdir()
    (run / "hf" / "stale.txt").write_text("an older export of this run\n")
    resumed = cli(run_args(split_shards, run, "export_hf=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history(run) == history(reference)
    assert sorted(p.name for p in (run / "hf").iterdir()) == sorted(
        ["config.json", "export_info.json", "model.safetensors", *(p.name for p in (split_shards[0] / "tokenizer")
                                                                    .iterdir() if p.name in hf.TOKENIZER_FILES)])
    assert json.loads((run / "hf" / "export_info.json").read_text())["step"] == STEPS


def test_sigterm_during_validation_keeps_that_evaluation(split_shards, reference, tmp_path):
    """SIGTERM to the group at the first batch of the step-3 validation: the evaluation is finished and its
    val/loss logged (it was dropped), then step 3 is saved; the resumed run matches the uninterrupted one."""
    run = tmp_path / "run"
    args = run_args(split_shards, run)
    result = signalled("term-val:1", args)
    assert_stopped_and_resumable(result, run, 3, args)
    assert history(run) == {step: history(reference)[step] for step in (1, 2, 3)}  # val/loss of step 3 included
    resumed = cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history(run) == history(reference)


def test_ctrl_c_twice_stops_at_once_with_the_projects_line(split_shards, tmp_path):
    """Two Ctrl-C (to the whole group, as a terminal sends them) in step 3: no step-3 checkpoint, the project's line
    and status 130 (it was Lightning's "Detected KeyboardInterrupt" and status 1)."""
    run = tmp_path / "run"
    args = run_args(split_shards, run)
    result = signalled("int-twice:3", args)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Detected KeyboardInterrupt" not in result.stderr and "Traceback" not in result.stderr
    assert last_line(result) == ("SIGINT: stopped without saving; the newest checkpoint (if any) resumes with: "
                                 f"python -m pretrain {shlex.join(args)}")
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.ckpt")) == ["step-00000002.ckpt"]


def export(checkpoint: Path, out: Path, *extra: str, runner: list[str] | None = None):
    return cli([str(checkpoint), str(out), *extra], runner=runner or ["-m", "pretrain.export"])


# Kills the export at its first tokenizer file copy: the weights are written, in the staging directory only.
KILL_MID_EXPORT = ["-c", "import os, runpy, shutil, signal, sys; "
                   "shutil.copy2 = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
                   "sys.argv = ['pretrain.export', *sys.argv[1:]]; "
                   "runpy.run_module('pretrain.export', run_name='__main__', alter_sys=True)"]


def test_export_keeps_a_users_directory_and_replaces_it_whole_only_when_asked(reference, tmp_path):
    checkpoint = reference / "checkpoints" / "step-00000004.ckpt"
    out = tmp_path / "out"
    (out / "hf").mkdir(parents=True)
    notes = out / "hf" / "notes.txt"
    notes.write_text("fine-tuning results\n")

    refused = export(checkpoint, out)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out / 'hf'}: exists and is not empty; pass --overwrite to replace it whole (files you "
                      "added there are deleted too), or choose another OUT"], refused.stderr[-3000:]
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["notes.txt"]

    killed = export(checkpoint, out, "--overwrite", runner=KILL_MID_EXPORT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["notes.txt"]  # the old directory, whole
    left = [p for p in out.iterdir() if p.name.startswith(".hf.tmp-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()  # a full model copy

    replaced = export(checkpoint, out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "hf"]  # nothing left by the killed export
    assert not notes.exists()
    assert json.loads((out / "hf" / "export_info.json").read_text()) == {"step": 4, "checkpoint": str(checkpoint)}
    model = hf.from_pretrained(out / "hf")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert model.state_dict()["deberta.embeddings.word_embeddings.weight"].equal(
        state["objective.model.deberta.embeddings.word_embeddings.weight"])


def holding(*locks: str) -> subprocess.Popen:
    """Another process that holds the given locks (python expressions over pretrain.run.lock) until killed."""
    code = ("import sys, time; from pretrain.run.lock import RunLock, checkpoint_folder_lock; "
            + "; ".join(f"{lock}.__enter__()" for lock in locks) + "; print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_checkpoint_folder_linked_into_a_live_run_is_refused(split_shards, tmp_path):
    """Run B's checkpoints/ is a link to run A's: while A is live, B is refused with one line naming the link (both
    trained into one folder); while B is live, A is refused. Nothing is written into A's folder."""
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "checkpoints").mkdir(parents=True)
    b.mkdir()
    (b / "checkpoints").symlink_to(a / "checkpoints")

    holder = holding(f"RunLock({str(a)!r})")  # run A, live
    try:
        result = cli(run_args(split_shards, b))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.match(rf"error: {re.escape(str(b / 'checkpoints'))} leads to {re.escape(str(a / 'checkpoints'))}, a "
                    rf"checkpoint folder in use by another run \(pid {holder.pid} on ", errors[0]), errors[0]
    assert list((a / "checkpoints").iterdir()) == []

    holder = holding(f"RunLock({str(b)!r})", f"checkpoint_folder_lock({str(b)!r})")  # run B, live
    try:
        with pytest.raises(RunLockedError, match=rf"{re.escape(str(a))} is in use by another run \(pid {holder.pid} "):
            train(compose_config(run_args(split_shards, a)))
    finally:
        holder.kill()
        holder.wait()
    assert list((a / "checkpoints").iterdir()) == []
