"""Typed run settings: the Hydra config is turned into these objects once, at the edge, and validated there.

Library code (objectives, Lightning module, data module) receives these objects, never the raw config. Every
problem found is reported together in one :class:`SettingsError` before any model is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data_prep.errors import did_you_mean

from pretrain.lr_schedule import DECAY_SHAPES, ON_EXTEND, SCHEDULES, decay_length
from pretrain.model import DebertaConfig
from pretrain.objectives.build import ObjectiveSettings  # noqa: F401 (part of the settings)

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """One or more invalid settings; the message lists every key at fault and what to do."""


@dataclass
class DataSettings:
    path: Any = None
    """The training corpus: a shard directory written by `python -m data_prep shards`, a glob of them
    (``OUT/part-*``) or a list; several sets are one corpus, each sequence once per epoch."""
    sources: list[dict[str, Any]] | None = None
    """Instead of ``path``, a weighted mixture: ``[{path: DIR_OR_GLOB, weight: W}, ...]`` (see data_prep.mixture)."""
    batch_size: int = 8
    """Per-device micro-batch size (sequences of the shards' length; see ``stage_batch`` for stages)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; ``trainer.accumulate_grad_batches`` is then derived at start-up
    as global_batch_size / (batch_size x data-parallel ranks), so one command trains the same on any GPU count."""
    stages: list[dict[str, Any]] | None = None
    """Sequence-length stages, e.g. ``[{seq_len: 128, steps: 900}, {seq_len: 512}]``: each stage runs ``steps``
    optimizer steps, the last one to ``trainer.max_steps``. A length divides the shards' length S (each packed
    sequence is split into exact pieces) or is a multiple of it (consecutive packed sequences are joined): one shard
    set serves every stage (``data_prep.stream_plan``). Validation stays at the validation shards' own length. Part
    of the plan, like ``trainer.max_steps``: a resume may change the stages of the steps still to come, not those
    already trained."""
    stage_batch: str = "tokens"
    """How the batch carries over to a stage of length s (``batch_size`` and ``global_batch_size`` are stated at
    the shards' length S). tokens (default): the tokens per step stay the same, ``batch_size*S/s`` sequences per
    rank and micro-batch; why: the tokens per optimizer step, hence the gradient noise the LR schedule was tuned for,
    and the activation memory of a micro-batch stay about the same across stages, so one micro-batch size fits every
    stage. sequences: ``batch_size`` sequences of length s (BERT's 256 x 128, then 256 x 512)."""
    batch_warmup: dict[str, Any] | None = None
    """Batch-size warm-up, ``{start: 64, tokens: 2_000_000, increment: null}``: the global batch (sequences at S)
    grows from ``start`` to ``global_batch_size`` (required) in steps of ``increment`` (default: ``start``), linearly
    over the first ``tokens`` tokens seen, fixed per optimizer step from the tokens seen at its start (ModernBERT's
    schedule). The per-rank micro-batch follows (the accumulation stays fixed), so every value must be divisible by
    ranks x accumulation (= global_batch_size / batch_size). The LR schedule stays in optimizer steps."""
    num_workers: int = 2
    seed: int = 1234
    """Seed of the global data order (fixed for a run: resume continues the same order)."""
    verify: str = "fast"
    """fast: sizes, headers and the tokenizer copy at start-up, every shard's sha256 in a background thread during
    training (verified before each checkpoint); full: every sha256 at start-up (reads everything first); none."""
    val_path: str | None = None
    """Optional held-out shard directory for validation loss/accuracy (``trainer.limit_val_batches`` batches every
    ``trainer.val_check_interval`` steps)."""


@dataclass
class OptimSettings:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 10000
    """Linear warm-up from 0 over this many steps, then the `schedule`. Every length of the schedule (warmup_steps,
    decay_steps, trainer.max_steps) counts optimizer steps, also with a batch-size warm-up or sequence-length stages:
    checkpoints, validation, cool-downs and max_steps all count optimizer steps, and the LR at step n then does not
    depend on the batch ramp."""
    schedule: str = "linear"
    """linear: decay to `min_lr_ratio * lr` at `trainer.max_steps` | cosine: a half cosine to the same end | wsd:
    warmup-stable-decay, the peak LR until the last `decay_steps` steps, which decay with `decay_shape` (the
    formulas: ``pretrain.lr_schedule``)."""
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None
    """wsd: length of the decay phase in steps; None = `decay_fraction` of `trainer.max_steps`. Like max_steps it is
    part of the plan, not compared on resume: a resumed run in its stable phase moves the decay (see on_extend)."""
    decay_fraction: float = 0.1
    """wsd: the decay phase as a fraction of `trainer.max_steps`, when `decay_steps` is None."""
    decay_shape: str = "1-sqrt"
    """wsd: 1-sqrt (multiplier 1 - sqrt(q) over the decay's progress q; ModernBERT, Hägele et al. 2024) | linear."""
    on_extend: str = "stretch"
    """When a resume finds another plan than the schedule was built for (`trainer.max_steps`; wsd: the decay's
    length or shape): `stretch` decays on from the last step's LR along the rest of the curve to `min_lr_ratio * lr`
    at the new end; `constant` keeps the last step's LR. A wsd run resumed in its warm-up or stable phase takes the
    new plan as it is (see ``pretrain.lr_schedule``). Not compared on resume: it only acts when the plan changes."""
    fused: bool | None = None
    """Fused AdamW; None = on when training on CUDA."""


@dataclass
class RunSettings:
    """Top-level keys of the config (``output_dir=...``, ``seed=...``)."""

    output_dir: str = "outputs/run"
    """Run directory: checkpoints, metrics.csv, resolved config, hf/ exports. Re-running with the same
    output_dir resumes from its newest checkpoint."""
    seed: int = 42
    export_hf: bool = True
    """Write `hf/` (and `hf_generator/` for RTD) at the end of training."""
    report: bool = True
    """Draw `report.png` from metrics.csv at the end of training (`python -m pretrain.report` redraws it)."""
    checkpoint_every_n_steps: int = 1000
    keep_checkpoints: int = 2
    """How many periodic step-N checkpoints stay on disk (the newest; ``last.ckpt`` besides); -1 keeps every one,
    e.g. to probe each later (``python -m pretrain.probe RUN``) or for the cool-downs of a wsd run
    (``python -m pretrain.cooldown``), which start from any of them."""
    attention_backend: str = "auto"
    """auto (the fused Triton kernel on CUDA, the reference path elsewhere) | triton | reference."""
    compile: bool | None = None
    """torch.compile each encoder layer; None = on when training on CUDA except under DeepSpeed ZeRO-3
    (compilation takes a minute or two at the start)."""
    gradient_checkpointing: bool = False


@dataclass
class StrategySettings:
    """How the ranks share the work (``strategy=`` group in conf/strategy/); built by ``pretrain.strategies``."""

    name: str = "auto"
    """auto (Lightning's choice) | ddp | deepspeed."""
    stage: int = 2
    """DeepSpeed ZeRO stage: 1 partitions optimizer state, 2 also gradients, 3 also parameters."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state (and run the step) in CPU memory."""
    offload_parameters: bool = False
    """DeepSpeed ZeRO-3: keep parameters in CPU memory between uses."""
    pin_memory: bool = False
    sub_group_size: int = 1_000_000_000_000
    find_unused_parameters: bool = False
    """DDP: set true only if some parameters get no gradient in a step."""
    process_group_backend: str | None = None
    """None = nccl on GPUs, gloo on CPU."""
    timeout_minutes: int = 30


@dataclass
class LoggerSettings:
    """metrics.csv is always written; these add optional loggers."""

    wandb: bool = False
    """Weights & Biases (honours WANDB_MODE=offline/disabled); the run id is kept in output_dir so a resumed run
    continues the same wandb run."""
    wandb_project: str = "deberta-pretrain"
    wandb_entity: str | None = None
    tensorboard: bool = False


@dataclass
class ResumeSettings:
    """Resuming an existing output_dir (``resume.*``)."""

    allow_changes: list[str] = field(default_factory=list)
    """Settings that may differ from the checkpoint's (``optim.lr``, or a whole section: ``optim``); any other
    difference in model/objective/optim/data/seed/trainer settings stops the resume with the list. Also
    ``data.global_batch_size`` (the effective global batch), ``data.corpus`` (other shard sets, or another order)
    and ``data.tokenizer`` (shards made with another tokenizer)."""


@dataclass
class InitSettings:
    """Continued pretraining (``model.init_from=DIR``, ``model.init_generator_from=DIR``). They sit in the ``model``
    section on the command line but are not architecture fields, so they are split off here; the checkpoint's own
    config.json then supplies the architecture (see ``pretrain.init_from``)."""

    init_from: str | None = None
    """HuggingFace DebertaV2 directory (weights, config.json, tokenizer) to start from."""
    init_generator_from: str | None = None
    """objective=rtd: HuggingFace DebertaV2ForMaskedLM directory of a matching generator; None = derive one from
    the discriminator."""


# What the *_continue experiments set model.init_from to. Not "???" (OmegaConf's MISSING): every experiment has the
# key with the default null (conf/config.yaml), and a MISSING value never overrides a set one in a merge.
REQUIRED = "REQUIRED"


def _split_init(raw: Any, problems: list[str]) -> tuple[dict[str, Any], InitSettings]:
    """(the model section without the init keys, InitSettings), each init directory checked to be a DebertaV2 one."""
    values = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
    init = InitSettings(**{f.name: values.pop(f.name, None) for f in dataclasses.fields(InitSettings)})
    for key in ("init_from", "init_generator_from"):
        value = getattr(init, key)
        if value in ("???", REQUIRED):
            problems.append(f"model.{key}: required, set it to a HuggingFace DebertaV2 directory (model.{key}=DIR)")
            setattr(init, key, None)
        elif value is not None:
            from pretrain.hf import CheckpointError, load_config

            try:
                load_config(value)
            except CheckpointError as err:
                problems.append(f"model.{key}={value}: not a DeBERTa-v2/v3 checkpoint directory ({err})")
    if init.init_generator_from and not init.init_from:
        problems.append("model.init_generator_from: set model.init_from too (the discriminator to continue)")
    return values, init


@dataclass
class Settings:
    model: DebertaConfig
    objective: ObjectiveSettings
    data: DataSettings
    optim: OptimSettings
    run: RunSettings
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `lightning.Trainer`, passed through after validation."""
    init: InitSettings = field(default_factory=InitSettings)
    resume: ResumeSettings = field(default_factory=ResumeSettings)
    warnings: list[str] = field(default_factory=list)
    """What the check found worth saying but not wrong (logged by :func:`log_warnings`, once per run)."""


def log_warnings(settings: Settings) -> None:
    """Log the settings' warnings: for settings checked with ``warn=False`` (before the run's log existed)."""
    for warning in settings.warnings:
        log.warning(warning)


def _section(cls, raw: Any, key: str, problems: list[str]):
    values = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(values) - names):
        hint = did_you_mean(unknown, names, f"{key}." if key != "config" else "")
        problems.append(f"{key}.{unknown}: unknown key ({hint + ' ' if hint else ''}valid: {', '.join(sorted(names))})")
    values = {k: v for k, v in values.items() if k in names}
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as err:
        problems.append(f"{key}: {err}")
        return cls() if cls is not DebertaConfig else None
    for f in dataclasses.fields(obj):
        if getattr(obj, f.name) == "???":
            problems.append(f"{key}.{f.name}: required, set it on the command line ({key}.{f.name}=...)")
    return obj


def trainer_arguments() -> set[str]:
    """The keyword arguments of ``lightning.Trainer`` (the valid ``trainer.*`` keys)."""
    import lightning

    return set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}


def known_keys() -> dict[str, set[str]]:
    """Each config section's keys that the settings accept (the top level's under ``""``; ``trainer`` is
    :func:`trainer_arguments`): what the command line checks its overrides against (``pretrain.overrides``)."""
    sections = {"model": DebertaConfig, "objective": ObjectiveSettings, "data": DataSettings, "optim": OptimSettings,
                "logger": LoggerSettings, "strategy": StrategySettings, "resume": ResumeSettings}
    keys = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections.items()}
    keys["model"] |= {f.name for f in dataclasses.fields(InitSettings)}
    keys[""] = {f.name for f in dataclasses.fields(RunSettings)} | set(sections) | {"trainer"}
    return keys


def _validate_trainer(trainer: dict[str, Any], problems: list[str]) -> None:
    accepted = trainer_arguments()
    for key in sorted(set(trainer) - accepted):
        hint = did_you_mean(key, accepted, "trainer.")
        problems.append(f"trainer.{key}: not an argument of lightning.Trainer{' (' + hint + ')' if hint else ''}")


# trainer arguments that change what an optimizer step does (the accumulation enters the effective global batch)
TRAINER_KEYS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "precision")


def unknown_allowances(allow: list[Any], model, objective, optim) -> list[str]:
    """Problems with ``resume.allow_changes`` entries that name nothing the resume compares (a typo would otherwise
    allow nothing and leave the user believing it did); checked with the other settings, before anything runs."""
    keys = {f"data.{k}" for k in ("seed", "corpus", "tokenizer", "global_batch_size", "stages", "stage_batch",
                                  "batch_warmup")} | {"seed"}
    keys |= {f"trainer.{k}" for k in TRAINER_KEYS if k != "accumulate_grad_batches"}
    for section, obj in (("model", model), ("objective", objective), ("optim", optim)):
        if obj is not None:
            keys |= {f"{section}.{f.name}" for f in dataclasses.fields(obj)}
    sections = {k.split(".")[0] for k in keys}
    bad = [a for a in allow if not isinstance(a, str) or (a not in keys and a not in sections)]
    if not bad:
        return []
    hint = (" (the batch is compared as data.global_batch_size, the effective global batch)"
            if {"data.batch_size", "trainer.accumulate_grad_batches"} & {str(b) for b in bad} else "")
    return [f"resume.allow_changes: {', '.join(map(str, bad))} is not a setting the resume compares{hint}; name a key "
            "such as optim.lr, data.global_batch_size, data.corpus or data.tokenizer, or a whole section (model, "
            "objective, optim, data, trainer, seed)"]


def _validate_strategy(strategy: StrategySettings, trainer: dict[str, Any], problems: list[str]) -> None:
    if "strategy" in trainer:
        problems.append(f"trainer.strategy={trainer['strategy']!r}: choose the strategy with the strategy group "
                        "instead (strategy=ddp, strategy=deepspeed_zero2, ...; see conf/strategy/)")
    if strategy.name not in ("auto", "ddp", "deepspeed"):
        problems.append(f"strategy.name={strategy.name!r}: choose auto, ddp or deepspeed (strategy=ddp|deepspeed_zero1|"
                        "deepspeed_zero2|deepspeed_zero3|...)")
    if strategy.name == "deepspeed":
        if strategy.stage not in (1, 2, 3):
            problems.append(f"strategy.stage={strategy.stage}: DeepSpeed ZeRO stages are 1, 2 and 3")
        if strategy.offload_parameters and strategy.stage != 3:
            problems.append(f"strategy.offload_parameters=true needs ZeRO stage 3 (strategy.stage={strategy.stage}); "
                            "use strategy=deepspeed_zero3_offload")


def _validate_corpus(data: DataSettings, problems: list[str]) -> list[Path]:
    """data.path / data.sources name existing shard directories (each one is verified when it is opened); returns
    them when they all exist."""
    from data_prep.errors import DataPrepError
    from data_prep.mixture import parse_sources

    try:
        sources = parse_sources(data.path, data.sources)
    except DataPrepError as err:
        problems.append(str(err))
        return []
    found, missing = [], False
    for source in sources:
        for path in source.paths:
            if not (path / "manifest.json").is_file():
                key = "data.sources" if data.sources else "data.path"
                problems.append(f"{key}={path}: no shard directory there ({path / 'manifest.json'} missing); create "
                                "one with `python -m data_prep shards --input ... --tokenizer ... --out DIR`")
                missing = True
            found.append(path)
    return [] if missing else found


VOCAB_PADDING = 64
"""Rows by which model.vocab_size may exceed the shards' tokenizer without a warning (padding for alignment)."""


