"""Build the Lightning strategy (how ranks share the work) from :class:`StrategySettings`.

DeepSpeed settings come from the ``strategy`` config group, never hard-coded. Lightning's ``DeepSpeedStrategy``
refuses CPU accelerators, although DeepSpeed itself runs on CPU over gloo. :class:`CPUDeepSpeedStrategy` lifts
the three CUDA-only checks and is chosen only when the accelerator is the CPU, so GPU runs use the stock
strategy with one fix (:class:`ZeroStrategy`: the gradient scale under accumulation). The CPU path exists so that
the ZeRO code paths (partitioning, sharded checkpoints, consolidation) are tested on machines without GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
from datetime import timedelta

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from pretrain.settings import StrategySettings


class ZeroStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` whose gradients are the mean over the global batch under gradient accumulation.

    Lightning divides each micro-batch loss by ``accumulate_grad_batches`` before its backward, and the DeepSpeed
    engine's ``backward`` divides it again by its ``gradient_accumulation_steps`` (the same number): the gradients,
    the reported gradient norm and the clipping threshold's effect were off by that factor, so one global batch
    trained differently as 2 ranks x 3 micro-batches and as 3 ranks x 2. Only Lightning's division is kept.
    """

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Lightning's DeepSpeed load with the tag named: the engine would otherwise open whichever directory the
        checkpoint's ``latest`` (or ``universal/latest_universal``) file names and unpickle its files without
        restrictions, so a crafted ``latest`` could point it past every file verified before the resume
        (``pretrain.checkpointing.find.verify_checkpoint``, ``pretrain.reshard``). Our saves and conversions always use
        the one tag ``checkpoint``: only that directory is loaded, whatever those files say."""
        if self.load_full_weights and self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.pytorch.strategies.deepspeed import _validate_checkpoint_directory
        from lightning.pytorch.trainer.states import TrainerFn

        from pretrain.checkpointing.find import DEEPSPEED_TAG

        _validate_checkpoint_directory(checkpoint_path)
        module = self.lightning_module
        _, client_state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path, tag=DEEPSPEED_TAG, load_optimizer_states=module.trainer.state.fn == TrainerFn.FITTING,
            load_lr_scheduler_states=False, load_module_strict=module.strict_loading)
        if client_state is None:
            raise RuntimeError(f"{checkpoint_path}: DeepSpeed found no '{DEEPSPEED_TAG}' checkpoint in it")
        return client_state


class CPUDeepSpeedStrategy(ZeroStrategy):
    """``DeepSpeedStrategy`` for the CPU accelerator (gloo process group).

    ``skip_shm_build`` stops DeepSpeed from JIT-compiling its shared-memory allreduce (about 75 s on 2 cores, once
    per machine); training over gloo does not use it.
    """

    def __init__(self, *args, skip_shm_build: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if skip_shm_build:
            # import_module, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name `torch`,
            # so the `as` form binds the real torch module and the patch would miss.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # the parent only adds a CUDA-accelerator check

    def setup_distributed(self) -> None:
        # The parent first validates CUDA device indices; CPU devices have none.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # The parent passes root_device.index, which is None on CPU; DeepSpeed needs the local rank.
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, deepspeed_optimizer


def runs_on_cpu(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` resolves to the CPU (``auto`` without a usable GPU)."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def deepspeed_config(s: StrategySettings, micro_batch_size: int) -> dict:
    """The DeepSpeed config dict. Precision, gradient clipping and accumulation are added by Lightning from the
    Trainer arguments; optimizer and LR schedule come from ``configure_optimizers``."""
    zero: dict = {
        "stage": s.stage, "overlap_comm": s.overlap_comm, "contiguous_gradients": s.contiguous_gradients,
        "reduce_bucket_size": s.reduce_bucket_size, "allgather_bucket_size": s.allgather_bucket_size,
        "allgather_partitions": True, "reduce_scatter": True, "sub_group_size": s.sub_group_size,
    }
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": s.pin_memory}
    if s.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": s.pin_memory}
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW from configure_optimizers
        # Offloading with a torch optimizer: DeepSpeed would insist on its CPU Adam (a C++ op built on first use).
        "zero_force_ds_cpu_optimizer": False,
        # Lightning would otherwise build the training dataloader early to guess it (logging only).
        "train_micro_batch_size_per_gpu": micro_batch_size,
    }


def build_strategy(s: StrategySettings, accelerator: str, micro_batch_size: int) -> Strategy | str:
    """Strategy object for ``lightning.Trainer(strategy=...)``; ``"auto"`` lets Lightning decide."""
    timeout = timedelta(minutes=s.timeout_minutes)
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        return DDPStrategy(find_unused_parameters=s.find_unused_parameters,
                           process_group_backend=s.process_group_backend, timeout=timeout)
    if s.name != "deepspeed":
        raise ValueError(f"strategy.name={s.name!r}: choose auto, ddp or deepspeed")
    cls = CPUDeepSpeedStrategy if runs_on_cpu(accelerator) else ZeroStrategy
    return cls(config=deepspeed_config(s, micro_batch_size), process_group_backend=s.process_group_backend,
               timeout=timeout)


def is_deepspeed(strategy: Strategy | str) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def zero_stage(strategy: Strategy | str) -> int:
    """The ZeRO stage of a DeepSpeed strategy; 0 for anything else."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int((strategy.config or {}).get("zero_optimization", {}).get("stage", 0))


def full_parameters(strategy: Strategy, module: torch.nn.Module):
    """Context in which ``module``'s parameters are whole on every rank: under ZeRO-3 each rank holds a slice,
    and reading weights (e.g. the HuggingFace export) must gather them first; a no-op otherwise. Every rank must
    enter it (the gather is a collective)."""
    if zero_stage(strategy) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


class _OutputFields(dict):
    """A model-output dataclass as a dict that still reads like the dataclass (``out.loss``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _dataclass_output_as_dict(module, args, output):
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return _OutputFields({f.name: getattr(output, f.name) for f in dataclasses.fields(output)})
    return None  # output unchanged


def expose_outputs_to_zero3(model: torch.nn.Module) -> None:
    """Let ZeRO-3 see the tensors in the native model's dataclass outputs.

    ZeRO-3 re-gathers a module's partitioned weights for its backward through hooks on the tensors the module
    returns, and it finds tensors only in tensors, tuples, lists and dicts. The models return dataclasses, so
    weights used outside their own module's forward (the tied MLM decoder, the relative-position table read by the
    enhanced mask decoder) stayed partitioned in backward and training failed with a size-0 tensor. A forward hook
    that runs before DeepSpeed's own turns each dataclass output into a dict with attribute access. Call it before
    the DeepSpeed engine is created (the hook must run first: ``prepend=True`` makes it so either way).
    """
    for module in model.modules():
        module.register_forward_hook(_dataclass_output_as_dict, prepend=True)
