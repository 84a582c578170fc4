"""``train(cfg)``: settings -> data -> objective -> Lightning Trainer -> fit -> HuggingFace export.

No CLI parsing here (``__main__`` does that), so tests call ``train`` with a composed config. Re-running with the
same ``output_dir`` resumes from its newest usable checkpoint (``pretrain.checkpointing.find``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from data_prep.atomic_io import write_atomic, write_text_atomic
from pretrain import hf, init_from
from pretrain.checkpointing import reshard
from pretrain.checkpointing.files import AtomicCheckpointIO, RunCheckpoint, remove_stale_temps
from pretrain.run.console import RunSummary, StepProgressBar, quiet_console
from pretrain.checkpointing.find import check_resumable, newest_checkpoint, read_metadata
from pretrain.run.loggers import ResumableCSVLogger
from pretrain.datamodule import ShardDataModule
from pretrain.run.global_batch import AccumulationOnResume, accumulation_for
from pretrain.run.interrupt import StopOnInterrupt, StoppedAtOnce, TrainingInterrupted
from pretrain.lightning_module import PretrainingModule
from pretrain.objectives.base import PretrainingObjective, SpecialTokens
from pretrain.objectives.build import build_objective  # noqa: F401 (export and tests import it from here too)
from pretrain.run.perf import training_flops_per_token
from pretrain.report import write_report
from pretrain.checkpointing.resume import check_changes, optimisation_settings, write_change_record
from pretrain.run.lock import RunLock, checkpoint_folder_lock, launching_process
from pretrain.run.sanity import sanity_warnings
from pretrain.settings import Settings, SettingsError, settings_from_config
from pretrain.strategies import build_strategy, expose_outputs_to_zero3, full_parameters, is_deepspeed, zero_stage

log = logging.getLogger(__name__)


def check_data_against_model(settings: Settings, data: ShardDataModule) -> None:
    shards = data.train_set
    problems = []
    if shards.vocab_size > settings.model.vocab_size:
        problems.append(f"the shards' tokenizer has {shards.vocab_size} ids but model.vocab_size="
                        f"{settings.model.vocab_size}; set model.vocab_size>={shards.vocab_size}")
    if shards.seq_len > settings.model.max_position_embeddings:
        problems.append(f"the shards hold sequences of {shards.seq_len} tokens but model.max_position_embeddings="
                        f"{settings.model.max_position_embeddings} (the EMD's absolute position table); raise it or "
                        "re-pack the shards with a smaller --seq-len")
    if problems:
        raise SettingsError(f"data.path={settings.data.path} does not fit the model:\n  - " + "\n  - ".join(problems))


def export(objective: PretrainingObjective, output_dir: Path, tokenizer_dir: Path,
           info: dict[str, Any] | None = None) -> list[Path]:
    """Write ``output_dir/hf`` (and ``hf_generator``), each replaced whole, with ``info`` (the step it came from) in
    its ``export_info.json``. The caller holds ``output_dir``'s run lock, so what an export killed there before left
    behind (``.hf.tmp-*``: a full model copy) is removed first."""
    written = []
    for name, model in objective.export_models().items():
        for stale in hf.remove_stale_staging(output_dir, name):
            log.warning("removed %s, left by an export that was interrupted", stale)
        written.append(hf.save_pretrained(model, output_dir / name, tokenizer=tokenizer_dir, info=info))
    return written


def probe_summary(output_dir: Path) -> list[str]:
    """The newest downstream probe results of this run (``output_dir/probes``, written by ``python -m pretrain.probe
    --watch``), for the closing summary; nothing when there are none or they cannot be read."""
    from pretrain.probe.panel import latest_lines

    try:
        return latest_lines(output_dir)
    except Exception as err:  # a convenience: never fail a finished run over it
        log.warning("downstream probe table not shown (%s)", err)
        return []


def new_wandb_run_id() -> str:
    """A wandb run id (8 characters of [a-z0-9], wandb's own format; ``wandb.util.generate_id`` is gone in 0.31)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def build_loggers(settings: Settings, output_dir: Path, resume_step: int | None) -> list:
    loggers: list = [ResumableCSVLogger(str(output_dir), resume_step=resume_step)]
    if settings.logger.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(output_dir), name="tensorboard", version=""))
    if settings.logger.wandb:
        from lightning.pytorch.loggers import WandbLogger

        id_file = output_dir / "wandb_run_id"  # a resumed run continues the same wandb run
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = new_wandb_run_id()
            output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(id_file, run_id + "\n")
        loggers.append(WandbLogger(project=settings.logger.wandb_project, entity=settings.logger.wandb_entity,
                                   save_dir=str(output_dir), id=run_id, resume="allow"))
    return loggers


def save_config(cfg: DictConfig, path: Path) -> None:
    """The resolved config, written atomically (a kill never leaves a half config.yaml)."""
    write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True), temp=path.with_name(f".{path.name}.tmp-{os.getpid()}"))