def _recorded_vocab_size(output_dir: str) -> int | None:
    """The vocab_size in the run record (``output_dir/config.yaml``) of a run that has checkpoints: a resumed run
    keeps its model's embedding table when model.vocab_size is unset (its record holds the number it used)."""
    run = Path(output_dir)
    if not (run / "config.yaml").is_file() or not any((run / "checkpoints").glob("*")):
        return None
    try:
        value = OmegaConf.select(OmegaConf.load(run / "config.yaml"), "model.vocab_size")
    except Exception:  # an unreadable record: the resume itself reports what is wrong with the run
        return None
    return value if isinstance(value, int) and value > 0 else None


def _fit_to_shards(model: DebertaConfig, follow_tokenizer: bool, shard_sets: list[Path], output_dir: str,
                   key: str, problems: list[str], warnings: list[str]) -> DebertaConfig:
    """Check the model against the shards' manifests (read here, before anything is built or any run directory
    exists): ``vocab_size`` unset (null) follows the tokenizer; one smaller than the tokenizer is an error, one
    more than VOCAB_PADDING rows larger a warning (rows no token uses, and output probability on ids that do not
    exist); sequences longer than the EMD's position table are an error."""
    from data_prep import shard_format as sf
    from data_prep.errors import DataPrepError
    from pretrain.model import ConfigError

    vocab = seq_len = 0
    for path in shard_sets:
        try:
            manifest = sf.load_manifest(path)
            vocab = max(vocab, int(manifest["tokenizer"]["vocab_size"]))
            seq_len = max(seq_len, int(manifest["settings"]["seq_len"]))
        except (DataPrepError, KeyError, TypeError, ValueError) as err:
            problems.append(f"{key}={path}: {err}")
            return model
    if not vocab:
        return model
    if follow_tokenizer:
        try:
            model = dataclasses.replace(model, vocab_size=_recorded_vocab_size(output_dir) or vocab)
        except ConfigError as err:
            problems.append(f"model: {err}")
            return model
    elif model.vocab_size > vocab + VOCAB_PADDING:
        warnings.append(f"model.vocab_size={model.vocab_size} is {model.vocab_size - vocab} rows larger than the "
                        f"shards' tokenizer ({vocab} ids): those rows are never trained and take output probability; "
                        "set model.vocab_size=null to follow the tokenizer")
    if model.vocab_size < vocab:
        problems.append(f"{key}: the shards' tokenizer has {vocab} ids but model.vocab_size={model.vocab_size}; set "
                        f"model.vocab_size>={vocab}, or model.vocab_size=null to follow the tokenizer")
    if seq_len > model.max_position_embeddings:
        problems.append(f"{key}: the shards hold sequences of {seq_len} tokens but model.max_position_embeddings="
                        f"{model.max_position_embeddings} (the EMD's absolute position table); raise it or re-pack the "
                        "shards with a smaller --seq-len")
    return model


