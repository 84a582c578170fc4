"""LR schedules (linear, cosine, warmup-stable-decay) follow their formulas at every step of a real run, a WSD resume
in its stable phase moves the decay, and a cool-down from a stable-phase checkpoint equals, bitwise on CPU, a run
that planned its decay at that step, without touching the source run; from a DeepSpeed (ZeRO-2) checkpoint directory
too."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain.train import train

REPO = Path(__file__).resolve().parents[1]
LR, WARMUP, MIN_RATIO = 1e-3, 2, 0.1


def args(shards: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["+experiment=quickstart", "objective=mlm", f"data.path={shards}", f"output_dir={run}",
            f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "data.batch_size=4", "data.num_workers=0",
            "model.vocab_size=1024", "model.max_position_embeddings=64", "model.position_buckets=16",
            "model.num_hidden_layers=1", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}",
            f"optim.min_lr_ratio={MIN_RATIO}", "export_hf=false", "report=false", *extra]


def run(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        train(compose(config_name="config", overrides=overrides))


def rows(run_dir: Path) -> dict[int, dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def lrs(run_dir: Path) -> list[float]:
    return [float(r["lr-AdamW/pg1"]) for _, r in sorted(rows(run_dir).items())]


def expected_multiplier(schedule: str, step: int, total: int, decay: int = 0, shape: str = "1-sqrt") -> float:
    """The formulas of the README / pretrain.lr_schedule, written out again."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (total - WARMUP))
    if schedule == "linear":
        return max(MIN_RATIO, 1 - progress * (1 - MIN_RATIO))
    if schedule == "cosine":
        return MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
    start = total - decay
    if step < start:
        return 1.0
    q = (step - start) / decay
    return MIN_RATIO + (1 - MIN_RATIO) * (1 - math.sqrt(q) if shape == "1-sqrt" else 1 - q)


@pytest.fixture(scope="module")
def wsd_source(shards, tmp_path_factory) -> Path:
    """A WSD run of 10 steps whose last 4 decay (the stable phase: steps 2..5), every checkpoint kept."""
    run_dir = tmp_path_factory.mktemp("wsd") / "source"
    run(args(shards, run_dir, 10, "optim.schedule=wsd", "optim.decay_steps=4", "checkpoint_every_n_steps=3",
             "keep_checkpoints=-1"))
    return run_dir


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd"])
def test_each_schedule_follows_its_formula_at_every_step(schedule, shards, wsd_source, tmp_path):
    if schedule == "wsd":  # 1-sqrt over the last 4 of 10 steps
        run_dir, steps, extra = wsd_source, 10, {"decay": 4}
    else:
        run_dir, steps, extra = tmp_path / schedule, 7, {}
        run(args(shards, run_dir, steps, f"optim.schedule={schedule}", "checkpoint_every_n_steps=100"))
    logged = lrs(run_dir)
    assert len(logged) == steps
    assert logged == pytest.approx([LR * expected_multiplier(schedule, s, steps, **extra) for s in range(steps)],
                                   rel=1e-12, abs=0)
    if schedule == "wsd":
        assert logged[WARMUP:6] == [LR] * 4 and logged[6] == LR and logged[7] < LR


def _stepped(total: int, steps: int, state: dict | None = None, decay: int = 4, shape: str = "linear"):
    from pretrain.lr_schedule import build_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    schedule = build_schedule(optimizer, WARMUP, total, MIN_RATIO, "wsd", decay, shape)
    if state is not None:
        optimizer.param_groups[0]["lr"] = state["_last_lr"][0]
        schedule.load_state_dict(state)
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return schedule


def _lrs_after(schedule, steps: int) -> list[float]:
    out = [schedule.get_last_lr()[0]]
    for _ in range(steps):
        schedule.optimizer.step()
        schedule.step()
        out.append(schedule.get_last_lr()[0])
    return out


