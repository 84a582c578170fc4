"""Each shard's sha256 verified lazily during training, in a background thread.

The default start-up check (``verify="fast"``) reads headers and sizes only: reading a TB corpus up front would
delay every launch by many minutes. Flipped bytes inside a shard would then train silently. Here a background
thread hashes the shards in the order training first uses them (the sampler's global order from the current
position), and the training side asks two things: at each step, whether a hash has already failed (a dictionary
look-up); before each checkpoint, that every shard used since the previous checkpoint is verified (it waits for
those hashes), so a checkpoint never holds weights trained on data that failed its checksum. A failure is a
:class:`DataPrepError` naming the shard and what to do.
"""

from __future__ import annotations

import threading
from typing import Iterable

import numpy as np

from data_prep import shard_format as sf
from data_prep.errors import DataPrepError


class LazyShardHasher:
    def __init__(self, dataset, order, start: int) -> None:
        """``dataset``: a ShardedDataset or ShardCorpus; ``order``: its global order; ``start``: the global position training
        resumes from (positions before it were verified before the checkpoint they resume from was written)."""
        self.dataset = dataset
        self.order = order
        self.checked_upto = int(start)
        self._results: dict[int, str | None] = {}  # shard -> None (matches) or the problem
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(self._first_use_order(start),),
                                        name="shard-sha256", daemon=True)
        self._thread.start()

    def _shards_at(self, positions: np.ndarray) -> np.ndarray:
        indices = self.order.positions(positions)
        return np.searchsorted(self.dataset._ends, indices, side="right")

    def _first_use_order(self, start: int, chunk: int = 1 << 16) -> list[int]:
        """Shards in the order training reaches them from ``start`` (scanning at most one epoch of positions)."""
        n_shards, seen, order = len(self.dataset.shards), set(), []
        for first in range(start, start + self.dataset.__len__(), chunk):
            for s in self._shards_at(np.arange(first, first + chunk, dtype=np.int64)).tolist():
                if s not in seen:
                    seen.add(s)
                    order.append(s)
            if len(order) == n_shards:
                break
        return order + [s for s in range(n_shards) if s not in seen]

    def _run(self, order: list[int]) -> None:
        for s in order:
            entry = self.dataset.shards[s]
            path = self.dataset.shard_file(s)
            try:
                actual = sf.file_sha256(path)
                problem = None if actual == entry["sha256"] else (
                    f"shard {path} is corrupted: sha256 {actual[:16]}... != manifest {entry['sha256'][:16]}...; "
                    "re-create it (delete it and re-run the same `python -m data_prep shards` command), then resume")
            except OSError as err:
                problem = f"shard {path} cannot be read ({err.strerror or err}); restore it, then resume"
            with self._done:
                self._results[s] = problem
                self._done.notify_all()

    def raise_if_failed(self) -> None:
        """Cheap: raise if any hash computed so far failed."""
        for problem in self._results.values():
            if problem:
                raise DataPrepError(problem)

    def verify_used(self, consumed: int) -> None:
        """Wait until every shard used at positions [checked_upto, consumed) is hashed; raise on a mismatch."""
        if consumed > self.checked_upto:
            needed = self._used(range(self.checked_upto, consumed))
            with self._done:
                self._done.wait_for(lambda: needed <= self._results.keys())
            for s in sorted(needed):
                if self._results[s]:
                    raise DataPrepError(self._results[s])
            self.checked_upto = consumed
        self.raise_if_failed()

    def _used(self, positions: Iterable[int], chunk: int = 1 << 20) -> set[int]:
        positions = range(positions.start, positions.stop)
        used: set[int] = set()
        for first in range(positions.start, positions.stop, chunk):
            last = min(positions.stop, first + chunk)
            used.update(np.unique(self._shards_at(np.arange(first, last, dtype=np.int64))).tolist())
            if len(used) == len(self.dataset.shards):
                break
        return used
