"""Several shard sets as one corpus: array-job parts read with a glob, weighted mixtures, global batch size.

The array-job parts are made by the splitting logic of `slurm/data_prep_array.sbatch` (`python -m data_prep split`)
for 3 tasks and the shard writer; the script itself runs once for real (`srun` is a pass-through, no SLURM needed).
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
import torch

from data_prep import pack
from data_prep import shard_format as sf
from data_prep.__main__ import main as data_prep_main
from data_prep.array_split import part_name, read_input_list, task_inputs
from data_prep.corpus import CorpusOptions
from data_prep.errors import DataPrepError
from data_prep.mixture import BlendedOrder, blending_table, open_corpus, quotas
from hydra import compose, initialize_config_dir
from position_runner import recording_step
from pretrain.run.global_batch import accumulation_for
from pretrain.lightning_module import PretrainingModule
from pretrain.train import train
from pretrain.settings import SettingsError
from shard_helpers import build_wordpiece_vocab, sample_documents, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
FILES = 6


def _shards(inputs: list, tokenizer: Path, out: Path, seq_len: int = SEQ_LEN, cross_document: bool = False) -> Path:
    """What `python -m data_prep shards --input ... --no-cross-document` writes, in this process."""
    settings = pack.PackSettings(seq_len=seq_len, cross_document=cross_document)
    pack.prepare_shards([str(i) for i in inputs], tokenizer, out, CorpusOptions(), settings,
                        progress=pack.Progress(enabled=False))
    return out


def _sbatch(corpus_root: Path, tokenizer: Path, out: Path, task: int) -> subprocess.CompletedProcess:
    """slurm/data_prep_array.sbatch as array task ``task`` of 3 (`srun` is a pass-through: no SLURM here)."""
    bin_dir = corpus_root / "bin"
    if not (bin_dir / "srun").exists():
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
        (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "PARTS": "3",
           "SLURM_ARRAY_TASK_ID": str(task)}
    return subprocess.run(["bash", str(REPO / "slurm" / "data_prep_array.sbatch"), str(corpus_root / "inputs.txt"),
                           str(tokenizer), str(out), "--seq-len", str(SEQ_LEN), "--no-cross-document", "--workers",
                           "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus(shards, tmp_path_factory):
    """The English sample as 6 input files, prepared (a) as 3 array-job parts split by `data_prep split`'s logic,
    (b) in one run of all inputs."""
    root = tmp_path_factory.mktemp("mixtures")
    tokenizer = shards.parent / "tok"  # the session fixture's SentencePiece tokenizer
    docs = sample_documents("en")
    files = [write_jsonl(root / "raw" / f"file{i}.jsonl", docs[i::FILES]) for i in range(FILES)]
    (root / "inputs.txt").write_text("".join(f"{f}\n" for f in files), encoding="utf-8")
    groups = read_input_list(root / "inputs.txt")
    for task in range(3):
        _shards(task_inputs(groups, task, 3), tokenizer, root / "out" / part_name(task))
    whole = _shards(files, tokenizer, root / "whole")
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
    realised = order.quotas / order.period  # the weights to 1/65536: within two samples of them in any window
    assert np.abs(windows - realised).max() * 1000 < 2, np.abs(windows - realised).max() * 1000
    # each source's own stream: ordinals 0, 1, 2, ... in order, and every epoch of it is a permutation of it
    for s, n in enumerate(order.lengths[:len(weights)]):
        mine = ordinal[source == s]
        assert np.array_equal(mine, np.arange(len(mine)))
        indices = order.positions(positions[source == s][:3 * n]) - order.offsets[s]
        for epoch in range(min(3, len(mine) // n)):
            assert np.array_equal(np.sort(indices[epoch * n:(epoch + 1) * n]), np.arange(n))
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
    # the array script itself, as task 1 of 3, writes the same part; re-submitting it then does nothing
    out = corpus["root"] / "sbatch_out"
    first = _sbatch(corpus["root"], corpus["tokenizer"], out, 1)
    assert first.returncode == 0, first.stderr
    made = sf.load_manifest(out / "part-00001")
    assert [s["sha256"] for s in made["shards"]] == \
        [s["sha256"] for s in sf.load_manifest(parts[1])["shards"]]
    assert made["settings"]["inputs"] == sf.load_manifest(parts[1])["settings"]["inputs"]
    again = _sbatch(corpus["root"], corpus["tokenizer"], out, 1)
    assert again.returncode == 0 and "is complete, nothing to do" in again.stdout, again.stderr
    wrong = _sbatch(corpus["root"], corpus["tokenizer"], out, 3)
    assert wrong.returncode == 2 and "error: --task 3 is not one of the 3 tasks" in wrong.stderr


def test_mismatched_sources_are_one_error_naming_both(corpus, tmp_path):
    part0 = corpus["parts"] / "part-00000"
    short = _shards(corpus["files"][:1], corpus["tokenizer"], tmp_path / "short", seq_len=32)
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

GLOBAL_BATCH = 12
WEIGHTS = [0.5, 0.3, 0.2]


def _args(run_dir: Path, sources: str, devices: int, steps: int) -> list[str]:
    return ["+experiment=quickstart", "objective=rtd", f"strategy={'ddp' if devices > 1 else 'auto'}", "data.path=null", f"data.sources={sources}",
            f"output_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
            f"trainer.devices={devices}", "trainer.log_every_n_steps=1", "checkpoint_every_n_steps=2",
            "data.batch_size=1", f"data.global_batch_size={GLOBAL_BATCH}", "data.num_workers=0",
            "model.vocab_size=1024", f"model.max_position_embeddings={SEQ_LEN}", "model.position_buckets=16",
            "model.num_hidden_layers=1", "optim.lr=3e-3", "optim.warmup_steps=2", "export_hf=false"]


def _run(run_dir: Path, sources: str, devices: int, steps: int, record: Path) -> None:
    """`python -m pretrain` on ``devices`` CPU processes with one sequence per micro-batch (so every sequence gets
    its own masks and dropout whatever the layout) and a global batch of 12, recording what every rank trains on."""
    args = _args(run_dir, sources, devices, steps)
    record.mkdir(exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "POSITIONS_DIR": str(record)}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "position_runner.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _records(record: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(record.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def _step_losses(records: list[dict]) -> dict[int, float]:
    """Loss of each optimizer step over the whole global batch: the mean of its micro-batch losses on all ranks
    (what the averaged gradient is the gradient of)."""
    by_step = collections.defaultdict(list)
    for r in records:
        by_step[r["step"] + 1].append(r["loss"])
    assert all(len(v) == GLOBAL_BATCH for v in by_step.values()), {k: len(v) for k, v in by_step.items()}
    return {step: float(np.mean(v)) for step, v in sorted(by_step.items())}


@pytest.fixture(scope="module")
def mixture_runs(corpus, tmp_path_factory):
    """One weighted mixture trained for 2 steps on 2 ranks, resumed to step 4 on 3 ranks; and 2 steps on 4 ranks."""
    parts = corpus["parts"]
    sources = "[" + ",".join(f"{{path:{parts}/part-0000{i},weight:{w}}}" for i, w in enumerate(WEIGHTS)) + "]"
    root = tmp_path_factory.mktemp("mixture_runs")
    run = root / "run"
    _run(run, sources, 2, 2, root / "first")
    first_log = (run / "pretrain.log").read_text()
    _run(run, sources, 3, 4, root / "second")  # the same command on 3 ranks: resumes at step 2
    _run(root / "four", sources, 4, 2, root / "four_ranks")
    corpus_obj = open_corpus(sources=[{"path": str(parts / f"part-0000{i}"), "weight": w}
                                      for i, w in enumerate(WEIGHTS)])
    return {"run": run, "first_log": first_log, "root": root, "corpus": corpus_obj, "sources": sources}


def test_weighted_mixture_resumes_on_three_ranks_without_repeating_or_skipping(mixture_runs):
    root, corpus_obj = mixture_runs["root"], mixture_runs["corpus"]
    assert "global batch 12 sequences = data.batch_size 1 x 2 rank(s) x accumulate_grad_batches 6" in \
        mixture_runs["first_log"]
    log = (mixture_runs["run"] / "pretrain.log").read_text()
    assert "x 3 rank(s) x accumulate_grad_batches 4" in log and "epochs per source" in log

    order = corpus_obj.order(seed=1234)  # data.seed of the run
    records = _records(root / "first") + _records(root / "second")
    assert {(r["world"], r["accumulate"]) for r in records} == {(2, 6), (3, 4)}
    positions = []
    for r in records:  # what each rank trained on is exactly the sequences at its global positions
        mine = r["consumed"] + r["rank"] + r["world"] * np.arange(len(r["sha1"]))
        expected = [hashlib.sha1(corpus_obj[int(i)]["input_ids"].tobytes()).hexdigest()
                    for i in order.positions(mine)]
        assert r["sha1"] == expected, r
        positions += mine.tolist()
    # steps 1-2 on 2 ranks, 3-4 on 3 ranks: positions 0..47, each trained exactly once, 12 per step
    assert sorted(positions) == list(range(4 * GLOBAL_BATCH))
    assert sorted(_step_losses(records)) == [1, 2, 3, 4]
    source, _ = order.sources_at(np.arange(4 * GLOBAL_BATCH))
    assert np.bincount(source).tolist() == [24, 14, 10]  # 48 positions of the blend at 0.5 / 0.3 / 0.2
    state = torch.load(mixture_runs["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    data_state = state["ShardDataModule"]  # Lightning keeps a datamodule's state_dict under its class name
    assert data_state["consumed"] == 48 and data_state["weights"] == WEIGHTS
    assert np.allclose(data_state["source_epochs"], np.array([24, 14, 10]) / corpus_obj.source_lengths)


def test_global_batch_gives_the_same_losses_on_one_two_and_four_ranks(mixture_runs, monkeypatch, tmp_path):
    """data.global_batch_size=12 on 1 rank (accumulate 12), 2 ranks (6) and 4 ranks (3): the same sequences, masks
    and dropout per step, so the same per-step losses up to the order of the fp32 gradient reductions."""
    root = mixture_runs["root"]
    one = tmp_path / "one_rank"  # in this process (no launch): the recording step patched in for this test only
    one.mkdir()
    monkeypatch.setenv("POSITIONS_DIR", str(one))
    monkeypatch.setattr(PretrainingModule, "training_step", recording_step)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        train(compose(config_name="config", overrides=_args(tmp_path / "one", mixture_runs["sources"], 1, 2)))
    losses = {world: _step_losses([r for r in _records(d) if r["step"] < 2])
              for world, d in ((1, one), (2, root / "first"), (4, root / "four_ranks"))}
    assert sorted(losses[1]) == sorted(losses[2]) == sorted(losses[4]) == [1, 2]
    for world in (2, 4):
        np.testing.assert_allclose([losses[world][s] for s in (1, 2)], [losses[1][s] for s in (1, 2)],
                                   rtol=1e-5, err_msg=f"{world} ranks vs 1 rank")