def test_wsd_resumed_with_more_steps_moves_its_decay_to_the_new_end():
    from pretrain.lr_schedule import extension_note, follow_max_steps

    # stopped in the stable phase (step 5 of 12, decay from 8): the new plan as a fresh run of 20 steps has it
    state = _stepped(12, 5).state_dict()
    note = extension_note(state, WARMUP, 20, "stretch", MIN_RATIO, "wsd", 4, "linear")
    assert note == ("trainer.max_steps grew from 12 to 20 since the checkpoint (step 5): the stable phase now ends at "
                    "step 16, then the LR decays with the linear shape to 0.0001 at step 20")
    resumed = _stepped(12, 0, state)
    assert follow_max_steps(resumed, 20, "stretch", schedule="wsd", decay_steps=4, decay_shape="linear")
    assert _lrs_after(resumed, 15) == _lrs_after(_stepped(20, 5), 15)  # (the LR of step 5 was already 1.0)

    # stopped inside the decay (step 10 of 12): the decay goes on from the LR it reached, to the new end
    state = _stepped(12, 10).state_dict()
    reached = _stepped(12, 9).get_last_lr()[0]
    for on_extend in ("stretch", "constant"):
        resumed = _stepped(12, 0, state)
        assert follow_max_steps(resumed, 20, on_extend, schedule="wsd", decay_steps=4, decay_shape="linear")
        after = _lrs_after(resumed, 9)
        if on_extend == "constant":
            assert after == pytest.approx([reached] * 10, rel=1e-12)
        else:  # a straight line (linear shape) from the step-9 LR to the floor at step 20
            drop = (reached - LR * MIN_RATIO) / (20 - 9)
            assert after == pytest.approx([reached - drop * (i + 1) for i in range(10)], rel=1e-9)


def test_cosine_resumed_with_more_steps_goes_on_along_its_curve():
    """Stopped at step 6 of 10: the rest of the cosine, from the LR reached, stretched to end at step 20."""
    from pretrain.lr_schedule import build_schedule, follow_max_steps

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    schedule = build_schedule(optimizer, WARMUP, 10, MIN_RATIO, "cosine")
    reached = _lrs_after(schedule, 5)[-1]  # the LR of step 5, the last one trained
    optimizer.step()
    schedule.step()
    assert follow_max_steps(schedule, 20, "stretch", schedule="cosine")
    after = _lrs_after(schedule, 13)  # steps 6..19
    progress = math.acos(2 * (reached / LR - MIN_RATIO) / (1 - MIN_RATIO) - 1) / math.pi
    expected = [LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * (progress + (1 - progress) * (
        s - 5) / 15)))) for s in range(6, 20)]
    assert after == pytest.approx(expected, rel=1e-9) and after[0] < reached


def test_cooldown_checks_the_source_is_in_its_stable_phase(tmp_path):
    from pretrain.cooldown import CooldownError, check_destination, check_stable
    from pretrain.lr_schedule import WarmupDecay

    wsd = WarmupDecay(WARMUP, 10, 0.0, "wsd", 4)
    for step in range(WARMUP, 7):  # warm-up done, decay (from step 6) not begun
        check_stable(Path("c.ckpt"), step, wsd)
    with pytest.raises(CooldownError, match="inside its warm-up"):
        check_stable(Path("c.ckpt"), 1, wsd)
    with pytest.raises(CooldownError, match=r"past the stable phase of its run \(its decay began at step 6\)"):
        check_stable(Path("c.ckpt"), 7, wsd)
    with pytest.raises(CooldownError, match="optim.schedule=cosine"):
        check_stable(Path("c.ckpt"), 4, WarmupDecay(WARMUP, 10, 0.0, "cosine"))
    with pytest.raises(CooldownError, match="overlaps the source run"):
        check_destination(tmp_path / "run" / "cooled", tmp_path / "run")


