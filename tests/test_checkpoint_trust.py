"""A resume or export loads only checkpoint files that were verified first.

- A ZeRO checkpoint's ``latest`` (or ``universal/latest_universal``) file naming a crafted tag directory runs
  nothing: DeepSpeed is told which tag to load, and that tag's files are the ones read with the restricted
  unpickler beforehand. Checked with a marker file the crafted pickle would create.
- A universal checkpoint with one weight changed is refused, naming the file (``universal/SHA256SUMS``).
- A ``.ckpt`` or DeepSpeed file copied without its ``.sha256`` is checked against the CRC-32 values stored in the
  file itself: one flipped byte is named and the resume falls back to an older checkpoint, the export stops.

Runs are the quickstart model on the bundled English sample (the ``shards`` fixture), ZeRO-1 on CPU, 2 steps.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from test_recovery import cli, copy_run, craft, four_steps  # noqa: F401 (four_steps: a fixture)

from pretrain.checkpointing import safe_load
from pretrain.checkpointing.find import CheckpointError, newest_checkpoint, verify_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def zero_args(shards: Path, run_dir: Path, steps: int, ranks: int) -> list[str]:
    """ZeRO-1 on ``ranks`` CPU processes; a global batch of 4 (2 x 2 accumulated on one rank, 2 x 2 ranks)."""
    return ["+experiment=quickstart", "objective=mlm", "strategy=deepspeed_zero1", f"data.path={shards}",
            f"output_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
            f"trainer.devices={ranks}", "data.global_batch_size=4", "data.batch_size=2", "data.num_workers=0",
            "trainer.log_every_n_steps=1", "checkpoint_every_n_steps=2", "export_hf=false", "model.vocab_size=1024",
            "model.max_position_embeddings=64", "model.position_buckets=16", "optim.warmup_steps=2"]


def step_dir(run_dir: Path, step: int = 2) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}.ckpt"


@pytest.fixture(scope="module")
def zero_run(shards, tmp_path_factory) -> Path:
    """A one-rank ZeRO-1 run stopped at its step-2 checkpoint, converted to universal form by `pretrain.reshard`."""
    run = tmp_path_factory.mktemp("zero") / "run"
    result = cli(zero_args(shards, run, 2, 1), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli([str(step_dir(run))], runner=["-m", "pretrain.reshard"], env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (step_dir(run) / "universal" / "SHA256SUMS").is_file()
    return run


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_crafted_tag_named_by_latest_runs_nothing(shards, zero_run, tmp_path):
    marker = tmp_path / "MARKER"
    run = copy_run(zero_run, tmp_path, "run")
    craft(step_dir(run) / "evil" / "mp_rank_00_model_states.pt", marker)
    (step_dir(run) / "latest").write_text("evil")
    result = cli(zero_args(shards, run, 4, 1), env=ONE_THREAD)
    assert not marker.exists()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(step 2)" in result.stdout + result.stderr  # resumed from the verified tag, then trained on
    assert step_dir(run, 4).is_dir()


def test_a_crafted_tag_named_by_latest_universal_runs_nothing(shards, zero_run, tmp_path):
    """The resume on two ranks loads the universal form; its ``latest_universal`` names a crafted directory."""
    marker = tmp_path / "MARKER"
    run = copy_run(zero_run, tmp_path, "run")
    universal = step_dir(run) / "universal"
    craft(universal / "evil" / "mp_rank_00_model_states.pt", marker)
    craft(universal / "evil" / "zero" / "optimizer_state.pt", marker)
    (universal / "latest_universal").write_text("evil")
    result = cli(zero_args(shards, run, 4, 2), env=ONE_THREAD)
    assert not marker.exists()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from its universal form" in result.stdout + result.stderr
    assert step_dir(run, 4).is_dir()


def test_one_changed_element_in_a_universal_file_is_refused(shards, zero_run, tmp_path):
    run = copy_run(zero_run, tmp_path, "run")
    zero = step_dir(run) / "universal" / "checkpoint" / "zero"
    damaged = sorted(zero.glob("*/fp32.pt"))[0]
    state = safe_load.load(damaged, mmap=False, deepspeed=True)
    weights = state["param"] if isinstance(state, dict) else state
    with torch.no_grad():
        flat = weights.view(-1)
        flat[flat.abs().argmax()] *= 1 + 1e-5  # one element, a relative change of 1e-5: it still loads
    torch.save(state, damaged)

    for argv, runner in (([str(step_dir(run))], ["-m", "pretrain.reshard"]),  # by hand
                         (zero_args(shards, run, 4, 2), None)):  # resuming on another number of ranks
        result = cli(argv, runner=runner, env=ONE_THREAD)
        assert result.returncode != 0, result.stderr[-3000:]
        errors = error_lines(result)
        assert len(errors) == 1 and f"{damaged}: its sha256" in errors[0], result.stderr[-3000:]
        assert "SHA256SUMS" in errors[0]
    assert not step_dir(run, 4).exists()


def flip_byte_in_last_record(path: Path) -> None:
    """Flip one byte in the middle of the file's last tensor record (stored, not compressed, in torch's zip)."""
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 0]
        info = max(records, key=lambda i: int(i.filename.rsplit("/", 1)[1]))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def optimizer_tensors(checkpoint: dict) -> list[torch.Tensor]:
    return [t for state in checkpoint["optimizer_states"][0]["state"].values() for t in state.values()]


def test_a_checkpoint_copied_without_its_checksum_is_checked_by_its_own_crcs(four_steps, zero_run, tmp_path):
    run = copy_run(four_steps, tmp_path, "run")
    last = run / "checkpoints" / "last.ckpt"
    Path(f"{last}.sha256").unlink()
    assert newest_checkpoint(run).path == last  # intact without its sidecar: trusted through the file's CRC-32s

    before = torch.load(last, weights_only=True)
    flip_byte_in_last_record(last)
    after = torch.load(last, weights_only=True)  # still loads: only a checksum sees the flipped byte
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert any(not torch.equal(a, b) for a, b in zip(optimizer_tensors(after), optimizer_tensors(before)))

    point = newest_checkpoint(run)  # the resume falls back to the newest intact checkpoint, naming the damaged one
    assert point.path == run / "checkpoints" / "step-00000004.ckpt" and point.step == 4
    assert [p for p, _ in point.skipped] == [last] and "fails the CRC-32" in point.skipped[0][1]
    step4 = run / "checkpoints" / "step-00000004.ckpt"
    Path(f"{step4}.sha256").write_bytes(b"")  # a damaged sidecar: that checkpoint is skipped like a damaged one
    point = newest_checkpoint(run)
    assert point.path == run / "checkpoints" / "step-00000002.ckpt"
    assert point.skipped[-1] == (step4, "its checksum file step-00000004.ckpt.sha256 is damaged (empty)")

    result = cli([str(last), str(tmp_path / "out")], runner=["-m", "pretrain.export"])
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 1 and f"{last}: no last.ckpt.sha256 beside it" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()

    deepspeed = copy_run(zero_run, tmp_path, "zero")  # the same for a DeepSpeed file copied without its sidecar
    shutil.rmtree(step_dir(deepspeed) / "universal")
    optim = next((step_dir(deepspeed) / "checkpoint").glob("*optim_states.pt"))
    Path(f"{optim}.sha256").unlink()
    verify_checkpoint(step_dir(deepspeed))
    flip_byte_in_last_record(optim)
    with pytest.raises(CheckpointError, match=f"{optim.name}: no {optim.name}.sha256 beside it, .* fails the CRC-32"):
        verify_checkpoint(step_dir(deepspeed))
