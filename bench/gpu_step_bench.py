"""Training-step benchmark on one GPU: this project's MLM/RTD objectives against HuggingFace DeBERTa-v2 baselines.

Why one process and one GPU: every contestant then runs on the same device, driver, clocks and allocator state, and
the bf16 matmul ceiling that MFU is divided by is measured in the same run, so the ratios between rows are the
numbers to trust (absolute tokens/s move with the machine).

Contestants, each at DeBERTa-v3-base geometry (``conf/model/v3_base.yaml``; ``--tiny`` for a CPU smoke run), bf16
autocast with fp32 master weights and AdamW (fused where the device supports it), one full step each (forward with
loss, backward, optimiser step, zero_grad):

- ``hf_mlm_eager``: ``transformers.DebertaV2ForMaskedLM`` (random init), vocabulary head on every position.
- ``hf_mlm_compiled``: the same under ``torch.compile(model)``; the baseline of the MLM rows.
- ``hf_mlm_disentangled_flash``: the same with the ``disentangled-flash`` package's training encoder
  (``optimize_deberta_training(model.deberta, backend="triton")``, Triton kernels for the attention), eager (its
  training path has been reported to fail under ``torch.compile``); skipped when the package is not installed or
  there is no CUDA device.
- ``hf_rtd_compiled``: ELECTRA-style RTD from HF parts: a half-depth ``DebertaV2ForMaskedLM`` generator, a
  ``DebertaV2Model`` discriminator + ``Linear(hidden, 1)``, the word embeddings shared (ES), replacements sampled
  from the generator at masked positions, loss = mlm + 50 * bce; both models compiled; the baseline of RTD rows.
- ``ours_mlm``: ``pretrain``'s v2 MLM objective (whole-word n-gram masking, loss through the EMD, logits only at
  masked positions), built by ``pretrain.objectives.build.build_objective`` as training builds it.
- ``ours_rtd``: ``pretrain``'s v3 RTD objective (GDES, half-depth generator with the EMD).

Ours run with ``--backend`` (default "auto") on every encoder model of the objective (``encoder_models()``, the
models training configures: ``set_attention_backend``; a backend that is not registered falls back to "reference"
with a warning) and with each encoder layer compiled (``compile_layers()`` where the model has it, else
``layer.compile()`` per layer). ``--no-compile`` turns compilation off for every contestant.

Measured per (contestant, sequence length): tokens/s over ``--steps`` timed steps after ``--warmup`` steps
(compilation happens there), MFU = tokens/s x model FLOPs per token / measured bf16 matmul ceiling, peak GPU
memory (``torch.cuda.max_memory_allocated`` from before the warm-up), and speed-up against the baselines.
``--check-steps N`` also trains a small model twice from one initial state, with ``--backend`` and with
"reference", on identical batches and masks, and compares the loss curves (see :func:`run_check`).

A row of ours whose model did not run the fused kernel where it should (CUDA, or ``--interpret-kernel``) is
``invalid``: a failed self-check makes ``auto`` fall back to the reference path, and that speed must not pass for
ours. ``--time-budget`` gives each row a share of the time; a row past it says which phase it was in, and the JSON
is rewritten as each row progresses, so a row cut by an outer time limit says so too. The exit code is 1 when any
row is not ok (skipped rows excepted).

``--rows NAME:LxB ...`` runs rows in exactly the order given (the GPU check's long-context stage: ours at 2048 and
4096 first, the HF baselines after). A row that runs out of GPU memory is ``oom: <the allocator's message>``, with
the peak it reached before failing (``peak_mem_gib``, the peak counter is reset at each row's start); for a
baseline that is a result (HF does not fit that shape), not a failure, so it does not set the exit code; for a row
of ours it does.

Usage:
    python bench/gpu_step_bench.py                                       # all contestants, seq 512 (b32) and 2048 (b8)
    python bench/gpu_step_bench.py --contestants hf_mlm_compiled ours_mlm --seq-lens 2048 --batch-sizes 8
    python bench/gpu_step_bench.py --check-steps 200                     # plus the loss-curve check
    python bench/gpu_step_bench.py --rows ours_mlm:2048x8 ours_mlm:4096x4 hf_mlm_compiled:2048x8 hf_mlm_compiled:4096x4
    python bench/gpu_step_bench.py --device cpu --tiny --no-compile --steps 2 --warmup 1   # smoke run, no GPU
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):  # run as `python bench/gpu_step_bench.py`, or imported by a test
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from data_prep.atomic_io import write_json_atomic  # noqa: E402
from kernel_fault import inject_if_requested  # noqa: E402  (bench/, this script's directory)
from pretrain.model import DebertaConfig  # noqa: E402
from pretrain.model.attention import ATTENTION_BACKENDS, DisentangledSelfAttention  # noqa: E402
from pretrain.objectives.base import PretrainingObjective, SpecialTokens  # noqa: E402
from pretrain.objectives.build import ObjectiveSettings, build_objective  # noqa: E402
from pretrain.objectives.masking import MaskingConfig, mask_tokens, sample_replacements  # noqa: E402
from pretrain.run.perf import device_peak_flops, training_flops_per_token  # noqa: E402

GIB = 1024**3
CONTESTANTS = ("hf_mlm_eager", "hf_mlm_compiled", "hf_mlm_disentangled_flash", "hf_rtd_compiled", "ours_mlm",
               "ours_rtd")
OBJECTIVE = {"hf_mlm_eager": "mlm", "hf_mlm_compiled": "mlm", "hf_mlm_disentangled_flash": "mlm",
             "hf_rtd_compiled": "rtd", "ours_mlm": "mlm", "ours_rtd": "rtd"}
BASELINE = {"mlm": "hf_mlm_compiled", "rtd": "hf_rtd_compiled"}
DFLASH = "hf_mlm_disentangled_flash"

# Synthetic inputs use DeBERTa's special-token layout with [MASK] right after the four fixed ones, so ids 0..4 are
# the special ids and every other id is an ordinary token (as bench/zero_memory.py does).
SPECIAL = SpecialTokens(pad=0, cls=1, sep=2, unk=3, mask=4)
FIRST_ORDINARY_ID = 5
RTD_WEIGHT = 50.0
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "attention_head_size": 16,
        "intermediate_size": 256, "vocab_size": 1000, "position_buckets": 32}
TINY_SHAPE = ([64], [4])  # seq_lens, batch_sizes
ROW_RESERVE_S = 15.0  # --time-budget: what each row still to come is guaranteed (a cached-compile row's need)
BASE_SHAPE = ([512, 2048], [32, 8])

# Correctness check: PASS when the curves track within bf16 noise (see run_check).
CHECK_TAIL_STEPS = 20
CHECK_TAIL_TOLERANCE = 0.02  # |mean_fast - mean_ref| over the tail < 2% of mean_ref
CHECK_STEP_TOLERANCE = 0.10  # no single step differs by more than 10% of the reference loss

FLOPS_NOTE = (
    "model FLOPs per token from pretrain.run.perf.training_flops_per_token (matmuls only, backward = 2x forward) with "
    "each contestant's own model: use_emd=True for ours (the EMD reruns the last layer twice), False for HF (no "
    "EMD); the vocabulary head is counted at the masked 15% only, also for HF, which computes it on every position: "
    "MFU counts useful work, so HF's extra head work lowers its MFU instead of raising it. RTD rows add the "
    "discriminator and its head; HF's RTD head is one Linear(hidden, 1), the formula's head one hidden x hidden "
    "dense more (under 0.5% of the total at base geometry)."
)


# ------------------------------------------------------------------------------------------------ set-up


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_yaml(relative: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / relative).read_text())


def model_config(tiny: bool, seq_len: int, for_check: bool = False) -> tuple[DebertaConfig, dict[str, Any]]:
    """The geometry every contestant shares at ``seq_len``, and the fields changed to fit that length.

    Why the override: the EMD adds absolute positions, so ``max_position_embeddings`` must cover the sequence
    (2048 > 512). Raising it would also move the relative-position bucketing range (``max_relative_positions``
    -1 means max_position_embeddings), so that range is pinned to the geometry's own value: the relative attention
    computes exactly what the 512 model computes. HF has no absolute table here (position_biased_input false) and
    gets the same config, so both sides bucket identically.
    """
    raw = load_yaml("conf/model/v3_xsmall.yaml" if for_check and not tiny else "conf/model/v3_base.yaml")
    raw["vocab_size"] = raw.get("vocab_size") or DebertaConfig.vocab_size  # null (follow the tokenizer): 128100
    if tiny:
        raw.update(TINY)
    elif for_check:  # v3-xsmall width at half depth: 200 steps twice stay cheap on a GPU
        raw.update(num_hidden_layers=6)
    if for_check:  # the check compares attention numerics: dropout would add noise of its own
        raw.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    overrides: dict[str, Any] = {}
    if seq_len > raw["max_position_embeddings"]:
        if raw.get("max_relative_positions", -1) < 1:
            overrides["max_relative_positions"] = raw["max_position_embeddings"]
        overrides["max_position_embeddings"] = seq_len
    return DebertaConfig(**{**raw, **overrides}), overrides


def hf_config(config: DebertaConfig, num_hidden_layers: int | None = None):
    import transformers

    fields = config.to_hf_dict()
    fields.pop("model_type")
    if num_hidden_layers is not None:
        fields["num_hidden_layers"] = num_hidden_layers
    return transformers.DebertaV2Config(**fields)


def objective_settings(name: str) -> ObjectiveSettings:
    """The objective exactly as ``conf/objective/<name>.yaml`` configures training."""
    return ObjectiveSettings(**load_yaml(f"conf/objective/{name}.yaml"))


def make_optimizer(module: nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW with ``conf/optim/adamw.yaml``'s hyper-parameters, biases and norms undecayed, fused where possible.

    Why fall back: the fused kernel exists on CUDA and, in recent torch, on CPU; an older CPU build refuses it,
    and a smoke run should still measure something.
    """
    optim = load_yaml("conf/optim/adamw.yaml")
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": float(optim["weight_decay"])},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=float(optim["lr"]), betas=tuple(float(b) for b in optim["betas"]), eps=float(optim["eps"]))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs), True
    except (RuntimeError, ValueError) as err:
        if device.type == "cuda":
            raise
        log(f"  fused AdamW unavailable on {device.type} ({err}); using the for-each implementation")
        return torch.optim.AdamW(groups, **kwargs), False


