"""Lightning data module over the data_prep shard reader, with an exactly resumable data position.

The sampler's state is "global samples consumed". Lightning's prefetching runs ahead of the model, so the
count is advanced by the training step (what was really trained on) and stored in every checkpoint
through ``state_dict``; on resume it is restored before the first batch is drawn, with any number of ranks.
"""

from __future__ import annotations

from functools import partial
import logging

import lightning as L
from torch.utils.data import DataLoader

from data_prep.mixture import ShardCorpus, open_corpus, same_weights
from data_prep.reader import ResumableDistributedSampler
from data_prep.shard_hashes import LazyShardHasher, verify_used_together
from pretrain.run.interrupt import SignalSafeDataLoader, worker_ignores_stop_signals
from pretrain.checkpointing.identity import identity_changes
from pretrain.settings import DataSettings, SettingsError

log = logging.getLogger(__name__)


def check_same_tokenizer(train: ShardCorpus, val: ShardCorpus) -> None:
    """Validation shards made with another tokenizer would give numbers that mean nothing (other ids, other
    special tokens): refuse them, naming both directories."""
    train_sum, val_sum = train.manifest["tokenizer"]["checksum"], val.manifest["tokenizer"]["checksum"]
    if train_sum != val_sum:
        raise SettingsError(
            f"data.val_path={val.describe()} was made with another tokenizer (checksum {val_sum[:12]}...) than "
            f"the training corpus {train.describe()} ({train_sum[:12]}...); make both with the same --tokenizer, e.g. "
            "`python -m data_prep shards ... --val-fraction F`, which writes both")


