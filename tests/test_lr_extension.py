"""A resumed run with a larger trainer.max_steps: the LR continues from the last trained step's value, stretched to
the new end (optim.on_extend=stretch, the default) or held (constant), and one warning says so."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pretrain.train import train

REPO = Path(__file__).resolve().parents[1]
FIRST, EXTENDED, LR = 6, 10, 1e-3


def args(shards: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["+experiment=quickstart", "objective=mlm", f"data.path={shards}", f"output_dir={run}",
            f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "data.batch_size=4", "data.num_workers=0",
            "model.vocab_size=1024", "model.max_position_embeddings=64", "model.position_buckets=16",
            "model.num_hidden_layers=1", f"optim.lr={LR}", "optim.warmup_steps=2", "checkpoint_every_n_steps=3",
            "export_hf=false", "report=false", *extra]


def run(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        train(compose(config_name="config", overrides=overrides))


def lrs(run_dir: Path) -> list[float]:
    """The LR of every step in metrics.csv, in step order (first parameter group)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    column = next(k for k in rows[0] if k.startswith("lr-"))
    return [float(r[column]) for r in sorted(rows, key=lambda r: int(r["step"])) if r.get(column)]


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A run trained to its max_steps: its LR decayed to 0 at the end."""
    run_dir = tmp_path_factory.mktemp("lr") / "first"
    run(args(shards, run_dir, FIRST))
    return run_dir


@pytest.mark.parametrize("on_extend", ["stretch", "constant"])
def test_extension_continues_the_lr(shards, finished, tmp_path, caplog, on_extend):
    run_dir = tmp_path / on_extend
    shutil.copytree(finished, run_dir)
    before = lrs(run_dir)
    assert len(before) == FIRST and before[-1] > 0.0
    with caplog.at_level(logging.WARNING):
        run(args(shards, run_dir, EXTENDED, f"optim.on_extend={on_extend}"))
    notes = [r.getMessage() for r in caplog.records if "trainer.max_steps grew" in r.getMessage()]
    assert len(notes) == 1, notes
    assert f"from {FIRST} to {EXTENDED}" in notes[0] and f"optim.on_extend={on_extend}" in notes[0]
    after = lrs(run_dir)
    assert len(after) == EXTENDED and after[:FIRST] == before
    resumed = after[FIRST:]
    assert all(0.0 < lr <= before[-1] for lr in resumed), (before, resumed)
    if on_extend == "constant":
        assert resumed == pytest.approx([before[-1]] * len(resumed), rel=1e-6)
    else:  # one straight line from the last trained step's LR to 0 after the new last step
        step = before[-1] / (EXTENDED - FIRST + 1)
        assert resumed == pytest.approx([before[-1] - step * (i + 1) for i in range(len(resumed))], rel=1e-5)


def test_unknown_on_extend_is_one_error_line(shards, tmp_path):
    from pretrain.settings import SettingsError, settings_from_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args(shards, tmp_path / "run", 4, "optim.on_extend=restart"))
    with pytest.raises(SettingsError) as err:
        settings_from_config(cfg)
    assert str(err.value) == ("invalid configuration: optim.on_extend='restart': choose stretch or constant (what the "
                              "LR does when a resumed run's trainer.max_steps changes)")
    assert not (tmp_path / "run").exists()


def _stepped(total: int, steps: int, state: dict | None = None):
    import torch

    from pretrain.lr_schedule import build_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    schedule = build_schedule(optimizer, 4, total, 0.0)
    if state is not None:
        optimizer.param_groups[0]["lr"] = state["_last_lr"][0]  # as the optimizer's own state restores it
        schedule.load_state_dict(state)
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return schedule


def test_schedule_rebase_in_warm_up_and_from_an_unrecorded_checkpoint():
    from pretrain.lr_schedule import extension_note, follow_max_steps

    # stopped during warm-up: warm-up ends where planned, then `constant` holds the peak LR
    state = _stepped(8, 2).state_dict()
    note = extension_note(state, 4, 12, "constant", 0.0)
    assert note.startswith("trainer.max_steps grew from 8 to 12") and "warm-up ends at step 4" in note
    resumed = _stepped(12, 0, state)
    assert follow_max_steps(resumed, 12, "constant")
    lrs = [resumed.get_last_lr()[0]]
    for _ in range(8):
        resumed.optimizer.step()
        resumed.step()
        lrs.append(resumed.get_last_lr()[0])
    assert lrs == pytest.approx([LR * 3 / 4] + [LR] * 8)

    # a checkpoint whose schedule did not save its total (lr_lambdas None): one warning, no step at 0.0
    state = _stepped(6, 6).state_dict()
    state["lr_lambdas"] = [None]
    assert "does not record the trainer.max_steps" in extension_note(state, 4, 10, "stretch", 0.0)
    resumed = _stepped(10, 0, state)
    assert resumed.optimizer.param_groups[0]["lr"] == 0.0
    assert follow_max_steps(resumed, 10, "stretch", recorded=False)
    assert resumed.optimizer.param_groups[0]["lr"] > 0.0
    unchanged = _stepped(10, 6).state_dict()  # the same max_steps: nothing to say or do
    assert extension_note(unchanged, 4, 10, "stretch", 0.0) is None
    assert not follow_max_steps(_stepped(10, 0, unchanged), 10, "stretch")


def _resumed_lrs(schedule: str, on_extend: str, first: int, extended: int, warmup: int = 50):
    """The saved scheduler state after ``first`` steps of a run planned for ``first`` steps, and the LR of every
    step the resumed run (``trainer.max_steps=extended``) trains, steps first+1..extended."""
    import torch

    from pretrain.lr_schedule import build_schedule, follow_max_steps

    decay = 4 if schedule == "wsd" else 0

    def built(total: int):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
        return build_schedule(optimizer, warmup, total, 0.0, schedule, decay)

    trained = built(first)
    for _ in range(first):
        trained.optimizer.step()
        trained.step()
    state = trained.state_dict()
    resumed = built(extended)
    resumed.optimizer.param_groups[0]["lr"] = state["_last_lr"][0]  # as the optimizer's own state restores it
    resumed.load_state_dict(state)
    follow_max_steps(resumed, extended, on_extend, True, schedule, decay or None)
    lrs = []
    for _ in range(extended - first):
        lrs.append(resumed.get_last_lr()[0])
        resumed.optimizer.step()
        resumed.step()
    return state, lrs


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd"])
@pytest.mark.parametrize("on_extend", ["stretch", "constant"])
def test_a_new_end_inside_the_warm_up_is_said_as_the_schedule_does_it(schedule, on_extend):
    """optim.warmup_steps=50, trainer.max_steps 20 -> 30: every step left still warms up, so the LR only rises; the
    note names the values the schedule really gives (it said the LR decays to 0 at step 30 after warm-up ends at 50)."""
    from pretrain.lr_schedule import extension_note

    state, lrs = _resumed_lrs(schedule, on_extend, 20, 30)
    assert lrs == sorted(lrs) and lrs[-1] < LR and len(set(lrs)) == 10  # still warming up at the last step
    note = extension_note(state, 50, 30, on_extend, 0.0, schedule, 4 if schedule == "wsd" else None)
    assert note.startswith("trainer.max_steps grew from 20 to 30 since the checkpoint (step 20): the new end cuts "
                           "the warm-up short (optim.warmup_steps=50)"), note
    assert f"from {lrs[0]:.3g} at step 21 to {lrs[-1]:.3g} at step 30, the last, and never decays" in note, note
    assert "warm-up ends at step 50" not in note and "stable phase" not in note

    state, lrs = _resumed_lrs(schedule, on_extend, 20, 50)  # the new end where warm-up ends: the peak, once
    note = extension_note(state, 50, 50, on_extend, 0.0, schedule, 4 if schedule == "wsd" else None)
    assert lrs[-1] == pytest.approx(LR) and "comes as the warm-up ends" in note and f"{LR:.3g} at step 50" in note
