"""Resuming a run: which checkpoint, whether its settings may continue, and in which form it loads.

The order of the steps lives here, not in ``train``: :func:`find_resume` (before the trainer exists: stale temp
files removed, the newest usable checkpoint, whose step the CSV logger needs) and :func:`plan_resume` (once the
trainer knows its ranks: the settings check below, the change record, and the ZeRO re-partitioning when the
checkpoint was saved on another number of ranks). ``trainer.fit`` then loads what the :class:`ResumePlan` names.

On resume, refuse settings that silently change the optimisation unless the user says so.

Re-running a command resumes it, so an edited command line (another ``optim.lr``, dropout, ``mask_prob``) used to
continue the run with the new values without a word, and ``config.yaml`` then described neither half. The run
record stored in every checkpoint holds the settings that shape the optimisation; a resumed run compares its own
with it and stops with the list of differences. ``resume.allow_changes=[optim.lr,model.hidden_dropout_prob]`` (a key,
or a whole section such as ``optim``) accepts them on purpose; the change is then logged, kept in the run record
of later checkpoints and appended to ``output_dir/config_changes.yaml``. The data and tokenizer identity
(``data.corpus``, ``data.tokenizer``) and the effective global batch are compared too
(``pretrain.checkpointing.identity``).

Nothing is written for a resume that is refused: the check runs before training starts, and ``config.yaml`` and the
change record are written only once the checkpoint has loaded (``pretrain.run.loggers.RunRecordWriter``). An allowed
change that the checkpoint's weights cannot be loaded into (``model.hidden_size``, ``objective.name``) is refused
here, before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.checkpointing import reshard
from pretrain.checkpointing.files import remove_stale_temps
from pretrain.checkpointing.find import ResumePoint, check_resumable, newest_checkpoint, read_metadata
from pretrain.checkpointing.identity import GLOBAL_BATCH_KEY, identity_changes, saved_global_batch, unloadable_changes
from pretrain.run.lock import launching_process
from pretrain.settings import TRAINER_KEYS, Settings, SettingsError

log = logging.getLogger(__name__)

PLAN_KEYS = ("on_extend", "decay_steps", "decay_fraction", "decay_shape")
"""optim keys a resume does not compare: they say where the schedule ends (see ``pretrain.lr_schedule``)."""

class ChangedSettingsError(SettingsError):
    """Settings differ from the checkpoint's run record and were not allowed."""


def optimisation_settings(settings: Settings, global_batch: int | None = None,
                          shard_len: int | None = None) -> dict[str, Any]:
    """The part of the run record compared on resume (flattened ``section.key`` -> value, JSON-like values).

    The batch enters as ``data.global_batch_size``, the effective global batch (``data.batch_size x ranks x
    accumulate_grad_batches``, known once the trainer has its ranks), whichever keys produced it: the micro-batch,
    the accumulation and the number of ranks may change between runs of one output_dir, the global batch may not.
    ``data.stages`` is recorded as the run's plan of sequence lengths (one stage at the shards' length ``shard_len``
    when none is set), so a resume can tell stages to come from stages already trained (:func:`same_stages_until`)."""
    flat: dict[str, Any] = {}
    stages = settings.data.stages or ([{"seq_len": int(shard_len)}] if shard_len else None)
    data = {"seed": settings.data.seed, "global_batch_size": global_batch, "stages": stages,
            "stage_batch": settings.data.stage_batch, "batch_warmup": settings.data.batch_warmup}
    trainer = {k: settings.trainer.get(k) for k in TRAINER_KEYS if k != "accumulate_grad_batches"}
    # on_extend acts on a change only; the wsd decay's length and shape are part of the plan, like trainer.max_steps
    optim = {k: v for k, v in dataclasses.asdict(settings.optim).items() if k not in PLAN_KEYS}
    sections = {"model": settings.model.to_dict(), "objective": dataclasses.asdict(settings.objective),
                "optim": optim, "data": data, "trainer": trainer}
    for section, values in sections.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    flat["seed"] = settings.run.seed
    return flat


