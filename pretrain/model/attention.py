"""Disentangled self-attention (DeBERTa): content-to-content plus content-to-position (c2p) and
position-to-content (p2c) terms over a shared relative-embedding table.

The module owns the projections; the score/softmax/value computation ("the core") is a pluggable backend:
:func:`reference_attention` is the plain, readable definition every other backend is tested against, ``triton``
the fused kernel of :mod:`pretrain.model.triton_attention`, and ``auto`` (the default) picks the kernel for CUDA
tensors and the reference path elsewhere.

Before the kernel's first use on a device where ``auto`` picks it (CUDA), it is checked against the reference path
on a small problem in the run's dtype (:mod:`pretrain.model.attention_check`), once per (device, dtype, head size,
position terms). A failure makes ``auto`` warn once, with the numbers, and use the reference path from then on;
``triton`` raises instead. :func:`plan_attention` resolves this at set-up, before ``torch.compile``, so compiled
code only reads the cached outcome.

Notation: B batch, N heads, d head size, Lq/Lk query/key length, 2k rows of the relative-embedding table.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.attention_check import (
    TOLERANCE,
    CheckKey,
    CheckResult,
    Dropout,
    FusedAttentionCheckError,
    run_check,
)
from pretrain.model.config import DebertaConfig

log = logging.getLogger(__name__)


class AttentionCore(Protocol):
    def __call__(
        self,
        query: torch.Tensor,  # (B, N, Lq, d)
        key: torch.Tensor,  # (B, N, Lk, d)
        value: torch.Tensor,  # (B, N, Lk, d)
        pos_key: torch.Tensor | None,  # (N, 2k, d): relative table through the key projection (c2p), or None
        pos_query: torch.Tensor | None,  # (N, 2k, d): relative table through the query projection (p2c), or None
        rel_index: torch.Tensor,  # (Lq, Lk) long: table row of every (query, key) pair
        key_padding_mask: torch.Tensor,  # (B, Lk) bool: True = real token
        scale: float,
        dropout_p: float,
    ) -> torch.Tensor:  # (B, N, Lq, d)
        ...


def reference_probabilities(query, key, pos_key, pos_query, rel_index, key_padding_mask, scale) -> torch.Tensor:
    """Attention probabilities (B, N, Lq, Lk) in fp32 (as the original code, for half-precision stability; fp64
    inputs stay fp64, which makes this the exact reference the kernel's self-check and GPU tests compare with).

    Masking follows HF/original DeBERTa: the pair (i, j) is valid when both tokens are real, so a padded query
    row is fully masked and its softmax is uniform; those rows are zeroed or ignored downstream.
    """
    B, N, Lq, _ = query.shape
    Lk = key.shape[-2]
    compute = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        q, k = query.to(compute), key.to(compute)
        scores = q @ k.transpose(-1, -2)  # (B, N, Lq, Lk)
        index = rel_index.expand(B, N, Lq, Lk)
        if pos_key is not None:  # c2p: query i against the key-side embedding of distance (i - j)
            c2p = q @ pos_key.to(compute).transpose(-1, -2)  # (B, N, Lq, 2k)
            scores = scores + torch.gather(c2p, -1, index)
        if pos_query is not None:  # p2c: key j against the query-side embedding of distance (i - j)
            p2c = pos_query.to(compute) @ k.transpose(-1, -2)  # (B, N, 2k, Lk)
            scores = scores + torch.gather(p2c, -2, index)
        scores = scores * scale
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        if Lq == Lk:
            mask = mask & key_padding_mask[:, None, :, None]  # pairwise, as HF: padded query rows masked too
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)


def reference_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
    """The plain definition: full probability tensor, dropout on it, then the values."""
    probs = reference_probabilities(query, key, pos_key, pos_query, rel_index, key_padding_mask, scale)
    probs = F.dropout(probs, p=dropout_p).to(value.dtype)
    return probs @ value  # (B, N, Lq, d)


def kernel_support(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernel cannot compute this head size or dtype, or None when it can."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head size {head_dim} is not a power of two >= 16"
    if dtype not in TOLERANCE:
        return f"dtype {dtype}"
    return None


def triton_supported(query: torch.Tensor, key: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None when it can."""
    if query.shape[-2] != key.shape[-2]:
        return "query and key lengths differ"
    return kernel_support(query.shape[-1], query.dtype)


def triton_available() -> bool:
    """Triton can run here: a CUDA device and the package, or its CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _fused_attention(*args):
    """The fused kernel of :mod:`pretrain.model.triton_attention`, imported on first use (it needs Triton)."""
    from pretrain.model.triton_attention import disentangled_attention

    return disentangled_attention(*args)


def _fused_dropout_mask(*args):
    """The kernel's dropout mask for the self-check (:func:`pretrain.model.triton_attention.dropout_keep_mask`)."""
    from pretrain.model.triton_attention import dropout_keep_mask

    return dropout_keep_mask(*args)


def _reference_given_mask(keep: torch.Tensor):
    """The reference core with a given keep-mask instead of its own dropout (the self-check's dropout pass)."""

    def core(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
        probs = reference_probabilities(query, key, pos_key, pos_query, rel_index, key_padding_mask, scale)
        return (probs * keep.to(probs.dtype) / (1.0 - dropout_p)).to(value.dtype) @ value

    return core


# fp32 is the kernel's test mode (IEEE dots, checked to 1e-4), not a training mode: its pinned tiles are the smallest
# (16 x 16), it runs without tensor cores' 16-bit rates, and at head size 128 ptxas spills registers (over 1 KB per
# thread, `python bench/kernel_resources.py --dtypes fp32`). Training runs bf16/fp16 autocast.
FP32_KERNEL_WARNING = ("the fused attention kernel runs in float32: a test mode, several times slower than bf16 "
                       "(smallest tiles, no 16-bit tensor cores, register spills at head size 128); train with "
                       "precision bf16-mixed (or 16-mixed) for the fused kernel's speed")


# Device types on which ``auto`` picks the fused kernel (after its self-check) and ``triton`` checks it before first
# use. Tests add "cpu" to let Triton's interpreter stand in for CUDA, so the real check runs on a CPU machine.
KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_CHECKS: dict[CheckKey, CheckResult] = {}  # every self-check this process ran, by configuration
_PASSED: dict[CheckKey, bool] = {}  # the same outcomes as plain booleans, read by compiled code
_AUTO_USES_KERNEL: dict[CheckKey, bool] = {}  # auto's decision per configuration, read by compiled code


def check_key(query: torch.Tensor, pos_key: torch.Tensor | None, pos_query: torch.Tensor | None) -> CheckKey:
    return CheckKey(query.device.type, query.dtype, query.shape[-1], pos_key is not None, pos_query is not None)


def fused_attention_check(key: CheckKey) -> CheckResult:
    """The kernel's self-check for ``key``: run (eagerly) on the first request, then cached for the process."""
    result = _CHECKS.get(key)
    if result is None:
        result = run_check(key, _fused_attention, reference_attention,
                           dropout=Dropout(_fused_dropout_mask, _reference_given_mask))
        _CHECKS[key] = result
        _PASSED[key] = result.passed
        log.info(result.describe())
    return result


def fused_attention_checks() -> list[CheckResult]:
    """The self-checks run so far in this process (what a run records)."""
    return list(_CHECKS.values())


def clear_fused_attention_checks() -> None:
    """Forget every check and decision (tests; a process that swaps Triton versions)."""
    _CHECKS.clear()
    _PASSED.clear()
    _AUTO_USES_KERNEL.clear()


def _require_check(key: CheckKey) -> None:
    """``triton``: a failed self-check is an error, never a silent fallback."""
    result = fused_attention_check(key)
    if not result.passed:
        raise FusedAttentionCheckError(result.describe() + "; attention_backend=triton does not fall back: use "
                                       "attention_backend=auto (reference path after this check) or reference")


def _resolve_auto(key: CheckKey) -> bool:
    """``auto``: whether the kernel serves ``key``; a failed check warns once and sends ``key`` to the reference
    path for the rest of the process."""
    if not triton_available():
        log.info("attention_backend=auto: no usable Triton here, the reference path runs (%s)", key.label())
        usable = False
    else:
        result = fused_attention_check(key)
        usable = result.passed
        if not usable:
            log.warning("%s; attention_backend=auto uses the reference attention path for the rest of this run",
                        result.describe())
    _AUTO_USES_KERNEL[key] = usable
    return usable


# Compiled code must not trace the check: when a configuration first appears inside a compiled region, dynamo
# breaks the graph here, the check runs eagerly, and the next trace reads the cached decision instead.
_resolve_auto_eagerly = torch.compiler.disable(_resolve_auto)
_require_check_eagerly = torch.compiler.disable(_require_check)


def _require_triton() -> None:
    if not triton_available():
        raise RuntimeError("attention_backend=triton needs a CUDA GPU with the `triton` package (or TRITON_INTERPRET=1 "
                           "for Triton's slow CPU interpreter); use attention_backend=auto or reference")


def triton_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
    """The fused kernel (self-checked before its first use on a kernel device), or a clear error."""
    _require_triton()
    reason = triton_supported(query, key)
    if reason is not None:
        raise ValueError(f"attention_backend=triton cannot run this input ({reason}); use attention_backend=auto")
    check = check_key(query, pos_key, pos_query)
    if check.device_type in KERNEL_DEVICE_TYPES and not _PASSED.get(check, False):
        _require_check_eagerly(check)  # runs the check once; raises on every call of a failed configuration
    return _fused_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p)


def auto_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
    """The fused kernel on kernel devices (CUDA) for inputs it supports and after it passed its self-check; the
    reference path otherwise (CPU, unusual shapes, a failed check)."""
    args = (query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p)
    if query.device.type in KERNEL_DEVICE_TYPES and triton_supported(query, key) is None:
        check = check_key(query, pos_key, pos_query)
        usable = _AUTO_USES_KERNEL.get(check)
        if usable is None:
            usable = _resolve_auto_eagerly(check)
        if usable:
            return _fused_attention(*args)
    return reference_attention(*args)


def plan_attention(backend: str, device_type: str, dtype: torch.dtype, head_dim: int, has_c2p: bool,
                   has_p2c: bool) -> dict[str, Any]:
    """Resolve, once and eagerly (before ``torch.compile``), what ``backend`` will compute for a run on
    ``device_type`` in ``dtype``: runs the self-check where it applies (``triton`` raises on failure).

    Returns a JSON-ready record: ``fused`` (the kernel runs), ``reason`` and the ``check`` (None where no check
    applies). Registered custom backends are reported as they are (``fused`` None: unknown).
    """
    key = CheckKey(device_type, dtype, head_dim, has_c2p, has_p2c)
    record: dict[str, Any] = {"backend": backend, "fused": None, "reason": "", "check": None}
    unsupported = kernel_support(head_dim, dtype)
    if backend == "reference":
        record.update(fused=False, reason="attention_backend=reference")
    elif backend == "auto" and device_type not in KERNEL_DEVICE_TYPES:
        record.update(fused=False, reason=f"auto: the reference path on {device_type}")
    elif backend == "auto" and unsupported:
        record.update(fused=False, reason=f"auto: the reference path ({unsupported})")
    elif backend == "auto":
        usable = _resolve_auto(key) if key not in _AUTO_USES_KERNEL else _AUTO_USES_KERNEL[key]
        check = _CHECKS.get(key)
        record.update(fused=usable, check=check.to_dict() if check else None,
                      reason="auto: self-check passed" if usable else
                      ("auto: self-check failed, reference path" if check else "auto: no usable Triton"))
    elif backend == "triton":
        _require_triton()
        if unsupported:
            raise ValueError(f"attention_backend=triton cannot run {key.label()} ({unsupported}); use "
                             "attention_backend=auto")
        if device_type in KERNEL_DEVICE_TYPES:
            _require_check(key)
        check = _CHECKS.get(key)
        record.update(fused=True, check=check.to_dict() if check else None, reason="attention_backend=triton")
    else:
        record["reason"] = f"custom backend {backend!r}"
    if record["fused"] and dtype == torch.float32:
        log.warning(FP32_KERNEL_WARNING)
    return record


ATTENTION_BACKENDS: dict[str, AttentionCore] = {
    "auto": auto_attention,
    "reference": reference_attention,
    "triton": triton_attention,
}


def register_attention_backend(name: str, core: AttentionCore) -> None:
    """Make ``name`` selectable with :meth:`DisentangledSelfAttention.attention_backend`."""
    ATTENTION_BACKENDS[name] = core


class DisentangledSelfAttention(nn.Module):
    """Projections of DeBERTa's attention. Parameter names equal HF's (``query_proj``, ``pos_key_proj``, ...)."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.scale = config.score_scale
        self.dropout_p = config.attention_probs_dropout_prob
        self.use_c2p = "c2p" in config.pos_att_type
        self.use_p2c = "p2c" in config.pos_att_type
        self.share_att_key = config.share_att_key
        inner = config.all_head_size
        self.query_proj = nn.Linear(config.hidden_size, inner)
        self.key_proj = nn.Linear(config.hidden_size, inner)
        self.value_proj = nn.Linear(config.hidden_size, inner)
        if not self.share_att_key:
            if self.use_c2p:
                self.pos_key_proj = nn.Linear(config.hidden_size, inner)
            if self.use_p2c:
                self.pos_query_proj = nn.Linear(config.hidden_size, inner)
        # Dropout on the relative embeddings uses the hidden dropout rate (HF/original `pos_dropout`).
        self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.backend = "auto"

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, N*d) -> (B, N, L, d)
        return x.unflatten(-1, (self.num_heads, self.head_size)).transpose(1, 2)

    def relative_projections(self, rel_embeddings: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Project the (2k, H) relative table once per layer call: (N, 2k, d) each, shared by the whole batch."""
        rel = self.pos_dropout(rel_embeddings)
        key_proj = self.key_proj if self.share_att_key else getattr(self, "pos_key_proj", None)
        query_proj = self.query_proj if self.share_att_key else getattr(self, "pos_query_proj", None)
        pos_key = key_proj(rel).unflatten(-1, (self.num_heads, self.head_size)).transpose(0, 1) if self.use_c2p else None
        pos_query = (
            query_proj(rel).unflatten(-1, (self.num_heads, self.head_size)).transpose(0, 1) if self.use_p2c else None
        )
        return pos_key, pos_query

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, Lk, H): keys and values
        key_padding_mask: torch.Tensor,  # (B, Lk) bool
        rel_embeddings: torch.Tensor,  # (2k, H)
        rel_index: torch.Tensor,  # (Lq, Lk)
        query_states: torch.Tensor | None = None,  # (B, Lq, H); differs from hidden_states only in the EMD
    ) -> torch.Tensor:  # (B, Lq, N*d)
        if query_states is None:
            query_states = hidden_states
        q = self._split_heads(self.query_proj(query_states))
        k = self._split_heads(self.key_proj(hidden_states))
        v = self._split_heads(self.value_proj(hidden_states))
        pos_key, pos_query = self.relative_projections(rel_embeddings)
        core: Callable = ATTENTION_BACKENDS[self.backend]
        context = core(
            q, k, v, pos_key, pos_query, rel_index, key_padding_mask, self.scale,
            self.dropout_p if self.training else 0.0,
        )
        return context.transpose(1, 2).flatten(2)  # (B, Lq, N*d)
