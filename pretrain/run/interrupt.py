"""Ctrl-C and SIGTERM stop a run at the end of the current optimizer step, with a checkpoint, and say how to resume.

Why this shape: Lightning already turns SIGTERM into a clean stop, raising ``SIGTERMException`` between steps (and
on SLURM its requeue signal saves ``hpc_ckpt_N`` and requeues the job; both stay as they are). Ctrl-C, however,
raises ``KeyboardInterrupt`` wherever the main thread happens to be (mid optimizer step) and Lightning then exits
without saving, so everything since the last periodic checkpoint was lost. :class:`StopOnInterrupt` makes the first
Ctrl-C request the same clean stop as SIGTERM (a second Ctrl-C stops at once, without saving: it raises
:class:`StoppedAtOnce`, which Lightning does not turn into its own message and exit status 1), and
:class:`pretrain.checkpointing.callbacks.RunCheckpoint` saves a checkpoint when the stop arrives. ``train`` then raises
:class:`TrainingInterrupted`, and the command line prints one line with the command that resumes the run.

A signal that arrives during a validation is held until the evaluation has finished (:class:`StopOnInterrupt`),
so its ``val/loss`` is logged before the stop; Lightning would abandon the evaluation half-way.

Clusters signal every process of a job step (``scancel`` sends SIGTERM to the whole process group, DataLoader
workers included), as a terminal does with Ctrl-C. A worker killed by it ends the run with "DataLoader worker
killed by signal" before the main process reaches the end of its step, so nothing is saved. Workers therefore
ignore both signals (:func:`worker_ignores_stop_signals`); only the main process decides when to stop, and the
workers end with it. :class:`SignalSafeDataLoader` closes the gap between a worker's start and its
``worker_init_fn``.
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
from torch.utils.data import DataLoader

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


class StoppedAtOnce(BaseException):
    """A second Ctrl-C: stop now without saving. Not a ``KeyboardInterrupt``: Lightning catches those, prints its own
    message and exits with status 1; this one passes through ``trainer.fit`` (after Lightning's teardown) and
    ``train`` turns it back into ``KeyboardInterrupt`` for the command line's line and status 130."""


class StopOnInterrupt(Callback):
    """While fitting, Ctrl-C (SIGINT) asks Lightning for the clean stop it performs on SIGTERM; a stop asked for
    during a validation waits until that evaluation is complete."""

    def __init__(self) -> None:
        self.received: str | None = None  # the name of the signal that stopped the run
        self._previous = None
        self._held = False  # a stop that arrived during a validation, passed on once the evaluation is complete

    def setup(self, trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame) -> None:
            if self.received is not None:  # asked twice: stop now, without saving
                raise StoppedAtOnce
            self.received = "SIGINT"
            trainer._signal_connector.received_sigterm = True  # Lightning stops after this step (as on SIGTERM)
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop at once, without saving)",
                  file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_sigint)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # Lightning checks for a stop right after this hook and would abandon the evaluation (its val/loss lost);
        # hold the request until the evaluation is complete. The training loop stops after it, with a checkpoint.
        if not trainer.sanity_checking and trainer.received_sigterm:
            self._held = True
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._held or trainer.received_sigterm:
            self._held = False
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.received is None and trainer.received_sigterm:
            self.received = "SIGTERM"

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _exit_when_the_parent_terminates(parent: int) -> None:
    """In a worker: SIGTERM is blocked and picked up here with its sender; the DataLoader's own shutdown of a worker
    that does not end by itself (``Process.terminate()``, sent by the main process) still ends it, as torch's
    handler does. SIGTERM from anyone else (``scancel``, ``kill -TERM -PGID``) is ignored."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def worker_ignores_stop_signals(worker_id: int, rank: int = 0) -> None:
    """``worker_init_fn`` of the training DataLoader: Ctrl-C in a terminal and ``scancel`` reach every process of the
    group, and a worker that died of them would end the run before the main process reaches the end of its step
    and saves. The main process alone decides when to stop (see the module docstring). Lightning's worker seeding
    (which this replaces) still runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Kept blocked (SignalSafeDataLoader started the worker with both blocked): a SIGTERM then waits for the thread
    # below, which knows who sent it. SIGINT is ignored outright.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_exit_when_the_parent_terminates, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)


class SignalSafeDataLoader(DataLoader):
    """A DataLoader whose worker processes start with SIGINT and SIGTERM blocked, until their ``worker_init_fn``
    (:func:`worker_ignores_stop_signals`) has set them to be ignored: a signal to the process group while workers
    start cannot kill one. In the main process the two signals are held for that moment and delivered right
    after."""

    def _get_iterator(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super()._get_iterator()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
