"""Low-severity faults found by probing the command lines with bad inputs: each must end in one clear error line
(naming the file, key or value and what to do), exit non-zero, and print no traceback.

Each case is a function ``case(tmp_path, shards) -> Case`` that prepares its bad input under ``tmp_path`` and
says which command to run and what the error line must contain. Cases are grouped by the part of the project that
reads the input; every group is one list, and the test below is parametrised over all of them."""

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    argv: list[str]              # arguments after ``python``, e.g. ["-m", "pretrain.export", ckpt, out]
    expect: str                  # a substring of the one error line
    env: dict = field(default_factory=dict)
    timeout: float = 300


# --- checkpoints and their checksums ---------------------------------------------------------------------------
CHECKPOINT_CASES: list = []

# --- the run record, resume and export -------------------------------------------------------------------------
RUN_CASES: list = []

# --- shard sets, manifests and data_prep -----------------------------------------------------------------------
def _edited_manifest(tmp_path: Path, shards: Path, edit) -> Path:
    """A copy of the ``shards`` set whose manifest went through ``edit(manifest)``."""
    import json
    import shutil

    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _inspect(directory: Path) -> list[str]:
    return ["-m", "data_prep", "inspect", str(directory), "--num", "0"]


def _shards_args(shards: Path, inputs: str, out: Path) -> list[str]:
    return ["-m", "data_prep", "shards", "--input", inputs, "--tokenizer", str(shards.parent / "tok"), "--out",
            str(out), "--seq-len", "64", "--workers", "1"]


def manifest_without_a_key(tmp_path, shards):
    copy = _edited_manifest(tmp_path, shards, lambda m: m["tokenizer"].pop("vocab_size"))
    return Case(_inspect(copy), "manifest.json: tokenizer.vocab_size is missing, expected a whole number >= 0")


def manifest_of_the_wrong_type(tmp_path, shards):
    copy = _edited_manifest(tmp_path, shards, lambda m: m.update(shards={"shard-00000.bin": 1}))
    return Case(_inspect(copy), "manifest.json: shards is {'shard-00000.bin': 1} (dict), expected a list")


def manifest_count_as_a_string(tmp_path, shards):  # was "1368 sequences != manifest 1368"
    def edit(manifest):
        manifest["shards"][0]["sequences"] = str(manifest["shards"][0]["sequences"])
    copy = _edited_manifest(tmp_path, shards, edit)
    return Case(_inspect(copy), "manifest.json: shards[0].sequences is '")


def manifest_null_sha256(tmp_path, shards):  # killed the background sha256 thread; the run then hung
    copy = _edited_manifest(tmp_path, shards, lambda m: m["shards"][0].update(sha256=None))
    return Case(_inspect(copy), "manifest.json: shards[0].sha256 is None (NoneType), expected 64 hex digits")


def fifo_as_a_shard(tmp_path, shards):  # hung for ever, holding the shard set's lock
    import shutil

    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    (copy / "shard-00000.bin").unlink()
    os.mkfifo(copy / "shard-00000.bin")
    return Case(["-m", "pretrain", "+experiment=quickstart", f"data.path={copy}", f"output_dir={tmp_path / 'run'}",
                 "model.vocab_size=1024", "model.max_position_embeddings=64", "trainer.max_steps=2"],
                f"shard {copy / 'shard-00000.bin'} is not a regular file (a FIFO", timeout=120)


def fifo_as_an_input(tmp_path, shards):  # hung for ever, holding the output directory's lock
    os.mkfifo(tmp_path / "corpus.txt")
    return Case(_shards_args(shards, str(tmp_path / "corpus.txt"), tmp_path / "out"),
                f"{tmp_path / 'corpus.txt'} is not a regular file (a FIFO", timeout=120)


def out_is_the_input(tmp_path, shards):
    import shutil

    (tmp_path / "corpus").mkdir()
    shutil.copy(shards.parent / "corpus.jsonl", tmp_path / "corpus")
    return Case(_shards_args(shards, str(tmp_path / "corpus"), tmp_path / "corpus"),
                f"--out {tmp_path / 'corpus'} is the input {tmp_path / 'corpus'}")


def out_inside_the_input(tmp_path, shards):
    import shutil

    (tmp_path / "corpus").mkdir()
    shutil.copy(shards.parent / "corpus.jsonl", tmp_path / "corpus")
    return Case(_shards_args(shards, str(tmp_path / "corpus"), tmp_path / "corpus" / "shards"),
                f"--out {tmp_path / 'corpus' / 'shards'} lies inside the input {tmp_path / 'corpus'}")


DATA_CASES: list = [manifest_without_a_key, manifest_of_the_wrong_type, manifest_count_as_a_string,
                    manifest_null_sha256, fifo_as_a_shard, fifo_as_an_input, out_is_the_input, out_inside_the_input]

# --- signals, export directories and concurrent tools ----------------------------------------------------------
SIGNAL_CASES: list = []

ALL_CASES = CHECKPOINT_CASES + RUN_CASES + DATA_CASES + SIGNAL_CASES


def run_case(case: Case) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **case.env}
    return subprocess.run([sys.executable, *case.argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=case.timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("make_case", ALL_CASES, ids=[c.__name__ for c in ALL_CASES])
def test_bad_input_gives_one_clear_line(make_case, tmp_path, shards):
    case = make_case(tmp_path, shards)
    result = run_case(case)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and case.expect in errors[0], result.stderr[-3000:]
