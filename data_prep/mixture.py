"""Several shard directories as one training corpus: a plain union, or a weighted mixture of sources.

Why here: array jobs write one shard directory per task (``OUT/part-00000``, ...) and continued pretraining mixes
corpora with weights (new-domain text + a replay of general text). Training addresses data by *global position*
only (``data_prep.reader``); this module extends the position -> sequence map to several directories without
adding any state: the whole data position stays "global samples consumed", so resume is exact with any number of
ranks.

Forms (the same for ``data.path``, ``data.sources[*].path`` and ``python -m data_prep inspect``):

- a shard directory, a glob (``OUT/part-*``, matched directories in sorted order) or a list of these: one corpus,
  as if it had been prepared in one run. Its sequences are numbered set after set and ordered by one
  :class:`~data_prep.reader.GlobalOrder`, so every sequence is seen once per epoch.
- sources with weights (``[{path: A, weight: 0.7}, {path: B, weight: 0.3}]``): a :class:`BlendedOrder`. Position
  ``p`` belongs to the source chosen by a blending table (Megatron-LM's construction: each position goes to the
  source whose share so far falls furthest below its weight), so every window of the stream holds the sources in
  the given proportions; inside a source, its ``k``-th position is sequence ``order_s(k // n_s)[k % n_s]`` with its
  own seeded permutation per source epoch, so a source smaller than its share repeats, reshuffled each time.

Every set is verified as a single directory is (``ShardedDataset``), and all must share the tokenizer (checksum)
and sequence length: anything else is one error naming both sets.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.reader import GlobalOrder, ShardedDataset

BLEND_PERIOD = 1 << 16
"""Positions per period of the blending table. The weights are realised as quotas of this many positions (each
share rounded to 1/65536); the table repeats, so memory stays O(period) however long training runs."""


@dataclass(frozen=True)
class Source:
    """One entry of a mixture: its shard directories (one source may be a glob of array-job parts) and weight."""

    paths: tuple[Path, ...]
    weight: float | None = None

    @property
    def name(self) -> str:
        return ",".join(str(p) for p in self.paths)


def expand(spec: str | Path | Sequence[str | Path], what: str = "data.path") -> list[Path]:
    """Shard directories named by a directory, a glob or a list of them (globs expand to sorted directories)."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items:
        raise DataPrepError(f"{what} is an empty list: name at least one shard directory")
    paths: list[Path] = []
    for item in items:
        text = str(item)
        if glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text) if Path(m).is_dir())
            if not matches:
                raise DataPrepError(f"{what}: the pattern {text!r} matches no directory")
            paths += matches
        else:
            paths.append(Path(text))
    seen: dict[Path, str] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise DataPrepError(f"{what}: shard directory {p} is named twice ({seen[key]} and {p}); each set may "
                                "appear once (give a source a larger weight to see it more often)")
        seen[key] = str(p)
    return paths


def parse_sources(path: Any = None, sources: Iterable[Any] | None = None, what: str = "data") -> list[Source]:
    """Sources from ``data.path`` (one unweighted source) or ``data.sources`` (a list of {path, weight})."""
    if sources:
        if path not in (None, "???"):
            raise DataPrepError(f"{what}.path={path} and {what}.sources are both set: use {what}.path for one corpus, "
                                f"{what}.sources=[{{path: DIR, weight: W}}, ...] for a weighted mixture (add "
                                f"{what}.path=null when an experiment sets a path)")
        parsed = []
        for i, entry in enumerate(sources):
            if not isinstance(entry, dict) or set(entry) - {"path", "weight"} or "path" not in entry:
                raise DataPrepError(f"{what}.sources[{i}]={entry!r}: each source is {{path: DIR_OR_GLOB, weight: W}}")
            weight = entry.get("weight")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise DataPrepError(f"{what}.sources[{i}].weight={weight!r}: give a positive number") from None
            if not weight > 0 or not np.isfinite(weight):
                raise DataPrepError(f"{what}.sources[{i}].weight={weight}: weights must be positive")
            parsed.append(Source(tuple(expand(entry["path"], f"{what}.sources[{i}].path")), weight))
        return parsed
    if path in (None, "???"):
        raise DataPrepError(f"{what}.path: required (a shard directory, a glob such as OUT/part-*, or a list), or "
                            f"{what}.sources for a weighted mixture")
    return [Source(tuple(expand(path, f"{what}.path")))]


