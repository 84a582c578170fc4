"""Disentangled self-attention (DeBERTa): content-to-content plus content-to-position (c2p) and
position-to-content (p2c) terms over a shared relative-embedding table.

The module owns the projections; the score/softmax/value computation ("the core") is a pluggable backend:
:func:`reference_attention` is the plain, readable definition every other backend is tested against, ``triton``
the fused kernel of :mod:`pretrain.model.triton_attention`, and ``auto`` (the default) picks the kernel for CUDA
tensors and the reference path elsewhere.

Notation: B batch, N heads, d head size, Lq/Lk query/key length, 2k rows of the relative-embedding table.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import DebertaConfig


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
    """Attention probabilities (B, N, Lq, Lk) in fp32 (as the original code, for half-precision stability).

    Masking follows HF/original DeBERTa: the pair (i, j) is valid when both tokens are real, so a padded query
    row is fully masked and its softmax is uniform; those rows are zeroed or ignored downstream.
    """
    B, N, Lq, _ = query.shape
    Lk = key.shape[-2]
    with torch.autocast(query.device.type, enabled=False):
        q, k = query.float(), key.float()
        scores = q @ k.transpose(-1, -2)  # (B, N, Lq, Lk)
        index = rel_index.expand(B, N, Lq, Lk)
        if pos_key is not None:  # c2p: query i against the key-side embedding of distance (i - j)
            c2p = q @ pos_key.float().transpose(-1, -2)  # (B, N, Lq, 2k)
            scores = scores + torch.gather(c2p, -1, index)
        if pos_query is not None:  # p2c: key j against the query-side embedding of distance (i - j)
            p2c = pos_query.float() @ k.transpose(-1, -2)  # (B, N, 2k, Lk)
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


def triton_supported(query: torch.Tensor, key: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None when it can."""
    if query.shape[-2] != key.shape[-2]:
        return "query and key lengths differ"
    d = query.shape[-1]
    if d < 16 or d & (d - 1):
        return f"head size {d} is not a power of two >= 16"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype}"
    return None


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


def triton_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
    """The fused kernel, or a clear error where it cannot run."""
    if not triton_available():
        raise RuntimeError("attention_backend=triton needs a CUDA GPU with the `triton` package (or TRITON_INTERPRET=1 "
                           "for Triton's slow CPU interpreter); use attention_backend=auto or reference")
    reason = triton_supported(query, key)
    if reason is not None:
        raise ValueError(f"attention_backend=triton cannot run this input ({reason}); use attention_backend=auto")
    return _fused_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p)


def auto_attention(query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p):
    """The fused kernel on CUDA tensors it supports, the reference path otherwise (CPU, unusual shapes)."""
    args = (query, key, value, pos_key, pos_query, rel_index, key_padding_mask, scale, dropout_p)
    if query.is_cuda and triton_available() and triton_supported(query, key) is None:
        return _fused_attention(*args)
    return reference_attention(*args)


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
