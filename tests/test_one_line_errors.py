"""Low-severity faults found by probing the command lines with bad inputs: each must end in one clear error line
(naming the file, key or value and what to do), exit non-zero, and print no traceback.

Each case is a function ``case(tmp_path, shards) -> Case`` that prepares its bad input under ``tmp_path`` and
says which command to run and what the error line must contain. Cases are grouped by the part of the project that
reads the input; every group is one list, and the test below is parametrised over all of them."""

import functools
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
DATA_CASES: list = []

# --- signals, export directories and concurrent tools ----------------------------------------------------------
@functools.cache
def _one_step_checkpoint(shards: Path) -> Path:
    """A 1-step checkpoint of a tiny run (trained once per session, beside the session's shards)."""
    from hydra import compose, initialize_config_dir

    from pretrain.train import train

    run = shards.parent / "one_line_errors_signal_run"
    overrides = ["+experiment=quickstart", "objective=mlm", f"data.path={shards}", f"output_dir={run}",
                 "trainer.max_steps=1", "data.batch_size=4", "data.num_workers=0", "model.vocab_size=1024",
                 "model.max_position_embeddings=64", "model.position_buckets=16", "checkpoint_every_n_steps=1",
                 "export_hf=false", "report=false"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        train(compose(config_name="config", overrides=overrides))
    return run / "checkpoints" / "step-00000001.ckpt"


def export_into_a_non_empty_hf(tmp_path, shards):
    (tmp_path / "out" / "hf").mkdir(parents=True)
    (tmp_path / "out" / "hf" / "notes.txt").write_text("mine\n")
    return Case(["-m", "pretrain.export", str(_one_step_checkpoint(shards)), str(tmp_path / "out")],
                f"{tmp_path / 'out' / 'hf'}: exists and is not empty; pass --overwrite")


def export_onto_a_full_disk_names_the_destination(tmp_path, shards):
    """No room for the weights (a file size limit stands in for a full disk: no mount needed); the line names OUT/hf,
    where space is missing, not a file the export was reading."""
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); sys.argv = ['pretrain.export', *sys.argv[1:]]; "
               "runpy.run_module('pretrain.export', run_name='__main__', alter_sys=True)")
    return Case(["-c", limited, str(_one_step_checkpoint(shards)), str(tmp_path / "out")],
                f"File too large ({tmp_path / 'out' / 'hf'})")


SIGNAL_CASES: list = [export_into_a_non_empty_hf, export_onto_a_full_disk_names_the_destination]

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
