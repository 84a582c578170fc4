"""DeepSpeed ZeRO 1/2/3 on two CPU processes (gloo): same losses as DDP, checkpoint, resume, HuggingFace export.

Every run is the real command line (`python -m pretrain ... trainer.devices=2 strategy=...`) in a subprocess, as a
user runs it. The LR schedule is flat after warm-up (`optim.min_lr_ratio=1.0`), so a run stopped at step 4 and
continued to step 8 follows the same schedule as a straight 8-step run.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain import hf
from pretrain.settings import settings_from_config
from pretrain.strategies import build_strategy

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
STEPS = 8
# DeepSpeed reduces gradients in buckets, DDP in its own buckets: the sums can differ in the last bits.
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
WEIGHT_TOLERANCE = dict(rtol=0, atol=1e-5)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def two_process_run(shards: Path, run_dir: Path, objective: str, strategy: str, steps: int, *extra: str,
                    check: bool = True) -> subprocess.CompletedProcess:
    args = [
        "+experiment=quickstart", f"objective={objective}", f"strategy={strategy}", f"data.path={shards}",
        f"output_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.log_every_n_steps=1", "checkpoint_every_n_steps=4", "data.batch_size=8", "data.num_workers=0",
        "model.vocab_size=1024", f"model.max_position_embeddings={SEQ_LEN}", "model.position_buckets=16",
        "optim.lr=3e-3", "optim.warmup_steps=2", "optim.min_lr_ratio=1.0", *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def export(checkpoint: Path, out: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pretrain.export", str(checkpoint), str(out)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_reference(shards, tmp_path_factory):
    """Straight 8-step DDP runs (2 processes), exported from their last checkpoint, one per objective."""
    made: dict[str, Path] = {}

    def get(objective: str) -> Path:
        if objective not in made:
            run = tmp_path_factory.mktemp(f"ddp_{objective}")
            two_process_run(shards, run, objective, "ddp", STEPS, "export_hf=false")
            export(run / "checkpoints" / "last.ckpt", run / "exported")
            made[objective] = run
        return made[objective]

    return get


@pytest.mark.parametrize("stage,objective", [(1, "mlm"), (2, "mlm"), (3, "rtd")])
def test_zero_stage_matches_ddp_resumes_and_exports(stage, objective, shards, ddp_reference, tmp_path):
    """ZeRO-3 with objective=rtd covers GDES: the discriminator's table is built from the generator's partitioned
    word embeddings inside the objective's forward."""
    reference = ddp_reference(objective)
    run = tmp_path / f"zero{stage}"
    two_process_run(shards, run, objective, f"deepspeed_zero{stage}", STEPS // 2, "export_hf=false")
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "checkpoint").is_dir(), "a DeepSpeed checkpoint is a directory"
    resumed = two_process_run(shards, run, objective, f"deepspeed_zero{stage}", STEPS)
    assert f"resuming from {last} (step {STEPS // 2})" in resumed.stdout + resumed.stderr

    expected, actual = read_losses(reference), read_losses(run)
    steps = list(range(1, STEPS + 1))
    assert sorted(actual) == steps == sorted(expected)
    torch.testing.assert_close(torch.tensor([actual[s] for s in steps]),
                               torch.tensor([expected[s] for s in steps]), **LOSS_TOLERANCE)
    # the gradient norm (before clipping) comes from the DeepSpeed engine and equals DDP's from the full gradients
    norms, ddp_norms = read_losses(run, "train/grad_norm"), read_losses(reference, "train/grad_norm")
    assert sorted(norms) == sorted(ddp_norms) and len(norms) >= STEPS - 1, (norms, ddp_norms)
    torch.testing.assert_close(torch.tensor([norms[s] for s in sorted(norms)]),
                               torch.tensor([ddp_norms[s] for s in sorted(norms)]), rtol=1e-4, atol=1e-5)

    # the ZeRO checkpoint consolidates to the same HuggingFace model as the DDP run's and as the run's own export
    export(last, tmp_path / "exported")
    subdirs = ["hf", "hf_generator"] if objective == "rtd" else ["hf"]
    for sub in subdirs:
        from_zero = hf.read_state_dict(tmp_path / "exported" / sub)[0]
        from_ddp = hf.read_state_dict(reference / "exported" / sub)[0]
        at_end = hf.read_state_dict(run / sub)[0]
        assert from_zero.keys() == from_ddp.keys() == at_end.keys()
        for key in from_zero:
            torch.testing.assert_close(from_zero[key], from_ddp[key], **WEIGHT_TOLERANCE, msg=f"{sub}: {key}")
            assert torch.equal(from_zero[key], at_end[key]), f"{sub}: {key}"
    native = hf.from_pretrained(tmp_path / "exported" / "hf").eval()
    assert native.config.vocab_size == 1024

    if stage == 3:
        # a ZeRO checkpoint resumes only under DeepSpeed (another number of ranks: tests/test_elastic_zero.py)
        other = two_process_run(shards, run, objective, "ddp", STEPS + 2, check=False)
        assert other.returncode == 2 and "is a DeepSpeed (ZeRO) checkpoint directory" in other.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml")))
def test_every_strategy_config_builds(name, shards):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=quickstart", f"strategy={name}",
                                                       f"data.path={shards}"])
    settings = settings_from_config(cfg)
    strategy = build_strategy(settings.strategy, "cpu", settings.data.batch_size)
    if name.startswith("deepspeed"):
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == int(name[len("deepspeed_zero")])
        assert ("offload_optimizer" in zero) == name.endswith("offload")
        assert type(strategy).__name__ == "CPUDeepSpeedStrategy"
        # on a GPU accelerator the stock strategy is used, with the gradient-accumulation scale fixed
        assert type(build_strategy(settings.strategy, "gpu", 8)).__name__ == "ZeroStrategy"
    else:
        assert (strategy == "auto") == (name == "auto")
