"""Context extension: continue a checkpoint at a longer sequence length than it was trained at (512 -> 2048).

Why a module of its own: a longer context touches three architecture fields that the rest of the architecture
rule of ``model.init_from`` (the checkpoint's config.json wins) would otherwise silently undo, and two tables whose
shape or meaning follows those fields. This module decides the extended configuration and maps the checkpoint's
tables onto it; ``pretrain.init_from`` calls it.

The rule (logged when it applies):

- **When**: the training shards hold longer sequences than the checkpoint's ``max_position_embeddings`` and the
  experiment's ``model.max_position_embeddings`` covers them (``model.max_position_embeddings=2048`` for 2048-token
  shards). Then the three context fields ``max_position_embeddings``, ``max_relative_positions`` and
  ``position_buckets`` come from the experiment; every other field still comes from the checkpoint. Shards that fit
  the checkpoint change nothing (the checkpoint wins, as for any field), so a model group's default never resizes a
  checkpoint by accident; longer shards without the larger ``max_position_embeddings`` stop the run with the fix.
- **Relative-embedding table** (``encoder.rel_embeddings``, ``2k`` rows, ``k = position_buckets`` or, unbucketed,
  the bucketing range): every row of the extended table starts as the row the checkpoint used for the *shortest
  distance that row now covers* (distances up to the new ``max_position_embeddings - 1``, both signs). So a distance
  whose row content stays the same computes exactly what the checkpoint computed; the ones that change are logged.
  Rows no distance reaches keep the checkpoint's row of the same signed bucket (clamped to its table).

  - buckets and bucketing range unchanged (``max_relative_positions`` pinned to the old range, e.g. 512): the table
    is unchanged, no distance changes row; distances beyond the range share the farthest row, as they did before.
  - unbucketed (``position_buckets <= 0``): the table grows to ``2 x`` the new range; the new rows (distances the
    checkpoint clamped to its last row) start as that last row, so nothing changes at the start.
  - bucketing range grown (``max_relative_positions = -1`` follows ``max_position_embeddings``): distances up to
    ``position_buckets // 2`` keep their rows; longer ones are compressed harder: each of their buckets starts as the
    checkpoint's row of its shortest distance, and buckets beyond the old range start as the old farthest row.
  - more buckets: rows are re-indexed by distance (the table's centre moves), by the same rule.
- **Absolute position table** (the EMD's ``embeddings.position_embeddings``, v2/v3 MLM): rows past the old length
  are copies of the old rows, tiled (row ``p`` starts as row ``p mod old_length``), as Longformer extended RoBERTa.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from pretrain.model import DebertaConfig
from pretrain.model.relative_position import log_bucket_position

log = logging.getLogger(__name__)

CONTEXT_FIELDS = ("max_position_embeddings", "max_relative_positions", "position_buckets")
REL_TABLE = "encoder.rel_embeddings.weight"
POSITION_TABLE = "embeddings.position_embeddings.weight"


def extended_config(experiment: DebertaConfig, checkpoint: DebertaConfig, seq_len: int) -> DebertaConfig | None:
    """The checkpoint's configuration with the experiment's context fields when the shards' ``seq_len`` exceeds the
    checkpoint's ``max_position_embeddings`` and the experiment's covers it (a context extension); None otherwise."""
    if seq_len <= checkpoint.max_position_embeddings or experiment.max_position_embeddings < seq_len:
        return None
    return dataclasses.replace(checkpoint, **{k: getattr(experiment, k) for k in CONTEXT_FIELDS})


def table_row(distance: torch.Tensor, config: DebertaConfig) -> torch.Tensor:
    """Row of the relative-embedding table that ``config`` uses for each signed distance ``query - key`` (the
    index of ``relative_position_index``, for a 1-D tensor of distances)."""
    k = config.relative_span
    rel = distance
    if config.position_buckets > 0 and config.bucket_max_position > 0:
        rel = log_bucket_position(distance, config.position_buckets, config.bucket_max_position)
    return torch.clamp(rel + k, 0, 2 * k - 1)


def _distances(config: DebertaConfig) -> torch.Tensor:
    longest = config.max_position_embeddings - 1
    return torch.arange(-longest, longest + 1, dtype=torch.long)


def source_rows(old: DebertaConfig, new: DebertaConfig) -> torch.Tensor:
    """For each row of ``new``'s relative table, the row of ``old``'s it starts as (see the module rule)."""
    k_old, k_new = old.relative_span, new.relative_span
    rows = torch.arange(2 * k_new)
    out = torch.clamp(rows - k_new + k_old, 0, 2 * k_old - 1)  # unreached rows: the same signed bucket
    distances = _distances(new)
    new_rows, old_rows = table_row(distances, new), table_row(distances, old)
    # the shortest distance of each new row (unique: a row holds distances of one sign only, or just 0)
    shortest = torch.full((2 * k_new,), distances.abs().max() + 1).scatter_reduce(0, new_rows, distances.abs(), "amin")
    chosen = distances.abs() == shortest[new_rows]
    out[new_rows[chosen]] = old_rows[chosen]
    return out


def changed_distances(old: DebertaConfig, new: DebertaConfig) -> torch.Tensor:
    """Positive distances (up to ``new.max_position_embeddings - 1``) whose relative row content differs from what
    ``old`` used for them, in either direction (``+d`` or ``-d``)."""
    distances = _distances(new)
    starts = source_rows(old, new)[table_row(distances, new)]
    changed = distances[starts != table_row(distances, old)].abs()
    return torch.unique(changed)


def _ranges(values: torch.Tensor) -> str:
    """'129-140, 142-511' for a sorted 1-D tensor of integers ('none' when empty)."""
    if values.numel() == 0:
        return "none"
    parts, start, prev = [], int(values[0]), int(values[0])
    for v in values[1:].tolist() + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts) if len(parts) <= 6 else ", ".join(parts[:6]) + f", ... ({values.numel()} distances)"


def describe(old: DebertaConfig, new: DebertaConfig) -> str:
    """One log line: what the extension changes and which distances start from another row than before."""
    fields = ", ".join(f"{k} {getattr(old, k)} -> {getattr(new, k)}" for k in CONTEXT_FIELDS
                       if getattr(old, k) != getattr(new, k))
    table = f"relative table {2 * old.relative_span} -> {2 * new.relative_span} rows"
    changed = changed_distances(old, new)
    exact = ("every distance keeps the row it had" if changed.numel() == 0 else
             f"distances that start from another row than the checkpoint used: {_ranges(changed)}")
    return (f"context extension: {fields}; bucketing range {old.bucket_max_position} -> {new.bucket_max_position}, "
            f"{table}; {exact}; EMD position rows {old.max_position_embeddings}-"
            f"{new.max_position_embeddings - 1} start as copies of rows 0-{old.max_position_embeddings - 1}")


def extend_state(state: dict[str, torch.Tensor], old: DebertaConfig, new: DebertaConfig) -> dict[str, torch.Tensor]:
    """``state`` (a native model's state dict, any prefix) with its relative and absolute position tables mapped
    from ``old``'s context to ``new``'s; every other tensor is passed through."""
    rows = source_rows(old, new)
    out = {}
    for key, tensor in state.items():
        if key.endswith(REL_TABLE):
            tensor = tensor[rows].clone()
        elif key.endswith(POSITION_TABLE) and tensor.shape[0] < new.max_position_embeddings:
            tile = torch.arange(new.max_position_embeddings) % tensor.shape[0]
            tensor = tensor[tile].clone()
        out[key] = tensor
    return out