def differences(saved: dict[str, Any], current: dict[str, Any], world_size: int = 1) -> dict[str, tuple[Any, Any]]:
    """Keys present in both whose values differ (a key the older record lacks is not compared), and the effective
    global batch, which every record has in one form or another (``run_identity.saved_global_batch``)."""
    changed = {k: (saved[k], current[k]) for k in sorted(current)
               if k in saved and k != GLOBAL_BATCH_KEY and saved[k] != current[k]}
    old, new = saved_global_batch(saved, world_size), current.get(GLOBAL_BATCH_KEY)
    if old is not None and new is not None and old != new:
        changed[GLOBAL_BATCH_KEY] = (old, new)
    return dict(sorted(changed.items()))


def same_stages_until(saved: Any, current: Any, step: int) -> bool:
    """Whether two ``data.stages`` plans give every step before ``step`` the same sequence length. ``data.stages``
    is part of the plan, like ``trainer.max_steps``: a resume may lengthen, shorten, add or change stages still to
    come (the step of a boundary not yet reached, a last stage at another length), never the length of steps already
    trained (that needs ``resume.allow_changes=[data.stages]``). A change of the position's unit is converted or
    refused by the data module."""
    from data_prep.errors import DataPrepError
    from data_prep.stream_plan import parse_stages

    def lengths(stages: Any) -> list[tuple[int, float]]:  # (seq_len, first step after it)
        out, end = [], 0
        for stage in parse_stages(list(stages)):
            end = end + stage.steps if stage.steps is not None else float("inf")
            out.append((stage.seq_len, end))
        return out

    if saved is None or current is None:  # a record without the plan of lengths: nothing to compare
        return True
    try:
        old, new = lengths(saved), lengths(current)
    except (DataPrepError, TypeError):
        return False

    def at(plan: list[tuple[int, float]], n: int) -> int:
        return next(s for s, end in plan if n < end)

    cuts = {0} | {int(end) for _, end in old + new if end < step}  # where either plan's length may change
    return all(at(old, n) == at(new, n) for n in cuts) if step > 0 else True


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def _identity_summary(identity: dict) -> list[str]:
    return [f"{e['path']} (manifest {e['manifest_sha256'][:12]}, tokenizer {e['tokenizer'][:12]})"
            for source in identity.get("sources", []) for e in source.get("sets", [])]


def check_changes(saved_record: dict[str, Any], current_record: dict[str, Any], settings: Settings, checkpoint: Path,
                  step: int, world_size: int, objective=None) -> dict[str, tuple[Any, Any]]:
    """Raise :class:`ChangedSettingsError` listing every difference (settings, effective global batch, data and
    tokenizer identity) not in ``resume.allow_changes``, or allowed changes the checkpoint's weights cannot be
    loaded into (``objective``: the model about to be resumed). Return the allowed ones. Writes nothing: the
    change record is written by :func:`write_change_record` once the resume has loaded."""
    changed: dict[str, tuple[Any, Any]] = {}
    descriptions: dict[str, str] = {}
    saved = saved_record.get("optimisation")
    if saved:  # absent in checkpoints from before run records held these settings
        changed.update(differences(saved, current_record["optimisation"], world_size))
    if "data.stages" in changed and same_stages_until(*changed["data.stages"], step):
        del changed["data.stages"]  # part of the plan: only the steps still to come changed (see stage_changes)
    identity = identity_changes(saved_record.get("data"), current_record["data"], saved_record.get("special_tokens"),
                                current_record.get("special_tokens"))
    for key, text in identity.items():
        descriptions[key] = text
        changed[key] = (_identity_summary(saved_record["data"]), _identity_summary(current_record["data"]))
    allow = list(settings.resume.allow_changes)
    refused = {k: v for k, v in changed.items() if not _allowed(k, allow)}
    if refused:
        listing = "\n  - ".join(f"{k}: {descriptions[k]}" if k in descriptions else
                                f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
        keys = ",".join(refused)
        raise ChangedSettingsError(
            f"resuming {checkpoint} (step {step}) with settings or data that change the run:\n  - {listing}\n"
            f"Re-run with the checkpoint's settings and data, or allow the change on purpose with "
            f"resume.allow_changes=[{keys}], or start a new output_dir")
    shaped = [k for k in changed if k.startswith(("model.", "objective."))]
    if shaped and objective is not None and saved_record.get("model"):
        problems = unloadable_changes(saved_record, objective)
        if problems:
            listing = "\n  - ".join(problems[:6] + ([f"and {len(problems) - 6} more"] if len(problems) > 6 else []))
            raise ChangedSettingsError(
                f"resume.allow_changes accepts {', '.join(shaped)}, but the weights of {checkpoint} (step {step}) "
                f"cannot be loaded into the changed model:\n  - {listing}\nAn architecture or objective change "
                "cannot continue a checkpoint: start a new output_dir, continuing from an export of this run with "
                "model.init_from=DIR (python -m pretrain.export)")
    return changed


def write_change_record(output_dir: Path, checkpoint: Path, step: int, changed: dict[str, tuple[Any, Any]]) -> None:
    """Append an accepted change to ``output_dir/config_changes.yaml`` (called once the resume has loaded)."""
    if not changed:
        return
    history = output_dir / "config_changes.yaml"
    entry = [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": str(checkpoint), "step": step,
              "changes": {k: {"from": old, "to": new} for k, (old, new) in changed.items()}}]
    with open(history, "a", encoding="utf-8") as f:
        yaml.safe_dump(entry, f, sort_keys=False)


