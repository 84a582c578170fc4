"""Training reader: memory-mapped dataset, verification at open, and the resumable distributed sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep import pack
from data_prep import shard_format as sf
from data_prep.corpus import CorpusOptions
from data_prep.errors import DataPrepError
from data_prep.reader import GlobalOrder, ResumableDistributedSampler, ShardedDataset
from shard_helpers import build_wordpiece_vocab, read_all, sample_documents, train_spm_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    docs = sample_documents("en", limit=80)
    tok = train_spm_tokenizer(root / "tok", docs, vocab_size=600)
    inputs = [str(write_jsonl(root / "en.jsonl", docs))]
    pack.prepare_shards(inputs, tok, root / "shards", CorpusOptions(), pack.PackSettings(seq_len=32, shard_size=25))
    return root / "shards"


def _positions_of(samplers) -> list[list[int]]:
    return [list(s) for s in samplers]


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_items_match_the_shards(shard_dir):
    ds = ShardedDataset(shard_dir, verify="full", tokenizer_dir=shard_dir / "tokenizer")
    ids, flags = read_all(shard_dir)
    assert len(ds) == len(ids) and len(ds.manifest["shards"]) > 2
    for i in (0, 24, 25, len(ds) - 1):
        item = ds[i]
        assert item["input_ids"].dtype == np.int64 and item["input_ids"].shape == (32,)
        assert item["input_ids"].tolist() == ids[i].tolist()
        assert item["word_start"].tolist() == ((flags[i] & sf.WORD_START) > 0).tolist()
        assert item["special_tokens_mask"].tolist() == ((flags[i] & sf.SPECIAL) > 0).tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == (4, 32) and batch["word_start"].dtype == torch.bool


def test_open_rejects_truncated_shard_and_names_it(shard_dir, tmp_path):
    import shutil

    bad = shutil.copytree(shard_dir, tmp_path / "bad")
    victim = bad / "shard-00001.bin"
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(DataPrepError, match="shard-00001.bin.*(truncated|size)"):
        ShardedDataset(bad)


def test_full_verification_names_a_corrupted_shard(shard_dir, tmp_path):
    import shutil

    bad = shutil.copytree(shard_dir, tmp_path / "bad")
    victim = bad / "shard-00002.bin"
    data = bytearray(victim.read_bytes())
    data[sf.HEADER_SIZE + 5] ^= 0x01
    victim.write_bytes(bytes(data))
    ShardedDataset(bad)  # the fast path (size + header) cannot see a flipped byte ...
    with pytest.raises(DataPrepError, match="shard-00002.bin is corrupted"):
        ShardedDataset(bad, verify="full")  # ... the full check names the shard


def test_tokenizer_that_does_not_match_the_manifest_is_refused(shard_dir, tmp_path):
    other = build_wordpiece_vocab(tmp_path / "wp", ["hello world"])
    with pytest.raises(DataPrepError, match="does not match the one the shards"):
        ShardedDataset(shard_dir, tokenizer_dir=other)


def test_unfinished_directory_is_not_opened(tmp_path):
    (tmp_path / sf.PROGRESS_NAME).write_text("{}")
    with pytest.raises(DataPrepError, match="interrupted"):
        ShardedDataset(tmp_path)


# ------------------------------------------------------------------------------------------------ order


def test_global_order_is_a_seeded_permutation():
    for n in (1, 2, 7, 100, 1000, 4097):
        order = GlobalOrder(n, seed=3)
        perm = order(np.arange(n), epoch=0)
        assert sorted(perm.tolist()) == list(range(n))
    a, b = GlobalOrder(1000, 3), GlobalOrder(1000, 4)
    assert a(np.arange(1000), 0).tolist() == GlobalOrder(1000, 3)(np.arange(1000), 0).tolist()
    assert a(np.arange(1000), 0).tolist() != a(np.arange(1000), 1).tolist()
    assert a(np.arange(1000), 0).tolist() != b(np.arange(1000), 0).tolist()
    assert GlobalOrder(50, 0, shuffle=False)(np.arange(50), 0).tolist() == list(range(50))


# ---------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_covers_every_sequence_once_per_epoch(world):
    n = 101
    for epoch in range(2):
        samplers = [ResumableDistributedSampler(n, rank=r, world_size=world, seed=7) for r in range(world)]
        for s in samplers:
            s.consumed = epoch * n
        per_rank = _positions_of(samplers)
        assert len({len(p) for p in per_rank}) == 1  # equal lengths keep ranks in lock-step
        assert sum(map(len, per_rank)) - n < world
        # interleave back into global position order: the first n positions are one full epoch
        stream = [per_rank[k % world][k // world] for k in range(sum(map(len, per_rank)))]
        assert sorted(stream[:n]) == list(range(n))


def _run(samplers, steps: int, batch: int) -> list[int]:
    """Simulate `steps` training steps of `batch` samples per rank; return the global stream consumed."""
    world = len(samplers)
    iters = [iter(s) for s in samplers]
    seen = []
    for _ in range(steps):
        got = [[next(it) for _ in range(batch)] for it in iters]
        for k in range(batch):
            seen.extend(got[r][k] for r in range(world))
        for s in samplers:
            s.advance(batch * world)
    return seen


@pytest.mark.parametrize("old_world,new_world", [(2, 2), (2, 3), (3, 1)])
def test_save_restore_mid_epoch_continues_without_repeat_or_gap(old_world, new_world):
    n, batch = 97, 4
    reference = ResumableDistributedSampler(n, seed=11)
    full = list(reference.order.positions(np.arange(3 * n)))  # the global stream one rank would read

    first = [ResumableDistributedSampler(n, rank=r, world_size=old_world, seed=11) for r in range(old_world)]
    consumed = _run(first, steps=5, batch=batch)
    state = first[0].state_dict()
    assert state["consumed"] == 5 * batch * old_world == len(consumed)
    assert all(s.state_dict() == state for s in first)

    second = [ResumableDistributedSampler(n, rank=r, world_size=new_world, seed=11) for r in range(new_world)]
    for s in second:
        s.load_state_dict(state)
    rest = _run(second, steps=3, batch=batch)
    assert consumed + rest == full[: len(consumed) + len(rest)]


def test_prefetched_but_unconsumed_samples_are_replayed_after_restore(shard_dir):
    ds = ShardedDataset(shard_dir)
    sampler = ResumableDistributedSampler(len(ds), seed=1)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=0)
    it = iter(loader)
    first = next(it)
    sampler.advance(3)
    next(it)  # fetched, but the step "crashes" before the model consumed it: no advance
    state = sampler.state_dict()

    resumed = ResumableDistributedSampler(len(ds), seed=1)
    resumed.load_state_dict(state)
    again = next(iter(DataLoader(ds, batch_size=3, sampler=resumed)))
    expected = [ds[i]["input_ids"].tolist() for i in sampler.order.positions(np.arange(3, 6))]
    assert again["input_ids"].tolist() == expected
    assert first["input_ids"].tolist() != again["input_ids"].tolist()


def test_epoch_rollover_and_state_checks():
    s = ResumableDistributedSampler(10, rank=0, world_size=3, seed=0)
    assert len(s) == 4 and s.epoch == 0
    s.advance(12)  # 4 steps of 1 x 3 ranks: two positions of epoch 1 are already consumed
    assert s.epoch == 1 and len(s) == 3  # ceil(8 / 3)
    with pytest.raises(DataPrepError, match="num_samples"):
        ResumableDistributedSampler(11, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(DataPrepError, match="seed"):
        ResumableDistributedSampler(10, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(DataPrepError, match="rank 3"):
        ResumableDistributedSampler(10, rank=3, world_size=3)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_endless_sampler_streams_across_epochs_and_resumes(world):
    """Step-based training iterates one endless stream: every epoch of the global order is covered exactly once, and
    a restore (also to another world size) continues the same stream."""
    n, batch, steps = 23, 3, 40  # 40 * 3 * world samples: several epochs
    samplers = [ResumableDistributedSampler(n, rank=r, world_size=world, seed=3, endless=True) for r in range(world)]
    with pytest.raises(TypeError):
        len(samplers[0])  # no length: Lightning treats the loader as infinite and stops by max_steps
    stream = _run(samplers, steps, batch)
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    resumed = [ResumableDistributedSampler(n, rank=r, world_size=2, seed=3, endless=True) for r in range(2)]
    for s in resumed:
        s.load_state_dict(samplers[0].state_dict())
    more = _run(resumed, 10, batch)
    reference = [ResumableDistributedSampler(n, rank=0, world_size=1, seed=3, endless=True)]
    assert _run(reference, steps * world + 20, batch)[len(stream):] == more
