"""One step numbering in every output: the optimizer step just completed, counted from 1.

The case that used to break it: a run whose last step ran a validation, extended with a larger trainer.max_steps.
Its checkpoint is written at the end of training, after that validation; the resumed run logged every later row one
step off and never logged its final step. Here metrics.csv, TensorBoard, the checkpoint names, the LR-extension
warning, the closing summary and the report must all agree.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pretrain.checkpointing.find import read_metadata
from pretrain.report import load_run
from pretrain.run.loggers import ResumableCSVLogger, read_rows
from pretrain.train import train

REPO = Path(__file__).resolve().parents[1]
FIRST, EXTENDED = 3, 9  # validation every 3 steps: the first run's last step validates


def args(train_dir: Path, val_dir: Path, run: Path, steps: int) -> list[str]:
    return ["+experiment=quickstart", "objective=mlm", f"data.path={train_dir}", f"data.val_path={val_dir}",
            f"output_dir={run}", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=2",
            "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "checkpoint_every_n_steps=4",
            "data.batch_size=4", "data.num_workers=0", "model.vocab_size=1024", "model.max_position_embeddings=64",
            "model.position_buckets=16", "model.num_hidden_layers=1", "optim.warmup_steps=2",
            "logger.tensorboard=true", "export_hf=false", "report=false"]


def run(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        train(compose(config_name="config", overrides=overrides))


def column(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_extension_after_a_validation_on_the_last_step_numbers_every_output_alike(split_shards, tmp_path, caplog,
                                                                                  capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_dir, val_dir = split_shards
    run_dir = tmp_path / "run"
    run(args(train_dir, val_dir, run_dir, FIRST))  # no step-N save before the end: last.ckpt after the validation
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt")] == []
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        run(args(train_dir, val_dir, run_dir, EXTENDED))

    # the progress bar (v2): the validation loss once (val/loss is the MLM loss), beside the training MLM loss
    frames = [f for f in capfd.readouterr().err.replace("\n", "\r").split("\r") if f.startswith("train:")]
    assert f" {EXTENDED}/{EXTENDED} [" in frames[-1] and re.search(r"\bmlm=\S+, val=\S+", frames[-1]), frames[-1]
    assert "val_mlm=" not in frames[-1] and "val_rtd=" not in frames[-1], frames[-1]

    header, rows = read_rows(str(run_dir / "metrics.csv"))
    assert header[0] == "step"
    # one row per logging step (every 2nd) and the last step of each run, validation in the row of its step
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6, 8, 9]
    train_loss, val_loss, lr = column(rows, "train/loss"), column(rows, "val/loss"), column(rows, "lr-AdamW/pg1")
    assert list(train_loss) == list(lr) == [2, 3, 4, 6, 8, 9]
    assert list(val_loss) == [3, 6, 9]

    # TensorBoard: the same steps, the same values
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key, csv_values in (("train/loss", train_loss), ("val/loss", val_loss), ("lr-AdamW/pg1", lr)):
        board = {e.step: e.value for e in events.Scalars(key)}
        assert board == pytest.approx(csv_values, rel=1e-6), key

    # checkpoint names: step-N holds N steps; the LR its scheduler set for the next step is row N+1's
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt"))
    assert names == ["step-00000004.ckpt", "step-00000008.ckpt"]
    step_8 = run_dir / "checkpoints" / "step-00000008.ckpt"
    saved = read_metadata(step_8)
    assert saved["global_step"] == 8
    assert saved["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(lr[9], rel=1e-9)

    messages = [r.getMessage() for r in caplog.records]
    # the LR-extension warning's step is the row whose LR it quotes
    note = next(m for m in messages if "trainer.max_steps grew" in m)
    quoted = re.search(r"decays on from (\S+) \(its value at step (\d+)\)", note)
    assert int(quoted.group(2)) == FIRST and float(quoted.group(1)) == pytest.approx(lr[FIRST], rel=1e-2)
    # the closing summary's final values are the last row's
    summary = next(m for m in messages if m.startswith("run finished"))
    final = re.search(r"final\s+mlm (\S+) \(step (\d+)\)", summary)
    assert int(final.group(2)) == EXTENDED and float(final.group(1)) == pytest.approx(train_loss[EXTENDED], abs=1e-4)

    # the report plots the rows at their own steps
    report = load_run(run_dir)
    assert report.columns["val/loss"][0] == [3, 6, 9]
    assert report.columns["train/loss"][0] == [2, 3, 4, 6, 8, 9]


@pytest.mark.parametrize("accumulation", ["trainer.accumulate_grad_batches=2", "data.global_batch_size=8"])
def test_validation_with_gradient_accumulation_lands_on_completed_steps(split_shards, tmp_path, accumulation):
    """trainer.val_check_interval=3 means every 3 optimizer steps also with 2 micro-batches a step (set, or derived
    from data.global_batch_size 8 / data.batch_size 4): validations after steps 3 and 6, numbered so. Lightning
    counts the interval in micro-batches: it validated inside steps 2 and 5, numbered 2 and 5."""
    train_dir, val_dir = split_shards
    run_dir = tmp_path / "run"
    run([*args(train_dir, val_dir, run_dir, 6), accumulation])
    _, rows = read_rows(str(run_dir / "metrics.csv"))
    assert list(column(rows, "val/loss")) == [3, 6]
    assert list(column(rows, "train/loss")) == [2, 4, 6]


OLD_FORMAT = """epoch,lr-AdamW/pg1,step,train/loss,val/loss
0,0.001,0,7.0,
0,0.002,1,6.9,
0,,2,,6.8
0,0.002,2,6.7,
0,0.001,3,6.6,
"""  # as written before the 1-based numbering: columns in alphabetical order, step 0 = after the first update


def test_a_metrics_file_from_before_the_numbering_is_read_and_resumed_one_step_later(tmp_path):
    (tmp_path / "metrics.csv").write_text(OLD_FORMAT)
    report = load_run(tmp_path)
    assert report.columns["train/loss"] == ([1, 2, 3, 4], [7.0, 6.9, 6.7, 6.6])
    assert report.columns["val/loss"] == ([3], [6.8])

    # a resume from a checkpoint at step 3 keeps the rows of steps 1-3, rewritten in the 1-based numbering
    logger = ResumableCSVLogger(str(tmp_path), resume_step=3)
    logger.log_metrics({"train/loss": 6.5}, step=3)  # Lightning's index during step 4
    logger.save()
    header, rows = read_rows(str(tmp_path / "metrics.csv"))
    assert header[0] == "step"
    assert [(int(r["step"]), r.get("train/loss"), r.get("val/loss")) for r in rows] == [
        (1, "7.0", None), (2, "6.9", None), (3, "6.7", "6.8"), (4, "6.5", None)]
    assert load_run(tmp_path).columns["train/loss"] == ([1, 2, 3, 4], [7.0, 6.9, 6.7, 6.5])
