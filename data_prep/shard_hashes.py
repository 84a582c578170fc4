"""Each shard's sha256 verified lazily during training, in a background thread.

The default start-up check (``verify="fast"``) reads headers and sizes only: reading a TB corpus up front would
delay every launch by many minutes. Flipped bytes inside a shard would then train silently. Here a background
thread hashes the shards in the order training first uses them (the sampler's global order from the current
position), and the training side asks two things: at each step, whether a hash has already failed (a dictionary
look-up); before each checkpoint, that every shard used since the previous checkpoint is verified (it waits for
those hashes), so a checkpoint never holds weights trained on data that failed its checksum. A failure is a
:class:`DataPrepError` naming the shard and what to do.

With a shuffled global order nearly every shard is used within the first steps, so the first checkpoint waits
until the whole corpus is hashed (about 15 min per TB on one core). Only global rank 0 hashes; in a multi-rank run
the others would meanwhile sit in the checkpoint's first collective operation, whose timeout (30 min by default)
a large corpus exceeds. :func:`verify_used_together` makes all ranks wait together instead, in slices of at most
``slice_s`` seconds, each closed by one small collective that shares "done?" and "which shard failed?": no rank
ever waits inside a collective for longer than a slice, and a failed hash stops every rank with the same message.

Each shard is hashed through a descriptor of the very file training maps (``ShardedDataset.check_sha256``: same
inode, size and mtime as at the start check), so a file replaced after its hash passed is never trained on. Any
failure of the thread itself is recorded and raised on the training side: a dead thread never leaves a
checkpoint waiting for ever.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

import numpy as np

from data_prep.errors import DataPrepError

log = logging.getLogger(__name__)
WAIT_SLICE_S = 60.0  # the longest a rank waits inside one collective for rank 0's hashes


class LazyShardHasher:
    def __init__(self, dataset, order, start: int) -> None:
        """``dataset``: a ShardedDataset or ShardCorpus; ``order``: its global order; ``start``: the global position training
        resumes from (positions before it were verified before the checkpoint they resume from was written)."""
        self.dataset = dataset
        self.order = order
        self.checked_upto = int(start)
        self._results: dict[int, str | None] = {}  # shard -> None (matches) or the problem
        self._done = threading.Condition()
        self._finished = False  # the thread has ended (all hashed, or stopped by self._crash)
        self._crash: str | None = None
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
        """Hash the shards in ``order``. Whatever goes wrong here ends as a recorded problem and a notification,
        never as a silently dead thread that training would wait for at its next checkpoint."""
        s = None
        try:
            for s in order:
                try:
                    problem = self.dataset.check_sha256(s)
                except OSError as err:
                    problem = (f"shard {self.dataset.shard_file(s)} cannot be read ({err.strerror or err}); restore "
                               "it, then resume")
                with self._done:
                    self._results[s] = problem
                    self._done.notify_all()
        except BaseException as err:  # a bug or a damaged entry: the waiting side raises it instead of hanging
            try:
                where = f" at shard {self.dataset.shard_file(s)}" if s is not None else ""
            except Exception:
                where = f" at shard number {s}"
            self._crash = (f"the background sha256 check of the shards stopped{where} "
                           f"({type(err).__name__}: {err}); the shards trained on cannot be verified: check the "
                           "shard set (`python -m data_prep inspect DIR`), then resume")
        finally:
            with self._done:
                self._finished = True
                self._done.notify_all()

    def raise_if_failed(self) -> None:
        """Cheap: raise if any hash computed so far failed, or the check itself stopped."""
        if self._crash:
            raise DataPrepError(self._crash)
        for problem in self._results.values():
            if problem:
                raise DataPrepError(problem)

    def verify_used(self, consumed: int) -> None:
        """Wait until every shard used at positions [checked_upto, consumed) is hashed; raise on a mismatch."""
        done, failed = self.poll_used(consumed, timeout=None)
        assert done or failed is not None
        if failed is not None:
            raise DataPrepError(self.problem(failed))

    def poll_used(self, consumed: int, timeout: float | None) -> tuple[bool, int | None]:
        """Wait at most ``timeout`` seconds (None: until done) for the hashes of the shards used at positions
        [checked_upto, consumed). Returns (all of them hashed and matching, the first failed shard or None),
        without raising, so that a caller can share the outcome with the other ranks first. A background check
        that stopped before hashing them counts as a failure (of the first shard it left unhashed)."""
        if consumed > self.checked_upto:
            needed = self._used(range(self.checked_upto, consumed))
            with self._done:
                self._done.wait_for(lambda: needed <= self._results.keys() or self._failed() is not None
                                    or self._finished, timeout)
                known = needed & self._results.keys()
            failed = next((s for s in sorted(known) if self._results[s]), self._failed())
            if failed is None and known != needed and self._finished:
                failed = min(needed - known)
            if failed is not None or known != needed:
                return False, failed
            self.checked_upto = consumed
        return self._failed() is None, self._failed()

    def pending(self, consumed: int) -> int:
        """How many of the shards used at positions [checked_upto, consumed) are not hashed yet."""
        if consumed <= self.checked_upto:
            return 0
        return len(self._used(range(self.checked_upto, consumed)) - self._results.keys())

    def problem(self, shard: int) -> str:
        return self._results.get(shard) or self._crash or f"shard {self.dataset.shard_file(shard)} failed"

    def _failed(self) -> int | None:
        return next((s for s, problem in sorted(self._results.items()) if problem), None)

    def _used(self, positions: Iterable[int], chunk: int = 1 << 20) -> set[int]:
        positions = range(positions.start, positions.stop)
        used: set[int] = set()
        for first in range(positions.start, positions.stop, chunk):
            last = min(positions.stop, first + chunk)
            used.update(np.unique(self._shards_at(np.arange(first, last, dtype=np.int64))).tolist())
            if len(used) == len(self.dataset.shards):
                break
        return used


Exchange = Callable[[bool, "int | None"], "tuple[bool, int | None]"]


def verify_used_together(hasher: LazyShardHasher | None, consumed: int, exchange: Exchange, shard_path,
                         slice_s: float = WAIT_SLICE_S) -> None:
    """Before a checkpoint, on every rank of a multi-rank run: wait until the shards trained on are verified.

    ``hasher`` is rank 0's (None on the others); ``exchange(done, failed_shard)`` is a collective over all ranks
    returning (done on every rank, a failed shard if any rank saw one); ``shard_path(s)`` names shard ``s``. Every
    rank loops: rank 0 waits at most ``slice_s`` for its hashes, then all exchange their state, so no collective
    waits longer than a slice however large the corpus. A failed shard raises :class:`DataPrepError` everywhere.
    """
    waited = 0
    while True:
        done, failed = hasher.poll_used(consumed, slice_s) if hasher is not None else (True, None)
        done, failed = exchange(done, failed)
        if failed is not None:
            raise DataPrepError(hasher.problem(failed) if hasher is not None else
                                f"shard {shard_path(failed)} failed its sha256 check on global rank 0 (see its error)")
        if done:
            if hasher is not None:
                hasher.checked_upto = max(hasher.checked_upto, consumed)
            return
        waited += 1
        if hasher is not None and (waited in (1, 2, 5) or waited % 10 == 0):
            log.info("checkpoint: waiting for the sha256 of %s shards trained on (background check of data.path; "
                     "the first checkpoint waits for nearly the whole corpus)",
                     hasher.pending(consumed) if hasher is not None else "the")
