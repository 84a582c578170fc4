"""Relative positions between query and key tokens, log-bucketed as in DeBERTa v2/v3.

``rel(i, j) = i - j`` (query index minus key index). With ``position_buckets > 0`` distances up to
``mid = bucket_size // 2`` are kept exactly and longer ones are compressed logarithmically up to ``max_position``.
The result indexes the relative-embedding table (``2k`` rows) as ``clamp(bucket(i - j) + k, 0, 2k - 1)``.
"""

from __future__ import annotations

import torch


def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Map signed distances to signed buckets; antisymmetric: ``bucket(-r) == -bucket(r)``.

    The arithmetic is float32 ``torch`` exactly as in HF ``make_log_bucket_position`` (we checked that it equals the
    original float64 numpy formulation for every distance below ``max_position``). Like the original code, and unlike
    HF, distances are first clamped to ``±(max_position - 1)``: HF lets buckets grow past ``mid + mid - 1`` for
    sequences longer than ``max_position``, which maps far-left keys onto the wrong table row. Below
    ``max_position`` both agree.
    """
    relative_pos = relative_pos.clamp(-(max_position - 1), max_position - 1)
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
