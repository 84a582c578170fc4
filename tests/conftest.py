"""Test-wide settings: no network for wandb, deterministic torch, small thread count (CI has 2 cores)."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
