"""The pure plan of a run's data stream: sequence-length stages, the batch-size warm-up, and where each micro-batch
starts. No I/O, no torch, no Lightning: the batch sampler (``data_prep.stream_batches``), the data module and the
tests all ask this one object, so they cannot disagree.

Why stages cut and join the packed sequences instead of reading other shards: one shard set (packed at its length
S) serves every stage, nothing is re-tokenized or re-packed, and the data position stays one number. The shards
are read as one token stream in the global order (``data_prep.reader``): position ``p`` of the order holds tokens
``[p*S, (p+1)*S)`` of the stream. A stage of length ``s`` reads consecutive windows of ``s`` tokens of that
stream:

- ``s`` divides ``S`` (shorter stage): each packed sequence is **split** exactly into ``S/s`` pieces (exact slices:
  no token lost or repeated, no [CLS] inserted). The first token of a piece counts as a word start unless it is a
  special token, so a word cut by a piece boundary becomes two words for whole-word masking.
- ``s`` is a multiple of ``S`` (longer stage): ``s/S`` consecutive packed sequences of the stream (consecutive
  positions of the global order) are **regrouped** by concatenation.

**The position** stays ``consumed``, counted in slots of ``unit = gcd(S, every stage length)`` tokens (``unit = S``
without stages, so ``consumed`` is then "sequences consumed" as before). A sample of length ``s`` at slot ``c``
covers stream tokens ``[c*unit, c*unit + s)``. A micro-batch of ``b`` samples per rank on ``w`` ranks starting at
slot ``c`` gives sample ``j`` of rank ``r`` the slot ``c + (r + j*w)*m`` (``m = s/unit``: ranks interleave as they
always did) and advances the position by ``b*w*m``. A sample must not straddle two packed sequences (or start
inside one when regrouping), so a stage reads from slots that are multiples of its ``m``; at a stage boundary
whose position is not such a multiple (possible only with ``stage_batch=sequences``) the position skips forward to
the next one and the data module logs how many tokens were skipped.

**The global batch** (``data.batch_size``, ``data.global_batch_size``) is stated in sequences of the shards'
length S. ``stage_batch=tokens`` (the default) keeps the tokens per optimizer step: a stage of length ``s`` trains
``batch_size*S/s`` sequences per rank and micro-batch. Why the default: the tokens per step, hence the gradient
noise the learning-rate schedule was tuned for, and the activation memory of a micro-batch stay about the same
across stages, so one micro-batch size fits every stage. ``stage_batch=sequences`` keeps ``batch_size`` sequences
per micro-batch at every length (BERT's recipe: 256 sequences of 128, then of 512).

**The batch-size warm-up** (``batch_warmup``, ModernBERT's schedule): the global batch ``B`` (sequences at S)
starts at ``start`` and grows by ``increment`` in equal slices of the first ``tokens`` tokens seen, reaching
``global_batch_size`` when ``tokens`` tokens have been seen; ``B`` of an optimizer step is fixed from the tokens
seen when that step starts. It varies the per-rank micro-batch, ``B / (ranks x accumulation)``, never the
accumulation, so every micro-batch of one step has the same size and the loss averaging stays right.

Shapes: each stage and each warm-up value gives the micro-batch another shape ``[size, seq_len]``. With
``torch.compile`` per layer (on CUDA) a new shape costs a recompilation the first time it is seen (after the first
change, dynamo marks the changed dimension dynamic and compiles once more); a coarse ``increment`` and few stages keep
the number of distinct shapes, and those compilations, small.

Everything is a function of ``(consumed, optimizer step)``, which a checkpoint restores: the stage of a step comes
from the step, the batch from the tokens seen (``consumed * unit``). Neither depends on the number of ranks, so a
resume on another number of ranks continues the same stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from data_prep.errors import DataPrepError

STAGE_BATCH = ("tokens", "sequences")


@dataclass(frozen=True)
class Stage:
    seq_len: int
    steps: int | None = None  # optimizer steps of this stage; None: the last stage, to the end of training


@dataclass(frozen=True)
class BatchWarmup:
    start: int  # global batch at the first step (sequences at the shards' length)
    tokens: int  # tokens seen over which the batch grows to the full global batch
    increment: int  # growth of the global batch at each rise


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of the whole job: optimizer ``step``, first slot ``start``, ``size`` samples per rank of
    ``seq_len`` tokens, ``m = seq_len / unit`` slots per sample; the whole job advances ``size * ranks * m``."""

    step: int
    start: int
    size: int
    seq_len: int
    m: int

    def slots(self, rank: int, world_size: int) -> list[int]:
        """First slot of each sample of ``rank``."""
        return [self.start + (rank + j * world_size) * self.m for j in range(self.size)]


