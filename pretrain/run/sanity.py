"""Start-up warnings for settings that run but make little sense together (never fatal: the run may be a test).

Why: scaling an experiment down (``+experiment=v3_xsmall trainer.max_steps=200`` on a laptop) silently keeps
settings chosen for a cluster: a warm-up longer than the run, bf16 autocast on a CPU, more DataLoader workers than
cores, a generator checkpoint for an objective without a generator. One line each says what was found and what to
change.
"""

from __future__ import annotations

import os
from typing import Any


def sanity_warnings(warmup_steps: int, max_steps: int, accelerator: str, precision: Any, num_workers: int,
                    cuda_available: bool, cpu_count: int | None = None, objective: str = "rtd",
                    init_generator_from: str | None = None) -> list[str]:
    """The warnings for these settings, one message each (empty when nothing looks off)."""
    found = []
    if max_steps > 0 and warmup_steps >= max_steps:
        found.append(f"optim.warmup_steps={warmup_steps} >= trainer.max_steps={max_steps}: the learning rate never "
                     f"leaves its warm-up; set optim.warmup_steps to a few percent of max_steps")
    on_cpu = accelerator == "cpu" or (accelerator in ("auto", None) and not cuda_available)
    if on_cpu and str(precision).startswith(("bf16", "16")):
        found.append(f"trainer.precision={precision} on a CPU: autocast there is slow and is not what a GPU run "
                     f"computes; use trainer.precision=32-true for CPU runs")
    cores = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                     else os.cpu_count() or 1)
    if num_workers > cores:
        found.append(f"data.num_workers={num_workers} > {cores} CPU cores here: the loader processes compete with "
                     f"training; use data.num_workers={max(0, cores - 1)} or fewer")
    if init_generator_from and objective != "rtd":
        found.append(f"model.init_generator_from={init_generator_from} is not used by objective={objective} (only "
                     f"replaced-token detection has a generator): remove it, or use objective=rtd")
    return found