def resolve_backend(requested: str) -> str:
    """``requested`` when registered, else "reference" with a warning (the fast backends may not exist yet)."""
    if requested in ATTENTION_BACKENDS:
        return requested
    log(f"WARNING: attention backend {requested!r} is not registered (available: {sorted(ATTENTION_BACKENDS)}); "
        "falling back to 'reference'")
    return "reference"


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, device: torch.device, seed: int
                    ) -> dict[str, torch.Tensor]:
    """A packed batch as the shard reader yields it: [CLS] ... [SEP], uniform ordinary ids, ~70% word starts.

    Throughput does not depend on the token values; the word-start rate only shapes the whole-word masking, and
    0.7 is close to SentencePiece on English text.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, (batch_size, seq_len), generator=g)
    return finish_batch(ids, g, device)


def finish_batch(ids: torch.Tensor, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    ids[:, 0], ids[:, -1] = SPECIAL.cls, SPECIAL.sep
    word_start = torch.rand(ids.shape, generator=g) < 0.7
    word_start[:, 0] = True
    special = (ids == SPECIAL.cls) | (ids == SPECIAL.sep)
    return {"input_ids": ids.to(device), "word_start": word_start.to(device), "special_tokens_mask": special.to(device)}


def learnable_batches(steps: int, batch_size: int, seq_len: int, vocab_size: int, seed: int
                      ) -> list[dict[str, torch.Tensor]]:
    """``steps`` CPU batches of a fixed synthetic language the correctness check can learn: Zipf-distributed
    tokens, each followed by its fixed successor (a seeded permutation) with probability 0.5.

    Why not uniform ids: on uniform ids the MLM loss stays at log(vocab) whatever the model does, so two flat
    curves would agree even with broken attention. Here the loss falls as the model learns the unigram and then
    the neighbour structure, which needs working attention. Made once, so both runs see the very same batches.
    """
    ordinary = vocab_size - FIRST_ORDINARY_ID
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(ordinary, generator=g)
    zipf = 1.0 / torch.arange(1, ordinary + 1, dtype=torch.float64)
    batches = []
    for _ in range(steps):
        fresh = torch.multinomial(zipf, batch_size * seq_len, replacement=True, generator=g)
        fresh = fresh.view(batch_size, seq_len)
        follow = torch.rand(batch_size, seq_len, generator=g) < 0.5
        tokens = fresh.clone()
        for t in range(1, seq_len):
            tokens[:, t] = torch.where(follow[:, t], successor[tokens[:, t - 1]], fresh[:, t])
        batches.append(finish_batch(tokens + FIRST_ORDINARY_ID, g, torch.device("cpu")))
    return batches


def hf_masking(rtd: bool) -> MaskingConfig:
    """Single-token masking at the objectives' rate (15%, budget per sequence as ours), on the device.

    MLM: BERT's 80/10/10 (what transformers' data collator does); RTD generator: 100% [MASK], as ours.
    """
    if rtd:
        return MaskingConfig(mask_prob=0.15, max_ngram=1, whole_word=False, replace_with_mask=1.0,
                             replace_with_random=0.0)
    return MaskingConfig(mask_prob=0.15, max_ngram=1, whole_word=False)


def mask_for_hf(batch: dict[str, torch.Tensor], masking: MaskingConfig, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = batch["input_ids"]
    return mask_tokens(ids, batch["word_start"], SPECIAL.special_mask(ids), masking, mask_token_id=SPECIAL.mask,
                       vocab_size=vocab_size, generator=generator, random_token_low=FIRST_ORDINARY_ID)


# ------------------------------------------------------------------------------------------------ contestants


@dataclass
class Workload:
    """One contestant, built: ``loss()`` runs the forward of one step (masking included) and returns the loss."""

    module: nn.Module  # everything trained (shared parameters appear once)
    loss: Callable[[], torch.Tensor]
    flops_per_token: float
    flops_formula: str
    info: dict[str, Any] = field(default_factory=dict)


def hf_mlm_workload(config: DebertaConfig, batch: dict[str, torch.Tensor], seq_len: int, device: torch.device,
                    compile_model: bool, disentangled_flash: bool) -> Workload:
    import transformers

    model = transformers.DebertaV2ForMaskedLM(hf_config(config)).to(device).train()
    info: dict[str, Any] = {"compiled": compile_model}
    if disentangled_flash:
        info.update(patch_disentangled_flash(model))
    forward = torch.compile(model) if compile_model else model
    masking, attention_mask = hf_masking(rtd=False), torch.ones_like(batch["input_ids"])
    generator = torch.Generator(device=device).manual_seed(0)

    def loss() -> torch.Tensor:
        masked, labels = mask_for_hf(batch, masking, config.vocab_size, generator)
        return forward(input_ids=masked, attention_mask=attention_mask, labels=labels).loss

    flops = training_flops_per_token(config, seq_len, "mlm", masking.mask_prob, use_emd=False)
    return Workload(model, loss, flops, f"training_flops_per_token(objective='mlm', mask_prob={masking.mask_prob}, "
                    "use_emd=False)", info)


def patch_disentangled_flash(model: nn.Module) -> dict[str, Any]:
    """Swap the HF encoder for disentangled-flash's training encoder (its documented training entry point).

    The package silently keeps the HF encoder when its Triton path is unavailable, which would benchmark plain
    HF under this name, so that case is an error here.
    """
    import disentangled_flash
    from disentangled_flash import DebertaV2OptimizedEncoder, optimize_deberta_training

    optimize_deberta_training(model.deberta, backend="triton")
    if not isinstance(model.deberta.encoder, DebertaV2OptimizedEncoder):
        raise RuntimeError("disentangled-flash kept the HF encoder (its Triton training path is unavailable here)")
    return {"disentangled_flash_version": getattr(disentangled_flash, "__version__", "unknown"),
            "disentangled_flash_backend": model.deberta.encoder.backend}


class HFReplacedTokenDetection(nn.Module):
    """ELECTRA-style RTD built only from HF parts: what a user would write without this project.

    Generator: ``DebertaV2ForMaskedLM`` at ``generator_layers`` depth (logits on every position, as HF does).
    Discriminator: ``DebertaV2Model`` + ``Linear(hidden, 1)``. Embedding sharing is ES: the discriminator's word
    embedding *is* the generator's module, so both losses update it.
    """

    def __init__(self, config: DebertaConfig, generator_layers: int):
        super().__init__()
        import transformers

        self.generator = transformers.DebertaV2ForMaskedLM(hf_config(config, generator_layers))
        self.discriminator = transformers.DebertaV2Model(hf_config(config))
        self.discriminator.embeddings.word_embeddings = self.generator.deberta.embeddings.word_embeddings
        self.head = nn.Linear(config.hidden_size, 1)


def hf_rtd_workload(config: DebertaConfig, batch: dict[str, torch.Tensor], seq_len: int, device: torch.device,
                    compile_model: bool) -> Workload:
    generator_layers = max(1, config.num_hidden_layers // 2)
    rtd = HFReplacedTokenDetection(config, generator_layers).to(device).train()
    gen = torch.compile(rtd.generator) if compile_model else rtd.generator
    disc = torch.compile(rtd.discriminator) if compile_model else rtd.discriminator
    masking, attention_mask = hf_masking(rtd=True), torch.ones_like(batch["input_ids"])
    valid = attention_mask.bool()
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = batch["input_ids"]

    def loss() -> torch.Tensor:
        masked, labels = mask_for_hf(batch, masking, config.vocab_size, generator)
        gen_out = gen(input_ids=masked, attention_mask=attention_mask, labels=labels)
        with torch.no_grad():
            selected = labels != -100
            sampled = sample_replacements(gen_out.logits[selected], generator=generator)
            disc_input = input_ids.clone()
            disc_input[selected] = sampled
            replaced = (disc_input != input_ids).float()
        hidden = disc(input_ids=disc_input, attention_mask=attention_mask).last_hidden_state
        logits = rtd.head(hidden).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(logits[valid].float(), replaced[valid])
        return gen_out.loss + RTD_WEIGHT * bce

    flops = training_flops_per_token(config, seq_len, "rtd", masking.mask_prob, generator_layers, use_emd=False)
    return Workload(rtd, loss, flops, f"training_flops_per_token(objective='rtd', mask_prob={masking.mask_prob}, "
                    f"generator_layers={generator_layers}, use_emd=False)",
                    {"compiled": compile_model, "generator_layers": generator_layers, "embedding_sharing": "es"})


def prepare_ours(objective: PretrainingObjective, backend: str, compile_model: bool,
                 device_type: str = "cpu", amp_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Select the attention backend on every sub-model, resolve it for the autocast dtype on this device as
    training does (the fused kernel's self-check on CUDA), then compile each encoder layer in place."""
    models = list(objective.encoder_models().values())
    fused, reasons = [], []
    for model in models:
        model.set_attention_backend(backend)
        if hasattr(model, "plan_attention"):
            plan = model.plan_attention(device_type, amp_dtype)
            fused.append(plan["fused"])
            reasons.append(plan["reason"])
    how = "off"
    if compile_model:
        for model in models:
            if hasattr(model, "compile_layers"):
                model.compile_layers()
                how = "compile_layers()"
            else:  # pretrain.model has no compile_layers yet: the same thing by hand
                for layer in model.deberta.encoder.layer:
                    layer.compile()
                how = "layer.compile() per encoder layer"
    in_use = sorted({m.backend for m in objective.modules() if isinstance(m, DisentangledSelfAttention)})
    return {"compiled": compile_model, "compile": how, "attention_backend": ",".join(in_use),
            "attention_fused": None if not fused or None in fused else all(fused),
            "attention_plan": "; ".join(sorted(set(reasons)))}