def parse_stages(stages, what: str = "data.stages") -> list[Stage]:
    """``[{seq_len: 128, steps: 900}, {seq_len: 512}]`` -> stages; a DataPrepError naming the entry at fault."""
    if not isinstance(stages, (list, tuple)) or not stages:
        raise DataPrepError(f"{what}={stages!r}: give a list such as [{{seq_len: 128, steps: 900}}, {{seq_len: 512}}]"
                            " (or null for one stage at the shards' length)")
    parsed = []
    for i, entry in enumerate(stages):
        last = i == len(stages) - 1
        if not isinstance(entry, dict) or set(entry) - {"seq_len", "steps"} or "seq_len" not in entry:
            raise DataPrepError(f"{what}[{i}]={entry!r}: each stage is {{seq_len: TOKENS, steps: STEPS}} (the last "
                                "without steps)")
        seq_len, steps = entry["seq_len"], entry.get("steps")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise DataPrepError(f"{what}[{i}].seq_len={seq_len!r}: a positive number of tokens")
        if steps is None and not last:
            raise DataPrepError(f"{what}[{i}] (seq_len {seq_len}) has no steps: every stage but the last says how "
                                "many optimizer steps it runs (the last runs to trainer.max_steps)")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise DataPrepError(f"{what}[{i}].steps={steps!r}: a positive number of optimizer steps")
        if steps is not None and last:
            raise DataPrepError(f"{what}[{i}].steps={steps}: the last stage runs to trainer.max_steps; drop its steps")
        parsed.append(Stage(seq_len, steps))
    return parsed


def parse_warmup(warmup, global_batch: int | None, what: str = "data.batch_warmup") -> BatchWarmup:
    """``{start: 64, tokens: 2000000, increment: null}`` and ``data.global_batch_size`` -> the warm-up; a
    DataPrepError naming the key at fault."""
    if not isinstance(warmup, dict) or set(warmup) - {"start", "tokens", "increment"} or not {"start", "tokens"} <= set(
            warmup):
        raise DataPrepError(f"{what}={warmup!r}: give {{start: SEQUENCES, tokens: TOKENS, increment: SEQUENCES}} "
                            "(increment may be left out: it is then start)")
    for key in ("start", "tokens", "increment"):
        value = warmup.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataPrepError(f"{what}.{key}={value!r}: a positive whole number")
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise DataPrepError(f"{what} needs data.global_batch_size (a number of sequences): the batch the warm-up "
                            "grows to")
    if warmup["start"] > global_batch:
        raise DataPrepError(f"{what}.start={warmup['start']} is larger than data.global_batch_size={global_batch}: "
                            "the warm-up grows the batch up to the global batch")
    increment = warmup.get("increment") or warmup["start"]
    return BatchWarmup(int(warmup["start"]), int(warmup["tokens"]), int(increment))