def _tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_cooldown_equals_a_run_that_decayed_there(shards, wsd_source, tmp_path):
    """Cool down the 10-step run from its step-3 checkpoint over 3 steps, with the command line; compare with a
    6-step run whose last 3 steps decay: the same weights bitwise, the same metrics at every step."""
    source = wsd_source / "checkpoints" / "step-00000003.ckpt"  # kept by keep_checkpoints=-1
    before = _tree_digest(wsd_source)
    cooled = tmp_path / "cooled"
    command = [sys.executable, "-m", "pretrain.cooldown", str(source), "--out", str(cooled), "--decay-steps", "3"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the stable phase now ends at step 3, then the LR decays with the 1-sqrt shape" in result.stdout
    assert _tree_digest(wsd_source) == before  # the source run is only read

    reference = tmp_path / "reference"
    run(args(shards, reference, 6, "optim.schedule=wsd", "optim.decay_steps=3", "checkpoint_every_n_steps=3"))
    ours = torch.load(cooled / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    theirs = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ours["global_step"] == theirs["global_step"] == 6
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(ours["state_dict"][k], theirs["state_dict"][k]) for k in theirs["state_dict"])

    def compared(row: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in row.items() if k.startswith(("train/", "lr-"))}

    ours_rows, their_rows = rows(cooled), rows(reference)
    assert sorted(ours_rows) == sorted(their_rows) == list(range(1, 7))  # steps 1-3 copied from the source, 4-6 trained
    assert all(compared(ours_rows[s]) == compared(their_rows[s]) for s in range(1, 7))
    assert [compared(ours_rows[s]) for s in range(1, 4)] == [compared(rows(wsd_source)[s]) for s in range(1, 4)]
    assert lrs(cooled) == pytest.approx([LR * expected_multiplier("wsd", s, 6, 3) for s in range(6)], rel=1e-12)
    record = json.loads((cooled / "cooldown.json").read_text())
    assert record["step"] == 3 and record["decay_steps"] == 3 and record["source_checkpoint"] == str(source.resolve())

    # the report draws the whole history in the source's step numbering
    from pretrain.report import load_run

    steps, values = load_run(cooled).columns["lr-AdamW/pg1"]
    assert steps == [1, 2, 3, 4, 5, 6] and values[:3] == lrs(wsd_source)[:3]

    # the same command again finds the finished cool-down and trains nothing more
    from pretrain.cooldown import prepare

    copy_time = (cooled / "checkpoints" / "step-00000003.ckpt").stat().st_mtime_ns
    cfg, _ = prepare(source, cooled, 3, [])
    assert cfg.trainer.max_steps == 6 and cfg.output_dir == str(cooled)
    assert (cooled / "checkpoints" / "step-00000003.ckpt").stat().st_mtime_ns == copy_time


def _cli(runner: str, *argv: str) -> subprocess.CompletedProcess:
    """``python -m RUNNER ARGV`` as a user runs it (DeepSpeed initialises torch.distributed: its own process)."""
    result = subprocess.run([sys.executable, "-m", runner, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tensors(value, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a loaded DeepSpeed file, by its path of keys."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return {k: t for key, item in items for k, t in _tensors(item, f"{path}/{key}").items()}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cooldown_from_a_deepspeed_checkpoint_equals_a_deepspeed_run_that_decayed_there(shards, tmp_path):
    """ZeRO-2 on one CPU rank: the source saves its step-3 checkpoint directory, the cool-down resumes a copy of it
    and decays over 3 steps; a ZeRO-2 run planned to decay at step 3 reaches the same weights, fp32 master
    partition and Adam moments, bit for bit (one rank, fp32, DeepSpeed's CPU ops: the same sums in the same
    order), and logs the same losses and LRs at every step."""
    from pretrain.checkpointing import safe_load

    zero = ["strategy=deepspeed_zero2", "trainer.accelerator=cpu", "trainer.devices=1", "checkpoint_every_n_steps=3"]
    source_run = tmp_path / "source"
    _cli("pretrain", *args(shards, source_run, 6, "optim.schedule=wsd", "optim.decay_steps=2", "keep_checkpoints=-1",
                           *zero))
    source = source_run / "checkpoints" / "step-00000003.ckpt"
    assert (source / "checkpoint").is_dir(), "a DeepSpeed checkpoint is a directory"
    before = _tree_digest(source_run)
    cooled = tmp_path / "cooled"
    result = _cli("pretrain.cooldown", str(source), "--out", str(cooled), "--decay-steps", "3")
    assert f"resuming from {cooled / 'checkpoints' / 'step-00000003.ckpt'} (step 3)" in result.stdout
    assert "the stable phase now ends at step 3, then the LR decays with the 1-sqrt shape" in result.stdout
    assert _tree_digest(source_run) == before  # the source run is only read
    assert _tree_digest(cooled / "checkpoints" / "step-00000003.ckpt") == _tree_digest(source)

    reference = tmp_path / "reference"
    _cli("pretrain", *args(shards, reference, 6, "optim.schedule=wsd", "optim.decay_steps=3", *zero))
    for name, key in (("mp_rank_00_model_states.pt", "module"),
                      ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "optimizer_state_dict")):
        ours, theirs = (_tensors(safe_load.load(run_dir / "checkpoints" / "last.ckpt" / "checkpoint" / name,
                                                deepspeed=True)[key]) for run_dir in (cooled, reference))
        assert ours.keys() == theirs.keys() and len(ours) > 5, name
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), \
            [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    optimizer = _tensors(safe_load.load(reference / "checkpoints" / "last.ckpt" / "checkpoint" /
                                        "zero_pp_rank_0_mp_rank_00_optim_states.pt", deepspeed=True))
    assert sum(bool(t.abs().sum() > 0) for k, t in optimizer.items() if "exp_avg" in k) >= 2, \
        "the Adam moments compared are those of a trained run"

    def compared(row: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in row.items() if k.startswith(("train/", "lr-"))}

    ours_rows, their_rows = rows(cooled), rows(reference)
    assert sorted(ours_rows) == sorted(their_rows) == list(range(1, 7))
    assert all(compared(ours_rows[s]) == compared(their_rows[s]) for s in range(1, 7))
    assert lrs(cooled) == pytest.approx([LR * expected_multiplier("wsd", s, 6, 3) for s in range(6)], rel=1e-12)
