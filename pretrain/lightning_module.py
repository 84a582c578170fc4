"""The Lightning side of pretraining: optimisation, schedule, per-step metrics, deterministic masking randomness.

The objective (an ``nn.Module``) computes the loss; this module only wires it to Lightning.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from data_prep.atomic_io import write_json_atomic
from pretrain.objectives.base import PretrainingObjective
from pretrain.objectives.mlm import MaskedLMObjective
from pretrain.lr_schedule import (build_schedule, decay_length, extension_note, follow_max_steps,  # noqa: F401
                                  linear_warmup_decay)
from pretrain.run.perf import device_peak_flops
from pretrain.settings import OptimSettings


log = logging.getLogger(__name__)

ATTENTION_RECORD = "attention_backend.json"  # in the run directory: what the attention backend resolved to, and why


def attention_dtype(precision: Any) -> torch.dtype:
    """The dtype attention computes in under Lightning's ``precision`` (the autocast dtype when mixed)."""
    text = str(precision)
    for prefix, dtype in (("bf16", torch.bfloat16), ("16", torch.float16), ("64", torch.float64)):
        if text.startswith(prefix):
            return dtype
    return torch.float32


def plan_objective_attention(objective: PretrainingObjective, device_type: str, dtype: torch.dtype) -> dict[str, Any]:
    """Resolve the attention backend of every model of the objective for this device and dtype, eagerly (the first
    compiled forward then only reads the outcome): on CUDA, ``auto`` checks the fused kernel against the reference
    path and falls back with one warning if it fails; ``triton`` raises. The JSON-ready record: per model, and
    ``fused`` 1.0 when every model runs the kernel, 0.0 when any runs the reference path, None for custom backends.
    """
    plans = {name: model.plan_attention(device_type, dtype) for name, model in objective.encoder_models().items()}
    fused = [p["fused"] for p in plans.values()]
    backends = sorted({p["backend"] for p in plans.values()})
    return {"backend": ",".join(backends), "device_type": device_type, "dtype": str(dtype).removeprefix("torch."),
            "fused": None if not fused or None in fused else float(all(fused)), "models": plans}


