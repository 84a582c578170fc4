"""``python -m pretrain.cooldown SOURCE --out NEW --decay-steps N [key=value ...]``: finish a warmup-stable-decay run
from one of its stable-phase checkpoints, in a new run directory.

Why: a WSD run (``optim.schedule=wsd``) trains at its peak LR for most of its steps, so any checkpoint of that stable
phase can be turned into a finished model by a short decay (ModernBERT; Hägele et al. 2024). One long run then
yields several finished models, and the decision of when to stop can wait for the curves.

A cool-down from step ``k`` is the run that planned its decay there: the source run's settings (its ``config.yaml``)
with ``trainer.max_steps = k + N`` and ``optim.decay_steps = N``, resumed from step ``k``'s checkpoint. Weights,
optimizer state and data position continue exactly, and the LR schedule, resumed in its stable phase, takes that
plan as it is (``pretrain.lr_schedule``), so the result equals, bitwise on CPU, a run started with those settings.

Why a command and not an override of ``python -m pretrain``: the cool-down must continue the source run's exact
settings, and the source's own record supplies them; a Hydra form would make the user repeat the source's whole
command line (any difference is refused by the resume check, but finding it is the user's work). Extra ``key=value``
arguments (``data.num_workers=4``, ``checkpoint_every_n_steps=500``, ``optim.decay_shape=linear``,
``trainer.devices=8``) change settings as on that command line; ones a resume compares are refused unless
``resume.allow_changes`` names them, as for any resume.

SOURCE is a checkpoint (``RUN/checkpoints/step-N.ckpt``, a DeepSpeed checkpoint directory, ``last.ckpt``) or a run
directory (its newest usable checkpoint). The source is only read: it is verified as a resume verifies it (checksums,
the restricted unpickler), copied into ``NEW/checkpoints/`` (checked against its sha256) with the source's
``metrics.csv`` rows up to step ``k`` (so NEW's metrics and report carry the model's whole history, in the source's
step numbering), and NEW resumes from that copy; the source run may keep training meanwhile. ``NEW/cooldown.json``
records where the cool-down came from. Re-running the same command resumes an interrupted cool-down. A cool-down
that cannot start (a bad setting, a change the resume refuses) prints one error line and leaves no NEW behind.
Settings the source resolved when it started (``trainer.num_nodes`` under SLURM) are the source's; override them
for another allocation (the global batch stays that of ``data.global_batch_size``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

RECORD = "cooldown.json"
PLANNED = ("output_dir", "trainer.max_steps", "optim.decay_steps", "optim.decay_fraction", "optim.schedule")
"""Keys the command sets itself; an override of one of them is refused."""

log = logging.getLogger("pretrain.cooldown")  # (not __main__ when run with -m)


class CooldownError(ValueError):
    """A source, destination or argument the cool-down cannot use; the message says what to do."""


def _run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to: ``RUN/checkpoints/X`` or SLURM's ``RUN/hpc_ckpt_N.ckpt``."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def find_source(source: Path) -> tuple[Path, Path]:
    """(checkpoint, its run directory), the checkpoint verified as a resume verifies it."""
    from pretrain.checkpointing.find import is_deepspeed_checkpoint, newest_checkpoint, verify_checkpoint

    if not source.exists():
        raise CooldownError(f"{source}: no such checkpoint or run directory")
    if source.is_dir() and not is_deepspeed_checkpoint(source):
        newest = newest_checkpoint(source)
        if newest is None:
            raise CooldownError(f"{source}: a directory without checkpoints; give a run directory (its output_dir) "
                                "or one of its checkpoints/step-N.ckpt")
        return newest.path, source
    verify_checkpoint(source)
    return source, _run_dir_of(source)


def source_schedule(metadata: dict[str, Any]):
    """The LR schedule saved in a checkpoint (``pretrain.lr_schedule.WarmupDecay``), or None."""
    from pretrain.lr_schedule import WarmupDecay

    states = [s for s in metadata.get("lr_schedulers") or [] if isinstance(s, dict)]
    saved = next((d for d in (states[0].get("lr_lambdas") or []) if isinstance(d, dict)), None) if states else None
    if saved is None:
        return None
    schedule = WarmupDecay.__new__(WarmupDecay)
    schedule.__dict__.update(saved)
    return schedule


def check_stable(checkpoint: Path, step: int, schedule) -> None:
    """The checkpoint lies in the warm-up's end or the stable phase of a wsd run: every step after warm-up trained
    at the peak LR, and the decay has not begun."""
    if schedule is None or schedule.schedule != "wsd":
        kind = "linear" if schedule is None else schedule.schedule
        raise CooldownError(f"{checkpoint} (step {step}) comes from a run with optim.schedule={kind}: a cool-down "
                            "starts the decay of a warmup-stable-decay run (train it with optim.schedule=wsd)")
    if step < schedule.warmup_steps:
        raise CooldownError(f"{checkpoint} is at step {step}, inside its warm-up (optim.warmup_steps="
                            f"{schedule.warmup_steps}): cool down from a checkpoint at step {schedule.warmup_steps} "
                            "or later")
    if step > schedule.decay_start or schedule(step - 1) != 1.0:
        raise CooldownError(f"{checkpoint} (step {step}) is past the stable phase of its run (its decay began at step "
                            f"{min(schedule.decay_start, step)}): cool down from a checkpoint at or before that step")


def check_destination(out: Path, run_dir: Path) -> None:
    out_real, run_real = out.resolve(), run_dir.resolve()
    if out_real == run_real or run_real in out_real.parents or out_real in run_real.parents:
        raise CooldownError(f"--out {out}: {'is' if out_real == run_real else 'overlaps'} the source run {run_dir}; a "
                            "cool-down writes into a new directory of its own: choose another --out")


def planned_record(checkpoint: Path, run_dir: Path, step: int, decay_steps: int) -> dict[str, Any]:
    return {"source_checkpoint": str(checkpoint.resolve()), "source_run": str(run_dir.resolve()), "step": step,
            "decay_steps": decay_steps, "max_steps": step + decay_steps}


def read_record(out: Path) -> dict[str, Any] | None:
    """The cool-down ``out`` holds (its ``cooldown.json``), or None for a new or empty directory; raise if ``out``
    holds anything else."""
    path = out / RECORD
    if path.is_file():
        try:
            held = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(held, dict) or not {"source_run", "source_checkpoint", "step", "decay_steps"} <= set(held):
                raise ValueError("not a cool-down record")
            return held
        except (OSError, ValueError) as err:
            raise CooldownError(f"{path}: unreadable ({err}); move {out} away or choose another --out") from None
    if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
        raise CooldownError(f"--out {out}: exists, is not empty and holds no cool-down ({RECORD}); choose a new "
                            "directory")
    return None


def _started(out: Path) -> bool:
    return any((out / "checkpoints").glob("*.ckpt"))


def copy_checkpoint(checkpoint: Path, destination: Path) -> None:
    """Copy a verified checkpoint file (with its ``.sha256``) or DeepSpeed directory to ``destination``, through a
    temp name in its directory. A file is hashed as it is read: the copy must hold the bytes the source's
    ``.sha256`` names (the source run may be writing new checkpoints meanwhile)."""
    import hashlib

    from data_prep.atomic_io import fsync_dir, write_atomic
    from pretrain.checkpointing.files import TEMP_MARK, checksum_path, temp_path
    from pretrain.checkpointing.find import CheckpointError, verify_checkpoint

    destination.parent.mkdir(parents=True, exist_ok=True)
    for stale in destination.parent.glob(f".{destination.name}{TEMP_MARK}*"):  # a copy a kill interrupted
        shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    source = checkpoint.resolve()
    temp = temp_path(destination)
    if source.is_dir():
        shutil.copytree(source, temp)
        verify_checkpoint(temp)  # every *.pt against the .sha256 copied beside it
        os.rename(temp, destination)
    else:
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(temp, "wb") as dst:
            while chunk := src.read(1 << 24):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        recorded = checksum_path(source)
        expected = recorded.read_text(encoding="ascii").split()[0] if recorded.exists() else digest.hexdigest()
        if digest.hexdigest() != expected:
            temp.unlink()
            raise CheckpointError(f"{checkpoint}: it no longer matches its {recorded.name} (changed while it was "
                                  "copied?); re-run the command")
        write_atomic(checksum_path(destination), f"{expected}  {destination.name}\n",
                     temp=temp_path(checksum_path(destination)))
        os.replace(temp, destination)
    fsync_dir(destination.parent)


def copy_metrics(run_dir: Path, out: Path, step: int) -> None:
    """The source's ``metrics.csv`` rows of steps 1..``step`` (the steps the checkpoint holds), into ``out``, in the
    1-based numbering (a source written before it counted from 0 and is shifted by one)."""
    import csv
    import io

    from data_prep.atomic_io import write_atomic
    from pretrain.run.loggers import counts_from_one, metrics_header, read_rows

    source = run_dir / "metrics.csv"
    header, rows = read_rows(str(source)) if source.is_file() else ([], [])
    shift = 0 if counts_from_one(header) else 1
    rows = [{**r, "step": str(int(float(r["step"])) + shift)} for r in rows]
    rows = [r for r in rows if int(r["step"]) <= step]
    (out / "metrics.csv").unlink(missing_ok=True)  # (left by a start that was interrupted before its checkpoint)
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=metrics_header(set(header).union(*rows)), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(out / "metrics.csv", buffer.getvalue(), temp=str(out / ".metrics.csv.tmp"))


def cooldown_config(run_dir: Path, out: Path, step: int, decay_steps: int, overrides: list[str]) -> DictConfig:
    """The source run's settings (``RUN/config.yaml``) planned to decay at ``step``, with the user's overrides."""
    record = run_dir / "config.yaml"
    if not record.is_file():
        raise CooldownError(f"{run_dir}: no config.yaml (the settings a run records when it starts); the cool-down "
                            "continues the source run's settings, so give a checkpoint inside its run directory")
    cleaned = []
    for override in overrides:
        key, equals, _ = override.lstrip("+").partition("=")
        if not equals:
            raise CooldownError(f"{override}: give settings as key=value (e.g. data.num_workers=4)")
        if key in PLANNED:
            raise CooldownError(f"{key}: set by the cool-down itself (--out, --decay-steps, and the source's step); "
                                "drop it from the command")
        cleaned.append(override.lstrip("+"))
    cfg = OmegaConf.load(record)
    planned = {"output_dir": str(out), "trainer": {"max_steps": step + decay_steps},
               "optim": {"schedule": "wsd", "decay_steps": decay_steps}}
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(cleaned), planned)


class _LogFileOnceReady(logging.FileHandler):
    """``NEW/pretrain.log``, opened at the first record after ``NEW`` exists (a refused command creates nothing)."""

    def emit(self, record: logging.LogRecord) -> None:
        if Path(self.baseFilename).parent.is_dir():
            super().emit(record)


def _configure_logging(out: Path) -> None:
    """Console and ``NEW/pretrain.log``, in the format of a ``python -m pretrain`` run (Hydra's). Lightning's note
    that the checkpoint's folder changed (it always has: the cool-down resumes a copy) is dropped."""
    import warnings

    form = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), _LogFileOnceReady(out / "pretrain.log", delay=True)):
        handler.setFormatter(form)
        root.addHandler(handler)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The dirpath has changed from")