class ShardDataModule(L.LightningDataModule):
    def __init__(self, settings: DataSettings):
        super().__init__()
        self.settings = settings
        # data.path (a directory, a glob, a list) or data.sources (weighted): see data_prep.mixture. Every set is
        # read under its shared lock (data_prep.shard_lock) until teardown: `data_prep shards` cannot rewrite it
        self.train_set: ShardCorpus = open_corpus(settings.path, settings.sources, verify=settings.verify, lock=True)
        try:
            self.val_set = open_corpus(settings.val_path, verify=settings.verify, what="data.val", lock=True) \
                if settings.val_path else None
        except BaseException:
            self.train_set.close()
            raise
        self.order = self.train_set.order(settings.seed)  # position -> sequence, the same on every rank
        if self.val_set is not None:
            check_same_tokenizer(self.train_set, self.val_set)
        self.sampler: ResumableDistributedSampler | None = None
        self.consumed = 0  # global samples consumed by training (all ranks), the whole data position
        self.hasher: LazyShardHasher | None = None  # shard sha256s verified in the background (verify=fast)
        self._epochs_logged_at: int | None = None
        self.identity = self.train_set.identity()  # which shard sets, in which order, with which tokenizer
        self.allow_changes: list[str] = []  # resume.allow_changes, set by train() on a resume

    @property
    def seq_len(self) -> int:
        return self.train_set.seq_len

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        self.sampler = ResumableDistributedSampler(
            len(self.train_set), rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1, seed=self.settings.seed, endless=True, order=self.order,
        )
        self.sampler.consumed = self.consumed
        if self.settings.verify == "fast" and (trainer is None or trainer.is_global_zero) and self.hasher is None:
            # one rank hashes (the others would re-read the same files); it stops the whole run on a mismatch
            self.hasher = LazyShardHasher(self.train_set, self.sampler.order, self.consumed)
        return SignalSafeDataLoader(self.train_set, batch_size=self.settings.batch_size, sampler=self.sampler,
                                    num_workers=self.settings.num_workers, drop_last=True,
                                    persistent_workers=False, pin_memory=False,
                                    worker_init_fn=partial(worker_ignores_stop_signals,
                                                           rank=trainer.global_rank if trainer else 0))

    def teardown(self, stage: str) -> None:
        """Training has ended: give up the shard sets' locks."""
        self.train_set.close()
        if self.val_set is not None:
            self.val_set.close()

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.settings.batch_size, shuffle=False,
                          num_workers=0, drop_last=False)

    def consumed_batch(self) -> None:
        """Called after each trained micro-batch: the whole job consumed batch_size * world_size sequences."""
        world = self.trainer.world_size if self.trainer else 1
        self.consumed += self.settings.batch_size * world
        if self.sampler is not None:
            self.sampler.consumed = self.consumed
        if self.hasher is not None:
            self.hasher.raise_if_failed()

    def state_dict(self) -> dict:
        """The data position, for a checkpoint: first every shard trained on since the previous checkpoint must
        have passed its sha256 (this waits for the background hashes), so no checkpoint holds weights trained on
        a damaged shard."""
        self._verify_trained_shards()
        state = {"consumed": self.consumed, "seed": self.settings.seed, **self.train_set.signature(),
                 "identity": self.identity}
        if self.train_set.weighted:  # how often each source has been gone through so far
            state["source_epochs"] = self.order.source_epochs(self.consumed)
            if self._epochs_logged_at != self.consumed:  # once per position (last.ckpt saves the same state)
                self._epochs_logged_at = self.consumed
                log.info("data position %d: epochs per source %s", self.consumed, ", ".join(
                    f"{s.name}={e:.3f}" for s, e in zip(self.train_set.sources, state["source_epochs"])))
        return state

    def _verify_trained_shards(self) -> None:
        """Rank 0 hashes the shards; in a multi-rank run every rank waits with it, in bounded slices (see
        ``data_prep.shard_hashes.verify_used_together``), instead of sitting in the save's first collective."""
        import torch
        import torch.distributed as dist

        if self.settings.verify != "fast":
            return
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            if self.hasher is not None:
                self.hasher.verify_used(self.consumed)
            return
        device = trainer.strategy.root_device

        def exchange(done: bool, failed: int | None) -> tuple[bool, int | None]:
            state = torch.tensor([0 if done else 1, -1 if failed is None else failed], dtype=torch.int64,
                                 device=device)
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
            return int(state[0]) == 0, (None if int(state[1]) < 0 else int(state[1]))

        verify_used_together(self.hasher, self.consumed, exchange,
                             self.train_set.shard_file)

    def load_state_dict(self, state: dict) -> None:
        signature = self.train_set.signature()
        saved = {k: state.get(k) for k in signature}
        if saved["source_lengths"] is None:  # saved before mixtures existed: one set, one source
            saved["source_lengths"] = [state.get("num_samples")]
        counts = ("num_samples", "source_lengths")  # weights compare as proportions: [7,3] is the mixture [0.7,0.3]
        if (any(saved[k] != signature[k] for k in counts) or not same_weights(saved["weights"], signature["weights"])
                or state.get("seed") != self.settings.seed):
            raise SettingsError(
                f"checkpoint data position was saved for {state.get('num_samples')} sequences (per source "
                f"{saved['source_lengths']}, weights {saved['weights']}) with seed {state.get('seed')}, but the "
                f"corpus {self.train_set.describe()} has {len(self.train_set)} (per source "
                f"{signature['source_lengths']}, weights {signature['weights']}) with seed {self.settings.seed}: "
                "resume with the same shards, weights and data.seed, or start a new output_dir"
            )
        changes = {k: v for k, v in identity_changes(state.get("identity"), self.identity).items()
                   if not any(k == a or k.startswith(a + ".") for a in self.allow_changes)}
        if changes:  # the run record is compared first (pretrain.checkpointing.resume); this guards the position itself
            raise SettingsError(
                "checkpoint data position was saved for other data: "
                + "; ".join(f"{k}: {v}" for k, v in changes.items())
                + f". Resume with the same shard sets in the same order, or allow it with resume.allow_changes="
                f"[{','.join(changes)}]")
        self.consumed = int(state["consumed"])
        if self.sampler is not None:
            self.sampler.consumed = self.consumed
