"""ZeRO runs resume on another number of ranks (2 -> 3 for stages 1, 2 and 3; 3 -> 2 for stage 3).

One uninterrupted 2-rank run per stage trains 2N steps and saves at step N; that step-N checkpoint, copied into a
new run directory, is resumed on 3 ranks by the real command (``tests/elastic_probe.py`` is ``python -m pretrain``
that also saves the state it starts training from). The global batch is 6 sequences both ways: micro-batches of
one sequence, ``data.global_batch_size=6``: 2 ranks x 3 accumulated = 3 ranks x 2, derived at start-up (the resume
check compares the global batch, not the accumulation). Dropout and masks are drawn per sequence position, so the resumed run must reproduce the
uninterrupted run's per-step losses; the weights and Adam moments it starts from are compared with the checkpoint's,
each consolidated from its own partitions (2 ranks before, 3 after).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpointing import safe_load
from pretrain.checkpointing.find import read_metadata
from pretrain.checkpointing.reshard import UNIVERSAL

REPO = Path(__file__).resolve().parents[1]
N = 3  # steps before the resume, and after it
GLOBAL_BATCH = 6
LOSS_RTOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def run(shards: Path, run_dir: Path, stage: int, ranks: int, steps: int, probe: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    entry = [str(REPO / "tests" / "elastic_probe.py")] if probe else ["-m", "pretrain"]
    args = [
        "+experiment=quickstart", "objective=mlm", f"strategy=deepspeed_zero{stage}", f"data.path={shards}",
        f"output_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu", f"trainer.devices={ranks}",
        f"data.global_batch_size={GLOBAL_BATCH}", "data.batch_size=1", "data.num_workers=0",
        "trainer.log_every_n_steps=1", f"checkpoint_every_n_steps={N}", "export_hf=false",
        "model.vocab_size=1024", "model.max_position_embeddings=64", "model.position_buckets=16",
        "optim.lr=3e-3", "optim.warmup_steps=2", "optim.min_lr_ratio=1.0",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if probe:
        env["ELASTIC_PROBE_SAVE"] = str(probe)
    result = subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}.ckpt"


def resume_copy(source: Path, run_dir: Path) -> Path:
    """A new run directory holding only ``source`` (a step-N checkpoint directory) to resume from."""
    (run_dir / "checkpoints").mkdir(parents=True)
    target = run_dir / "checkpoints" / source.name
    shutil.copytree(source, target)
    return target


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def assert_losses_follow(reference: Path, resumed: Path, first: int, last: int) -> None:
    expected, actual = losses(reference), losses(resumed)
    steps = list(range(first + 1, last + 1))  # the steps after `first`, up to `last`
    assert all(s in actual for s in steps), (sorted(actual), steps)
    torch.testing.assert_close(torch.tensor([actual[s] for s in steps]), torch.tensor([expected[s] for s in steps]),
                               rtol=LOSS_RTOL, atol=0)
    # the gradient norm is the global batch's: equal on 2 and 3 ranks (it was off by the accumulation factor)
    norms, expected_norms = losses(resumed, "train/grad_norm"), losses(reference, "train/grad_norm")
    torch.testing.assert_close(torch.tensor([norms[s] for s in steps]),
                               torch.tensor([expected_norms[s] for s in steps]), rtol=LOSS_RTOL, atol=0)


def consolidated_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="checkpoint")


def universal_states(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter: fp32 weight, exp_avg, exp_avg_sq and step, as consolidated in ``checkpoint/universal``."""
    zero = checkpoint / UNIVERSAL / "checkpoint" / "zero"
    states = {}
    for param in sorted(p for p in zero.iterdir() if p.is_dir()):
        states[param.name] = {}
        for key in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            if (param / f"{key}.pt").is_file():
                value = safe_load.load(param / f"{key}.pt", mmap=False, deepspeed=True)
                states[param.name][key] = value["param"] if isinstance(value, dict) else value
    return states


def param_groups(checkpoint: Path) -> list[dict]:
    saved = safe_load.load(checkpoint / UNIVERSAL / "checkpoint" / "zero" / "optimizer_state.pt", mmap=False,
                           deepspeed=True)
    groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


