"""End-to-end training on the bundled English sample: RTD and MLM runs, export, exact resume, config errors."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from pretrain import hf
from pretrain.settings import SettingsError
from pretrain.train import train

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64  # the sequence length of the `shards` fixture (conftest.py)


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def tiny_run(shards: Path, output_dir: Path, objective: str, steps: int, *extra: str) -> list[str]:
    return [
        "+experiment=quickstart", f"objective={objective}", f"data.path={shards}", f"output_dir={output_dir}",
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "data.batch_size=8", "data.num_workers=0",
        "model.vocab_size=1024", f"model.max_position_embeddings={SEQ_LEN}", "model.position_buckets=16",
        "optim.warmup_steps=5", *extra,
    ]


def read_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_rtd_loss_falls_and_exports_load_in_transformers(shards, tmp_path):
    run = tmp_path / "rtd"
    train(compose_config(tiny_run(shards, run, "rtd", 60, "optim.lr=3e-3")))
    losses = list(read_losses(run).values())
    assert len(losses) >= 55
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    mlm = list(read_losses(run, "train/mlm_loss").values())
    assert sum(mlm[-5:]) / 5 < sum(mlm[:5]) / 5 - 0.5  # the generator learns too

    # discriminator -> a clean DebertaV2Model; generator -> a clean DebertaV2ForMaskedLM; tokenizer included
    base, info = transformers.AutoModel.from_pretrained(run / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    gen, info = transformers.AutoModelForMaskedLM.from_pretrained(run / "hf_generator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf_generator")
    fill = transformers.pipeline("fill-mask", model=str(run / "hf_generator"), tokenizer=str(run / "hf_generator"))
    assert len(fill(f"And God said, let there be {tokenizer.mask_token}.")) == 5

    # outputs equal the native models'
    native_disc, native_gen = hf.from_pretrained(run / "hf").eval(), hf.from_pretrained(run / "hf_generator").eval()
    ids = torch.tensor([tokenizer("In the beginning God created the heavens and the earth.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(input_ids=ids).last_hidden_state,
                                   native_disc(ids).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(gen.eval()(input_ids=ids).logits, native_gen(ids).logits, atol=1e-4, rtol=0)


def test_mlm_run_exports_a_fill_mask_model(shards, tmp_path):
    run = tmp_path / "mlm"
    train(compose_config(tiny_run(shards, run, "mlm", 40, "optim.lr=3e-3", f"data.val_path={shards}",
                                  "trainer.val_check_interval=20", "trainer.limit_val_batches=3")))
    losses = list(read_losses(run).values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    validation = read_losses(run, "val/loss")  # held-out evaluation at steps 20 and 40, with fixed masks
    assert len(validation) == 2 and validation[max(validation)] < validation[min(validation)]
    assert not (run / "hf_generator").exists()
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(run / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tagger, info = transformers.AutoModelForTokenClassification.from_pretrained(run / "hf", num_labels=3,
                                                                               output_loading_info=True)
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"classifier"}  # only the new task head is new
    assert all(k.startswith("lm_predictions.") for k in info["unexpected_keys"])  # the MLM head, unused there
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    fill = transformers.pipeline("fill-mask", model=str(run / "hf"), tokenizer=str(run / "hf"))
    assert len(fill(f"The LORD is my {tokenizer.mask_token}.")) == 5
    native = hf.from_pretrained(run / "hf").eval()
    ids = torch.tensor([tokenizer("Blessed are the meek, for they shall inherit the earth.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, native(ids).logits, atol=1e-4, rtol=0)

    # any checkpoint exports the same way from the command line
    checkpoint = run / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-m", "pretrain.export", str(checkpoint), str(tmp_path / "exported")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    exported = hf.read_state_dict(tmp_path / "exported" / "hf")[0]
    final = hf.read_state_dict(run / "hf")[0]
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


@pytest.mark.parametrize("experiment", ["v3_xsmall", "v3_small"])
def test_small_experiments_run_a_few_steps_on_cpu(experiment, shards, tmp_path):
    """The paper-size configs (full 128k vocabulary) train on CPU: two steps, then export."""
    overrides = [f"+experiment={experiment}", f"data.path={shards}", f"output_dir={tmp_path / experiment}",
                 "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                 "data.global_batch_size=2", "data.batch_size=2", "data.num_workers=0", "export_hf=false",
                 "model.vocab_size=128100"]
    metrics, objects = train(compose_config(overrides))
    assert objects["trainer"].global_step == 2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_interrupted_run_resumes_exactly(shards, tmp_path):
    """Kill a run after its step-4 checkpoint, re-run the same command: per-step losses equal an uninterrupted run."""
    straight = tmp_path / "straight"
    train(compose_config(tiny_run(shards, straight, "rtd", 10, "checkpoint_every_n_steps=2", "keep_checkpoints=-1",
                                  "model.hidden_dropout_prob=0.1")))
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step-*.ckpt"))
    assert kept == [f"step-{n:08d}.ckpt" for n in (2, 4, 6, 8, 10)]  # keep_checkpoints=-1: every one, for probing
    resumed = tmp_path / "resumed"
    args = tiny_run(shards, resumed, "rtd", 10, "checkpoint_every_n_steps=2", "model.hidden_dropout_prob=0.1")
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step-00000004.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, objects = train(compose_config(args))
    # resumed, not restarted: from last.ckpt, or from step-4 when the kill came before last.ckpt was rewritten
    assert objects["trainer"].ckpt_path in (str(resumed / "checkpoints" / "last.ckpt"),
                                            str(resumed / "checkpoints" / "step-00000004.ckpt"))
    expected, actual = read_losses(straight), read_losses(resumed)
    assert sorted(actual) == sorted(expected)
    assert actual == expected  # bitwise on CPU


def test_config_errors_are_reported_before_building(shards, tmp_path):
    with pytest.raises(SettingsError) as err:
        train(compose_config(tiny_run(shards, tmp_path / "x", "mlm", 5, "data.path=/nonexistent/shards",
                                      "+optim.learning_rate=1", "+trainer.max_stepz=3")))
    message = str(err.value)
    assert "data.path=/nonexistent/shards" in message
    assert "optim.learning_rate: unknown key" in message
    assert "trainer.max_stepz: not an argument of lightning.Trainer" in message
    with pytest.raises(SettingsError, match=r"model.vocab_size=100"):
        train(compose_config(tiny_run(shards, tmp_path / "y", "mlm", 5, "model.vocab_size=100")))
    # the command line prints the same message, without a traceback, and exits 2
    result = subprocess.run([sys.executable, "-m", "pretrain", *tiny_run(shards, tmp_path / "z", "mlm", 5,
                                                                         "data.path=/nonexistent/shards")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: invalid configuration" in result.stderr and "data.path=/nonexistent/shards" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "z").exists()  # checked before Hydra creates the run directory


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    result = subprocess.run([sys.executable, "-m", "pretrain", f"+experiment={experiment}", "--cfg", "job"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "model:" in result.stdout and "objective:" in result.stdout


def test_non_finite_loss_stops_before_a_checkpoint_is_written(shards, tmp_path):
    """The NaN check runs without a per-step host sync (a device flag read at logging steps and before every
    checkpoint): a diverging run stops with one clear error, and no checkpoint holds weights a NaN step touched."""
    run_dir = tmp_path / "diverge"
    cfg = compose_config(tiny_run(shards, run_dir, "mlm", 6, "trainer.log_every_n_steps=3", "checkpoint_every_n_steps=2",
                                  "optim.lr=1e30", "optim.warmup_steps=0", "trainer.gradient_clip_val=null",
                                  "trainer.precision=32-true", "export_hf=false"))
    with pytest.raises(FloatingPointError, match="non-finite loss at or before step"):
        train(cfg)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt"))
    assert checkpoints == [] or checkpoints == ["step-00000002.ckpt"], checkpoints
    if checkpoints:  # a checkpoint written before the divergence holds finite weights only
        state = torch.load(run_dir / "checkpoints" / checkpoints[0], map_location="cpu", weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