def build_ours(name: str, config: DebertaConfig) -> PretrainingObjective:
    return build_objective(config, objective_settings(name), SPECIAL)


def ours_workload(name: str, config: DebertaConfig, batch: dict[str, torch.Tensor], seq_len: int,
                  device: torch.device, compile_model: bool, backend: str, amp_dtype: torch.dtype) -> Workload:
    settings = objective_settings(name)
    objective = build_ours(name, config).to(device).train()
    info = prepare_ours(objective, backend, compile_model, device.type, amp_dtype)
    generator = torch.Generator(device=device).manual_seed(0)

    def loss() -> torch.Tensor:
        return objective(batch, generator)["loss"]

    args = dict(mask_prob=settings.mask_prob, generator_layers=settings.generator_layers, use_emd=settings.use_emd)
    flops = training_flops_per_token(config, seq_len, name, **args)
    formula = f"training_flops_per_token(objective={name!r}, " + ", ".join(f"{k}={v}" for k, v in args.items()) + ")"
    return Workload(objective, loss, flops, formula, info)


def build_workload(name: str, config: DebertaConfig, batch: dict[str, torch.Tensor], seq_len: int,
                   device: torch.device, args: argparse.Namespace) -> Workload:
    compile_model = not args.no_compile
    if name == "hf_mlm_eager":
        return hf_mlm_workload(config, batch, seq_len, device, False, False)
    if name == "hf_mlm_compiled":
        return hf_mlm_workload(config, batch, seq_len, device, compile_model, False)
    if name == DFLASH:  # eager: its training path has been reported to fail under torch.compile
        return hf_mlm_workload(config, batch, seq_len, device, False, True)
    if name == "hf_rtd_compiled":
        return hf_rtd_workload(config, batch, seq_len, device, compile_model)
    return ours_workload(OBJECTIVE[name], config, batch, seq_len, device, compile_model, args.backend_used,
                         args.amp_dtype)