class PretrainingModule(L.LightningModule):
    def __init__(self, objective: PretrainingObjective, optim: OptimSettings, seed: int,
                 run_record: dict | None = None, flops_per_token: Callable[[int], float] | None = None):
        super().__init__()
        self.attention_plan: dict[str, Any] | None = None  # resolved at fit start, on the training device
        # model FLOPs per trained token at a sequence length (``pretrain.run.perf``): attention's share grows with
        # the length, so a run with sequence-length stages counts each micro-batch at its own length
        self.flops_per_token = functools.lru_cache(maxsize=None)(flops_per_token) if flops_per_token else None
        self._peak_flops: float | None = None
        self.objective = objective
        # What `python -m pretrain.export` needs to rebuild the objective from a checkpoint alone.
        self.run_record = run_record or {}
        self.optim = optim
        self.seed = seed
        self._window: tuple[float, int] | None = None  # (time, step) of the previous logging step
        # trained since the previous logging step, all ranks and micro-batches: tokens, sequences, model FLOPs
        self._window_tokens, self._window_samples, self._window_flops = 0, 0, 0.0
        self._nonfinite: torch.Tensor | None = None  # device flag: a non-finite loss since the last check
        self._step_sums: torch.Tensor | None = None  # train/* values summed over this step's micro-batches
        self._step_micro_batches = 0
        self._val_sums: torch.Tensor | None = None  # MLM evaluation: (summed token loss, predicted tokens)
        self._schedule_unrecorded = False  # resumed from a checkpoint whose LR schedule did not save its total

    def _micro_batch_start(self) -> tuple[int, int]:
        """(global position of this micro-batch's first sample, positions per sample) from the data module."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "micro_batch_start"):
            start, m = datamodule.micro_batch_start()
            return int(start), int(m)
        return int(getattr(datamodule, "consumed", self.global_step)), 1

    def seed_step(self) -> torch.Generator:
        """Seed dropout (the global RNG) and return the masking generator from (seed, global position of this
        micro-batch's first sequence).

        The micro-batch of rank r starts at global position ``consumed + r`` (``data_prep.reader``): unique per
        micro-batch, restored on resume, so a resumed run draws exactly the masks and dropout of an uninterrupted
        one without storing RNG state, whatever the number of ranks. The key does not name the rank: a sequence
        trained alone in its micro-batch (``data.batch_size=1``) gets the same masks and dropout at any number of
        ranks and accumulation steps, so one global batch trains identically on 1, 2 or 4 ranks. With stages the
        position counts slots of ``position_unit`` tokens and a sample takes ``m`` of them (``data_prep.stream_plan``):
        rank r starts at ``consumed + r*m`` (``m = 1`` without stages: the same key as before).
        """
        start, m = self._micro_batch_start()
        key = (self.seed * 1_000_003 + start + self.global_rank * m) % (2**63 - 1)
        torch.manual_seed(key)
        g = torch.Generator(device=self.device)
        g.manual_seed(key ^ 0x5DEECE66D)
        return g

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.objective(batch, self.seed_step())
        # Remember a non-finite loss on the device; it is checked where the host waits anyway (logging steps, before
        # a checkpoint is written), so the step itself never synchronises with the accelerator.
        nonfinite = ~torch.isfinite(out["loss"].detach())
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite | nonfinite
        batch_size = batch["input_ids"].shape[0]
        self._count_window(*batch["input_ids"].shape)
        # Count the batch as consumed now, before any checkpoint of this step is written (callbacks save in
        # on_train_batch_end, which runs before the module's own hook).
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "consumed_batch"):
            datamodule.consumed_batch()
        self._log_global_batch_means({f"train/{k}": v for k, v in out.items() if k != "masked_tokens"}, batch_size)
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)
        last_micro_batch = not self.trainer.fit_loop._should_accumulate()  # the step's tokens are all counted
        if self._is_logging_step(self.global_step + 1):
            self.check_finite()  # waits for the device: the throughput window below ends on a finished step
            if last_micro_batch:
                self._log_throughput(batch_size)
        if last_micro_batch and self._step_metrics_read():
            self._log_data_position(datamodule, batch_size)
        return out["loss"]

    def _log_data_position(self, datamodule, batch_size: int) -> None:
        """``data/tokens_seen`` (tokens of the stream consumed after this step, pad included), ``data/global_batch``
        (sequences of this step over all ranks and micro-batches) and ``data/seq_len`` (their length), logged in
        float64 so that token counts stay exact in metrics.csv."""
        if datamodule is None or not hasattr(datamodule, "tokens_seen"):
            return
        sequences, seq_len = datamodule.step_shape()
        for key, value in (("data/tokens_seen", datamodule.tokens_seen), ("data/global_batch", sequences),
                           ("data/seq_len", seq_len)):
            self.log(key, torch.tensor(float(value), dtype=torch.float64), batch_size=batch_size)

    def _log_global_batch_means(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log each ``train/*`` value as its mean over the whole optimizer step: every micro-batch of the
        accumulation window on every rank (no host sync). A step's numbers then describe the global batch it trained
        on, the same on any number of ranks and accumulation for one global batch. The all-reduce runs only on the
        steps whose numbers someone reads (:meth:`_step_metrics_read`), as torchtitan reduces only when it logs."""
        values = torch.stack([v.detach().float() for v in metrics.values()])
        self._step_sums = values if self._step_sums is None else self._step_sums + values
        self._step_micro_batches += 1
        if self.trainer.fit_loop._should_accumulate():
            return
        sums, micro_batches = self._step_sums, self._step_micro_batches
        self._step_sums, self._step_micro_batches = None, 0
        if not self._step_metrics_read():
            return
        means = self.trainer.strategy.reduce(sums / micro_batches, reduce_op="mean")
        self.log_dict(dict(zip(metrics, means)), prog_bar=False, batch_size=batch_size)

    def _step_metrics_read(self) -> bool:
        """Whether the step now ending is one whose ``train/*`` values are read: a logging step (the loggers and the
        progress bar; Lightning's own rule too, which also writes a step at which a stop was asked for), or the
        last step (the loggers write it too, see ``pretrain.run.loggers.LoggedSteps``; the closing summary reads the
        final values)."""
        trainer = self.trainer
        completed = self.global_step + 1  # before the optimizer step, which global_step counts only after it
        return (self._is_logging_step(completed) or trainer._logger_connector.should_update_logs
                or completed >= trainer.max_steps or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def _is_logging_step(self, completed_steps: int) -> bool:
        """Whether the step that makes ``completed_steps`` optimizer steps is one the loggers write (before the
        optimizer step ``global_step`` counts it not yet, after it it does)."""
        return completed_steps % max(1, self.trainer.log_every_n_steps) == 0

    def _log_throughput(self, batch_size: int) -> None:
        """Tokens/s, samples/s and MFU over the steps since the previous logging step (both ends synchronised)."""
        now = time.perf_counter()
        fused = (self.attention_plan or {}).get("fused")
        if fused is not None:  # a constant (1: fused kernel, 0: reference path), next to the speed it explains
            self.log("perf/attention_fused", fused, batch_size=batch_size)
        if self._window is not None:
            started, _ = self._window
            # the tokens trained since the previous logging step (all ranks, every micro-batch): right whatever the
            # stage's length and the warm-up's batch
            seconds = max(now - started, 1e-9)
            self.log("perf/tokens_per_sec", self._window_tokens / seconds, prog_bar=True, batch_size=batch_size)
            self.log("perf/samples_per_sec", self._window_samples / seconds, batch_size=batch_size)
            if self._peak_flops and self.flops_per_token:
                mfu = self._window_flops / seconds / (self._peak_flops * self.trainer.world_size)
                self.log("perf/mfu", mfu, batch_size=batch_size)
        self._window = (now, self.global_step)
        self._window_tokens, self._window_samples, self._window_flops = 0, 0, 0.0

    def _count_window(self, sequences: int, seq_len: int) -> None:
        """Add one trained micro-batch (this rank's ``sequences`` x ``seq_len``; every rank trains the same shape)
        to the throughput window."""
        world = self.trainer.world_size
        self._window_tokens += sequences * seq_len * world
        self._window_samples += sequences * world
        if self.flops_per_token:
            self._window_flops += sequences * seq_len * world * self.flops_per_token(seq_len)

    def check_finite(self) -> None:
        """Raise if any loss since the last check was NaN/inf (one host sync)."""
        if self._nonfinite is not None and bool(self._nonfinite):
            raise FloatingPointError(
                f"non-finite loss at or before step {self.global_step}; no checkpoint was written after it. "
                "Lower optim.lr, use bf16 instead of fp16, or resume from the last checkpoint"
            )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed + batch_idx)  # the same masks at every evaluation: comparable numbers
        out = self.objective(batch, g)
        token_mean = isinstance(self.objective, MaskedLMObjective)
        skip = {"masked_tokens", "loss"} if token_mean else {"masked_tokens"}
        self.log_dict({f"val/{k}": v.float() for k, v in out.items() if k not in skip},
                      batch_size=batch["input_ids"].shape[0], sync_dist=True)
        if token_mean:  # summed over tokens here, divided once at the end of the evaluation
            predicted = (out["masked_tokens"] - out["dropped_predictions"]).float()
            step_sums = torch.stack([out["loss"].detach().float() * predicted, predicted])
            self._val_sums = step_sums if self._val_sums is None else self._val_sums + step_sums

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    def on_validation_epoch_end(self) -> None:
        """MLM: ``val/loss`` is the mean cross-entropy over every predicted token of the evaluation (all ranks),
        and ``val/perplexity`` its exponential. A mean of per-batch means (or of per-batch perplexities) would
        weigh a batch with few masked tokens like a full one and, for perplexity, overstate it (Jensen)."""
        if self._val_sums is None:
            return
        total = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        mean = total[0] / total[1].clamp(min=1)
        # the same value on every rank already; sync_dist only keeps Lightning from warning about epoch-level logs
        self.log("val/loss", mean, sync_dist=True)
        self.log("val/perplexity", torch.exp(mean), sync_dist=True)
        self._val_sums = None

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # MFU only where the device's bf16 peak is known
            self._peak_flops = device_peak_flops(torch.cuda.get_device_name(self.device))
        self._plan_attention()

    def _plan_attention(self) -> None:
        """Resolve the attention backend here, where Lightning has placed this rank on its device and before the
        first (compiled) forward, and record the outcome in the run directory (``attention_backend.json``)."""
        self.attention_plan = plan_objective_attention(self.objective, self.device.type,
                                                       attention_dtype(self.trainer.precision))
        if self.trainer.is_global_zero:
            root = Path(self.trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(root / ATTENTION_RECORD, self.attention_plan)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Total gradient norm before clipping, at logging steps only (it costs a pass over all gradients).
        if self._is_logging_step(self.global_step + 1):
            norms = [p.grad.detach().norm(2) for p in self.objective.parameters() if p.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms), 2))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # DeepSpeed partitions the gradients (p.grad is empty here); its engine computes the total norm before
        # clipping in its own step, and keeps it.
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is not None and self._is_logging_step(self.global_step):
            norm = engine.get_global_grad_norm()
            if norm is not None:
                self.log("train/grad_norm", float(norm))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write weights a NaN step has touched
        checkpoint["deberta_pretrain"] = self.run_record

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.objective.named_parameters():
            if p.requires_grad:
                (no_decay if self.objective.no_weight_decay(name, p) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = self.optim.fused if self.optim.fused is not None else self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps,
                                      fused=fused or None)
        schedule = build_schedule(optimizer, self.optim.warmup_steps, self.trainer.max_steps, self.optim.min_lr_ratio,
                                  **self._schedule_plan())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _schedule_plan(self) -> dict[str, Any]:
        """The configured schedule beyond warm-up, total and floor (``pretrain.lr_schedule``); the wsd decay length
        resolved against ``trainer.max_steps``."""
        return {"schedule": self.optim.schedule,
                "decay_steps": decay_length(self.trainer.max_steps, self.optim.decay_steps, self.optim.decay_fraction),
                "decay_shape": self.optim.decay_shape}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Say what a changed plan (``trainer.max_steps``, the wsd decay) does to the LR schedule (once, before the
        progress bar is drawn); ``on_train_start`` applies it once the schedule is restored."""
        states = [s for s in checkpoint.get("lr_schedulers") or [] if isinstance(s, dict)]
        # checkpoints from before the schedule's total was saved with it hold no multiplier state
        self._schedule_unrecorded = bool(states) and not any(states[0].get("lr_lambdas") or [None])
        for state in states:  # saved before schedules were named: they were all linear
            for saved in state.get("lr_lambdas") or []:
                if isinstance(saved, dict):
                    saved.setdefault("schedule", "linear")
        note = states and extension_note(states[0], self.optim.warmup_steps, self.trainer.max_steps,
                                         self.optim.on_extend, self.optim.min_lr_ratio, **self._schedule_plan())
        if note and self.trainer.is_global_zero:
            log.warning(note)

    def on_train_start(self) -> None:
        for config in self.trainer.lr_scheduler_configs:
            follow_max_steps(config.scheduler, self.trainer.max_steps, self.optim.on_extend,
                             recorded=not self._schedule_unrecorded, **self._schedule_plan())