def quotas(weights: Sequence[float], period: int = BLEND_PERIOD) -> np.ndarray:
    """Positions per period for each weight (largest-remainder rounding; every source gets at least one)."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * period
    q = np.maximum(np.floor(share).astype(np.int64), 1)
    while q.sum() < period:  # give the rest to the largest remainders (ties: the first source)
        q[int(np.argmax(share - q))] += 1
    while q.sum() > period:
        q[int(np.argmax(np.where(q > 1, q - share, -np.inf)))] -= 1
    return q


def blending_table(counts: Sequence[int]) -> np.ndarray:
    """Source of each position of one period, Megatron-LM's greedy construction on the quotas ``counts``: position
    ``i`` goes to the source with the largest deficit ``quota_s / period * (i + 1) - taken_s`` (ties: the first),
    so after any prefix every source is within one position of its share, and a period ends with exactly its
    quotas taken."""
    counts = [int(c) for c in counts]
    period = sum(counts)
    rates = [c / period for c in counts]
    taken = [0] * len(counts)
    sources = range(len(counts))
    table = []
    for i in range(1, period + 1):  # plain Python: ~10x faster than numpy calls on a few sources
        s = max(sources, key=lambda k: rates[k] * i - taken[k])  # max keeps the first of equal deficits
        table.append(s)
        taken[s] += 1
    return np.asarray(table, dtype=np.int32)


class BlendedOrder:
    """Global position -> index into the concatenated sources, for a weighted mixture (see module doc).

    ``lengths``: sequences per source; ``offsets``: where each source starts in the concatenated index space.
    Stateless and vectorised like ``GlobalOrder``: any position maps the same way on every rank and after resume.
    """

    def __init__(self, lengths: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool = True,
                 period: int = BLEND_PERIOD):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if (self.lengths <= 0).any():
            raise DataPrepError("a mixture source has no sequences")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.weights = [float(w) for w in weights]
        self.quotas = quotas(self.weights, period)
        self.period = int(self.quotas.sum())
        self.table = blending_table(self.quotas)
        # ordinal of each table position among the earlier positions of the same source in the period
        self.ordinal = np.empty(self.period, dtype=np.int64)
        for s in range(len(self.quotas)):
            where = np.flatnonzero(self.table == s)
            self.ordinal[where] = np.arange(len(where))
        self.orders = [GlobalOrder(int(n), source_seed(seed, s), shuffle) for s, n in enumerate(self.lengths)]
        self.n = int(self.lengths.sum())  # "epoch" length for the sampler's bookkeeping: one pass of the sizes

    def sources_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, ordinal within that source's own stream) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        cycle, offset = np.divmod(positions, self.period)
        source = self.table[offset].astype(np.int64)
        return source, cycle * self.quotas[source] + self.ordinal[offset]

    def positions(self, positions: np.ndarray) -> np.ndarray:
        source, ordinal = self.sources_at(positions)
        result = np.empty(len(source), dtype=np.int64)
        for s in np.unique(source):
            sel = source == s
            result[sel] = self.orders[int(s)].positions(ordinal[sel]) + self.offsets[s]
        return result

    def taken(self, consumed: int) -> np.ndarray:
        """Sequences drawn from each source by the first ``consumed`` global positions."""
        cycle, offset = divmod(int(consumed), self.period)
        return cycle * self.quotas + np.bincount(self.table[:offset], minlength=len(self.quotas))

    def source_epochs(self, consumed: int) -> list[float]:
        """Epochs of each source after ``consumed`` positions (1.0 = every sequence of the source seen once)."""
        return (self.taken(consumed) / self.lengths).tolist()


def source_seed(seed: int, source: int) -> int:
    """Seed of one source's own order (distinct per source, fixed by the run seed)."""
    return (int(seed) * 1_000_003 + 7919 * (source + 1)) % (1 << 62)


