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
def allow_changes_naming_nothing(tmp_path, shards):
    """A typo in resume.allow_changes used to allow nothing, silently."""
    return Case(["-m", "pretrain", "+experiment=quickstart", f"data.path={shards}", f"output_dir={tmp_path / 'run'}",
                 "resume.allow_changes=[optim.lrr]"], "resume.allow_changes: optim.lrr is not a setting the resume")


def allow_changes_of_the_micro_batch(tmp_path, shards):
    """data.batch_size is no longer compared on its own: the effective global batch is."""
    return Case(["-m", "pretrain", "+experiment=quickstart", f"data.path={shards}", f"output_dir={tmp_path / 'run'}",
                 "resume.allow_changes=[data.batch_size]"], "compared as data.global_batch_size")


RUN_CASES: list = [allow_changes_naming_nothing, allow_changes_of_the_micro_batch]

# --- shard sets, manifests and data_prep -----------------------------------------------------------------------
DATA_CASES: list = []

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