def skip_reason(name: str, device: torch.device) -> str | None:
    if name != DFLASH:
        return None
    try:
        import disentangled_flash  # noqa: F401
    except ImportError:
        return "skipped: not installed"
    if device.type != "cuda":
        return "skipped: needs CUDA (Triton kernels)"
    return None


# ------------------------------------------------------------------------------------------------ measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Between contestants: drop every cached object so the next one starts from an empty allocator and no
    compiled graphs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def matmul_ceiling(device: torch.device, size: int, repeats: int = 5) -> dict[str, Any]:
    """Best bf16 ``size`` x ``size`` x ``size`` matmul throughput: the FLOP/s this device really reaches on the
    model's dominant operation, the denominator of MFU (the datasheet peak is reported next to it).

    On CUDA each repetition times 10 back-to-back matmuls, so launch and synchronisation overhead stay below the
    measurement's noise, after 10 untimed ones that bring the clocks up.
    """
    inner = 10 if device.type == "cuda" else 1
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(inner + 1):
        torch.matmul(a, b)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    del a, b
    return {"size": size, "repeats": repeats, "matmuls_per_repeat": inner, "best_s": best,
            "tflops": 2 * size**3 / best / 1e12}


def time_steps(workload: Workload, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int,
               steps: int, amp_dtype: torch.dtype = torch.bfloat16, phase: Callable[[str], None] = lambda _: None
               ) -> dict[str, Any]:
    amp = torch.autocast(device.type, dtype=amp_dtype)

    def step() -> torch.Tensor:
        with amp:
            loss = workload.loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phase("warm-up steps (compilation happens here)")
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    phase("timed steps")
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    final_loss = float(loss)
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"non-finite loss {final_loss}")
    return {"elapsed_s": elapsed, "warmup_s": warmup_s, "peak_mem_gib": peak, "final_loss": final_loss}