def prepare(source: Path, out: Path, decay_steps: int, overrides: list[str]) -> tuple[DictConfig, Any]:
    """Check everything, then (launching process) make ``out`` a run that resumes from the source checkpoint; or,
    when ``out`` holds this cool-down already, the config that resumes it. Nothing is written when a check fails.
    Returns the config and its checked settings (``train`` takes both: the settings are checked once)."""
    from pretrain.checkpointing.find import read_metadata
    from pretrain.run.lock import RunLock, checkpoint_folder_lock, launching_process
    from pretrain.settings import settings_from_config

    if decay_steps < 1:
        raise CooldownError(f"--decay-steps {decay_steps}: give the length of the decay phase, 1 step or more")
    from pretrain.checkpointing.find import is_deepspeed_checkpoint

    check_destination(out, source if source.is_dir() and not is_deepspeed_checkpoint(source) else _run_dir_of(source))
    held = read_record(out)
    if held is not None and _started(out):  # the same command again: resume the cool-down (the source may be gone)
        if source.resolve() not in (Path(held["source_run"]), Path(held["source_checkpoint"])) or \
                held["decay_steps"] != decay_steps:
            raise CooldownError(f"--out {out} holds the cool-down of {held['source_checkpoint']} (step {held['step']}, "
                                f"{held['decay_steps']} decay steps): re-run that command to resume it, or choose "
                                "another --out")
        step = int(held["step"])
        record_dir = out if (out / "config.yaml").is_file() else Path(held["source_run"])
        cfg = cooldown_config(record_dir, out, step, decay_steps, overrides)
        settings = settings_from_config(cfg, warn=False)
        log.info("resuming the cool-down in %s (from step %d of %s)", out, step, held["source_checkpoint"])
        return cfg, settings
    checkpoint, run_dir = find_source(source)
    metadata = read_metadata(checkpoint)
    step = int(metadata["global_step"])
    check_stable(checkpoint, step, source_schedule(metadata))
    cfg = cooldown_config(run_dir, out, step, decay_steps, overrides)
    settings = settings_from_config(cfg, warn=False)  # a bad override: one line, before anything is written
    if not launching_process():  # another rank of the cool-down: the launching process prepares `out`
        _wait_for_preparation(out, step)
        return cfg, settings
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out), checkpoint_folder_lock(out):
        from data_prep.atomic_io import write_text_atomic

        record = planned_record(checkpoint, run_dir, step, decay_steps)
        write_text_atomic(out / RECORD, json.dumps(record, indent=2) + "\n")
        copy_metrics(run_dir, out, step)
        copy_checkpoint(checkpoint, out / "checkpoints" / f"step-{step:08d}.ckpt")  # last: NEW can now resume
    log.info("cool-down of %s from step %d: %d decay steps to step %d, in %s", checkpoint, step, decay_steps,
             step + decay_steps, out)
    return cfg, settings