def reshard_cli(checkpoint: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pretrain.reshard", str(checkpoint)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"wrote {checkpoint.resolve() / UNIVERSAL}" in result.stdout


def adam_steps(checkpoint: Path) -> set[int]:
    """Every AdamW ``step`` count in a ZeRO checkpoint's optimizer files (one per parameter group and rank)."""
    def find(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from ([int(item)] if key == "step" else find(item))
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from find(item)

    return {s for f in (checkpoint / "checkpoint").glob("*optim_states.pt")
            for s in find(safe_load.load(f, deepspeed=True))}


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_run_resumes_on_three_ranks(stage, shards, tmp_path):
    reference = tmp_path / "reference"
    run(shards, reference, stage, ranks=2, steps=2 * N)
    source = step_dir(reference, N)
    before = file_bytes(source)

    resumed = tmp_path / "resumed"
    copied = resume_copy(source, resumed)
    # what a conversion killed halfway leaves (its temp directory), and a universal/ that is not this
    # checkpoint's conversion: neither is trusted
    (copied / ".universal.tmp-12345" / "checkpoint").mkdir(parents=True)
    (copied / UNIVERSAL / "checkpoint" / "zero").mkdir(parents=True)
    (copied / UNIVERSAL / "latest_universal").write_text("checkpoint")
    probe = tmp_path / "probe.ckpt"  # the 3-rank state right after loading, saved before the first step
    result = run(shards, resumed, stage, ranks=3, steps=2 * N, probe=probe)
    output = result.stdout + result.stderr
    assert f"{copied} was saved on 2 ranks, this run has 3" in output
    assert "left by a conversion that was interrupted" in output and f"replacing {copied / UNIVERSAL}" in output
    assert file_bytes(source) == before and file_bytes(copied / "checkpoint") == file_bytes(source / "checkpoint"), \
        "the original checkpoint files are never modified"
    assert (copied / UNIVERSAL / "conversion.json").is_file() and not list(copied.glob(".universal.tmp-*"))

    # the data position: global samples consumed, restored whatever the number of ranks
    assert read_metadata(probe)["dp_world_size"] == 3
    assert read_metadata(probe)["ShardDataModule"]["consumed"] == N * GLOBAL_BATCH
    assert read_metadata(step_dir(resumed, 2 * N))["ShardDataModule"]["consumed"] == 2 * N * GLOBAL_BATCH

    # consolidated weights: the 2-rank checkpoint's equal the 3-rank run's after loading, bit for bit
    saved, loaded = consolidated_weights(source), consolidated_weights(probe)
    assert saved.keys() == loaded.keys() and len(saved) > 10
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name

    # Adam moments and step: consolidated from the 2-rank files (by the resume) and from the 3-rank ones (by the
    # CLI) they are equal; so are the per-group hyperparameters (ZeRO-3's loader would give every group the first
    # group's weight decay)
    reshard_cli(probe)
    before_states, after_states = universal_states(copied), universal_states(probe)
    assert before_states.keys() == after_states.keys()
    moments = 0
    for name, states in before_states.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(after_states[name][key], states[key], rtol=1e-6, atol=0, msg=f"{name} {key}")
            moments += key != "fp32" and bool(states[key].abs().sum() > 0)
        if "step" in states:
            assert int(after_states[name]["step"]) == int(states["step"]) == N, name
    assert moments > 10, "the moments compared are those of a trained run"
    assert param_groups(probe) == param_groups(copied)
    assert [g["weight_decay"] for g in param_groups(probe)] == [0.01, 0.0]

    # training continues as if never interrupted: steps N+1..2N of the uninterrupted 2-rank run, with AdamW's
    # step count (its bias correction) continued too (ZeRO-3's loader shared one counter between groups)
    assert_losses_follow(reference, resumed, N, 2 * N)
    assert adam_steps(step_dir(resumed, 2 * N)) == adam_steps(step_dir(reference, 2 * N)) == {2 * N}

    if stage == 3:
        # and back from 3 ranks to 2: the 3-rank state at step N (the probe) resumed on 2 ranks, steps N+1..2N again
        back = tmp_path / "back"
        (back / "checkpoints").mkdir(parents=True)
        shutil.copytree(probe, step_dir(back, N))  # with the universal form the CLI made: reused, not redone
        result = run(shards, back, stage, ranks=2, steps=2 * N)
        assert "was saved on 3 ranks, this run has 2" in result.stdout + result.stderr
        assert "converted" not in result.stdout + result.stderr
        assert_losses_follow(reference, back, N, 2 * N)
