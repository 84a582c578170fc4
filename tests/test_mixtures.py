"""Several shard sets as one corpus: array-job parts read with a glob, weighted mixtures, global batch size.

The shard sets are made by the real commands: `slurm/data_prep_array.sbatch` run for 3 array tasks (its splitting
logic is `python -m data_prep split`; `srun` is a pass-through here, no SLURM needed) and `python -m data_prep shards`.
Training runs are the real `python -m pretrain` on 2 and 3 CPU processes (gloo), recording what each rank trains on.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main as data_prep_main
from data_prep.array_split import read_input_list, task_inputs
from data_prep.errors import DataPrepError
from data_prep.mixture import BlendedOrder, blending_table, open_corpus, quotas
from pretrain.global_batch import accumulation_for
from pretrain.settings import SettingsError
from shard_helpers import build_wordpiece_vocab, read_all, run_cli, sample_documents, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
FILES = 6


def _shards(inputs: list[Path], tokenizer: Path, out: Path, *extra: str) -> Path:
    result = run_cli("shards", "--input", *inputs, "--tokenizer", tokenizer, "--out", out, "--seq-len", SEQ_LEN,
                     "--workers", "1", *extra)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def corpus(shards, tmp_path_factory):
    """The English sample as 6 input files, prepared (a) in 3 array tasks by the sbatch script, (b) in one run."""
    root = tmp_path_factory.mktemp("mixtures")
    tokenizer = shards.parent / "tok"  # the session fixture's SentencePiece tokenizer
    docs = sample_documents("en")
    files = [write_jsonl(root / "raw" / f"file{i}.jsonl", docs[i::FILES]) for i in range(FILES)]
    (root / "inputs.txt").write_text("".join(f"{f}\n" for f in files), encoding="utf-8")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "PARTS": "3"}
    for task in range(3):
        result = subprocess.run(["bash", str(REPO / "slurm" / "data_prep_array.sbatch"), str(root / "inputs.txt"),
                                 str(tokenizer), str(root / "out"), "--seq-len", str(SEQ_LEN), "--no-cross-document"],
                                cwd=REPO, env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    whole = _shards(files, tokenizer, root / "whole", "--no-cross-document")
    return {"root": root, "files": files, "tokenizer": tokenizer, "parts": root / "out", "whole": whole, "docs": docs}


# ------------------------------------------------------------------------------------------ the mixture index


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.01, 0.09, 0.9]])
def test_blend_holds_the_proportions_in_every_window(weights):
    order = BlendedOrder([50, 1234, 20000][:len(weights)], weights, seed=5)
    positions = np.arange(3 * order.period + 10_000)  # windows across period boundaries too
    source, ordinal = order.sources_at(positions)
    onehot = np.eye(len(weights), dtype=np.int64)[source]
    total = onehot[:10_000].sum(0) / 10_000
    assert np.abs(total - weights).max() < 0.01, total
    cumulative = np.concatenate([np.zeros((1, len(weights)), np.int64), np.cumsum(onehot, 0)])
    windows = (cumulative[1000:] - cumulative[:-1000]) / 1000  # every window of 1000 consecutive positions
    assert np.abs(windows - weights).max() < 0.01, np.abs(windows - weights).max()
    # each source's own stream: ordinals 0, 1, 2, ... in order, and every epoch of it is a permutation of it
    for s, n in enumerate(order.lengths[:len(weights)]):
        mine = ordinal[source == s]
        assert np.array_equal(mine, np.arange(len(mine)))
        indices = order.positions(positions[source == s]) - order.offsets[s]
        for epoch in range(min(3, len(mine) // n)):
            assert sorted(indices[epoch * n:(epoch + 1) * n]) == list(range(n))
    # deterministic: a second order from the same settings maps every position the same
    again = BlendedOrder(order.lengths, weights, seed=5)
    assert np.array_equal(again.positions(positions[::97]), order.positions(positions[::97]))


def test_blending_table_is_megatrons_greedy_deficit_rule():
    counts = quotas([0.6, 0.25, 0.15], period=40)
    assert counts.tolist() == [24, 10, 6]
    table = blending_table(counts)
    taken = np.zeros(3)
    for i, s in enumerate(table):  # the reference rule, written out
        assert s == int(np.argmax(counts / 40 * (i + 1) - taken))
        taken[s] += 1
    assert taken.tolist() == [24, 10, 6]


# ------------------------------------------------------------------------------------------ array-job parts


def test_split_gives_every_line_to_exactly_one_task(corpus):
    groups = read_input_list(corpus["root"] / "inputs.txt")
    split = [task_inputs(groups, t, 3) for t in range(3)]
    assert [len(s) for s in split] == [2, 2, 2] and sum(split, []) == [str(f) for f in corpus["files"]]
    assert task_inputs(groups, 4) == [str(corpus["files"][4])]  # default: one line per task
    with pytest.raises(DataPrepError, match="--task 3 is not one of the 3 tasks"):
        task_inputs(groups, 3, 3)
    with pytest.raises(DataPrepError, match="--tasks 7: the list has 6 input"):
        task_inputs(groups, 0, 7)


def test_glob_over_array_parts_equals_one_run(corpus):
    parts = sorted(corpus["parts"].glob("part-*"))
    assert [p.name for p in parts] == ["part-00000", "part-00001", "part-00002"]
    glob_corpus = open_corpus(f"{corpus['parts']}/part-*", verify="full")
    whole = open_corpus(corpus["whole"])
    assert len(glob_corpus) == len(whole) and len(glob_corpus.sets) == 3 and not glob_corpus.weighted

    def sequences(c) -> collections.Counter:
        return collections.Counter(np.asarray(c.raw(i)[0]).tobytes() + np.asarray(c.raw(i)[1]).tobytes()
                                   for i in range(len(c)))

    assert sequences(glob_corpus) == sequences(whole)  # the same multiset of sequences (ids and flags)
    # one epoch of the training order visits every sequence of the union exactly once
    order = glob_corpus.order(seed=11)
    epoch = order.positions(np.arange(len(glob_corpus)))
    assert sorted(epoch.tolist()) == list(range(len(glob_corpus)))
    # re-submitting a finished task does nothing
    bin_dir = corpus["root"] / "bin"
    again = subprocess.run(["bash", str(REPO / "slurm" / "data_prep_array.sbatch"), str(corpus["root"] / "inputs.txt"),
                            str(corpus["tokenizer"]), str(corpus["parts"])], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
                                "PARTS": "3", "SLURM_ARRAY_TASK_ID": "1"})
    assert again.returncode == 0 and "is complete, nothing to do" in again.stdout, again.stderr


def test_mismatched_sources_are_one_error_naming_both(corpus, tmp_path):
    part0 = corpus["parts"] / "part-00000"
    short = _shards(corpus["files"][:1], corpus["tokenizer"], tmp_path / "short", "--seq-len", "32")
    with pytest.raises(DataPrepError, match=rf"shard sets {part0} and {short} cannot be trained together: "
                                            r"seq_len 64 vs 32"):
        open_corpus([str(part0), str(short)])
    wordpiece = build_wordpiece_vocab(tmp_path / "wp", corpus["docs"])
    other = _shards(corpus["files"][:1], wordpiece, tmp_path / "other_tok")
    with pytest.raises(DataPrepError, match=rf"{part0} and {other} cannot be trained together: tokenizer checksum"):
        open_corpus(sources=[{"path": str(part0), "weight": 1}, {"path": str(other), "weight": 1}])
    with pytest.raises(DataPrepError, match="data.sources\\[1\\].weight=-1.0: weights must be positive"):
        open_corpus(sources=[{"path": str(part0), "weight": 1}, {"path": str(other), "weight": -1}])
    with pytest.raises(DataPrepError, match="matches no directory"):
        open_corpus(str(tmp_path / "nothing-*"))


def test_inspect_prints_the_mixture(corpus, capsys):
    parts = corpus["parts"]
    assert data_prep_main(["inspect", "--fast", "--num", "0", "--source", str(parts / "part-00000"), "0.75",
                           "--source", f"{parts}/part-0000[12]", "0.25", "--steps", "100", "--global-batch", "8"]) == 0
    out = capsys.readouterr().out
    corpus_obj = open_corpus(sources=[{"path": str(parts / "part-00000"), "weight": 0.75},
                                      {"path": f"{parts}/part-0000[12]", "weight": 0.25}])
    n0, n1 = corpus_obj.source_lengths
    assert f"source 0: {parts / 'part-00000'}: {n0} sequences, {n0 * SEQ_LEN} tokens, 75.00% of the stream" in out
    assert f"{n1} sequences, {n1 * SEQ_LEN} tokens, 25.00% of the stream (weight 0.25)" in out
    assert f"{600 / n0:.3f} epochs after 100 steps" in out and f"{200 / n1:.3f} epochs after 100 steps" in out
    assert out.count("validation fast") == 3
    assert data_prep_main(["inspect", "--fast", "--num", "0", f"{parts}/part-*"]) == 0
    assert "one corpus, each sequence once per epoch" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- global batch


def test_global_batch_derives_the_accumulation_or_lists_the_choices():
    assert accumulation_for(8192, 32, 64) == 4 and accumulation_for(8192, 32, 8) == 32
    assert accumulation_for(12, 2, 2) == 3 and accumulation_for(12, 2, 3) == 2
    with pytest.raises(SettingsError, match=r"data.global_batch_size=8192 is not a multiple of data.batch_size=32 x 3 "
                                            r".* the number of ranks can be one of 1, 2, 4, 8"):
        accumulation_for(8192, 32, 3)


# ----------------------------------------------------------------------------- real runs: mixture, 2 -> 3 ranks


def _run(run_dir: Path, sources: str, devices: int, steps: int, record: Path) -> subprocess.CompletedProcess:
    args = ["+experiment=quickstart", "objective=mlm", "strategy=ddp", "data.path=null", f"data.sources={sources}",
            f"output_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
            f"trainer.devices={devices}", "trainer.log_every_n_steps=1", "checkpoint_every_n_steps=3",
            "data.batch_size=2", "data.global_batch_size=12", "data.num_workers=0", "model.vocab_size=1024",
            f"model.max_position_embeddings={SEQ_LEN}", "model.position_buckets=16", "model.num_hidden_layers=1",
            "optim.warmup_steps=2", "export_hf=false"]
    record.mkdir(exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "POSITIONS_DIR": str(record)}
    return subprocess.run([sys.executable, str(REPO / "tests" / "position_runner.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _records(record: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(record.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def test_weighted_mixture_resumes_on_three_ranks_without_repeating_or_skipping(corpus, tmp_path):
    parts = corpus["parts"]
    weights = [0.5, 0.3, 0.2]
    sources = ",".join(f"{{path:{parts}/part-0000{i},weight:{w}}}" for i, w in enumerate(weights))
    sources = f"[{sources}]"
    run, record = tmp_path / "run", tmp_path / "record"
    first = _run(run, sources, 2, 3, record)
    assert first.returncode == 0, first.stderr[-4000:]
    log = (run / "pretrain.log").read_text()
    assert "global batch 12 sequences = data.batch_size 2 x 2 rank(s) x accumulate_grad_batches 3" in log
    second = _run(run, sources, 3, 6, record)  # the same command on 3 ranks: resumes at step 3
    assert second.returncode == 0, second.stderr[-4000:]
    log = (run / "pretrain.log").read_text()
    assert "x 3 rank(s) x accumulate_grad_batches 2" in log and "epochs per source" in log

    corpus_obj = open_corpus(sources=[{"path": str(parts / f"part-0000{i}"), "weight": w}
                                      for i, w in enumerate(weights)])
    order = corpus_obj.order(seed=1234)  # data.seed of the run
    records = _records(record)
    assert {(r["world"], r["accumulate"]) for r in records} == {(2, 3), (3, 2)}
    positions = []
    for r in records:  # what each rank trained on is exactly the sequences at its global positions
        mine = r["consumed"] + r["rank"] + r["world"] * np.arange(len(r["sha1"]))
        expected = [hashlib.sha1(corpus_obj[int(i)]["input_ids"].tobytes()).hexdigest()
                    for i in order.positions(mine)]
        assert r["sha1"] == expected, r
        positions += mine.tolist()
    # steps 1-3 on 2 ranks, 4-6 on 3 ranks: positions 0..71, each trained exactly once
    assert sorted(positions) == list(range(6 * 12))
    source, _ = order.sources_at(np.arange(6 * 12))
    assert np.bincount(source).tolist() == [36, 22, 14]  # 72 positions of the blend at 0.5 / 0.3 / 0.2
