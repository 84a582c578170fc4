"""``python -m pretrain.probe --watch RUN``: probe each checkpoint of a training run as it is written.

The watcher only reads the run: it never takes the run's lock (it asks the kernel whether someone holds it, with
``F_GETLK``, which takes nothing), never writes into ``RUN/checkpoints`` and never signals the training process. Its
own output goes to ``--out`` (default ``RUN/probes/``: ``probes.csv``, ``tasks.json`` and the ``.models/`` exports).

Which checkpoints are read. A save is complete once it is renamed into place *and* its ``NAME.sha256`` is beside it
(:mod:`pretrain.checkpointing.files` writes the checksum right after the rename); a DeepSpeed directory once its
``latest`` file is there and every rank's shard has its checksum (rank 0 writes ``latest`` without waiting for the
other ranks; their number is in rank 0's record). While the run is live only ``step-N.ckpt`` and
``hpc_ckpt_N.ckpt`` are read: ``last.ckpt`` is rewritten in place at every save (it is a copy of the newest
``step-N``, or under DeepSpeed a link to it). Each checkpoint is verified against its
checksum before it is loaded; one that fails is skipped with the reason, named once, and tried again only if it is
rewritten. One that the run deletes first (``save_top_k`` keeps the newest two) is skipped with a note.

When the watch ends. The run has finished when its lock ``RUN/.lock`` is free (no training process) *and* it
reached its end: a checkpoint at ``trainer.max_steps`` (from ``RUN/config.yaml``), or ``RUN/hf/export_info.json``
at that step (or, with no ``config.yaml``, any ``export_info.json``). On a filesystem without locks the end alone
decides. The run's state is read before the checkpoints are listed, so a finished run's last look sees every
checkpoint it wrote; the watch ends after probing them. A run that stopped before its end (a crash, or a SLURM job
waiting to be requeued) is waited for, up to ``--give-up-after`` minutes without a new checkpoint.

Kills. Every (model, step, task, seed) cell is appended to ``probes.csv`` in one atomic write, and cells already
there are skipped, so a killed watch started again goes on from the first missing cell.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import struct
import sys
import time
from pathlib import Path

from pretrain.checkpointing.files import checksum_path
from pretrain.probe import models
from pretrain.probe.tasks import Task
from pretrain.run.lock import LOCK_NAME  # only its name: the watch looks at the lock, never takes it

_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid


def lock_held(run: Path) -> bool | None:
    """Whether a process holds ``RUN/.lock`` (a live training run or export); None when the filesystem cannot
    tell. Uses ``F_GETLK``, which reports a conflicting lock without taking one."""
    try:
        fd = os.open(run / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False  # never started
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise
    finally:
        os.close(fd)


def max_steps(run: Path) -> int | None:
    """``trainer.max_steps`` from the run's ``config.yaml`` (written when training starts), or None."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.load(run / "config.yaml"), "trainer.max_steps")
    except Exception:  # absent, or unreadable for now (rewritten by a resume): looked at again at the next poll
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def exported_step(run: Path) -> int | None:
    try:
        return int(json.loads((run / "hf" / "export_info.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _complete(path: Path, live: bool) -> bool:
    if path.is_dir():
        return (path / "latest").is_file()
    return checksum_path(path).is_file() or (not live and path.is_file())


def ready_checkpoints(run: Path, live: bool) -> list[Path]:
    """The run's complete checkpoints, oldest first (``last.ckpt`` only once the run is no longer live)."""
    folder = run / "checkpoints"
    paths = sorted((p for p in folder.glob("step-*.ckpt") if re.fullmatch(r"step-\d+\.ckpt", p.name)),
                   key=lambda p: int(p.name[5:-5]))
    paths += sorted((p for p in run.glob("hpc_ckpt_*.ckpt") if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", p.name)),
                    key=lambda p: int(p.name[9:-5]))
    if not live:
        paths.append(folder / "last.ckpt")
    return [p for p in paths if _complete(p, live)]


def _signature(path: Path) -> tuple[int, int] | None:
    """What identifies one write of a checkpoint (a rewrite is looked at again); None once it is gone."""
    try:
        stat = (path / "latest").stat() if path.is_dir() else path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class Watch:
    def __init__(self, run: Path, tasks: list[Task], args: argparse.Namespace) -> None:
        self.run, self.tasks, self.args = run, tasks, args
        self.name = str(run)
        self.looked: dict[Path, tuple[int, int]] = {}  # checkpoint -> the write already probed or skipped
        self.gone: set[Path] = set()
        self.steps: set[int] = set()  # pretraining steps probed (last.ckpt repeats one of them)
        self.random_done = not args.random_init

    def state(self) -> tuple[str, str]:
        """("live" | "finished" | "stopped", why), read before the checkpoints are listed."""
        held = lock_held(self.run)
        if held:
            return "live", f"{self.run / LOCK_NAME} is held"
        end = max_steps(self.run)
        named = [int(p.name[5:-5]) for p in ready_checkpoints(self.run, live=True) if p.name.startswith("step-")]
        reached = [s for s in [exported_step(self.run), *self.steps, *named] if s is not None]
        if end is None and exported_step(self.run) is not None:
            return "finished", "hf/export_info.json written"
        if end is not None and reached and max(reached) >= end:
            return "finished", f"step {max(reached)} of max_steps {end} reached"
        if held is None:
            return "live", "the filesystem has no locks, and the run has not reached its end"
        if not (self.run / LOCK_NAME).exists():
            return "stopped", f"not started yet (no {self.run / LOCK_NAME})"
        at = f"step {max(reached)}" if reached else "no checkpoint"
        return "stopped", f"no process holds {self.run / LOCK_NAME}, at {at} of max_steps {end or '?'}"

    def look(self, live: bool) -> int:
        """Probe every complete checkpoint not looked at yet; returns how many were new."""
        from pretrain.checkpointing.find import CheckpointError, read_metadata
        from pretrain.probe.cells import probe_source

        new = 0
        for path in ready_checkpoints(self.run, live):
            signature = _signature(path)
            if signature is None:  # listed, then deleted by the run's rotation
                if path not in self.gone:
                    self.gone.add(path)
                    self._skip(path, "")
                continue
            if self.looked.get(path) == signature:
                continue
            self.looked[path] = signature
            new += 1
            try:
                metadata = read_metadata(path)
                step = int(metadata["global_step"])
            except (CheckpointError, KeyError, TypeError, ValueError) as err:
                self._skip(path, str(err).removeprefix(f"{path}: "))
                continue
            if live and models.unfinished_deepspeed_save(path, metadata, live=True):
                del self.looked[path]  # another rank is still writing its shard: looked at again next time
                new -= 1
                continue
            if step in self.steps:
                continue
            source = models.ModelSource(self.name, step, "checkpoint", path)
            skipped = probe_source(source, self.tasks, self.args)
            if skipped:
                self._skip(path, skipped.removeprefix(f"{path}: "))
                continue
            self.steps.add(step)
            if not self.random_done:  # the run's architecture and tokenizer, with fresh weights
                directory = models.materialise(source, self.args.out)
                probe_source(models.ModelSource(f"random:{self.name}", 0, "random", directory), self.tasks, self.args)
                self.random_done = True
        return new

    def _skip(self, path: Path, reason: str) -> None:
        if not os.path.exists(path):
            print(f"note: {path} was removed by the run (save_top_k keeps the newest) before it was probed; "
                  "skipped", file=sys.stderr, flush=True)
        else:
            print(f"warning: skipping {path}: {reason}", file=sys.stderr, flush=True)

    def follow(self) -> None:
        stopped_since: float | None = None
        said = ""
        while True:
            state, why = self.state()
            new = self.look(live=state != "finished")
            if state == "finished":
                print(f"{self.run}: run finished ({why}); every checkpoint probed", flush=True)
                return
            if state == "stopped":
                stopped_since = time.monotonic() if stopped_since is None or new else stopped_since
                if time.monotonic() - stopped_since >= 60 * self.args.give_up_after:
                    print(f"warning: {self.run}: stopped before its end ({why}) for {self.args.give_up_after:g} "
                          "min; giving up. Run the same command again once training resumes", file=sys.stderr)
                    return
            else:
                stopped_since = None
            if why != said:
                print(f"watching {self.run}: {state} ({why}); looking every {self.args.poll:g} s", flush=True)
                said = why
            time.sleep(self.args.poll)


def check_run(run: Path) -> None:
    """A RUN that can never become a run directory is refused at once (one that does not exist yet is waited for:
    the probe job may start before training has made it)."""
    if run.exists() and not run.is_dir():
        raise models.ModelError(f"{run}: --watch needs a run directory (training's output_dir), and this is a file; "
                                "to probe one checkpoint, give it as MODEL instead of --watch")
    if (run / "config.json").is_file() and not (run / "checkpoints").exists():
        raise models.ModelError(f"{run}: a model directory, not a training run (no checkpoints/); probe it as MODEL "
                                f"(`python -m pretrain.probe {run} --task ...`)")


def watch(run: Path, tasks: list[Task], args: argparse.Namespace) -> None:
    check_run(Path(run))
    Watch(Path(run), tasks, args).follow()
