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
    """The directory to put first on PYTHONPATH so that ``import triton`` gives Triton 3.6."""
    target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deberta-pretrain" / \
        f"triton-{GPU_IMAGE_TRITON}"
    if not (target / "triton" / "__init__.py").exists():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                               str(target), f"triton=={GPU_IMAGE_TRITON}"], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            pytest.skip(f"could not install triton=={GPU_IMAGE_TRITON} into {target}: {done.stderr[-300:]}")
    return target
