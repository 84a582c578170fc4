"""Reading the token stream by the plan of ``data_prep.stream_plan``: a batch sampler and the dataset it indexes.

Used only when a run has sequence-length stages or a batch-size warm-up; otherwise training reads whole packed
sequences through ``data_prep.reader.ResumableDistributedSampler`` exactly as before. The micro-batch size changes
from one optimizer step to the next (warm-up) and the sequence length from one stage to the next, which a
``DataLoader(batch_size=...)`` cannot express: the :class:`StreamBatchSampler` yields each micro-batch as a list
of keys ``(sequence indices, offset, length)`` that :class:`StreamDataset` turns into items. Samples of one
micro-batch share their length, so the default collate stacks them. Neither imports Lightning.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from data_prep.stream_plan import MicroBatch, StreamPlan

Key = tuple[tuple[int, ...], int, int]
"""(indices of the packed sequences joined, first token within them, length): one sample."""


def sample_keys(plan: StreamPlan, order, micro: MicroBatch, rank: int, world_size: int) -> list[Key]:
    """The keys of ``rank``'s samples of ``micro`` (see ``StreamPlan``): slot ``c`` covers stream tokens
    ``[c*unit, c*unit + length)``, i.e. positions ``c*unit // S`` onwards of the global order."""
    S, u, s = plan.shard_len, plan.unit, micro.seq_len
    starts = np.asarray(micro.slots(rank, world_size), dtype=np.int64) * u
    first, offsets = np.divmod(starts, S)
    pieces = max(1, s // S)
    positions = first[:, None] + np.arange(pieces, dtype=np.int64)[None, :]
    indices = order.positions(positions.reshape(-1)).reshape(positions.shape)
    return [(tuple(int(i) for i in row), int(off), s) for row, off in zip(indices, offsets)]


class StreamBatchSampler(Sampler[list[Key]]):
    """This rank's micro-batches, for ever, from the data position when ``iter()`` is called.

    ``start``: returns ``(consumed, optimizer step)`` of the training loop at that moment (restored by a resume);
    the plan is simulated forward from there. Prefetching runs ahead of training, so the sampler keeps no state the
    checkpoint needs: the data module counts what was trained. ``batch_size`` is the target micro-batch at the
    shards' length (Lightning's DeepSpeed strategy reads it; the actual size follows the plan)."""

    def __init__(self, plan: StreamPlan, order, rank: int, world_size: int, start: Callable[[], tuple[int, int]]):
        self.plan, self.order, self.rank, self.world_size, self._start = plan, order, rank, world_size, start
        self.batch_size = plan.batch_size

    def __iter__(self) -> Iterator[list[Key]]:
        consumed, step = self._start()
        for micro in self.plan.micro_batches(consumed, step):
            yield sample_keys(self.plan, self.order, micro, self.rank, self.world_size)

    def __len__(self) -> int:
        raise TypeError("the stream has no length: training stops by step count")


class StreamDataset:
    """Items of any length cut from or joined out of packed sequences (``Key``), with the fields of
    ``ShardedDataset`` items. The first token of a piece is a word start unless it is a special token: a word cut
    by a piece boundary becomes two words for whole-word masking, and no label crosses the cut."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key: Key) -> dict[str, np.ndarray]:
        indices, offset, length = key
        items = [self.dataset[i] for i in indices]
        if len(items) == 1:
            item = {k: v[offset:offset + length] for k, v in items[0].items()}
        else:
            item = {k: np.concatenate([it[k] for it in items])[offset:offset + length] for k in items[0]}
        if not item["special_tokens_mask"][0] and not item["word_start"][0]:
            item["word_start"] = item["word_start"].copy()
            item["word_start"][0] = True
        return item
