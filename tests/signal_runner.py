"""Run ``python -m pretrain ARGS`` and signal its whole process group at a chosen event (used by
tests/test_signals_and_export.py), as ``scancel`` or Ctrl-C in a terminal do.

``python tests/signal_runner.py KIND:N ARGS...``, started as the leader of its own process group:

- ``term:N``      SIGTERM to the group at the start of the N-th training step this process runs (the batch is drawn,
  DataLoader workers are preparing the next ones);
- ``int-twice:N`` SIGINT to the group twice at the start of the N-th training step (Ctrl-C pressed twice);
- ``term-val:N``  SIGTERM to the group at the start of the N-th validation batch (not a sanity-check batch).

The production code paths run unchanged; only the moment of the signal is chosen, as a count, never a time.
"""

from __future__ import annotations

import functools
import os
import runpy
import subprocess
import sys

KIND, _, COUNT = sys.argv[1].rpartition(":")
AT = int(COUNT)
assert KIND in ("term", "int-twice", "term-val"), sys.argv[1]
_count = 0


def _signal_group() -> None:
    """Signal the group from a process outside it, as slurmstepd or a terminal does (torch's handler in a worker
    treats a SIGTERM from its own parent as a request to exit quietly). Returns once the signal is pending in every
    process of the group."""
    names = ["SIGINT", "SIGINT"] if KIND == "int-twice" else ["SIGTERM"]
    for name in names:
        subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({os.getpgid(0)}, signal.{name})"],
                       start_new_session=True, check=True)


def _patch(name: str) -> None:
    from pretrain.lightning_module import PretrainingModule

    real = getattr(PretrainingModule, name)

    @functools.wraps(real)
    def step(self, *args, **kwargs):
        global _count
        if not self.trainer.sanity_checking:
            _count += 1
            if _count == AT:
                _signal_group()
        return real(self, *args, **kwargs)

    setattr(PretrainingModule, name, step)


_patch("validation_step" if KIND == "term-val" else "training_step")
sys.argv = ["pretrain", *sys.argv[2:]]
runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