def _wait_for_preparation(out: Path, step: int, timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out / "checkpoints" / f"step-{step:08d}.ckpt").exists():
        if time.monotonic() > deadline:
            raise CooldownError(f"{out}: the launching process did not copy the source checkpoint in "
                                f"{timeout_s:.0f} s")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.cooldown", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="example:\n  python -m pretrain.cooldown runs/wsd/checkpoints/step-00040000.ckpt --out runs/wsd-cd40k "
               "--decay-steps 4000\n\nRe-running the same command resumes an interrupted cool-down.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a stable-phase checkpoint of a wsd run, or its run directory "
                                                  "(newest checkpoint)")
    parser.add_argument("--out", type=Path, required=True, help="the cool-down's own run directory (new)")
    parser.add_argument("--decay-steps", type=int, required=True, help="length of the decay phase in steps")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings to change, as on the "
                        "python -m pretrain command line (data.num_workers=4, optim.decay_shape=linear)")
    args = parser.parse_intermixed_args(argv)  # key=value settings before, between or after the options

    from data_prep.cli_errors import one_line_errors
    from pretrain.run.command import run_training, user_errors
    from pretrain.run.interrupt import resume_command
    from pretrain.run.lock import launching_process

    _configure_logging(args.out)
    fresh = not args.out.exists()
    with one_line_errors(CooldownError, *user_errors(), where=args.out,
                         hint="free space or fix the path, then re-run the command") as outcome:
        cfg, settings = prepare(args.source, args.out, args.decay_steps, args.overrides)
    outcome.exit_on_error()
    again = resume_command(["python -m pretrain.cooldown", *(sys.argv[1:] if argv is None else argv)])
    try:
        run_training(cfg, again, settings)
    except SystemExit as stop:  # one error line printed: a cool-down refused before its first step leaves nothing
        if stop.code == 2 and fresh and launching_process() and not (args.out / "config.yaml").exists():
            shutil.rmtree(args.out, ignore_errors=True)
        raise


if __name__ == "__main__":
    main()
