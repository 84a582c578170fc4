"""Training-side reader of a shard directory: memory-mapped dataset + resumable distributed sampler.

``pretrain`` imports this module; it uses numpy and torch, never lightning.

Design: everything is expressed in *global sample positions*. Position ``p`` (counted from the very first step of
training, across epochs) is sequence ``order(epoch=p // N)[p % N]``, where ``order`` is a deterministic
permutation of the N sequences drawn from the seed and the epoch. The only state is ``consumed``, the number of
positions the whole data-parallel job has consumed. Rank ``r`` of ``w`` ranks takes positions
``consumed + r, consumed + r + w, ...``, so the ranks never overlap, together they cover the positions
contiguously, and a restored ``consumed`` continues exactly where training stopped, with any number of ranks.

Contract with the training loop (DataLoader prefetching runs ahead of what the model has seen, so the sampler
cannot count for itself): after each micro-batch the model actually consumed, call
``sampler.advance(per_rank_batch_size * world_size)`` (identical on every rank), and save ``sampler.state_dict()``
in the checkpoint; on resume call ``load_state_dict`` before the DataLoader is iterated. A new ``iter()`` (next
epoch of the DataLoader) starts at ``consumed``. With Lightning, pass ``use_distributed_sampler=False`` so it
does not replace this sampler.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from data_prep import shard_format as sf
from data_prep.errors import DataPrepError
from data_prep.shard_lock import ShardSetLock

# ------------------------------------------------------------------------------------------------ dataset


class ShardedDataset:
    """Random access to the packed sequences of a shard directory, memory-mapped (nothing is loaded up front).

    ``verify``: "fast" (default) checks every shard's size and header against the manifest and the bundled
    tokenizer copy against its checksum and the manifest's special ids; "full" also checksums every shard (reads
    everything); "none" skips it. Token ids >= the vocabulary size are refused as sequences are read.
    ``tokenizer_dir``: the tokenizer training will use; a DataPrepError if it is not the one the shards were made
    with. Items are dicts of numpy arrays (``DataLoader``'s default collate turns them into tensors):
    ``input_ids`` int64 [seq_len], ``word_start`` bool [seq_len], ``special_tokens_mask`` bool [seq_len]
    (True for [CLS]/[SEP]/[PAD] inserted by packing).

    A shard file is opened once per process, at its first use, and its size and header are checked through that
    descriptor before the same descriptor is mapped; its inode, size and mtime must be those seen at the start
    check, so a shard replaced or truncated under a live run stops it with one error instead of being trained on
    (or read as zeros, or killing the reader with SIGBUS). The background sha256 reads through such a descriptor
    too. A file truncated after it was mapped cannot be caught this way: the set's lock (``lock=True``, held by
    training) keeps ``data_prep shards`` out, and nothing else should write a shard set in use.
    """

    def __init__(self, path: str | Path, *, verify: str = "fast", tokenizer_dir: str | Path | None = None,
                 lock: bool = False):
        self.path = Path(path)
        # lock: hold the set's shared lock while this object lives (training), so `data_prep shards` cannot
        # rewrite it meanwhile (see data_prep.shard_lock); taken before the manifest is read
        self._lock = ShardSetLock(self.path, exclusive=False).acquire() if lock else None
        try:
            self._open(verify, tokenizer_dir)
        except BaseException:
            self.close()
            raise

    def _open(self, verify: str, tokenizer_dir: str | Path | None) -> None:
        self.manifest = sf.load_manifest(self.path)
        self.settings = self.manifest["settings"]
        tok = self.manifest["tokenizer"]
        self.seq_len: int = int(self.settings["seq_len"])
        self.vocab_size: int = int(tok["vocab_size"])
        self.special_ids: dict[str, int] = {k: int(v) for k, v in tok["special_ids"].items()}
        self.pad_id, self.cls_id, self.sep_id = self.special_ids["pad"], self.special_ids["cls"], self.special_ids["sep"]
        self.mask_id, self.unk_id = self.special_ids["mask"], self.special_ids["unk"]
        self.shards = self.manifest["shards"]
        counts = np.array([s["sequences"] for s in self.shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._headers: list[sf.ShardHeader | None] = [None] * len(self.shards)
        # (device, inode, size, mtime) of each shard file when it was first checked: every later open (a DataLoader
        # worker's, the background sha256) must find the same file, or the shard changed under the run
        self._identity: list[tuple | None] = [None] * len(self.shards)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if verify not in ("fast", "full", "none"):
            raise DataPrepError(f"verify={verify!r}: use 'fast', 'full' or 'none'")
        if tokenizer_dir is not None:
            self.check_tokenizer(tokenizer_dir)
        if verify != "none":
            self.verify(full=verify == "full")

    def close(self) -> None:
        """Give up the shard set's lock (the memory maps stay usable)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    @property
    def tokenizer_dir(self) -> Path:
        """The copy of the tokenizer the shards were made with (inside the shard directory)."""
        return self.path / self.manifest["tokenizer"].get("copy", sf.TOKENIZER_SUBDIR)

    def check_tokenizer(self, tokenizer_dir: str | Path) -> None:
        from data_prep.text_tokenizer import tokenizer_checksum

        actual, _ = tokenizer_checksum(Path(tokenizer_dir))
        expected = self.manifest["tokenizer"]["checksum"]
        if actual != expected:
            raise DataPrepError(
                f"tokenizer {tokenizer_dir} (checksum {actual[:12]}...) does not match the one the shards in "
                f"{self.path} were made with (manifest tokenizer.checksum {expected[:12]}..., copy in "
                f"{self.tokenizer_dir}); use that tokenizer or re-create the shards"
            )

    def verify(self, full: bool = False) -> None:
        """Raise DataPrepError naming the first problem. Fast: the tokenizer copy against its checksum and against
        the manifest's special ids and vocabulary size, every shard's size and header (including its index
        against its manifest position); full: also every shard's sha256. Token ids are checked against the
        vocabulary as each sequence is read (``__getitem__``)."""
        copy = self.tokenizer_dir
        if copy.is_dir():
            self.check_tokenizer(copy)
            from data_prep.text_tokenizer import load_tokenizer

            problems = sf.tokenizer_mismatches(self.manifest, load_tokenizer(copy))
            if problems:
                raise DataPrepError(f"{self.path / sf.MANIFEST_NAME} contradicts the shard set's own tokenizer copy "
                                    f"({'; '.join(problems)}): the manifest was edited or mixed up; re-create the "
                                    "shards")
        for i, entry in enumerate(self.shards):
            fd = sf.open_regular(self.shard_file(i))
            try:
                self._headers[i] = sf.check_open_shard(fd, self.shard_file(i), entry, self.settings, full, i)
                self._identity[i] = _identity(fd)
            finally:
                os.close(fd)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def shard_file(self, shard: int) -> Path:
        return self.path / self.shards[shard]["file"]

    def _open_shard(self, s: int) -> int:
        """Open shard ``s`` and check that it is still the file checked at start (same inode, size and mtime);
        returns the descriptor, whose later reads are of that very file."""
        path = self.shard_file(s)
        fd = sf.open_regular(path)
        try:
            now, then = _identity(fd), self._identity[s]
            if then is None:
                self._identity[s] = now
            elif now != then:
                change = ("another file has taken its name" if now[:2] != then[:2] else
                          f"its size went from {then[2]} to {now[2]} bytes" if now[2] != then[2] else
                          "it was written to")
                raise DataPrepError(
                    f"shard {path} changed on disk under this run ({change}) after the run had checked it; nothing "
                    "is trained on it. Restore the shard set as it was and resume, or re-create it and start a new "
                    "run")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        maps = self._maps.get(s)
        if maps is None:
            fd = self._open_shard(s)
            try:  # size and header checked through the descriptor that is then mapped
                header = sf.check_open_shard(fd, self.shard_file(s), self.shards[s], self.settings, position=s)
                maps = self._maps[s] = sf.map_shard(fd, header)
            finally:
                os.close(fd)
        return maps

    def check_sha256(self, s: int) -> str | None:
        """Hash shard ``s`` through the descriptor of the file the run reads (``_open_shard``); the problem found,
        or None when it matches the manifest. Used by the background check (``data_prep.shard_hashes``)."""
        path = self.shard_file(s)
        try:
            fd = self._open_shard(s)
        except DataPrepError as err:
            return f"{err}"
        try:
            actual = sf.file_sha256(fd)
            if _identity(fd) != self._identity[s]:
                return (f"shard {path} changed on disk while its sha256 was being checked; nothing is trained on it. "
                        "Restore the shard set as it was and resume, or re-create it and start a new run")
        except OSError as err:
            return f"shard {path} cannot be read ({err.strerror or err}); restore it, then resume"
        finally:
            os.close(fd)
        expected = self.shards[s]["sha256"]
        if actual != expected:
            return (f"shard {path} is corrupted: sha256 {actual[:16]}... != manifest {expected[:16]}...; re-create it "
                    "(delete it and re-run the same `python -m data_prep shards` command), then resume")
        return None

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row in shard) of a global sequence index."""
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"sequence index {index} out of range for {n} sequences in {self.path}")
        s = int(np.searchsorted(self._ends, index, side="right"))
        return s, index - (int(self._ends[s - 1]) if s else 0)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, flag bits) of one sequence as stored (read-only views of the memory map)."""
        s, row = self.locate(int(index))
        ids, flags = self._shard(s)
        return ids[row], flags[row]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ids, flags = self.raw(index)
        top = int(ids.max())
        if top >= self.vocab_size:  # one pass over seq_len ids: negligible next to a training step
            s, row = self.locate(int(index))
            raise DataPrepError(
                f"shard {self.path / self.shards[s]['file']} sequence {row}: token id {top} >= vocabulary size "
                f"{self.vocab_size}; the shard is damaged or from another tokenizer: re-create it "
                "(`python -m data_prep inspect` checks every shard)")
        return {
            "input_ids": ids.astype(np.int64),
            "word_start": (flags & sf.WORD_START).astype(bool),
            "special_tokens_mask": (flags & sf.SPECIAL).astype(bool),
        }

    def __getstate__(self) -> dict:
        # memory maps are per process: DataLoader workers (spawn) reopen them instead of pickling the data
        state = dict(self.__dict__)
        state["_maps"] = {}
        state["_lock"] = None  # the parent process holds the set's lock for the workers it starts
        return state


