"""Lightning data module over the data_prep shard reader, with an exactly resumable data position.

The sampler's state is "global samples consumed". Lightning's prefetching runs ahead of the model, so the
count is advanced by the training step (what was really trained on) and stored in every checkpoint
through ``state_dict``; on resume it is restored before the first batch is drawn, with any number of ranks.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from data_prep.reader import ResumableDistributedSampler, ShardedDataset
from data_prep.shard_hashes import LazyShardHasher
from pretrain.settings import DataSettings, SettingsError


def check_same_tokenizer(train: ShardedDataset, val: ShardedDataset, settings: DataSettings) -> None:
    """Validation shards made with another tokenizer would give numbers that mean nothing (other ids, other
    special tokens): refuse them, naming both directories."""
    train_sum, val_sum = train.manifest["tokenizer"]["checksum"], val.manifest["tokenizer"]["checksum"]
    if train_sum != val_sum:
        raise SettingsError(
            f"data.val_path={settings.val_path} was made with another tokenizer (checksum {val_sum[:12]}...) than "
            f"data.path={settings.path} ({train_sum[:12]}...); make both with the same --tokenizer, e.g. "
            "`python -m data_prep shards ... --val-fraction F`, which writes both")


class ShardDataModule(L.LightningDataModule):
    def __init__(self, settings: DataSettings):
        super().__init__()
        self.settings = settings
        self.train_set = ShardedDataset(settings.path, verify=settings.verify)
        self.val_set = ShardedDataset(settings.val_path, verify=settings.verify) if settings.val_path else None
        if self.val_set is not None:
            check_same_tokenizer(self.train_set, self.val_set, settings)
        self.sampler: ResumableDistributedSampler | None = None
        self.consumed = 0  # global samples consumed by training (all ranks), the whole data position
        self.hasher: LazyShardHasher | None = None  # shard sha256s verified in the background (verify=fast)

    @property
    def seq_len(self) -> int:
        return self.train_set.seq_len

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        self.sampler = ResumableDistributedSampler(
            len(self.train_set), rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1, seed=self.settings.seed, endless=True,
        )
        self.sampler.consumed = self.consumed
        if self.settings.verify == "fast" and (trainer is None or trainer.is_global_zero) and self.hasher is None:
            # one rank hashes (the others would re-read the same files); it stops the whole run on a mismatch
            self.hasher = LazyShardHasher(self.train_set, self.sampler.order, self.consumed)
        return DataLoader(self.train_set, batch_size=self.settings.batch_size, sampler=self.sampler,
                          num_workers=self.settings.num_workers, drop_last=True,
                          persistent_workers=False, pin_memory=False)

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
        if self.hasher is not None:
            self.hasher.verify_used(self.consumed)
        return {"consumed": self.consumed, "seed": self.settings.seed, "num_samples": len(self.train_set)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples") != len(self.train_set) or state.get("seed") != self.settings.seed:
            raise SettingsError(
                f"checkpoint data position was saved for {state.get('num_samples')} sequences with seed "
                f"{state.get('seed')}, but data.path={self.settings.path} has {len(self.train_set)} with seed "
                f"{self.settings.seed}: resume with the same shards and data.seed, or start a new output_dir"
            )
        self.consumed = int(state["consumed"])
        if self.sampler is not None:
            self.sampler.consumed = self.consumed
