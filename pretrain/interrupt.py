"""Ctrl-C and SIGTERM stop a run at the end of the current optimizer step, with a checkpoint, and say how to resume.

Why this shape: Lightning already turns SIGTERM into a clean stop, raising ``SIGTERMException`` between steps (and
on SLURM its requeue signal saves ``hpc_ckpt_N`` and requeues the job; both stay as they are). Ctrl-C, however,
raises ``KeyboardInterrupt`` wherever the main thread happens to be (mid optimizer step) and Lightning then exits
without saving, so everything since the last periodic checkpoint was lost. :class:`StopOnInterrupt` makes the first
Ctrl-C request the same clean stop as SIGTERM (a second Ctrl-C stops at once, without saving), and
:class:`pretrain.checkpoint_io.RunCheckpoint` saves a checkpoint when the stop arrives. ``train`` then raises
:class:`TrainingInterrupted`, and the command line prints one line with the command that resumes the run.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` at ``step``; re-running the command resumes."""

    def __init__(self, signal_name: str, step: int, max_steps: int, checkpoint: Path | None,
                 announce: bool = True) -> None:
        self.signal_name, self.step, self.max_steps, self.checkpoint = signal_name, step, max_steps, checkpoint
        self.announce = announce  # global rank 0 says how to resume; the other ranks stop quietly
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step was completed)"
        super().__init__(f"{signal_name}: stopped at step {step}/{max_steps}, {saved}")

    @property
    def exit_status(self) -> int:
        """The shell's convention for death by a signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that started this process, as the user would type it again."""
    argv = list(sys.argv if argv is None else argv)
    program = argv[0] if argv else "python -m pretrain"
    if program.endswith("__main__.py"):  # `python -m pretrain ...`
        program = f"python -m {Path(program).parent.name}"
    else:
        program = os.path.basename(program)  # the console script, e.g. deberta-pretrain
    return " ".join([program, *map(shlex.quote, argv[1:])])


class StopOnInterrupt(Callback):
    """While fitting, Ctrl-C (SIGINT) asks Lightning for the clean stop it performs on SIGTERM."""

    def __init__(self) -> None:
        self.received: str | None = None  # the name of the signal that stopped the run
        self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame) -> None:
            if self.received is not None:  # asked twice: stop now, without saving
                raise KeyboardInterrupt
            self.received = "SIGINT"
            trainer._signal_connector.received_sigterm = True  # Lightning stops after this step (as on SIGTERM)
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop at once, without saving)",
                  file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_sigint)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.received is None and trainer.received_sigterm:
            self.received = "SIGTERM"

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def worker_ignores_sigint(worker_id: int, rank: int = 0) -> None:
    """``worker_init_fn`` of the training DataLoader: Ctrl-C in a terminal reaches every process of its group, and a
    worker that died of it would end the run before the main process reaches the end of its step and saves. The
    main process alone decides when to stop. Lightning's worker seeding (which this replaces) still runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)
