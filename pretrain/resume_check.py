"""On resume, refuse settings that silently change the optimisation unless the user says so.

Re-running a command resumes it, so an edited command line (another ``optim.lr``, dropout, ``mask_prob``) used to
continue the run with the new values without a word, and ``config.yaml`` then described neither half. The run
record stored in every checkpoint holds the settings that shape the optimisation; a resumed run compares its own
with it and stops with the list of differences. ``resume.allow_changes=[optim.lr,model.hidden_dropout_prob]`` (a key,
or a whole section such as ``optim``) accepts them on purpose; the change is then logged, kept in the run record
of later checkpoints and appended to ``output_dir/config_changes.yaml``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import yaml

from pretrain.settings import Settings, SettingsError

# trainer arguments that change what an optimizer step does
TRAINER_KEYS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "precision")


class ChangedSettingsError(SettingsError):
    """Settings differ from the checkpoint's run record and were not allowed."""


def optimisation_settings(settings: Settings) -> dict[str, Any]:
    """The part of the run record compared on resume (flattened ``section.key`` -> value, JSON-like values)."""
    flat: dict[str, Any] = {}
    data = {"seed": settings.data.seed, "batch_size": settings.data.batch_size}
    trainer = {k: settings.trainer.get(k) for k in TRAINER_KEYS}
    trainer["accumulate_grad_batches"] = trainer["accumulate_grad_batches"] or 1  # null: 1 without a global batch
    if settings.data.global_batch_size is not None:
        # The global batch is what the optimisation sees; the micro-batch and the accumulation derived from it and
        # the number of ranks may change between runs of one output_dir (resume on another GPU count).
        data = {"seed": settings.data.seed, "global_batch_size": settings.data.global_batch_size}
        del trainer["accumulate_grad_batches"]
    sections = {"model": settings.model.to_dict(), "objective": dataclasses.asdict(settings.objective),
                "optim": dataclasses.asdict(settings.optim), "data": data, "trainer": trainer}
    for section, values in sections.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    flat["seed"] = settings.run.seed
    return flat


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys present in both whose values differ (a key the older record lacks is not compared)."""
    return {k: (saved[k], current[k]) for k in sorted(current) if k in saved and saved[k] != current[k]}


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def check_changes(saved_record: dict[str, Any], settings: Settings, checkpoint: Path, step: int,
                  output_dir: Path, write_history: bool) -> dict[str, tuple[Any, Any]]:
    """Raise :class:`ChangedSettingsError` listing every difference not in ``resume.allow_changes``; return the
    allowed ones (recorded in ``config_changes.yaml`` when ``write_history``)."""
    saved = saved_record.get("optimisation")
    if not saved:
        return {}  # a checkpoint from before run records held these settings
    changed = differences(saved, optimisation_settings(settings))
    allow = list(settings.resume.allow_changes)
    refused = {k: v for k, v in changed.items() if not _allowed(k, allow)}
    if refused:
        listing = "\n  - ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
        keys = ",".join(refused)
        raise ChangedSettingsError(
            f"resuming {checkpoint} (step {step}) with settings that change the optimisation:\n  - {listing}\n"
            f"Re-run with the checkpoint's values, or allow the change on purpose with resume.allow_changes=[{keys}], "
            "or start a new output_dir")
    if changed and write_history:
        history = output_dir / "config_changes.yaml"
        entry = [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": str(checkpoint), "step": step,
                  "changes": {k: {"from": old, "to": new} for k, (old, new) in changed.items()}}]
        with open(history, "a", encoding="utf-8") as f:
            yaml.safe_dump(entry, f, sort_keys=False)
    return changed