class RunRecordWriter(Callback):
    """Writes ``config.yaml`` and, on a resume with allowed changes, appends to ``config_changes.yaml``: on a
    resume only once the checkpoint has loaded (``on_train_start`` runs after every restore), so a refused or
    failed resume leaves the run record as it was. Rank 0 writes, once."""

    def __init__(self, cfg: DictConfig, output_dir: Path):
        self.cfg, self.output_dir = cfg, output_dir
        self.changes: tuple[Path, int, dict] | None = None
        self.written = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.write(trainer)

    def write(self, trainer) -> None:
        if self.written or not trainer.is_global_zero:
            return
        self.written = True
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.output_dir / "config.yaml")
        if self.changes is not None:
            write_change_record(self.output_dir, *self.changes)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train under the output_dir's run lock (one run per output_dir, and per checkpoint folder when
    ``checkpoints/`` is a link elsewhere; see ``pretrain.run.lock``)."""
    settings = settings_from_config(cfg)
    with RunLock(settings.run.output_dir), checkpoint_folder_lock(settings.run.output_dir):
        return _train(cfg, settings)


def _train(cfg: DictConfig, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    quiet_console()
    for warning in sanity_warnings(settings.optim.warmup_steps, int(settings.trainer.get("max_steps") or 0),
                                   settings.trainer.get("accelerator", "auto"), settings.trainer.get("precision"),
                                   settings.data.num_workers, torch.cuda.is_available(),
                                   objective=settings.objective.name,
                                   init_generator_from=settings.init.init_generator_from):
        log.warning(warning)
    L.seed_everything(settings.run.seed, workers=True)
    data = ShardDataModule(settings.data)
    settings, start = init_from.prepare(settings, data.train_set)  # model.init_from: the checkpoint's architecture
    check_data_against_model(settings, data)
    ids = data.train_set.special_ids
    special = SpecialTokens(pad=ids["pad"], cls=ids["cls"], sep=ids["sep"], unk=ids["unk"], mask=ids["mask"])
    objective = build_objective(settings.model, settings.objective, special)
    if start is not None:
        start.initialise(objective)
    compile_layers = settings.run.compile
    if compile_layers is None:  # on CUDA; not under ZeRO-3, whose parameter-gathering hooks run inside the layers
        zero3 = settings.strategy.name == "deepspeed" and settings.strategy.stage == 3
        on_gpu = settings.trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        compile_layers = on_gpu and not zero3
    for model in objective.encoder_models().values():
        model.set_attention_backend(settings.run.attention_backend)
        model.gradient_checkpointing_enable(settings.run.gradient_checkpointing)
        if compile_layers:
            model.compile_layers()
    run_record = {"model": settings.model.to_dict(), "objective": dataclasses.asdict(settings.objective),
                  "special_tokens": dataclasses.asdict(special), "tokenizer_dir": str(data.train_set.tokenizer_dir.resolve()),
                  "tokenizer_checksum": data.train_set.tokenizer_checksum, "data": data.identity,
                  "optimisation": optimisation_settings(settings)}  # the effective global batch is set below
    flops = training_flops_per_token(settings.model, data.seq_len, settings.objective.name, settings.objective.mask_prob,
                                     settings.objective.generator_layers, settings.objective.use_emd)
    module = PretrainingModule(objective, settings.optim, settings.run.seed, data.seq_len, run_record, flops)

    output_dir = Path(settings.run.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    trainer_args = dict(settings.trainer)
    if trainer_args.get("accumulate_grad_batches") is None:  # derived below from data.global_batch_size, else 1
        trainer_args.pop("accumulate_grad_batches", None)
    strategy = build_strategy(settings.strategy, str(trainer_args.get("accelerator", "auto")), settings.data.batch_size)
    # DeepSpeed checkpoints are directories written in place: `last.ckpt` becomes a link to the newest complete
    # step-N directory instead of a second copy overwritten at every save (a kill mid-save would corrupt it).
    save_last = "link" if is_deepspeed(strategy) else True
    if zero_stage(strategy) == 3:
        expose_outputs_to_zero3(objective)
    checkpoint = RunCheckpoint(dirpath=checkpoint_dir, filename="step-{step:08d}", save_last=save_last, save_top_k=2,
                                 monitor="step", mode="max", every_n_train_steps=settings.run.checkpoint_every_n_steps,
                                 auto_insert_metric_name=False,
                                 enable_version_counter=False)  # a resumed run overwrites/relinks last.ckpt, no last-v1
    if launching_process():
        for path in remove_stale_temps(checkpoint_dir):
            log.warning("removed %s, left by a save that was interrupted", path)
    newest = newest_checkpoint(output_dir)  # newest complete, readable one of last.ckpt, hpc_ckpt_N, step-N
    resume, resume_step = (str(newest.path), newest.step) if newest else (None, None)
    if newest:
        for path, why in newest.skipped:
            log.warning("not resuming from %s: %s", path, why)
        log.info("resuming from %s (step %d)", resume, resume_step)
    loggers = build_loggers(settings, output_dir, resume_step)
    if not settings.data.val_path:
        trainer_args["limit_val_batches"] = 0
    # The progress bar reads its metrics from the device at each refresh: refresh at logging steps only.
    progress = StepProgressBar(refresh_rate=max(1, int(trainer_args.get("log_every_n_steps") or 50)))
    trainer_args.setdefault("enable_model_summary", False)  # its table's FLOPs column is always 0: one line below
    interrupt = StopOnInterrupt()
    trainer = L.Trainer(default_root_dir=str(output_dir),
                        callbacks=[checkpoint, LearningRateMonitor("step"), progress, interrupt,
                                   AccumulationOnResume()],
                        logger=loggers, use_distributed_sampler=False, strategy=strategy,
                        plugins=[AtomicCheckpointIO()], **trainer_args)
    if settings.data.global_batch_size is not None:  # set before fit: DeepSpeed reads it when the engine is built
        trainer.accumulate_grad_batches = accumulation_for(settings.data.global_batch_size, settings.data.batch_size,
                                                           trainer.world_size)
        if trainer.is_global_zero:
            log.info("global batch %d sequences = data.batch_size %d x %d rank(s) x accumulate_grad_batches %d",
                     settings.data.global_batch_size, settings.data.batch_size, trainer.world_size,
                     trainer.accumulate_grad_batches)
    run_record["optimisation"] = optimisation_settings(
        settings, settings.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches)
    record = RunRecordWriter(cfg, output_dir)
    if newest:  # refuse changed settings or data before anything is loaded or written
        saved = read_metadata(newest.path).get("deberta_pretrain") or {}
        allowed = check_changes(saved, run_record, settings, newest.path, newest.step, trainer.world_size, objective)
        if allowed:
            log.warning("resuming with changed settings (resume.allow_changes): %s",
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in allowed.items()))
        data.allow_changes = list(settings.resume.allow_changes)  # the data position's own identity check
        run_record["changes"] = [*saved.get("changes", []),
                                 *([{"step": newest.step, "changes": {k: list(v) for k, v in allowed.items()}}]
                                   if allowed else [])]
        record.changes = (newest.path, newest.step, allowed)
        trainer.callbacks.append(record)  # writes config.yaml and the change record once the checkpoint has loaded
    if resume:
        universal = None
        if check_resumable(Path(resume), is_deepspeed(strategy), trainer.world_size):
            # ZeRO state saved on another number of ranks: resume from its universal form (rank 0 converts it)
            universal = reshard.prepare(Path(resume), trainer.world_size, launching_process(),
                                        timeout_s=60.0 * settings.strategy.timeout_minutes)
            reshard.enable_universal_load(strategy.config)
            resume = str(universal)
            trainer.callbacks.append(reshard.ElasticResume(universal))
    if not newest:  # a fresh run: nothing to refuse or load
        record.write(trainer)
    trained = settings.trainer["max_steps"] > 0  # 0: export the starting model as it is
    started = time.monotonic()
    if trained:
        parameters = sum(p.numel() for p in objective.parameters())
        log.info("training %s: %s parameters, steps %d -> %d, %s", type(objective).__name__, f"{parameters:,}",
                 resume_step or 0, settings.trainer["max_steps"], output_dir)
        try:  # checkpoints verified in newest_checkpoint
            trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
        except SIGTERMException:  # Ctrl-C or SIGTERM: a checkpoint was saved at the step reached (RunCheckpoint)
            saved = getattr(checkpoint, "interrupt_checkpoint", None)
            raise TrainingInterrupted(interrupt.received or "SIGTERM", trainer.global_step, trainer.max_steps,
                                      Path(saved) if saved else None, trainer.is_global_zero) from None
        except StoppedAtOnce:  # Ctrl-C pressed twice: nothing saved (the command line says so, status 130)
            raise KeyboardInterrupt from None
    seconds = time.monotonic() - started
    record.write(trainer)  # a resume with nothing left to train loaded its checkpoint but never started training

    exported: list[Path] = []
    if settings.run.export_hf:
        with full_parameters(trainer.strategy, objective):  # ZeRO-3: every rank takes part in the gather
            if trainer.is_global_zero:
                info = {"step": trainer.global_step, "output_dir": str(output_dir.resolve())}
                if start is not None and not trained:
                    exported = start.export_untrained(objective, output_dir, data.train_set.tokenizer_dir, info)
                else:
                    exported = export(objective, output_dir, data.train_set.tokenizer_dir, info)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero and trained:
        report = None
        if settings.run.report:
            try:
                report = write_report([output_dir])
            except Exception as err:  # the picture is a convenience: never fail a finished run over it
                log.warning("report.png not written (%s); draw it later with `python -m pretrain.report %s`",
                            err, output_dir)
        tokens_per_step = (data.seq_len * settings.data.batch_size * trainer.world_size
                           * trainer.accumulate_grad_batches)  # also when derived from data.global_batch_size
        summary = RunSummary(output_dir, trainer.global_step, trainer.max_steps, resume_step or 0, tokens_per_step,
                             seconds, metrics, exported, report, probe_summary(output_dir))
        log.info("\n".join(summary.lines()))
    return metrics, {"trainer": trainer, "module": module, "datamodule": data, "exported": exported,
                     "settings": settings}
