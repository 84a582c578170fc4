"""Relative positions between query and key tokens, log-bucketed as in DeBERTa v2/v3.

``rel(i, j) = i - j`` (query index minus key index). With ``position_buckets > 0`` distances up to
``mid = bucket_size // 2`` are kept exactly and longer ones are compressed logarithmically up to ``max_position``.
The result indexes the relative-embedding table (``2k`` rows) as ``clamp(bucket(i - j) + k, 0, 2k - 1)``.
"""

from __future__ import annotations

import torch


def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Map signed distances to signed buckets; antisymmetric: ``bucket(-r) == -bucket(r)``.

    The arithmetic is float32 ``torch`` exactly as in HF ``make_log_bucket_position`` (it equals the original
    float64 numpy formulation for every distance below ``max_position``). Beyond ``max_position`` we follow HF, not
    the original code: the original clamps distances to ``±(max_position - 1)`` first, HF does not, and after the
    table-index clamp the two differ only for keys at least ``max_position`` tokens to the *right* of the query
    (``key - query >= max_position``; HF: table row 0, original: row 1). Following HF keeps a model trained here computing exactly what
    ``transformers`` computes at every sequence length.
    """
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where(
        (relative_pos < mid) & (relative_pos > -mid),
        torch.tensor(mid - 1).type_as(relative_pos),
        torch.abs(relative_pos),
    )
    log_pos = (
        torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    )
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign).to(torch.long)


def relative_position_index(
    query_len: int,
    key_len: int,
    span: int,
    bucket_size: int,
    max_position: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Row of the relative-embedding table for every (query, key) pair: a ``[query_len, key_len]`` long tensor.

    The same index serves c2p (query content to key position) and p2c (key content to query position): the
    original code builds p2c from ``-rel(j, i)``, which equals ``rel(i, j)`` because bucketing is antisymmetric.
    """
    q_ids = torch.arange(query_len, dtype=torch.long, device=device)
    k_ids = torch.arange(key_len, dtype=torch.long, device=device)
    rel = q_ids[:, None] - k_ids[None, :]  # (Lq, Lk)
    if bucket_size > 0 and max_position > 0:
        rel = log_bucket_position(rel, bucket_size, max_position)
    return torch.clamp(rel + span, 0, 2 * span - 1)
