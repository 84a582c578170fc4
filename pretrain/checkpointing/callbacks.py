"""The Lightning side of checkpointing: the only module of ``pretrain.checkpointing`` that imports Lightning.

- :class:`AtomicCheckpointIO`: Lightning's checkpoint I/O through the atomic, checksummed writer of
  :mod:`pretrain.checkpointing.files`, and reads through the restricted unpickler.
- :class:`RunCheckpoint`: Lightning's ``ModelCheckpoint`` with an atomic ``last.ckpt`` link, the step's metrics row
  written before its checkpoint, a save on a clean stop (Ctrl-C, SIGTERM) and the counter fix-ups a resume needs.
  Lightning keys each callback's saved state by its class name (and its settings): the name stays ``RunCheckpoint``
  so that existing checkpoints resume exactly.
- :class:`ElasticResume`: fix-ups after DeepSpeed has loaded ZeRO state re-partitioned for another number of ranks
  (:mod:`pretrain.checkpointing.reshard`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pretrain.checkpointing import reshard, safe_load
from pretrain.checkpointing.files import checksum_deepspeed_saves, checksum_path, replace_link, save_atomic
from pretrain.checkpointing.find import DEEPSPEED_TAG


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes in the destination directory, restricted-unpickler reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save_atomic(checkpoint, path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        checksum_path(Path(path)).unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _log_step_to_csv(trainer, pl_module) -> None:
    """What Lightning's logger connector will log for this step, sent to the CSV logger now."""
    from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

    from pretrain.run.loggers import ResumableCSVLogger

    connector = trainer._logger_connector
    if trainer.fit_loop._should_accumulate() and pl_module.automatic_optimization:
        return
    if not connector.should_update_logs:
        return
    metrics = connector.metrics["log"]
    if not metrics:
        return
    scalars = convert_tensors_to_scalars(metrics)
    scalars.setdefault("epoch", trainer.current_epoch)
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.log_metrics(scalars, step=step)
            logger.save()


def _realign_accumulation(trainer) -> None:
    """Re-align Lightning's micro-batch counter with the optimizer steps when a resumed run accumulates differently
    from the run that saved the checkpoint (another number of ranks under one global batch).

    Lightning decides where an accumulation window ends from ``batch_progress.current.ready % accumulate``: a run
    saved after 3 steps of 3 micro-batches (ready = 9) and resumed with 2 micro-batches per step would end its
    first window after one micro-batch, so that step would see a third of the global batch. Checkpoints are written
    at optimizer-step boundaries, and pretraining is one endless epoch, so the counter must be
    ``global_step x accumulate``; this shifts every field of the counter by the same amount before the epoch loop
    restarts (``on_train_start`` runs first).
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if trainer.current_epoch != 0 or progress.current.ready == 0:
        return
    shift = trainer.global_step * trainer.accumulate_grad_batches - progress.current.ready
    if shift == 0:
        return
    for counter in (progress.current, progress.total):
        for name in ("ready", "started", "processed", "completed"):
            setattr(counter, name, getattr(counter, name) + shift)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with an atomic ``last.ckpt`` link, checksummed DeepSpeed files, and the step's metrics row
    written before its checkpoint.

    Lightning saves checkpoints in ``on_train_batch_end`` and writes that step's metrics only afterwards; a kill
    in between lost the step's ``metrics.csv`` row for good (a resume starts after it). At a checkpoint step the
    row goes to the CSV logger first (the CSV writer merges Lightning's own call for the same step into that row;
    other loggers are left to Lightning, so they see each step once), so every step up to a checkpoint's step has
    its row whenever that checkpoint exists.

    On a resume, ``on_train_start`` (after every restore) corrects two of Lightning's counters: the step last saved,
    and the micro-batch count when the run now accumulates differently (:func:`_realign_accumulation`).
    (The step number the loggers write is kept by :class:`pretrain.run.loggers.LoggedSteps`, whichever hook saved
    the checkpoint.)
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        saving = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if saving:
            _log_step_to_csv(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        checksum_deepspeed_saves(trainer.strategy)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """On Lightning's clean stop (SIGTERM, or Ctrl-C through ``pretrain.run.interrupt``; raised between steps, so the
        state is that of a finished step) save ``step-N`` and ``last``, as a periodic save would. Other exceptions
        save nothing: the state they leave may be half-updated or diverged."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.global_step == 0:
            return
        if self._last_global_step_saved != trainer.global_step:  # else a periodic save at this step already did
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self.interrupt_checkpoint = self._last_checkpoint_saved  # step-N (last.ckpt is a copy or link of it)
            self._save_last_checkpoint(trainer, candidates)
        elif not getattr(self, "interrupt_checkpoint", None):
            self.interrupt_checkpoint = self._last_checkpoint_saved

    def on_train_start(self, trainer, pl_module) -> None:
        """The two counter fix-ups a resume needs, after every restore and before the epoch loop restarts."""
        # Lightning starts counting "already saved at this step" from 0, also on resume: with gradient accumulation
        # the first micro-batch after resuming at a checkpoint step (still that step) wrote the checkpoint again,
        # over the one resumed from, with a half-accumulated step in it.
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step
        _realign_accumulation(trainer)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            replace_link(filepath, linkpath)
        trainer.strategy.barrier()


class ElasticResume(Callback):
    """Fix-ups after DeepSpeed has loaded a checkpoint into a run with another layout.

    - ZeRO-3's universal loader (``deepspeed/runtime/zero/stage3.py``) gives every parameter group the
      hyperparameters of the first one, which would apply weight decay to biases and LayerNorm weights: the saved
      per-group values are put back. It also stores one and the same ``step`` tensor in the AdamW state of every
      sub-group, which AdamW then increments once per sub-group and step (wrong bias correction): each gets its own.

    (A changed accumulation, the same global batch on another number of ranks, is re-aligned for every strategy by
    :class:`RunCheckpoint`.)
    """

    def __init__(self, universal: Path) -> None:
        self.universal = universal

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._restore_group_hyperparameters(trainer)

    def _restore_group_hyperparameters(self, trainer) -> None:
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None or engine.zero_optimization_stage() != 3:
            return
        saved = safe_load.load(self.universal / DEEPSPEED_TAG / "zero" / "optimizer_state.pt", mmap=False,
                               deepspeed=True)
        groups = saved.get("optimizer_state_dict", saved).get("param_groups") or saved.get("param_groups")
        current = engine.optimizer.optimizer.param_groups
        if groups is None or len(groups) != len(current):
            raise reshard.ReshardError(f"{self.universal}: {len(groups or [])} saved parameter groups for "
                               f"{len(current)} in this run")
        for group, saved_group in zip(current, groups):
            for key, value in saved_group.items():
                if key != "params":
                    group[key] = value
        for state in engine.optimizer.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