def _identity(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------------------------------ global order


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class GlobalOrder:
    """A deterministic pseudo-random permutation of ``range(n)`` per (seed, epoch), computed on the fly.

    A balanced Feistel network over the smallest even power of two >= n, with cycle walking to stay in range:
    a bijection by construction, O(1) memory (a 180 GB corpus has ~10^8 sequences; a stored permutation per rank
    would take GBs), vectorised over any array of offsets. ``shuffle=False`` gives the identity.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise DataPrepError("cannot order an empty dataset: the shard directory has no sequences")
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        bits = max(2, math.ceil(math.log2(n)) if n > 1 else 2)
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)

    def _keys(self, epoch: int) -> np.ndarray:
        return np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.seed >> 32, int(epoch)]).generate_state(
            self.ROUNDS, np.uint64
        )

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        with np.errstate(over="ignore"):
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, offsets: np.ndarray, epoch: int) -> np.ndarray:
        offsets = np.asarray(offsets, dtype=np.int64)
        if not self.shuffle:
            return offsets
        keys = self._keys(epoch)
        x = self._feistel(offsets.astype(np.uint64), keys)
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = self._feistel(x[out], keys)
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)

    def positions(self, positions: np.ndarray) -> np.ndarray:
        """Sequence index at each global position (positions may span epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n)
        result = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            result[sel] = self(offsets[sel], int(e))
        return result


# ------------------------------------------------------------------------------------------------ sampler


class ResumableDistributedSampler(Sampler[int]):
    """Splits the global order among data-parallel ranks; state = global samples consumed (see module doc).

    One ``iter()`` yields this rank's share of the rest of the current epoch: ``ceil(remaining / world_size)``
    indices on every rank (equal lengths keep DDP in lock-step). When ``remaining`` is not a multiple of the world
    size, the last round takes its few extra positions from the start of the next epoch's order; they count as
    consumed, so nothing repeats and every sequence is still seen exactly once per epoch of the order.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 chunk: int = 65536, endless: bool = False, order=None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataPrepError(f"rank {rank} is not valid for world_size {world_size}")
        self.num_samples = int(num_samples)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        # ``order``: any position -> sequence map with ``positions()`` (a weighted mixture's ``BlendedOrder``);
        # default: one permutation of the num_samples sequences per epoch.
        self.order = order if order is not None else GlobalOrder(self.num_samples, self.seed, self.shuffle)
        self.consumed = 0
        self._chunk = chunk
        # endless: one iter() runs across epoch boundaries for ever (step-based pretraining stops by step count;
        # the epoch of a position is still position // num_samples, so coverage per epoch is unchanged).
        self.endless = bool(endless)

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    def _remaining_in_epoch(self, start: int) -> int:
        return (start // self.num_samples + 1) * self.num_samples - start

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless sampler has no length")
        return -(-self._remaining_in_epoch(self.consumed) // self.world_size)

    def __iter__(self) -> Iterator[int]:
        start = self.consumed
        if self.endless:
            k0, chunk = 0, min(self._chunk, self.num_samples)
            while True:
                k = np.arange(k0, k0 + chunk, dtype=np.int64)
                yield from self.order.positions(start + self.rank + k * self.world_size).tolist()
                k0 += chunk
        count = -(-self._remaining_in_epoch(start) // self.world_size)
        for k0 in range(0, count, self._chunk):
            k = np.arange(k0, min(count, k0 + self._chunk), dtype=np.int64)
            yield from self.order.positions(start + self.rank + k * self.world_size).tolist()

    def advance(self, global_samples: int) -> None:
        """Record that the whole job consumed ``global_samples`` more samples (per-rank batch x world size)."""
        if global_samples < 0:
            raise ValueError(f"advance({global_samples}): the number of consumed samples cannot be negative")
        self.consumed += int(global_samples)

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``consumed``; the rank and world size stay those of this run (they may differ from the saved)."""
        for key in ("seed", "shuffle", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise DataPrepError(
                    f"sampler state has {key}={state.get(key)!r} but this run has {key}={getattr(self, key)!r}: "
                    f"resume with the same data and seed (a changed shard directory cannot continue the same order)"
                )
        self.consumed = int(state["consumed"])