def _validate_schedule(optim: OptimSettings, max_steps: Any, problems: list[str]) -> None:
    """optim.schedule and the WSD decay phase: known names, and a decay that fits after the warm-up."""
    if optim.schedule not in SCHEDULES:
        hint = did_you_mean(str(optim.schedule), SCHEDULES, "")
        problems.append(f"optim.schedule={optim.schedule!r}: choose {', '.join(SCHEDULES)}"
                        f"{' (' + hint + ')' if hint else ''}")
    if optim.decay_shape not in DECAY_SHAPES:
        problems.append(f"optim.decay_shape={optim.decay_shape!r}: choose {' or '.join(DECAY_SHAPES)} (the shape of "
                        "the wsd decay phase)")
    if optim.decay_steps is not None and (isinstance(optim.decay_steps, bool) or not isinstance(optim.decay_steps, int)
                                          or optim.decay_steps < 0):
        problems.append(f"optim.decay_steps={optim.decay_steps!r}: a whole number of steps >= 0, or null to use "
                        "optim.decay_fraction")
        return
    if isinstance(optim.decay_fraction, bool) or not isinstance(optim.decay_fraction, (int, float)) or not (
            0.0 <= optim.decay_fraction <= 1.0):
        problems.append(f"optim.decay_fraction={optim.decay_fraction!r}: a fraction of trainer.max_steps between 0 "
                        "and 1")
        return
    if optim.schedule != "wsd" or not isinstance(max_steps, int) or not isinstance(optim.warmup_steps, int):
        return
    decay = decay_length(max_steps, optim.decay_steps, optim.decay_fraction)
    if max_steps > 0 and decay > max_steps - optim.warmup_steps:
        key = (f"optim.decay_steps={optim.decay_steps}" if optim.decay_steps is not None else
               f"optim.decay_fraction={optim.decay_fraction} ({decay} steps)")
        problems.append(f"{key}: the wsd decay phase is longer than the steps after warm-up (trainer.max_steps="
                        f"{max_steps} - optim.warmup_steps={optim.warmup_steps} = {max_steps - optim.warmup_steps}); "
                        "shorten the decay or the warm-up, or raise trainer.max_steps")


