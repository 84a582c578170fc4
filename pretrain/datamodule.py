"""Lightning data module over the data_prep shard reader, with an exactly resumable data position.

The sampler's state is "global samples consumed". Lightning's prefetching runs ahead of the model, so the
count is advanced by the training step (what was really trained on) and stored in every checkpoint
through ``state_dict``; on resume it is restored before the first batch is drawn, with any number of ranks.

With sequence-length stages or a batch-size warm-up (``data.stages``, ``data.batch_warmup``) the position is
counted in slots of ``position_unit`` tokens and the micro-batches follow ``data_prep.stream_plan.StreamPlan``
(read by ``data_prep.stream_batches``); without them ``position_unit`` is the shards' length, a slot is a packed
sequence and the DataLoader is the one it always was. Validation always reads the validation shards at their own
length, whatever the stage, so validation numbers stay comparable across stages.
"""

from __future__ import annotations

from functools import partial
import logging

import lightning as L
from torch.utils.data import DataLoader

from data_prep.mixture import ShardCorpus, open_corpus, same_weights
from data_prep.reader import ResumableDistributedSampler
from data_prep.shard_hashes import LazyShardHasher, verify_used_together
from data_prep.stream_batches import StreamBatchSampler, StreamDataset
from data_prep.stream_plan import StreamPlan, parse_stages, parse_warmup, position_unit
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
        # stages and warm-up (validated with the other settings): the plan is built once the ranks are known
        self.stages = parse_stages(settings.stages) if settings.stages else None
        self.warmup = parse_warmup(settings.batch_warmup, settings.global_batch_size) \
            if settings.batch_warmup else None
        self.position_unit = position_unit(self.seq_len, [s.seq_len for s in self.stages or []])
        self._plan: StreamPlan | None = None
        self._micro_index = 0  # micro-batch within the current optimizer step (staged/warm-up runs)
        self._micro: tuple[int, int, int] | None = None  # (step, per-rank size, seq_len) of the current step
        self.session_start_tokens = 0  # tokens seen when this session's training began (after a resume's restore)

    @property
    def seq_len(self) -> int:
        """The shards' sequence length (S): what ``data.batch_size`` and ``data.global_batch_size`` count in."""
        return self.train_set.seq_len

    @property
    def plan(self) -> StreamPlan:
        """The stream plan of this run (``data_prep.stream_plan``), for the trainer's ranks and accumulation."""
        trainer = self.trainer
        world = trainer.world_size if trainer else 1
        accumulation = trainer.accumulate_grad_batches if trainer else 1
        key = (world, accumulation)
        if self._plan is None or (self._plan.world_size, self._plan.accumulation) != key:
            global_batch = self.settings.batch_size * world * accumulation
            self._plan = StreamPlan(self.seq_len, self.settings.batch_size, global_batch, world, accumulation,
                                    self.stages, self.settings.stage_batch, self.warmup)
        return self._plan

    @property
    def staged(self) -> bool:
        """Whether this run reads the stream by a plan (stages or warm-up) rather than whole packed sequences."""
        return self.stages is not None or self.warmup is not None

    @property
    def tokens_seen(self) -> int:
        """Tokens of the stream consumed so far (pad included; with stage_batch=sequences, also those skipped to
        align a stage)."""
        return self.consumed * self.position_unit

    @property
    def sequence_position(self) -> int:
        """Packed sequences of the global order reached so far (a piece begun counts): the position in the units
        of the order, for the shard hashes and the per-source epochs."""
        return -(-self.consumed * self.position_unit // self.seq_len)

    def _step(self) -> int:
        return int(self.trainer.global_step) if self.trainer else 0

    def micro_batch_start(self) -> tuple[int, int]:
        """(first slot, slots per sample) of the micro-batch about to be trained. At the first micro-batch of an
        optimizer step the position is aligned to the step's stage (logged once when tokens are skipped)."""
        if not self.staged:
            return self.consumed, 1
        plan = self.plan
        step = self._step()
        if self._micro_index == 0:
            aligned = plan.align(self.consumed, step)
            if aligned != self.consumed:
                if self.trainer is None or self.trainer.is_global_zero:
                    log.info("stage of seq_len %d starts at step %d: %d tokens of the stream skipped to align it "
                             "(data.stage_batch=sequences)", plan.seq_len(step), step + 1,
                             (aligned - self.consumed) * plan.unit)
                self.consumed = aligned
            s = plan.seq_len(step)
            self._micro = (step, plan.micro_batch_size(plan.global_batch_at(self.tokens_seen), s), s)
        return self.consumed, self._micro[2] // plan.unit

    def tokens_after(self, steps: int, global_batch: int) -> int:
        """Tokens of the stream the run will have consumed after ``steps`` optimizer steps of ``global_batch``
        sequences at the shards' length (the plan's, with stages or a warm-up)."""
        if not self.staged:
            return steps * global_batch * self.seq_len
        plan = StreamPlan.for_global_batch(self.seq_len, self.settings.batch_size, global_batch, self.stages,
                                           self.settings.stage_batch, self.warmup)
        return plan.trained_position(steps) * plan.unit

    def step_shape(self) -> tuple[int, int]:
        """(sequences over all ranks, seq_len) of the optimizer step being trained."""
        if not self.staged or self._micro is None:
            world = self.trainer.world_size if self.trainer else 1
            accumulation = self.trainer.accumulate_grad_batches if self.trainer else 1
            return self.settings.batch_size * world * accumulation, self.seq_len
        plan = self.plan
        return self._micro[1] * plan.world_size * plan.accumulation, self._micro[2]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        self._micro_index, self._micro = 0, None
        self.session_start_tokens = self.tokens_seen  # the checkpoint's position is restored by now
        if self.staged:
            return self._stream_dataloader()
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

    def _stream_dataloader(self) -> DataLoader:
        """Staged or warm-up runs: micro-batches by the plan, from the position and step at ``iter()``."""
        trainer = self.trainer
        rank = trainer.global_rank if trainer else 0
        plan = self.plan
        if trainer is None or trainer.is_global_zero:
            log.info(plan.describe())
        batches = StreamBatchSampler(plan, self.order, rank, plan.world_size, lambda: (self.consumed, self._step()))
        if self.settings.verify == "fast" and (trainer is None or trainer.is_global_zero) and self.hasher is None:
            self.hasher = LazyShardHasher(self.train_set, self.order, self.sequence_position)
        return SignalSafeDataLoader(StreamDataset(self.train_set), batch_sampler=batches,
                                    num_workers=self.settings.num_workers, persistent_workers=False, pin_memory=False,
                                    worker_init_fn=partial(worker_ignores_stop_signals, rank=rank))

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
        """Called after each trained micro-batch: the whole job consumed batch_size * world_size sequences (with
        stages or a warm-up: the micro-batch's samples x ranks x slots per sample)."""
        world = self.trainer.world_size if self.trainer else 1
        if self.staged:
            start, m = self.micro_batch_start()
            self.consumed = start + self._micro[1] * world * m
            self._micro_index = (self._micro_index + 1) % self.plan.accumulation
        else:
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
                 "identity": self.identity, "position_unit": self.position_unit}
        if self.train_set.weighted:  # how often each source has been gone through so far
            state["source_epochs"] = self.order.source_epochs(self.sequence_position)
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
                self.hasher.verify_used(self.sequence_position)
            return
        device = trainer.strategy.root_device

        def exchange(done: bool, failed: int | None) -> tuple[bool, int | None]:
            state = torch.tensor([0 if done else 1, -1 if failed is None else failed], dtype=torch.int64,
                                 device=device)
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
            return int(state[0]) == 0, (None if int(state[1]) < 0 else int(state[1]))

        verify_used_together(self.hasher, self.sequence_position, exchange,
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
        self.consumed = self._restored_position(state)
        if self.sampler is not None:
            self.sampler.consumed = self.consumed

    def _restored_position(self, state: dict) -> int:
        """``consumed`` of a checkpoint in this run's slots: a checkpoint counted in other slots (other stage lengths,
        or none: slots of a whole packed sequence) converts when its position is a whole number of this run's."""
        saved_unit = int(state.get("position_unit") or self.seq_len)
        tokens = int(state["consumed"]) * saved_unit
        if tokens % self.position_unit:
            raise SettingsError(
                f"checkpoint data position {state['consumed']} (slots of {saved_unit} tokens: {tokens} tokens of the "
                f"stream) is not a whole number of this run's slots of {self.position_unit} tokens (the gcd of the "
                f"shards' length {self.seq_len} and data.stages' lengths); resume with stage lengths that divide "
                f"{tokens}, or with the checkpoint's data.stages")
        return tokens // self.position_unit