def failure_status(err: BaseException) -> str:
    """``oom: <message>`` for an allocator failure (also when a compiler wrapped it), else ``error: <message>``."""
    text = f"{type(err).__name__}: {err}"
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower()
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if oom:  # the allocator's own line: how much it tried to allocate, and what the device holds
        first = next((line for line in lines if "out of memory" in line.lower()), lines[0] if lines else "")
        return ("oom: " + first[:300]) if first else "oom"
    return "error: " + (f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)[:300]


def row_failed(row: dict[str, Any]) -> bool:
    """Whether a row makes the run fail: anything but ok or skipped, except a baseline that ran out of memory (a
    measured fact about the baseline at that shape; ours must fit, so an oom of ours fails)."""
    status = row["status"]
    if status == "ok" or status.startswith("skipped"):
        return False
    return not (status.startswith("oom") and not row["contestant"].startswith("ours_"))


class ShareExceeded(BaseException):
    """A contestant ran past its share of the stage's time (``--time-budget``). Not an ``Exception``, so that no
    ``except Exception`` on the way (the kernel's self-check, a compiler) mistakes it for a failure of its own."""


def unfinished(phase: str) -> str:
    """The status a row carries while it runs: what the JSON says if the process is killed in this phase."""
    return f"unfinished: the process ended during {phase} (the stage's time limit?)"


def requires_fused(name: str, device: torch.device, args: argparse.Namespace) -> bool:
    """Our rows measure the fused kernel wherever it is meant to run (CUDA, or the interpreter standing in for
    it): a row that fell back to the reference path would be PyTorch's speed under our name."""
    return (name.startswith("ours_") and not args.allow_fallback and args.backend_used in ("auto", "triton")
            and (device.type == "cuda" or args.interpret_kernel))