def find_resume(output_dir: Path) -> ResumePoint | None:
    """The newest complete, readable checkpoint of ``output_dir`` (of ``last.ckpt``, ``hpc_ckpt_N``, ``step-N``), or
    None for a fresh run; the launching process first removes the temp files that killed saves left behind. Newer
    checkpoints that were skipped are logged with the reason."""
    if launching_process():
        for path in remove_stale_temps(output_dir / "checkpoints"):
            log.warning("removed %s, left by a save that was interrupted", path)
    newest = newest_checkpoint(output_dir)
    if newest:
        for path, why in newest.skipped:
            log.warning("not resuming from %s: %s", path, why)
        log.info("resuming from %s (step %d)", newest.path, newest.step)
    return newest


@dataclass
class ResumePlan:
    """What a run starts from: nothing (``checkpoint`` None), or a checkpoint whose settings passed the check."""

    checkpoint: Path | None = None
    step: int | None = None
    ckpt_path: str | None = None
    """What ``trainer.fit`` loads: the checkpoint, or its universal form."""
    universal: Path | None = None
    """ZeRO state re-partitioned for this number of ranks (``pretrain.checkpointing.reshard``), else None."""
    allowed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Changed settings that ``resume.allow_changes`` accepts; recorded once the checkpoint has loaded."""


def plan_resume(point: ResumePoint | None, run_record: dict[str, Any], settings: Settings, world_size: int,
                objective=None, deepspeed_config: dict | None = None) -> ResumePlan:
    """Check that ``point`` may continue with this run's settings, data and ranks, before anything is loaded or
    written (:func:`check_changes`, then whether the strategy can load it), and add this resume's accepted changes
    to ``run_record``. ``deepspeed_config``: the DeepSpeed strategy's config, or None for other strategies; when
    the checkpoint's ZeRO state was saved on another number of ranks it is converted to its universal form (by the
    launching process; the others wait) and the engine is told to load that."""
    if point is None:
        return ResumePlan()
    saved = read_metadata(point.path).get("deberta_pretrain") or {}
    allowed = check_changes(saved, run_record, settings, point.path, point.step, world_size, objective)
    if allowed:
        log.warning("resuming with changed settings (resume.allow_changes): %s",
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in allowed.items()))
    run_record["changes"] = [*saved.get("changes", []),
                             *([{"step": point.step, "changes": {k: list(v) for k, v in allowed.items()}}]
                               if allowed else [])]
    plan = ResumePlan(point.path, point.step, str(point.path), allowed=allowed)
    if check_resumable(point.path, deepspeed_config is not None, world_size):
        # ZeRO state saved on another number of ranks: resume from its universal form (rank 0 converts it)
        plan.universal = reshard.prepare(point.path, world_size, launching_process(),
                                         timeout_s=60.0 * settings.strategy.timeout_minutes)
        reshard.enable_universal_load(deepspeed_config)
        plan.ckpt_path = str(plan.universal)
    return plan
