"""What a run is pinned to beyond its settings: the exact data and tokenizer, the effective global batch, and
weights that still fit the model.

Why: counts alone do not identify data. Shards of another text made with another tokenizer can hold as many
sequences as the old ones, and ``data.path=[A,B]`` resumed as ``[B,A]`` has the same counts but maps every data
position to another sequence; both used to resume without a word (the [MASK] id silently changed with the
tokenizer). The run record and the saved data position therefore hold, per source and in order, every shard
set's path, manifest sha256 and tokenizer checksum (``ShardCorpus.identity``), and a resume compares them:

- ``data.tokenizer``: another tokenizer (its checksum; the special ids that moved are named);
- ``data.corpus``: other shard sets, or the same ones in another order (a set moved to another path with the same
  manifest is the same data and is accepted).

Both are keys of ``resume.allow_changes`` like the settings in ``pretrain.checkpointing.resume``. The global batch is
compared as its effective value (``data.batch_size x ranks x accumulate_grad_batches``), whichever keys produced it.
"""

from __future__ import annotations

from typing import Any

TOKENIZER_KEY = "data.tokenizer"
CORPUS_KEY = "data.corpus"
GLOBAL_BATCH_KEY = "data.global_batch_size"
IDENTITY_KEYS = (TOKENIZER_KEY, CORPUS_KEY)


def _sets(identity: dict) -> list[tuple[int, dict]]:
    return [(s, entry) for s, source in enumerate(identity.get("sources", [])) for entry in source.get("sets", [])]


def _short(entry: dict) -> str:
    return f"{entry['path']} (manifest {entry['manifest_sha256'][:12]}...)"


def identity_changes(saved: dict | None, current: dict, saved_special: dict | None = None,
                     current_special: dict | None = None) -> dict[str, str]:
    """``{key: what differs}`` between a checkpoint's data identity and the current one (empty: the same data).
    A record without an identity (written before it was kept) compares as the same."""
    if not saved or "sources" not in saved:
        return {}
    changes: dict[str, str] = {}
    old_sets, new_sets = _sets(saved), _sets(current)
    old_toks = list(dict.fromkeys(e["tokenizer"] for _, e in old_sets))
    new_toks = list(dict.fromkeys(e["tokenizer"] for _, e in new_sets))
    if old_toks != new_toks:
        old, new = (", ".join(t[:12] + "..." for t in toks) for toks in (old_toks, new_toks))
        text = f"the checkpoint was trained on shards made with tokenizer {old}, these shards were made with {new}"
        if saved_special and current_special:
            moved = [f"[{name.upper()}] id {saved_special[name]} -> {current_special[name]}"
                     for name in sorted(saved_special) if name in current_special
                     and saved_special[name] != current_special[name]]
            if moved:
                text += f" ({', '.join(moved)})"
        changes[TOKENIZER_KEY] = text
    old_layout = [(s, e["manifest_sha256"]) for s, e in old_sets]
    new_layout = [(s, e["manifest_sha256"]) for s, e in new_sets]
    if old_layout != new_layout:
        if sorted(old_layout) == sorted(new_layout):
            changes[CORPUS_KEY] = (
                f"the same shard sets in another order: {', '.join(e['path'] for _, e in old_sets)} in the checkpoint, "
                f"{', '.join(e['path'] for _, e in new_sets)} now (the order decides which sequence each data position "
                "reads)")
        else:
            lines = []
            for i in range(max(len(old_sets), len(new_sets))):
                old = old_sets[i] if i < len(old_sets) else None
                new = new_sets[i] if i < len(new_sets) else None
                if old and new and (old[0], old[1]["manifest_sha256"]) == (new[0], new[1]["manifest_sha256"]):
                    continue
                where = f"source {(new or old)[0] + 1} set {i + 1}"
                lines.append(f"{where}: {_short(old[1]) if old else 'none'} in the checkpoint, "
                             f"{_short(new[1]) if new else 'none'} now")
            changes[CORPUS_KEY] = "other shard sets than the checkpoint was trained on: " + "; ".join(lines[:4]) + (
                f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
    return changes


def saved_global_batch(saved: dict[str, Any], world_size: int) -> int | None:
    """The effective global batch of a run record's ``optimisation`` settings. Records written before it was kept
    hold either the configured ``data.global_batch_size`` or ``data.batch_size`` and the accumulation without the
    number of ranks (taken as today's then, as the older check did)."""
    if GLOBAL_BATCH_KEY in saved and saved[GLOBAL_BATCH_KEY] is not None:
        return int(saved[GLOBAL_BATCH_KEY])
    if "data.batch_size" in saved:
        return int(saved["data.batch_size"]) * world_size * int(saved.get("trainer.accumulate_grad_batches") or 1)
    return None


def unloadable_changes(saved_record: dict[str, Any], objective) -> list[str]:
    """Parameters of the checkpoint that the current objective cannot take (other names or shapes), as
    ``name: shape`` lines; the checkpoint's objective is rebuilt from its run record on the meta device, so this
    costs no memory and runs before anything is loaded or written."""
    import torch

    from pretrain.model import DebertaConfig
    from pretrain.objectives.base import SpecialTokens
    from pretrain.objectives.build import ObjectiveSettings, build_objective

    try:
        with torch.device("meta"):
            saved = build_objective(DebertaConfig(**saved_record["model"]),
                                    ObjectiveSettings(**saved_record["objective"]),
                                    SpecialTokens(**saved_record["special_tokens"]))
    except (KeyError, TypeError, ValueError):  # a record from another version: leave it to the load itself
        return []
    old = {k: tuple(v.shape) for k, v in saved.state_dict().items()}
    new = {k: tuple(v.shape) for k, v in objective.state_dict().items()}
    problems = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            problems.append(f"{key}: {list(old[key]) if key in old else 'absent'} in the checkpoint, "
                            f"{list(new[key]) if key in new else 'absent'} now")
    return problems
