"""The Triton release GPU images ship today, installed once into a cache directory beside (not into) the project's
environment, for tests that must also pass under it (ahead-of-time compilation, the GPU check's dry run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_IMAGE_TRITON = "3.6.0"


def triton_for_gpu_images() -> Path:
    """The directory to put first on PYTHONPATH so that ``import triton`` gives Triton 3.6.

    Installed once per machine: the test processes (two under `make test`) take a lock first, and the install lands
    in a scratch directory renamed into place when complete, so no process ever sees half an install."""
    import fcntl
    import shutil

    target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deberta-pretrain" / \
        f"triton-{GPU_IMAGE_TRITON}"
    if (target / "triton" / "__init__.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if not (target / "triton" / "__init__.py").exists():
            scratch = target.with_name(f"{target.name}.partial-{os.getpid()}")
            shutil.rmtree(scratch, ignore_errors=True)
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                                   str(scratch), f"triton=={GPU_IMAGE_TRITON}"], capture_output=True, text=True,
                                  timeout=600)
            if done.returncode != 0:
                shutil.rmtree(scratch, ignore_errors=True)
                pytest.skip(f"could not install triton=={GPU_IMAGE_TRITON} into {target}: {done.stderr[-300:]}")
            shutil.rmtree(target, ignore_errors=True)  # an earlier install without triton/__init__.py: unfinished
            os.rename(scratch, target)
    return target