def run_contestant(name: str, seq_len: int, batch_size: int, device: torch.device, args: argparse.Namespace,
                   ceiling_flops: float, datasheet_flops: float | None, share_s: float | None = None,
                   save: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Measure one row. ``share_s``: seconds this contestant may take (build, compile, warm-up and timed steps);
    past it the row says so and the next contestant runs. ``save(row)`` records the row as it progresses, so a
    kill by the stage's own time limit leaves a row that names the phase it was in."""
    row: dict[str, Any] = {"contestant": name, "objective": OBJECTIVE[name], "seq_len": seq_len,
                           "batch_size": batch_size, "status": "ok", "tokens_per_s": None, "mfu": None,
                           "peak_mem_gib": None}
    reason = skip_reason(name, device)
    if reason:
        row["status"] = reason
        return row
    state = {"phase": "model build and compilation", "fired": False}

    def phase(text: str) -> None:
        state["phase"] = text
        save({**row, "status": unfinished(text)})

    def exceeded(signum, frame):
        state["fired"] = True
        raise ShareExceeded(f"past its share of {share_s:.0f} s")

    phase(state["phase"])
    if device.type == "cuda":  # this row's own peak (time_steps resets it again before the warm-up)
        torch.cuda.reset_peak_memory_stats(device)
    use_alarm = share_s is not None and share_s > 0
    previous = signal.signal(signal.SIGALRM, exceeded) if use_alarm else None
    if use_alarm:
        signal.setitimer(signal.ITIMER_REAL, share_s)
    try:
        row.update(measure(name, seq_len, batch_size, device, args, phase))
    except (Exception, ShareExceeded) as err:  # one contestant failing must not lose the others' numbers
        row["status"] = failure_status(err)
        if not row["status"].startswith("oom") and not state["fired"]:
            traceback.print_exc()
        elif row["status"].startswith("oom") and device.type == "cuda":  # how far it got before failing
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if state["fired"]:  # (compilers may wrap the exception: the flag, not the message, decides)
        row["status"] = f"timeout: {state['phase']} exceeded this row's share of {share_s:.0f} s"
    free_memory(device)
    if row["status"] == "ok" and requires_fused(name, device, args) and row.get("attention_fused") is not True:
        row["status"] = (f"invalid: the fused attention kernel did not run ({row.get('attention_plan') or 'unknown'})"
                         "; this speed is the reference path's")
    if row["status"] == "ok" or row["status"].startswith("invalid"):
        row["tokens_per_s"] = batch_size * seq_len * args.steps / row["elapsed_s"]
        row["step_time_ms"] = 1e3 * row["elapsed_s"] / args.steps
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / ceiling_flops
        if datasheet_flops:
            row["mfu_datasheet_peak"] = row["tokens_per_s"] * row["flops_per_token"] / datasheet_flops
    return row


def measure(name: str, seq_len: int, batch_size: int, device: torch.device, args: argparse.Namespace,
            phase: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Build, warm up and time one contestant; everything it allocates lives in this frame and dies with it."""
    config, overrides = model_config(args.tiny, seq_len)
    batch = synthetic_batch(batch_size, seq_len, config.vocab_size, device, args.seed)
    torch.manual_seed(args.seed)
    workload = build_workload(name, config, batch, seq_len, device, args)
    optimizer, fused = make_optimizer(workload.module, device)
    timing = time_steps(workload, optimizer, device, args.warmup, args.steps, args.amp_dtype, phase)
    return {**timing, **workload.info, "fused_adamw": fused, "config_overrides": overrides,
            "parameters": sum(p.numel() for p in workload.module.parameters()),
            "flops_per_token": workload.flops_per_token, "flops_formula": workload.flops_formula}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up of every row against its objective's HF compiled baseline and, for MLM rows, against
    HF + disentangled-flash, at the same sequence length."""
    speed = {(r["contestant"], r["seq_len"]): r["tokens_per_s"] for r in rows if r["status"] == "ok"}
    for r in rows:
        base = speed.get((BASELINE[r["objective"]], r["seq_len"]))
        flash = speed.get((DFLASH, r["seq_len"])) if r["objective"] == "mlm" else None
        ok = r["status"] == "ok"
        r["vs_baseline"] = r["tokens_per_s"] / base if ok and base else None
        r["baseline"] = BASELINE[r["objective"]]
        r["vs_disentangled_flash"] = r["tokens_per_s"] / flash if ok and flash else None


# ------------------------------------------------------------------------------------------------ correctness


def train_curve(config: DebertaConfig, objective_name: str, initial_state: dict[str, torch.Tensor], backend: str,
                batches: list[dict[str, torch.Tensor]], lr: float, device: torch.device, compile_model: bool,
                seed: int) -> tuple[list[float], str]:
    """Train from ``initial_state`` on ``batches`` (one step each) with ``backend``: the per-step losses and the
    backend the attention modules ended up with."""
    objective = build_ours(objective_name, config)
    objective.load_state_dict(initial_state)
    objective.to(device).train()
    backend_in_use = prepare_ours(objective, backend, compile_model, device.type)["attention_backend"]
    optimizer, _ = make_optimizer(objective, device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    warmup = max(1, len(batches) // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    for step, cpu_batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        torch.manual_seed(seed + step)  # the global RNG (dropout, were it on) is the same for both runs
        masks = torch.Generator(device=device).manual_seed(seed * 7919 + step)  # identical masks (and RTD samples)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = objective(batch, masks)["loss"]
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, backend_in_use


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf: a failed comparison is recorded as null (the verdict says FAIL)."""
    return value if math.isfinite(value) else None


def run_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train the same small model twice, with ``--backend`` and with "reference", and compare the loss curves.

    Model: ``conf/model/v3_xsmall.yaml`` cut to 6 layers (width 384, 6 heads of 64), or the tiny geometry with
    ``--tiny``; dropout off. Both runs start from one initial state and see the same batches, the same masks (the
    masking generator is re-seeded identically per step) and, for RTD, the same sampling seeds, so the curves
    can differ only through the attention numerics. Under bf16 autocast two correct kernels still round
    differently and the differences compound through training, so the curves are not expected to be equal,
    only to track.

    PASS: every loss finite, |mean_fast - mean_ref| over the last 20 steps (all steps if fewer) below 2% of the
    reference mean, and no step differing by more than 10% of the reference loss at that step. A wrong position
    term, mask or gradient moves the loss level by far more than that within a few hundred steps; bf16 rounding
    (relative precision 2^-8, about 0.4% per operation) does not.
    """
    seq_len = args.check_seq_len or args.seq_lens[0]
    batch_size = args.check_batch_size or args.batch_sizes[0]
    config, overrides = model_config(args.tiny, seq_len, for_check=True)
    torch.manual_seed(args.seed)
    initial_state = copy.deepcopy(build_ours(args.check_objective, config).state_dict())
    batches = learnable_batches(args.check_steps, batch_size, seq_len, config.vocab_size, args.seed)
    runs = {}
    for label, backend in (("backend", args.backend_used), ("reference", "reference")):
        log(f"check: {args.check_steps} steps of {args.check_objective} with backend {backend!r}")
        runs[label] = train_curve(config, args.check_objective, initial_state, backend, batches, args.check_lr,
                                  device, not args.no_compile, args.seed)
        free_memory(device)
    fast, ref = runs["backend"][0], runs["reference"][0]
    tail = min(CHECK_TAIL_STEPS, len(ref))
    mean_fast, mean_ref = sum(fast[-tail:]) / tail, sum(ref[-tail:]) / tail
    diffs = [abs(f - r) for f, r in zip(fast, ref)]
    step_rel = max(d / abs(r) for d, r in zip(diffs, ref))
    tail_rel = abs(mean_fast - mean_ref) / abs(mean_ref)
    finite = all(math.isfinite(x) for x in fast + ref)
    passed = finite and tail_rel < CHECK_TAIL_TOLERANCE and step_rel < CHECK_STEP_TOLERANCE
    result = {
        "objective": args.check_objective, "steps": args.check_steps, "seq_len": seq_len, "batch_size": batch_size,
        "lr": args.check_lr, "geometry": "tiny" if args.tiny else "conf/model/v3_xsmall.yaml, 6 layers",
        "dropout": 0.0, "config_overrides": overrides, "compiled": not args.no_compile,
        "backend": runs["backend"][1], "reference_backend": runs["reference"][1],
        "curves": {"backend": [finite_or_none(x) for x in fast], "reference": [finite_or_none(x) for x in ref]},
        "max_abs_diff": finite_or_none(max(diffs)), "mean_abs_diff": finite_or_none(sum(diffs) / len(diffs)),
        "max_step_rel_diff": finite_or_none(step_rel), "tail_steps": tail,
        "tail_mean_backend": finite_or_none(mean_fast), "tail_mean_reference": finite_or_none(mean_ref),
        "tail_mean_ratio": finite_or_none(mean_fast / mean_ref), "tail_rel_diff": finite_or_none(tail_rel),
        "tolerance": {"tail_rel": CHECK_TAIL_TOLERANCE, "step_rel": CHECK_STEP_TOLERANCE},
        "verdict": "PASS" if passed else "FAIL",
    }
    if fast == ref:
        result["note"] = ("identical curves: the backend ran the reference computation here (e.g. 'auto' off CUDA), "
                          "so this checked run-to-run determinism only")
    return result


# ------------------------------------------------------------------------------------------------ report


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table(rows: list[dict[str, Any]]) -> str:
    header = ["contestant", "seq", "batch", "tokens/s", "MFU %", "peak GiB", "vs HF compiled", "vs dflash", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        cells = [r["contestant"], str(r["seq_len"]), str(r["batch_size"]), fmt(r["tokens_per_s"], ",.0f"),
                 fmt(mfu, ".1f"), fmt(r["peak_mem_gib"], ".2f"), fmt(r.get("vs_baseline"), ".2f", "x"),
                 fmt(r.get("vs_disentangled_flash"), ".2f", "x"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version()}
    for package in ("triton", "disentangled_flash"):
        try:
            env[package] = __import__(package).__version__
        except Exception:  # absent (or broken) optional packages are simply not reported
            env[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        env["git_commit"] = commit.stdout.strip() or None
        env["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark one training step (forward+backward+AdamW, bf16 autocast) of HF DeBERTa-v2 baselines "
                    "and this project's MLM/RTD objectives on one GPU: tokens/s, MFU, peak memory, speed-ups; "
                    "optionally a loss-curve check of the attention backend against the reference.",
        epilog="Example: python bench/gpu_step_bench.py --seq-lens 512 2048 --batch-sizes 32 8 --check-steps 200",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=list(CONTESTANTS),
                        help="which contestants to run, in this order")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=None,
                        help="sequence lengths (default: 512 2048; with --tiny: 64)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="batch size for each of --seq-lens, same order (default: 32 8; with --tiny: 4)")
    parser.add_argument("--rows", nargs="+", metavar="NAME:LxB", default=None,
                        help="rows to run, in this order (contestant:seq_lenxbatch_size, e.g. ours_mlm:4096x4); "
                             "replaces --contestants, --seq-lens and --batch-sizes")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--device", default="cuda", help="'cuda', 'cuda:N', or 'cpu' for a smoke run")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny geometry (hidden 64, 2 layers, 4 heads, vocab 1000, position_buckets 32) for CPU")
    parser.add_argument("--backend", default="auto",
                        help="attention backend of ours; falls back to 'reference' (with a warning) if not registered")
    parser.add_argument("--no-compile", action="store_true", help="run every contestant eagerly")
    parser.add_argument("--time-budget", type=float, default=0,
                        help="seconds for all rows (0 = no limit): each row may use what is left minus "
                             "--row-reserve per row after it; a row past its share says so and the next runs")
    parser.add_argument("--row-reserve", type=float, default=ROW_RESERVE_S,
                        help="with --time-budget: seconds kept for each row still to come")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="keep our rows valid when the fused kernel did not run (by default, on CUDA or with "
                             "--interpret-kernel, such a row is 'invalid' and the exit code is 1)")
    parser.add_argument("--interpret-kernel", action="store_true",
                        help="dry run on CPU: Triton's interpreter (TRITON_INTERPRET=1) stands in for CUDA, so our "
                             "rows run the fused kernel, under float16 autocast (the interpreter has no bf16 dot)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_step_bench.json",
                        help="JSON results (written atomically, after every row)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the n x n x n bf16 matmul ceiling (default: 8192 on CUDA, 1024 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    check = parser.add_argument_group("correctness check")
    check.add_argument("--check-steps", type=int, default=0,
                       help="train --backend and 'reference' this many steps from one state and compare (0 = off)")
    check.add_argument("--check-objective", choices=("mlm", "rtd"), default="mlm")
    check.add_argument("--check-seq-len", type=int, default=None, help="default: the first of --seq-lens")
    check.add_argument("--check-batch-size", type=int, default=None, help="default: the first of --batch-sizes")
    check.add_argument("--check-lr", type=float, default=5e-4, help="peak learning rate (10%% linear warm-up)")
    args = parser.parse_args(argv)
    if args.interpret_kernel and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--interpret-kernel needs TRITON_INTERPRET=1 in the environment")
    args.amp_dtype = torch.float16 if args.interpret_kernel else torch.bfloat16
    if args.rows:
        if args.seq_lens or args.batch_sizes:
            parser.error("--rows gives each row's shape: drop --seq-lens and --batch-sizes")
        args.plan = [parse_row(text, parser) for text in args.rows]
        args.seq_lens = list(dict.fromkeys(seq for seq, _, _ in args.plan))  # (the first is the check's default)
        args.batch_sizes = [next(b for s, b, _ in args.plan if s == seq) for seq in args.seq_lens]
        args.contestants = list(dict.fromkeys(name for _, _, name in args.plan))
    else:
        default_seqs, default_batches = TINY_SHAPE if args.tiny else BASE_SHAPE
        args.seq_lens = args.seq_lens or default_seqs
        args.batch_sizes = args.batch_sizes or (default_batches if args.seq_lens == default_seqs else None)
        if args.batch_sizes is None or len(args.batch_sizes) != len(args.seq_lens):
            parser.error("--batch-sizes needs one value per --seq-lens value")
        args.plan = [(s, b, n) for s, b in zip(args.seq_lens, args.batch_sizes) for n in args.contestants]
    if min(args.seq_lens + args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0 or args.check_steps < 0:
        parser.error("sequence lengths, batch sizes and --steps must be positive; --warmup/--check-steps >= 0")
    return args


def parse_row(text: str, parser: argparse.ArgumentParser) -> tuple[int, int, str]:
    """``ours_mlm:4096x4`` -> (4096, 4, "ours_mlm")."""
    name, _, shape = text.partition(":")
    seq, _, batch = shape.partition("x")
    if name not in CONTESTANTS or not seq.isdigit() or not batch.isdigit():
        parser.error(f"--rows {text}: give CONTESTANT:SEQ_LENxBATCH_SIZE (e.g. ours_mlm:4096x4) with a contestant "
                     f"of {', '.join(CONTESTANTS)}")
    return int(seq), int(batch), name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with --tiny) for a smoke run")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    args.backend_used = resolve_backend(args.backend)
    inject_if_requested()  # GPU_CHECK_INJECT_FAULT=1 only: the GPU check's own test
    if args.interpret_kernel:
        from pretrain.model import attention

        attention.KERNEL_DEVICE_TYPES = (*attention.KERNEL_DEVICE_TYPES, "cpu")
    started = time.perf_counter()
    env = environment(device)
    log(f"device: {env['device_name']}; torch {env['torch']}, transformers {env['transformers']}")
    ceiling = matmul_ceiling(device, args.matmul_size or (8192 if device.type == "cuda" else 1024))
    datasheet = device_peak_flops(env["device_name"]) if device.type == "cuda" else None
    log(f"bf16 matmul ceiling: {ceiling['tflops']:.1f} TFLOP/s (n={ceiling['size']})")

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **env,
        "matmul_ceiling_tflops": ceiling["tflops"], "matmul_ceiling": ceiling,
        "datasheet_peak_tflops": datasheet / 1e12 if datasheet else None,
        "args": {k: str(v) if isinstance(v, (Path, torch.dtype)) else v for k, v in vars(args).items()},
        "attention_backend_requested": args.backend, "attention_backend_used": args.backend_used,
        "notes": {"flops": FLOPS_NOTE,
                  "mfu": "tokens/s x flops_per_token / matmul_ceiling (mfu_datasheet_peak: / datasheet bf16 peak)",
                  "peak_memory": "torch.cuda.max_memory_allocated after warm-up + timed steps, reset before the "
                                 "warm-up (weights and optimizer state included); an oom row: the peak since the "
                                 "row began; None on CPU",
                  "tokens_per_s": "batch x seq_len x steps / wall time of the timed steps (synchronised at both ends)"},
        "rows": [], "check": None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = report["rows"]

    def save_with(row: dict[str, Any]) -> None:  # the finished rows and this one as it stands
        write_json_atomic(args.out, {**report, "rows": [*rows, row]})

    planned = args.plan
    runs = [skip_reason(name, device) is None for _, _, name in planned]  # a skipped row needs no reserve
    for index, (seq_len, batch_size, name) in enumerate(planned):
        share = None
        if args.time_budget:
            left = args.time_budget - (time.perf_counter() - started)
            share = max(left - args.row_reserve * sum(runs[index + 1:]), 1.0)
        log(f"{name}: seq {seq_len}, batch {batch_size} ..." + (f" (share {share:.0f} s)" if share else ""))
        row = run_contestant(name, seq_len, batch_size, device, args, ceiling["tflops"] * 1e12, datasheet, share,
                             save_with)
        log(f"  {row['status']}" + (f", {row['tokens_per_s']:,.0f} tokens/s" if row["tokens_per_s"] else ""))
        rows.append(row)
        add_ratios(rows)
        write_json_atomic(args.out, report)  # partial results survive a crash of a later contestant
    if args.check_steps:
        report["check"] = run_check(args, device)
        write_json_atomic(args.out, report)

    print(f"\n{env['device_name']}, bf16 matmul ceiling {ceiling['tflops']:.1f} TFLOP/s, "
          f"attention backend of ours: {args.backend_used}, compile: {'off' if args.no_compile else 'on'}\n")
    print(table(rows))
    check = report["check"]
    if check:
        print(f"\ncheck ({check['objective']}, {check['steps']} steps, backend {check['backend']} vs "
              f"{check['reference_backend']}): {check['verdict']}; max |diff| {fmt(check['max_abs_diff'], '.4f')}, "
              f"mean |diff| {fmt(check['mean_abs_diff'], '.4f')}, tail-mean ratio "
              f"{fmt(check['tail_mean_ratio'], '.4f')}" + (f" ({check['note']})" if "note" in check else ""))
    print(f"\nresults: {args.out}")
    bad = [f"{r['contestant']} ({r['status']})" for r in rows if row_failed(r)]
    if bad:
        print("rows not ok: " + "; ".join(bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