class ShardCorpus:
    """Several shard directories as one indexable dataset (set after set), with the single-set interface training
    uses (``seq_len``, ``vocab_size``, ``special_ids``, ``tokenizer_dir``, ``check_tokenizer``, items as dicts).

    ``sources``: from :func:`parse_sources`; every directory is opened and verified as a ``ShardedDataset``
    (``verify``; ``lock``: hold each set's shared lock, as training does) and all are checked to share tokenizer
    and sequence length.
    """

    def __init__(self, sources: Sequence[Source], *, verify: str = "fast", lock: bool = False):
        self.sources = list(sources)
        self.sets: list[ShardedDataset] = []
        self.source_of_set: list[int] = []
        try:
            for s, source in enumerate(self.sources):
                for path in source.paths:
                    self.sets.append(ShardedDataset(path, verify=verify, lock=lock))
                    self.source_of_set.append(s)
            check_compatible(self.sets)
        except BaseException:
            self.close()
            raise
        first = self.sets[0]
        self.path: Path | str = first.path if len(self.sets) == 1 else self.describe()  # for messages
        self.manifest = first.manifest
        self.seq_len, self.vocab_size, self.special_ids = first.seq_len, first.vocab_size, first.special_ids
        set_lengths = np.array([len(d) for d in self.sets], dtype=np.int64)
        self._set_ends = np.cumsum(set_lengths)
        self.source_lengths = [int(set_lengths[[i for i, s in enumerate(self.source_of_set) if s == k]].sum())
                               for k in range(len(self.sources))]
        for k, n in enumerate(self.source_lengths):
            if n == 0:
                raise DataPrepError(f"source {self.sources[k].name} has no sequences")
        # every shard of every set, in order, for the lazy sha256 check
        self.shards = [entry for d in self.sets for entry in d.shards]
        self._shard_files = [d.path / entry["file"] for d in self.sets for entry in d.shards]
        self._shard_owner = [(d, i) for d in self.sets for i in range(len(d.shards))]
        self._ends = np.cumsum([entry["sequences"] for entry in self.shards]).astype(np.int64)

    @property
    def weighted(self) -> bool:
        return self.sources[0].weight is not None

    def describe(self) -> str:
        if self.weighted:
            return "; ".join(f"{s.name} (weight {s.weight:g})" for s in self.sources)
        return ", ".join(str(d.path) for d in self.sets)

    def order(self, seed: int, shuffle: bool = True):
        """The global order of this corpus: one permutation of the union, or the weighted blend."""
        if self.weighted:
            return BlendedOrder(self.source_lengths, [s.weight for s in self.sources], seed, shuffle)
        return GlobalOrder(len(self), seed, shuffle)

    def signature(self) -> dict:
        """What a saved data position is only valid for (checked on resume)."""
        return {"num_samples": len(self), "source_lengths": self.source_lengths,
                "weights": [s.weight for s in self.sources] if self.weighted else None}

    def identity(self) -> dict:
        """What the data *is*, beyond its counts: per source (in order) its weight and its shard sets in order,
        each with its resolved path, the sha256 of its manifest's content and its tokenizer checksum. Two corpora
        with equal counts but other text, another tokenizer or another order of sets differ here (compared on
        resume by ``pretrain.checkpointing.identity``)."""
        sources = [{"weight": s.weight, "sets": []} for s in self.sources]
        for d, s in zip(self.sets, self.source_of_set):
            sources[s]["sets"].append({"path": str(d.path.resolve()), "manifest_sha256": manifest_sha256(d.manifest),
                                       "tokenizer": d.manifest["tokenizer"]["checksum"], "sequences": len(d)})
        return {"sources": sources}

    @property
    def tokenizer_checksum(self) -> str:
        return self.manifest["tokenizer"]["checksum"]  # every set shares it (check_compatible)

    @property
    def tokenizer_dir(self) -> Path:
        return self.sets[0].tokenizer_dir

    def check_tokenizer(self, tokenizer_dir: str | Path) -> None:
        self.sets[0].check_tokenizer(tokenizer_dir)  # all sets share the checksum (check_compatible)

    def shard_file(self, shard: int) -> Path:
        return self._shard_files[shard]

    def check_sha256(self, shard: int) -> str | None:
        """The background sha256 of one shard (numbered over all sets), through its set's verified descriptor."""
        dataset, local = self._shard_owner[shard]
        return dataset.check_sha256(local)

    def close(self) -> None:
        """Give up the shard sets' locks."""
        for dataset in self.sets:
            dataset.close()

    def __len__(self) -> int:
        return int(self._set_ends[-1])

    def _locate(self, index: int) -> tuple[ShardedDataset, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence index {index} out of range for {len(self)} sequences in {self.describe()}")
        k = int(np.searchsorted(self._set_ends, index, side="right"))
        return self.sets[k], index - (int(self._set_ends[k - 1]) if k else 0)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        dataset, row = self._locate(int(index))
        return dataset.raw(row)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        dataset, row = self._locate(int(index))
        return dataset[row]


def manifest_sha256(manifest: dict) -> str:
    """sha256 of a manifest's content (canonical JSON: sorted keys, no whitespace), so the identity is that of
    what was read, whatever the file's formatting. The manifest lists every shard's sha256, the tokenizer checksum
    and the preparation settings, so it names the shard set's exact bytes."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def same_weights(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """Mixture weights are proportions: [7, 3] is the mixture [0.7, 0.3] (compared normalised)."""
    if a is None or b is None:
        return a is None and b is None
    if len(a) != len(b):
        return False
    ta, tb = float(sum(a)), float(sum(b))
    return all(abs(x / ta - y / tb) <= 1e-9 for x, y in zip(a, b))


def check_compatible(sets: Sequence[ShardedDataset]) -> None:
    """All shard sets of a corpus were made with one tokenizer and one sequence length: else one error naming the
    first set and the one that differs."""
    first = sets[0]
    reference = first.manifest["tokenizer"]["checksum"]
    for other in sets[1:]:
        problems = []
        checksum = other.manifest["tokenizer"]["checksum"]
        if checksum != reference:
            problems.append(f"tokenizer checksum {reference[:12]}... vs {checksum[:12]}...")
        if other.seq_len != first.seq_len:
            problems.append(f"seq_len {first.seq_len} vs {other.seq_len}")
        if problems:
            raise DataPrepError(
                f"shard sets {first.path} and {other.path} cannot be trained together: {'; '.join(problems)}. "
                "Every source of a corpus must be prepared with the same tokenizer and --seq-len "
                "(re-create one of them with `python -m data_prep shards`)")


def open_corpus(path: Any = None, sources: Iterable[Any] | None = None, *, verify: str = "fast",
                what: str = "data", lock: bool = False) -> ShardCorpus:
    """The training corpus named by ``data.path`` / ``data.sources`` (see module doc)."""
    return ShardCorpus(parse_sources(path, sources, what), verify=verify, lock=lock)
