"""Shard sets under a live run, and two writers of one shard directory.

Training holds a shared lock on every shard set it reads and `data_prep shards` an exclusive one
(``data_prep.shard_lock``); shards are checked and mapped through one descriptor, against the file the run checked
at start (``data_prep.reader``). Each test holds a real process at a chosen point (tests/pause_runner.py: an event,
never a time), attacks the shard directory, then lets it go.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import shard_format as sf
from data_prep.errors import DataPrepError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
TIMEOUT = 600  # seconds: a bound so that a hang fails the test instead of stalling CI


def run_args(shards: Path, run_dir: Path, workers: int = 0) -> list[str]:
    return ["+experiment=quickstart", "objective=mlm", f"data.path={shards}", f"output_dir={run_dir}",
            "trainer.max_steps=2", "data.batch_size=8", f"data.num_workers={workers}", "model.vocab_size=1024",
            "model.max_position_embeddings=64", "model.position_buckets=16", "checkpoint_every_n_steps=2",
            "export_hf=false", "report=false"]


def shards_command(shards: Path, out: Path, *extra: str) -> list[str]:
    root = shards.parent
    return ["-m", "data_prep", "shards", "--input", str(root / "corpus.jsonl"), "--tokenizer", str(root / "tok"),
            "--out", str(out), "--seq-len", "64", "--workers", "1", *extra]


def start_held(point: str, flag: Path, module: str, args: list[str]) -> tuple[subprocess.Popen, int]:
    """Start ``python -m module args`` held at ``point`` (tests/pause_runner.py); wait until it is there."""
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "pause_runner.py"), point, str(flag), module,
                                *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = flag.with_suffix(".ready")
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"{module} ended before reaching {point}: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    while not ready.read_text():  # written, maybe not yet flushed
        time.sleep(0.05)
    return process, int(ready.read_text())


def go(flag: Path, process: subprocess.Popen) -> tuple[int, str]:
    flag.with_suffix(".go").touch()
    _, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stderr


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".shards.lock"}


@pytest.fixture
def live_set(shards, tmp_path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def test_overwrite_under_a_live_run_is_refused_and_the_run_trains_on_what_it_checked(shards, live_set, tmp_path):
    """F3: `data_prep shards --overwrite` (other settings: --seq-len 32) while a run holds the set, checked and
    about to read it with two DataLoader workers, is refused with one line naming the directory and the run's pid,
    and changes no file; the run then trains to its end. Once the run is over, the same command goes through: the live run was the reason."""
    before = digests(live_set)
    flag = tmp_path / "run"
    process, pid = start_held("data", flag, "pretrain", run_args(live_set, tmp_path / "run_dir", workers=2))
    try:
        overwrite = shards_command(shards, live_set, "--overwrite")
        overwrite[overwrite.index("--seq-len") + 1] = "32"
        refused = run(overwrite)
        assert refused.returncode == 2, refused.stderr[-3000:]
        line = one_error_line(refused.stderr)
        assert f"shard directory {live_set} is being read by a live training run (pid {pid}" in line, line
        assert digests(live_set) == before
    finally:
        rc, stderr = go(flag, process)
    assert rc == 0, stderr[-3000:]
    assert (tmp_path / "run_dir" / "checkpoints" / "step-00000002.ckpt").exists()
    assert digests(live_set) == before

    after = run(overwrite)
    assert after.returncode == 0, after.stderr[-3000:]
    assert json.loads((live_set / sf.MANIFEST_NAME).read_text())["settings"]["seq_len"] == 32


def test_a_shard_truncated_under_a_live_run_stops_it_with_one_line(live_set, tmp_path):
    """F3: a shard truncated after the run checked it at start and before the run opened it is refused when it is
    first opened (by a DataLoader worker or the background sha256, whichever comes first), with one line naming
    it: not read as zeros, no mmap traceback, no SIGBUS; no checkpoint."""
    shard = live_set / "shard-00000.bin"
    flag = tmp_path / "run"
    process, _ = start_held("data", flag, "pretrain", run_args(live_set, tmp_path / "run_dir", workers=2))
    try:
        os.truncate(shard, shard.stat().st_size // 2)  # far past the first page: was a mmap ValueError or SIGBUS
    finally:
        rc, stderr = go(flag, process)
    assert rc == 2, stderr[-3000:]
    line = one_error_line(stderr)
    assert f"shard {shard} changed on disk under this run (its size went from" in line, line
    assert not list((tmp_path / "run_dir").glob("checkpoints/*.ckpt"))


def test_a_manifest_entry_without_sha256_is_one_line_and_a_dead_hash_check_never_hangs(shards, live_set, tmp_path):
    """F9: a shard entry with no sha256 is refused before training, naming the key (null: tests/
    test_one_line_errors.py); and should the background check die anyway (here: an entry emptied after the set was
    opened), the checkpoint's wait raises its error in the training thread instead of waiting for ever. Both under
    a bounded subprocess timeout."""
    manifest = json.loads((live_set / sf.MANIFEST_NAME).read_text())
    del manifest["shards"][0]["sha256"]
    (live_set / sf.MANIFEST_NAME).write_text(json.dumps(manifest))
    result = run(["-m", "pretrain", *run_args(live_set, tmp_path / "run_dir")])
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert f"{live_set / sf.MANIFEST_NAME}: shards[0].sha256 is missing, expected 64 hex digits" in line, line
    assert not (tmp_path / "run_dir" / "checkpoints").exists()

    script = (
        "import sys\n"
        "from data_prep.errors import DataPrepError\n"
        "from data_prep.reader import GlobalOrder, ShardedDataset\n"
        "from data_prep.shard_hashes import LazyShardHasher\n"
        f"dataset = ShardedDataset({str(shards)!r})\n"
        "dataset.shards[0] = {}  # the hashing thread meets an entry with no keys at all\n"
        "hasher = LazyShardHasher(dataset, GlobalOrder(len(dataset), 0), 0)\n"
        "try:\n"
        "    hasher.verify_used(len(dataset))\n"
        "except DataPrepError as err:\n"
        "    print(f'error: {err}', file=sys.stderr)\n"
        "    sys.exit(2)\n"
    )
    result = run(["-c", script])
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert "the background sha256 check of the shards stopped" in line and "KeyError" in line, line


def test_two_writers_of_one_out_one_refuses_and_the_other_verifies(shards, tmp_path):
    """F13: a second `data_prep shards` on an --out that another one is writing refuses at once, naming the
    directory and the writer's pid, and touches nothing; a run started meanwhile is refused too. The first one
    then finishes, and its output passes the full sha256 check."""
    out = tmp_path / "out"
    flag = tmp_path / "writer"
    process, pid = start_held("write", flag, "data_prep", shards_command(shards, out, "--shard-size", "500")[2:])
    try:
        second = run(shards_command(shards, out, "--shard-size", "500"))
        assert second.returncode == 2, second.stderr[-3000:]
        line = one_error_line(second.stderr)
        assert f"shard directory {out} is being written by another `data_prep shards` (pid {pid} " in line, line
        from data_prep.reader import ShardedDataset

        with pytest.raises(DataPrepError, match=rf"shard directory {out} is being written right now .*pid {pid} "):
            ShardedDataset(out, lock=True)
    finally:
        rc, stderr = go(flag, process)
    assert rc == 0, stderr[-3000:]
    assert not [p for p in out.rglob("*") if p.name.endswith(sf.TMP_SUFFIX)]
    verified = run(["-m", "data_prep", "inspect", str(out), "--num", "0"])
    assert verified.returncode == 0 and "validation full (sha256): all 3 shards OK" in verified.stdout, \
        verified.stdout + verified.stderr
