"""Sequence-length stages and the batch-size warm-up (``data_prep.stream_plan``, ``data_prep.stream_batches``).

The shards of the session fixture hold sequences of 64 tokens; stages of 16 and 32 split them, a stage of 128 joins
two. Training runs are the real ``train`` (in this process, or ``python -m pretrain`` on 2 and 3 CPU processes),
recording what every rank trains on (``position_runner``): each trained sample is mapped back through the global
order to the packed sequences and offset its slot names, and compared by content.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_prep.mixture import open_corpus
from data_prep.stream_batches import StreamDataset, sample_keys
from data_prep.stream_plan import Stage, StreamPlan, parse_warmup
from position_runner import flags_sha1, recording_step
from pretrain import report
from pretrain.lightning_module import PretrainingModule
from pretrain.run.perf import training_flops_per_token
from pretrain.settings import settings_from_config
from pretrain.train import train

REPO = Path(__file__).resolve().parents[1]
S = 64  # the shards' sequence length (conftest.shards)


def _args(shards: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["+experiment=quickstart", "objective=mlm", f"data.path={shards}", f"output_dir={run_dir}",
            f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "data.num_workers=0",
            "model.vocab_size=1024", "model.max_position_embeddings=128", "model.position_buckets=16",
            "model.num_hidden_layers=1", "optim.warmup_steps=2", "checkpoint_every_n_steps=2", "export_hf=false",
            "report=false", *extra]


def _train(overrides: list[str], record: Path, monkeypatch) -> None:
    record.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("POSITIONS_DIR", str(record))
    monkeypatch.setattr(PretrainingModule, "training_step", recording_step)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        train(compose(config_name="config", overrides=overrides))


def _records(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def _rows(run_dir: Path) -> dict[int, dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def _expected_piece(corpus, order, token: int, length: int) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Sequences, token ids, word starts and special flags of stream tokens [token, token + length), written out
    from the definition: stream position p holds packed sequence order(p); a piece's first token is a word start
    unless special."""
    first, offset = divmod(token, S)
    indices = order.positions(np.arange(first, first + max(1, length // S))).tolist()
    items = [corpus[i] for i in indices]
    ids, word, special = (np.concatenate([it[k] for it in items])[offset:offset + length]
                          for k in ("input_ids", "word_start", "special_tokens_mask"))
    word = word.copy()
    word[0] = word[0] or not special[0]
    return indices, ids, word, special


def _trained_samples(records: list[dict], unit: int):
    """(first stream token, length, record, j) of every trained sample: rank r's j-th sample of a micro-batch
    starting at slot c takes slot c + (r + j*world)*m."""
    for r in records:
        for j in range(len(r["sha1"])):
            slot = r["start"] + (r["rank"] + j * r["world"]) * r["m"]
            yield slot * unit, r["seq_len"], r, j


def _check_content(samples, corpus, order) -> list[tuple[int, int]]:
    """Every trained sample equals the stream tokens (and flags) its slot names; returns their token ranges."""
    spans = []
    for token, length, r, j in samples:
        _, ids, word, special = _expected_piece(corpus, order, token, length)
        assert r["sha1"][j] == hashlib.sha1(ids.astype(np.int64).tobytes()).hexdigest(), (r["step"], token)
        assert r["flags_sha1"][j] == flags_sha1(word, special), (r["step"], token)
        spans.append((token, token + length))
    return spans


def _assert_contiguous(spans: list[tuple[int, int]], end: int) -> None:
    """The spans tile [0, end) of the stream: nothing repeated, nothing skipped."""
    spans = sorted(spans)
    assert spans[0][0] == 0 and spans[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "a gap or an overlap in the trained stream"


# ------------------------------------------------------------------------------------------------ the data layer


@pytest.mark.parametrize("length", [16, 128])
def test_a_stage_reads_every_token_of_an_epoch_once_on_two_ranks(shards, length):
    """A stage of 16 splits each packed sequence into 4 exact pieces, one of 128 joins two consecutive positions of
    the order: over one epoch, on 2 ranks, every (sequence, offset) once, with its own tokens, word starts valid."""
    corpus = open_corpus(shards)
    order = corpus.order(seed=5)
    n = len(corpus)
    plan = StreamPlan(S, batch_size=8, global_batch=16, world_size=2, accumulation=1, stages=[Stage(length)])
    assert plan.unit == min(S, length)
    dataset = StreamDataset(corpus)
    seen = collections.Counter()
    tokens = []
    for micro in plan.micro_batches(0, 0):
        if micro.start * plan.unit >= n * S:
            break
        for rank in range(2):
            for slot, key in zip(micro.slots(rank, 2), sample_keys(plan, order, micro, rank, 2)):
                token = slot * plan.unit
                if token >= n * S:
                    continue  # the next epoch's order
                indices, ids, word, special = _expected_piece(corpus, order, token, length)
                item = dataset[key]
                assert list(key[0]) == indices and key[1:] == (token % S, length)
                np.testing.assert_array_equal(item["input_ids"], ids)
                np.testing.assert_array_equal(item["word_start"], word)
                np.testing.assert_array_equal(item["special_tokens_mask"], special)
                for i in indices:
                    seen[(i, token % S)] += 1
                tokens.append(item["input_ids"])
    pieces = [(i, off) for i in range(n) for off in (range(0, S, length) if length < S else [0])]
    assert seen == collections.Counter(pieces)  # every (sequence, offset) exactly once in the epoch
    everything = np.concatenate([corpus[i]["input_ids"] for i in range(n)])
    assert np.array_equal(np.sort(np.concatenate(tokens)), np.sort(everything))  # the shard tokens as a multiset
    # a piece that starts inside a word starts a word of its own (whole-word masking never crosses the cut)
    if length < S:
        cut = [dataset[(( i,), off, length)] for i in range(4) for off in range(length, S, length)]
        assert all(item["word_start"][0] or item["special_tokens_mask"][0] for item in cut)


def test_the_position_stays_aligned_in_tokens_mode_and_skips_in_sequences_mode():
    """Tokens mode: every micro-batch advances a multiple of every stage's length, so a stage boundary is aligned.
    Sequences mode: 3 steps of 4 sequences of 16 tokens end at slot 12; a 128-token stage reads from multiples of 8
    slots, so it starts at slot 16 (64 tokens skipped)."""
    stages = [Stage(16, 3), Stage(128)]
    tokens = StreamPlan(S, 4, 4, 1, 1, stages, "tokens")
    starts = {m.step: m.start for m in _take(tokens.micro_batches(0, 0), 5)}
    assert starts == {0: 0, 1: 16, 2: 32, 3: 48, 4: 64}  # 4 x 64 tokens per step = 16 slots of 16
    sequences = StreamPlan(S, 4, 4, 1, 1, stages, "sequences")
    micro = {m.step: m for m in _take(sequences.micro_batches(0, 0), 5)}
    assert [micro[k].start for k in range(5)] == [0, 4, 8, 16, 48]
    assert [micro[k].size for k in range(5)] == [4, 4, 4, 4, 4] and micro[3].m == 8
    assert sequences.position_after(4) == 48
    # the tokens a plan comes to, summed a stage at a time, equal those of its micro-batches one by one
    warm = StreamPlan(S, 4, 16, 1, 4, [Stage(16, 5), Stage(32, 4), Stage(128)], "tokens",
                      parse_warmup({"start": 4, "tokens": 3000}, 16))
    for plan in (tokens, sequences, warm):
        for steps in (0, 1, 3, 4, 7, 12, 40):
            trained = list(itertools.takewhile(lambda m: m.step < steps, plan.micro_batches(0, 0)))
            end = trained[-1].start + trained[-1].size * trained[-1].m if trained else 0
            assert plan.trained_position(steps) == end, (plan.describe(), steps)
    # the log line numbers steps as metrics.csv does (step N = the N-th optimizer step, counted from 1)
    assert tokens.describe() == ("stream plan (tokens per step kept across stages): steps 1-3: 16 tokens x 16 per "
                                 "rank and micro-batch; steps 4-: 128 tokens x 2 per rank and micro-batch")


def test_a_misaligned_stage_boundary_skips_to_alignment_and_says_so(shards, tmp_path, monkeypatch, caplog):
    """data.stage_batch=sequences: 3 steps of 4 pieces of 16 tokens end 12 slots into the stream, the 128-token stage
    starts at slot 16; the 64 tokens between are skipped once, logged, and everything else is trained in order."""
    caplog.set_level("INFO", logger="pretrain.datamodule")
    _train(_args(shards, tmp_path / "run", 5, "data.batch_size=4", "data.stage_batch=sequences",
                 "data.stages=[{seq_len:16,steps:3},{seq_len:128}]"), tmp_path / "record", monkeypatch)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == ["stage of seq_len 128 starts at step 4: 64 tokens of the stream skipped to align it "
                       "(data.stage_batch=sequences)"]
    corpus = open_corpus(shards)
    spans = _check_content(_trained_samples(_records(tmp_path / "record"), 16), corpus, corpus.order(seed=1234))
    _assert_contiguous(spans + [(3 * 4 * 16, 4 * 16 * 4)], (4 * 16 * 4) + 2 * 4 * 128)
    assert float(_rows(tmp_path / "run")[5]["data/tokens_seen"]) == 4 * 16 * 4 + 2 * 4 * 128


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ training


PEAK = 1e12  # a device peak in FLOP/s, so that MFU is logged on CPU


def test_a_split_stage_trains_on_every_piece_of_an_epoch_then_a_joined_stage(shards, tmp_path, monkeypatch):
    """22 steps of 256 pieces of 16 tokens (an epoch is 1368 x 64 tokens = 21.4 steps), then 2 steps of 32
    sequences of 128: every trained sample is the stream's tokens at its slot, the first epoch's pieces are each
    trained once, and the stream is trained contiguously across the boundary; MFU and samples/s count each stage's
    own length."""
    fit_start = PretrainingModule.on_fit_start

    def with_a_peak(self):
        fit_start(self)
        self._peak_flops = PEAK

    monkeypatch.setattr(PretrainingModule, "on_fit_start", with_a_peak)
    run = tmp_path / "run"
    _train(_args(shards, run, 24, "data.batch_size=64", "optim.lr=1e-3",
                 "data.stages=[{seq_len:16,steps:22},{seq_len:128}]"), tmp_path / "record", monkeypatch)
    records = _records(tmp_path / "record")
    corpus = open_corpus(shards)
    order = corpus.order(seed=1234)
    assert {(r["seq_len"], len(r["sha1"])) for r in records} == {(16, 256), (128, 32)}
    spans = _check_content(_trained_samples(records, 16), corpus, order)
    _assert_contiguous(spans, 24 * 64 * S)
    n = len(corpus)
    epoch = collections.Counter((int(order.positions(np.array([a // S]))[0]), a % S) for a, b in spans
                                if b - a == 16 and b <= n * S)
    assert epoch == collections.Counter((i, off) for i in range(n) for off in range(0, S, 16))
    rows = _rows(run)
    assert [float(rows[k]["data/seq_len"]) for k in (22, 23)] == [16.0, 128.0]
    assert float(rows[24]["data/tokens_seen"]) == 24 * 64 * S
    # MFU counts each step's model FLOPs at its own length (a window of one step here: log_every_n_steps=1)
    settings = settings_from_config(OmegaConf.load(run / "config.yaml"), warn=False)
    for step, length in ((22, 16), (24, 128)):
        flops = training_flops_per_token(settings.model, length, "mlm", settings.objective.mask_prob,
                                         use_emd=settings.objective.use_emd)
        per_token = float(rows[step]["perf/mfu"]) * PEAK / float(rows[step]["perf/tokens_per_sec"])
        assert per_token == pytest.approx(flops, rel=1e-6), step  # logged as float32
        assert float(rows[step]["perf/samples_per_sec"]) * length == pytest.approx(
            float(rows[step]["perf/tokens_per_sec"]), rel=1e-6)


def test_a_run_resumed_before_a_stage_boundary_and_mid_ramp_ends_bitwise_equal(shards, tmp_path, monkeypatch):
    """Stages 32 (3 steps) then 128, and a batch warm-up 8 -> 16 over 1536 tokens (steps 0-2 at 8 sequences): a run
    stopped at its step-2 checkpoint and resumed to step 6 crosses the boundary and ends the ramp after the resume,
    and has the losses of a straight run, bit for bit, trained on the same samples."""
    plan = ["data.batch_size=4", "data.global_batch_size=16", "optim.min_lr_ratio=1.0",
            "data.stages=[{seq_len:32,steps:3},{seq_len:128}]", "data.batch_warmup={start:8,tokens:1536}"]
    _train(_args(shards, tmp_path / "straight", 6, *plan), tmp_path / "rec_straight", monkeypatch)
    _train(_args(shards, tmp_path / "resumed", 2, *plan), tmp_path / "rec_resumed", monkeypatch)
    _train(_args(shards, tmp_path / "resumed", 6, *plan), tmp_path / "rec_resumed", monkeypatch)
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    for step in straight:
        for key in ("train/loss", "data/tokens_seen", "data/global_batch", "data/seq_len"):
            assert straight[step][key] == resumed[step][key], (step, key)
    a, b = _records(tmp_path / "rec_straight"), _records(tmp_path / "rec_resumed")
    assert [(r["step"], r["start"], r["sha1"]) for r in a] == [(r["step"], r["start"], r["sha1"]) for r in b]
    # 8, 8, 8 sequences of 64 tokens as 16 of 32, then 16 x 64 tokens: 8 x 128 (tokens mode)
    assert [float(straight[k]["data/global_batch"]) for k in range(1, 7)] == [16, 16, 16, 8, 8, 8]


def _ramp(start: int, increment: int, full: int, tokens: int, seen: int) -> int:
    """ModernBERT's batch warm-up, written out again: (full - start) / increment rises spread evenly over the first
    ``tokens`` tokens seen."""
    if seen >= tokens:
        return full
    rises = -(-(full - start) // increment)
    return min(full, start + increment * (seen * rises // tokens))


def test_batch_warmup_follows_the_ramp_and_the_lr_its_steps(shards, tmp_path, monkeypatch, caplog):
    """Global batch 4 -> 16 over 2048 tokens, 4 micro-batches per step: the sequences of every optimizer step are
    the ramp's at the tokens seen when it starts, the LR is the linear schedule of the step number, and the logged
    tokens seen (metrics.csv and the closing summary) are the sum of the steps' tokens."""
    caplog.set_level("INFO", logger="pretrain.train")
    run = tmp_path / "run"
    _train(_args(shards, run, 8, "data.batch_size=4", "data.global_batch_size=16", "optim.lr=1e-3",
                 "optim.min_lr_ratio=0.1", "data.batch_warmup={start:4,tokens:2048,increment:4}"),
           tmp_path / "record", monkeypatch)
    records = _records(tmp_path / "record")
    per_step = collections.Counter()
    for r in records:
        per_step[r["step"]] += len(r["sha1"])
        assert r["accumulate"] == 4
    seen, expected, seen_after = 0, [], []
    for _ in range(8):
        expected.append(_ramp(4, 4, 16, 2048, seen))
        seen += expected[-1] * S
        seen_after.append(seen)
    assert [per_step[k] for k in range(8)] == expected
    assert len(set(expected)) == 4  # the whole ramp was run
    rows = _rows(run)
    assert [float(rows[k + 1]["data/global_batch"]) for k in range(8)] == expected
    assert [float(rows[k + 1]["data/tokens_seen"]) for k in range(8)] == seen_after
    for k in range(8):  # LR: linear warm-up over 2 steps, linear decay to 0.1 x lr at step 8; steps, not tokens
        multiplier = (k + 1) / 2 if k < 2 else max(0.1, 1 - (k - 2) / 6 * 0.9)
        assert float(rows[k + 1]["lr-AdamW/pg1"]) == pytest.approx(1e-3 * multiplier, rel=1e-6)
    spans = _check_content(_trained_samples(records, S), open_corpus(shards), open_corpus(shards).order(seed=1234))
    _assert_contiguous(spans, seen)
    assert f"tokens      {seen:,} seen" in caplog.text
    assert f"steps 0 -> 8 ({seen:,} tokens by step 8, {seen / (len(open_corpus(shards)) * S):.2f} epochs" in caplog.text
    # the report: the plan's panel, and the training panels against the tokens seen
    drawn = report.load_run(run)
    assert "tokens per optimizer step" in {p.title for p in report.select_panels([drawn])}
    assert drawn.columns[report.TOKENS_PER_STEP][1] == [float(b * S) for b in expected]
    fig = report.figure([drawn], x="tokens")
    loss_axis = next(ax for ax in fig.axes if ax.get_title().startswith("MLM loss"))
    assert loss_axis.get_xlabel() == "tokens seen"
    assert list(loss_axis.lines[-1].get_xdata()) == seen_after


# ------------------------------------------------------------------------------------------------ ranks


def _launch(run_dir: Path, devices: int, steps: int, record: Path, shards: Path) -> None:
    args = _args(shards, run_dir, steps, "trainer.accelerator=cpu", f"trainer.devices={devices}",
                 f"strategy={'ddp' if devices > 1 else 'auto'}", "data.batch_size=2", "data.global_batch_size=12",
                 "data.stages=[{seq_len:32,steps:3},{seq_len:128}]", "optim.min_lr_ratio=1.0")
    record.mkdir(exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "POSITIONS_DIR": str(record)}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "position_runner.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_then_three_ranks_across_a_stage_boundary_repeat_and_skip_nothing(shards, tmp_path):
    """2 steps of stage 32 on 2 ranks (accumulation 3), resumed on 3 ranks (accumulation 2) for a third step of 32
    and a fourth of 128: every rank's samples are the stream at their slots and together they tile the stream."""
    run = tmp_path / "run"
    _launch(run, 2, 2, tmp_path / "first", shards)
    _launch(run, 3, 4, tmp_path / "second", shards)
    records = _records(tmp_path / "first") + _records(tmp_path / "second")
    assert {(r["world"], r["accumulate"], r["seq_len"]) for r in records} == {(2, 3, 32), (3, 2, 32), (3, 2, 128)}
    corpus = open_corpus(shards)
    spans = _check_content(_trained_samples(records, 32), corpus, corpus.order(seed=1234))
    _assert_contiguous(spans, 4 * 12 * S)  # 12 sequences of 64 tokens per step, whatever the stage


# ------------------------------------------------------------------------------------------------ resume rules


def test_stages_to_come_may_change_on_resume_stages_trained_may_not():
    """data.stages is part of the plan, like trainer.max_steps: only the lengths of steps already trained count."""
    from pretrain.checkpointing.resume import same_stages_until

    plain = [{"seq_len": 64}]
    staged = [{"seq_len": 64, "steps": 4}, {"seq_len": 128}]
    assert same_stages_until(plain, staged, 4)  # a later stage added at the resume step
    assert not same_stages_until(plain, staged, 5)  # step 4 trained at 64, now planned at 128
    assert same_stages_until(staged, [{"seq_len": 64, "steps": 6}, {"seq_len": 32}], 4)  # a boundary moved ahead
    assert not same_stages_until(staged, [{"seq_len": 64, "steps": 2}, {"seq_len": 128}], 4)  # one moved back


def test_a_plain_run_resumed_with_a_shorter_stage_converts_its_position(shards, tmp_path, monkeypatch):
    """2 steps at the shards' length (position in slots of 64 tokens), resumed with a stage of 32 from step 2 (slots
    of 32): the position converts and the stream goes on where it stopped; changing a trained step's length is
    refused."""
    from pretrain.checkpointing.resume import ChangedSettingsError

    run = tmp_path / "run"
    _train(_args(shards, run, 2, "data.batch_size=4"), tmp_path / "first", monkeypatch)
    _train(_args(shards, run, 4, "data.batch_size=4", "data.stages=[{seq_len:64,steps:2},{seq_len:32}]"),
           tmp_path / "second", monkeypatch)
    first, second = _records(tmp_path / "first"), _records(tmp_path / "second")
    assert [r["start"] for r in first] == [0, 4] and [r["start"] for r in second] == [16, 24]  # slots of 64, of 32
    corpus = open_corpus(shards)
    order = corpus.order(seed=1234)
    spans = _check_content(_trained_samples(first, 64), corpus, order)
    spans += _check_content(_trained_samples(second, 32), corpus, order)
    _assert_contiguous(spans, 4 * 4 * S)
    with pytest.raises(ChangedSettingsError, match="data.stages"):
        _train(_args(shards, run, 6, "data.batch_size=4", "data.stages=[{seq_len:32}]"), tmp_path / "third",
               monkeypatch)