def _validate_stream(data: DataSettings, model: DebertaConfig | None, shard_sets: list[Path],
                     problems: list[str]) -> None:
    """data.stages, data.stage_batch and data.batch_warmup against the shards' length and the model
    (``data_prep.stream_plan``): stage lengths the shards can serve and the position table holds, micro-batches
    that are whole at every stage and warm-up value."""
    from data_prep import shard_format as sf
    from data_prep.errors import DataPrepError
    from data_prep.stream_plan import (STAGE_BATCH, StreamPlan, batch_problems, parse_stages, parse_warmup,
                                       stage_length_problems)

    if data.stage_batch not in STAGE_BATCH:
        problems.append(f"data.stage_batch={data.stage_batch!r}: choose tokens (the tokens per step stay the same "
                        "across stages) or sequences (the sequences per step do)")
        return
    if data.stages is None and data.batch_warmup is None:
        return
    try:
        stages = parse_stages(data.stages) if data.stages is not None else None
        warmup = parse_warmup(data.batch_warmup, data.global_batch_size) if data.batch_warmup is not None else None
    except DataPrepError as err:
        problems.append(str(err))
        return
    if not shard_sets or not isinstance(data.batch_size, int) or data.batch_size < 1:
        return
    try:
        shard_len = int(sf.load_manifest(shard_sets[0])["settings"]["seq_len"])
    except (DataPrepError, KeyError, TypeError, ValueError):
        return  # reported by _fit_to_shards
    if stages is not None:
        found = stage_length_problems(shard_len, stages, model.max_position_embeddings if model else None)
        problems += found
        if found:
            return
    global_batch = data.global_batch_size if isinstance(data.global_batch_size, int) else data.batch_size
    if global_batch % data.batch_size:
        return  # the accumulation check names it at start-up (pretrain.run.global_batch)
    plan = StreamPlan.for_global_batch(shard_len, data.batch_size, global_batch, stages, data.stage_batch, warmup)
    problems += batch_problems(plan, plan.accumulation)