class StreamPlan:
    """Stages, batch and warm-up of one run (see module doc). ``shard_len``: S; ``batch_size``: per-rank micro-batch
    at S (the target once the warm-up is over); ``global_batch``: sequences at S per optimizer step;
    ``accumulation``: micro-batches per optimizer step (fixed); ``world_size``: data-parallel ranks."""

    def __init__(self, shard_len: int, batch_size: int, global_batch: int, world_size: int, accumulation: int,
                 stages: Sequence[Stage] | None = None, stage_batch: str = "tokens",
                 warmup: BatchWarmup | None = None):
        self.shard_len = int(shard_len)
        self.stages = list(stages) if stages else [Stage(self.shard_len)]
        self.stage_batch = stage_batch
        self.batch_size, self.global_batch = int(batch_size), int(global_batch)
        self.world_size, self.accumulation = int(world_size), int(accumulation)
        self.warmup = warmup
        self.unit = position_unit(self.shard_len, [s.seq_len for s in self.stages])
        self._ends = []  # first step after each stage
        end = 0
        for stage in self.stages:
            end = end + stage.steps if stage.steps is not None else math.inf
            self._ends.append(end)

    @classmethod
    def for_global_batch(cls, shard_len: int, batch_size: int, global_batch: int, stages: Sequence[Stage] | None,
                         stage_batch: str, warmup: BatchWarmup | None) -> "StreamPlan":
        """The plan on one rank whose accumulation (``global_batch / batch_size``) makes up the global batch: its
        per-rank micro-batches and tokens per step are those of every layout with this global batch, so the checks
        at start-up and the tokens a run will see need not know the ranks."""
        return cls(shard_len, batch_size, global_batch, 1, global_batch // batch_size, stages, stage_batch, warmup)

    @property
    def plain(self) -> bool:
        """One stage at the shards' length and no warm-up: training reads whole packed sequences as it always did."""
        return self.warmup is None and [s.seq_len for s in self.stages] == [self.shard_len]

    def stage_of(self, step: int) -> int:
        return next(i for i, end in enumerate(self._ends) if step < end)

    def seq_len(self, step: int) -> int:
        return self.stages[self.stage_of(step)].seq_len

    def global_batch_at(self, tokens_seen: int) -> int:
        """Global batch (sequences at S) of a step that starts with ``tokens_seen`` tokens seen."""
        w = self.warmup
        if w is None or tokens_seen >= w.tokens:
            return self.global_batch
        rises = -(-(self.global_batch - w.start) // w.increment)
        return min(self.global_batch, w.start + w.increment * (tokens_seen * rises // w.tokens))

    def ramp(self) -> list[int]:
        """Every global batch the warm-up can give, in order."""
        if self.warmup is None:
            return [self.global_batch]
        w = self.warmup
        return list(range(w.start, self.global_batch, w.increment)) + [self.global_batch]

    def micro_batch_size(self, global_batch: int, seq_len: int) -> int:
        """Per-rank micro-batch of a step with ``global_batch`` sequences at S in a stage of length ``seq_len``."""
        at_shard_len = global_batch // (self.world_size * self.accumulation)
        if self.stage_batch == "tokens":
            return at_shard_len * self.shard_len // seq_len
        return at_shard_len

    def align(self, consumed: int, step: int) -> int:
        """The first slot at or after ``consumed`` where the stage of ``step`` can read."""
        m = self.seq_len(step) // self.unit
        return -(-consumed // m) * m

    def micro_batches(self, consumed: int, step: int) -> Iterator[MicroBatch]:
        """Every micro-batch from the start of optimizer step ``step`` with position ``consumed``, for ever."""
        while True:
            consumed = self.align(consumed, step)
            s = self.seq_len(step)
            m = s // self.unit
            size = self.micro_batch_size(self.global_batch_at(consumed * self.unit), s)
            for _ in range(self.accumulation):
                yield MicroBatch(step, consumed, size, s, m)
                consumed += size * self.world_size * m
            step += 1

    def describe(self) -> str:
        """One line for the log: each stage's steps, length and per-rank micro-batch (at the full batch), and the
        warm-up."""
        parts, first = [], 0
        for stage, end in zip(self.stages, self._ends):
            steps = f"steps {first + 1}-{end}" if end != math.inf else f"steps {first + 1}-"  # as metrics.csv numbers them
            size = self.micro_batch_size(self.global_batch, stage.seq_len)
            parts.append(f"{steps}: {stage.seq_len} tokens x {size} per rank and micro-batch")
            first = end
        line = f"stream plan ({self.stage_batch} per step kept across stages): " + "; ".join(parts)
        if self.warmup is not None:
            w = self.warmup
            line += (f"; batch warm-up {w.start} -> {self.global_batch} sequences of {self.shard_len} tokens (+"
                     f"{w.increment}) over the first {w.tokens:,} tokens")
        return line

    def position_after(self, steps: int) -> int:
        """``consumed`` at the start of optimizer step ``steps`` of a run that started at 0 (any number of ranks)."""
        return self.align(self.trained_position(steps), steps)

    def trained_position(self, steps: int) -> int:
        """``consumed`` once the first ``steps`` optimizer steps are trained. Step by step through the warm-up, then a
        stage at a time (every step of a stage past the warm-up trains the same tokens), so a plan of millions of
        steps is summed at once: the run's start line says how many tokens it will see."""
        consumed, step = 0, 0
        while step < steps:
            consumed = self.align(consumed, step)
            s = self.seq_len(step)
            size = self.micro_batch_size(self.global_batch_at(consumed * self.unit), s)
            warming = self.warmup is not None and consumed * self.unit < self.warmup.tokens
            run = 1 if warming else min(steps, self._ends[self.stage_of(step)]) - step
            consumed += run * self.accumulation * size * self.world_size * (s // self.unit)
            step += run
        return consumed


def position_unit(shard_len: int, lengths: Sequence[int]) -> int:
    unit = int(shard_len)
    for s in lengths:
        unit = math.gcd(unit, int(s))
    return unit


def stage_length_problems(shard_len: int, stages: Sequence[Stage], max_positions: int | None = None,
                          what: str = "data.stages") -> list[str]:
    """Stage lengths that the shards cannot serve (neither a divisor nor a multiple of S) or the model cannot hold."""
    problems = []
    for i, stage in enumerate(stages):
        s = stage.seq_len
        if shard_len % s and s % shard_len:
            works = [d for d in range(1, shard_len + 1) if shard_len % d == 0 and d >= 8] or [shard_len]
            problems.append(f"{what}[{i}].seq_len={s} neither divides nor is a multiple of the shards' length "
                            f"{shard_len}: a stage splits each packed sequence into equal pieces or joins whole ones; "
                            f"use one of {', '.join(map(str, works))} or a multiple of {shard_len}")
        if max_positions is not None and s > max_positions:
            problems.append(f"{what}[{i}].seq_len={s} is longer than model.max_position_embeddings={max_positions} "
                            f"(the EMD's absolute position table); raise it to {max(x.seq_len for x in stages)} or "
                            "shorten the stage")
    return problems


def batch_problems(plan: StreamPlan, ranks_accumulation: int, what: str = "data") -> list[str]:
    """Warm-up values the ranks x accumulation cannot share, and tokens-mode micro-batches that are not whole."""
    problems = []
    per_pass = ranks_accumulation
    if plan.warmup is not None:
        w = plan.warmup
        bad = [f"{k}={v}" for k, v in (("start", w.start), ("increment", w.increment),
                                      ("global_batch_size", plan.global_batch)) if v % per_pass]
        if bad:
            multiples = [per_pass * k for k in range(1, 5)]
            problems.append(f"{what}.batch_warmup: {', '.join(bad)} not divisible by ranks x accumulation = {per_pass} "
                            f"(data.global_batch_size / data.batch_size): every global batch of the warm-up is "
                            f"shared by the ranks and micro-batches of one step; use multiples of {per_pass} such as "
                            f"{', '.join(map(str, multiples))}")
            return problems
    if plan.stage_batch != "tokens":
        return problems
    for i, stage in enumerate(plan.stages):
        s = stage.seq_len
        sizes = sorted({b * plan.batch_size // plan.global_batch for b in plan.ramp()})
        bad = [b for b in sizes if (b * plan.shard_len) % s or b * plan.shard_len // s < 1]
        if bad:
            works = [b for b in range(1, 4 * max(sizes) + 1) if (b * plan.shard_len) % s == 0][:6]
            problems.append(f"{what}.stages[{i}].seq_len={s} with data.stage_batch=tokens: a micro-batch of "
                            f"{bad[0]} sequence(s) of {plan.shard_len} tokens is {bad[0] * plan.shard_len / s:g} "
                            f"sequences of {s}, not a whole number; per-rank micro-batches (at {plan.shard_len} "
                            f"tokens) that work: {', '.join(map(str, works))} (data.batch_size, and every warm-up "
                            "batch / (ranks x accumulation)); or data.stage_batch=sequences")
    return problems
