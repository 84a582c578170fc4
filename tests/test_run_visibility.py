"""Seeing a run: Ctrl-C saves and says how to resume, the resumed run matches an uninterrupted one, the terminal
prints each message once and ends with a summary, the progress bar counts to max_steps, report.png is drawn.

One RTD run is trained straight through (in this process) and once from the command line, stopped with SIGINT
after a few steps and resumed with the command it printed; the checks below share those runs.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import report
from pretrain.checkpointing.find import newest_checkpoint
from pretrain.run.loggers import read_rows
from pretrain.train import train
from test_train import REPO, compose_config, read_losses, tiny_run

MAX_STEPS = 10
BATCH, SEQ_LEN = 8, 64  # tiny_run's data.batch_size and the shards' sequence length
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HYDRA_PREFIX = re.compile(r"^\[[^\]]+\]\[[^\]]+\]\[[A-Z]+\] - ")  # [time][logger][LEVEL] - (the console format)
LEVEL_PREFIX = re.compile(r"^(INFO|WARNING|ERROR): ")  # Lightning's own console format


def _logged_rows(run: Path) -> int:
    try:
        return len(read_rows(str(run / "metrics.csv"))[1])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("visibility")
    extra = ("checkpoint_every_n_steps=4", "model.hidden_dropout_prob=0.1")
    straight = root / "straight"
    train(compose_config(tiny_run(shards, straight, "rtd", MAX_STEPS, *extra, "export_hf=false", "report=false")))

    # an `srun` on the PATH: Lightning would advise wrapping the command in it
    fake_bin = root / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}

    run = root / "run"
    args = tiny_run(shards, run, "rtd", MAX_STEPS, *extra)
    with open(root / "stopped.out", "w") as out, open(root / "stopped.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, stdout=out, stderr=err, env=env)
        deadline = time.time() + 600
        while _logged_rows(run) < 3:  # three steps trained (the fourth may be under way)
            assert proc.poll() is None, "the run ended before it was interrupted"
            assert time.time() < deadline, "no metrics after 10 minutes"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stopped_rc = proc.wait(timeout=600)
    stopped = {"rc": stopped_rc, "stdout": (root / "stopped.out").read_text(), "stderr": (root / "stopped.err").read_text()}
    stopped_rows = read_rows(str(run / "metrics.csv"))[1]
    stopped_checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*.ckpt"))
    stopped_newest = newest_checkpoint(run)  # what the next run resumes from

    last_line = stopped["stderr"].rstrip("\n").rsplit("\n", 1)[-1]
    command = last_line.split("resume with: ", 1)[-1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pretrain"], last_line
    result = subprocess.run([sys.executable, "-m", "pretrain", *argv[3:]], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    resumed = {"rc": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
    return {"straight": straight, "run": run, "args": args, "stopped": stopped, "stopped_rows": stopped_rows,
            "stopped_checkpoints": stopped_checkpoints, "stopped_newest": stopped_newest,
            "resumed": resumed, "root": root}


def _stop_line(runs) -> re.Match:
    last_line = runs["stopped"]["stderr"].rstrip("\n").rsplit("\n", 1)[-1]
    match = re.fullmatch(r"SIGINT: stopped at step (\d+)/(\d+), checkpoint (\S+); resume with: (.+)", last_line)
    assert match, last_line
    return match


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(runs):
    assert runs["stopped"]["rc"] == 130, runs["stopped"]["stderr"][-2000:]
    match = _stop_line(runs)
    step, total = int(match[1]), int(match[2])
    assert total == MAX_STEPS and 3 <= step < MAX_STEPS
    checkpoint = Path(match[3])
    assert checkpoint == runs["run"] / "checkpoints" / f"step-{step:08d}.ckpt"
    assert checkpoint.name in runs["stopped_checkpoints"]
    assert match[4] == "python -m pretrain " + shlex.join(runs["args"])
    newest = runs["stopped_newest"]
    assert newest is not None and newest.step == step  # what the next run resumes from
    # every step up to the checkpoint's has its metrics row, none after it
    assert [int(r["step"]) for r in runs["stopped_rows"]] == list(range(1, step + 1))


def test_resumed_run_has_the_losses_of_an_uninterrupted_one(runs):
    assert runs["resumed"]["rc"] == 0, runs["resumed"]["stderr"][-3000:]
    step = int(_stop_line(runs)[1])
    assert f"(resumed at step {step})" in runs["resumed"]["stdout"]
    expected, actual = read_losses(runs["straight"]), read_losses(runs["run"])
    assert sorted(actual) == list(range(1, MAX_STEPS + 1))
    assert actual == expected  # bitwise on CPU, as test_train's kill-and-resume test


def _messages(output: dict) -> list[str]:
    """Every line printed (stdout and stderr), without the logging prefixes and without progress-bar redraws."""
    lines = []
    for text in (output["stdout"], output["stderr"]):
        for line in text.split("\n"):
            shown = line.split("\r")[-1]  # what stays on the screen after carriage-return redraws
            if shown.startswith("train:"):
                continue  # the progress bar
            message = LEVEL_PREFIX.sub("", HYDRA_PREFIX.sub("", shown)).rstrip()
            if message:
                lines.append(message)
    return lines


def test_terminal_prints_each_message_once_and_a_summary(runs):
    for output in (runs["stopped"], runs["resumed"]):
        messages = _messages(output)
        repeated = {m for m in messages if messages.count(m) > 1}
        assert not repeated, repeated
        everything = output["stdout"] + output["stderr"]
        for noise in ("💡 Tip", "srun", "Total FLOPs", "LeafSpec", "litlogger"):
            assert noise not in everything, noise
        assert "Seed set to 42" in everything  # Lightning's messages still arrive, once

    stdout = runs["resumed"]["stdout"]
    run, step = runs["run"], int(_stop_line(runs)[1])
    block = stdout[stdout.index("run finished: "):].splitlines()
    assert block[0].endswith(f"run finished: {run}")
    with open(run / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["step"]) == MAX_STEPS
    expected = [f"  steps       {MAX_STEPS} / {MAX_STEPS} (resumed at step {step})",
                f"  tokens      {MAX_STEPS * BATCH * SEQ_LEN:,} seen",
                f"  final       mlm {float(last['train/mlm_loss']):.4f}, rtd {float(last['train/rtd_loss']):.4f}, "
                f"total {float(last['train/loss']):.4f}, replaced-token AUC {float(last['train/discriminator_auc']):.4f}"
                f" (step {MAX_STEPS})",
                f"  model       {run / 'hf'}", f"  model       {run / 'hf_generator'}",
                f"  report      {run / 'report.png'}"]
    for line in expected:
        assert line in block, (line, block)
    assert any(re.fullmatch(r"  wall time   (\d+h )?\d+m \d\ds this session", line) for line in block), block
    assert any(re.fullmatch(r"  tokens/s    [\d,]+", line) for line in block), block


def test_progress_bar_counts_to_max_steps_after_resume(runs):
    step = int(_stop_line(runs)[1])
    frames = [f for f in runs["resumed"]["stderr"].replace("\n", "\r").split("\r") if f.startswith("train:")]
    assert frames and all(f"/{MAX_STEPS} [" in f for f in frames), frames[:3]  # a total (and so an ETA) throughout
    assert f" {step}/{MAX_STEPS} [" in frames[0]  # starts at the resumed step, not at 0 or `?`
    assert f" {MAX_STEPS}/{MAX_STEPS} [" in frames[-1]
    assert all(key in frames[-1] for key in ("mlm=", "rtd=", "auc="))  # the objective's parts, not the total


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, (path, len(data))


def test_report_draws_mlm_and_rtd_runs(runs, shards):
    rtd = runs["run"]
    _assert_png(rtd / "report.png")  # written by the training run at its end
    mlm = runs["root"] / "mlm"
    train(compose_config(tiny_run(shards, mlm, "mlm", 6, f"data.val_path={shards}", "trainer.val_check_interval=3",
                                  "trainer.limit_val_batches=1", "export_hf=false")))
    _assert_png(mlm / "report.png")

    mlm_panels = {p.title for p in report.select_panels([report.load_run(mlm)])}
    assert {"MLM loss (v3: generator)", "validation perplexity (MLM)", "learning rate", "tokens/s"} <= mlm_panels
    assert not any("RTD" in t or "replaced-token" in t or "total" in t for t in mlm_panels)
    assert not {"tokens per optimizer step", "sequence length"} & mlm_panels  # one batch, one length: no plan panels
    tokens_axis = report.tokens_at(report.load_run(mlm), [3, 6])  # 8 sequences of 64 tokens per step
    assert tokens_axis == [3 * 8 * 64, 6 * 8 * 64]
    rtd_panels = {p.title for p in report.select_panels([report.load_run(rtd)])}
    assert {"RTD loss (discriminator)", "replaced-token AUC", "replaced-token precision / recall",
            "total loss (mlm + rtd_weight x rtd)"} <= rtd_panels

    out = runs["root"] / "compare.png"
    result = subprocess.run([sys.executable, "-m", "pretrain.report", str(mlm), str(rtd), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    _assert_png(out)


def test_report_errors_name_the_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "older").mkdir()  # a run made before tokens seen were logged
    (tmp_path / "unknown").mkdir()  # columns the report does not know
    (tmp_path / "unknown" / "metrics.csv").write_text("step,epoch,custom/score\n1,0,0.5\n")
    (tmp_path / "older" / "metrics.csv").write_text("step,epoch,train/mlm_loss\n1,0,6.9\n2,0,6.7\n")
    for argv, expected in (([str(tmp_path / "empty")], f"{tmp_path / 'empty'}: no metrics.csv"),
                           ([str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such run directory"),
                           ([str(tmp_path / "older"), "--x", "tokens"],
                            f"{tmp_path / 'older'}: its metrics.csv has no data/tokens_seen column"),
                           ([str(tmp_path / "unknown")], f"{tmp_path / 'unknown'}: nothing to draw")):
        with pytest.raises(SystemExit) as exit_info:
            report.main(argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert message.startswith("error: ") and expected in message, message


def test_the_command_of_a_finished_run_again_says_so_and_shows_its_final_values(shards, tmp_path, caplog):
    """A re-run of a run already at max_steps trains nothing: no "tokens/s 0", the final values from metrics.csv,
    and metrics.csv left as it was."""
    run = tmp_path / "run"
    args = tiny_run(shards, run, "mlm", 2, "model.num_hidden_layers=1", "export_hf=false", "report=false")
    train(compose_config(args))
    logged = (run / "metrics.csv").read_bytes()
    with caplog.at_level(logging.INFO, logger="pretrain.train"):
        train(compose_config(args))
    assert (run / "metrics.csv").read_bytes() == logged
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run finished: ")]
    assert len(summaries) == 1, summaries
    block = summaries[0].splitlines()
    last = read_rows(str(run / "metrics.csv"))[1][-1]
    assert "  steps       2 / 2" in block, block
    assert ("  this session nothing to train: the run had reached trainer.max_steps=2 (a larger value trains on)"
            in block), block
    assert f"  final       mlm {float(last['train/mlm_loss']):.4f} (step 2)" in block, block
    assert not any(line.startswith(("  tokens/s", "  wall time")) for line in block), block
    # the start line says what the plan comes to: 2 steps x 8 sequences x 64 tokens of the 1,368-sequence corpus
    assert f"steps 2 -> 2 (1,024 tokens by step 2, {1024 / (1368 * 64):.2f} epochs of the corpus)" in caplog.text