def _validate_global_batch(data: DataSettings, trainer: dict[str, Any], problems: list[str]) -> None:
    if data.global_batch_size is None:
        return
    if not isinstance(data.global_batch_size, int) or data.global_batch_size < 1:
        problems.append(f"data.global_batch_size={data.global_batch_size!r}: a positive number of sequences")
    elif trainer.get("accumulate_grad_batches") is not None:
        problems.append(f"trainer.accumulate_grad_batches={trainer['accumulate_grad_batches']} and "
                        f"data.global_batch_size={data.global_batch_size} are both set: the accumulation is derived "
                        "from the global batch; drop trainer.accumulate_grad_batches (or set "
                        "data.global_batch_size=null to choose it by hand)")


def settings_from_config(cfg: DictConfig, warn: bool = True) -> Settings:
    """Convert and validate the composed Hydra config; raises one SettingsError listing every problem. Warnings
    are logged when ``warn``. A ``model.vocab_size`` taken from the shards' tokenizer is written back into ``cfg``,
    so the run record (config.yaml) holds the number used."""
    problems: list[str] = []
    warnings: list[str] = []
    model_section, init = _split_init(cfg.get("model"), problems)
    follow_tokenizer = model_section.get("vocab_size") is None  # unset (null): the shards' tokenizer decides
    if follow_tokenizer:
        model_section.pop("vocab_size", None)  # the default stands in until the shards are read below
    model = _section(DebertaConfig, model_section, "model", problems)  # DebertaV2Config names, v3 defaults
    if model is not None and follow_tokenizer and init.init_from and not problems:
        from pretrain.hf import load_config  # (a continued model's vocabulary is its checkpoint's, not a default's)

        model = dataclasses.replace(model, vocab_size=load_config(init.init_from).vocab_size)
    objective = _section(ObjectiveSettings, cfg.get("objective"), "objective", problems)
    data = _section(DataSettings, cfg.get("data"), "data", problems)
    optim = _section(OptimSettings, cfg.get("optim"), "optim", problems)
    logger = _section(LoggerSettings, cfg.get("logger"), "logger", problems)
    strategy = _section(StrategySettings, cfg.get("strategy"), "strategy", problems)
    resume = _section(ResumeSettings, cfg.get("resume"), "resume", problems)
    groups = {"model", "objective", "data", "optim", "trainer", "experiment", "hydra", "logger", "strategy", "resume"}
    top_level = {k: v for k, v in cfg.items() if k not in groups}
    run = _section(RunSettings, top_level, "config", problems)
    trainer = OmegaConf.to_container(cfg.get("trainer", {}), resolve=True)
    _validate_trainer(trainer, problems)

    if objective.name not in ("mlm", "rtd"):
        problems.append(f"objective.name={objective.name!r}: choose 'mlm' or 'rtd' (objective=mlm|rtd)")
    if optim is not None and optim.on_extend not in ON_EXTEND:
        problems.append(f"optim.on_extend={optim.on_extend!r}: choose {' or '.join(ON_EXTEND)} (what the LR does when "
                        "a resumed run's trainer.max_steps changes)")
    if optim is not None:
        _validate_schedule(optim, trainer.get("max_steps"), problems)
    if objective.embedding_sharing not in ("gdes", "es", "nes"):
        problems.append(f"objective.embedding_sharing={objective.embedding_sharing!r}: choose gdes, es or nes")
    shard_sets = _validate_corpus(data, problems)
    if model is not None and not init.init_from:  # (a continued model's size comes from its checkpoint)
        model = _fit_to_shards(model, follow_tokenizer, shard_sets, run.output_dir,
                               "data.sources" if data.sources else "data.path", problems, warnings)
        if follow_tokenizer and shard_sets:
            try:
                OmegaConf.update(cfg, "model.vocab_size", model.vocab_size, force_add=True)
            except Exception:  # a read-only config: the record then says null (the tokenizer's size)
                pass
    _validate_global_batch(data, trainer, problems)
    _validate_stream(data, None if init.init_from else model, shard_sets, problems)
    if data.val_path and not (Path(data.val_path) / "manifest.json").is_file():
        problems.append(f"data.val_path={data.val_path}: no shard directory there (manifest.json missing)")
    if not isinstance(trainer.get("max_steps"), int) or trainer["max_steps"] < 0:
        problems.append("trainer.max_steps: set a step count (the LR schedule is defined over it; 0 exports the "
                        "starting model without training)")
    _validate_strategy(strategy, trainer, problems)
    if isinstance(run.keep_checkpoints, bool) or not isinstance(run.keep_checkpoints, int) or not (
            run.keep_checkpoints >= 1 or run.keep_checkpoints == -1):
        problems.append(f"keep_checkpoints={run.keep_checkpoints!r}: how many step checkpoints to keep, 1 or more, "
                        "or -1 for all")
    from pretrain.model.attention import ATTENTION_BACKENDS

    if run.attention_backend not in ATTENTION_BACKENDS:
        problems.append(f"attention_backend={run.attention_backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if not isinstance(resume.allow_changes, (list, tuple)):
        problems.append(f"resume.allow_changes={resume.allow_changes!r}: give a list, e.g. "
                        f"resume.allow_changes=[{resume.allow_changes}]")
    else:
        problems += unknown_allowances(list(resume.allow_changes), model, objective, optim)
    if warn:
        for warning in warnings:
            log.warning(warning)
    if problems:
        if len(problems) == 1:  # one problem, one line
            raise SettingsError(f"invalid configuration: {problems[0]}")
        raise SettingsError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return Settings(model, objective, data, optim, run, logger, trainer=trainer, strategy=strategy, init=init,
                    resume=resume, warnings=warnings)
