"""Reading checkpoint files without running code from them.

A ``.ckpt``/``.pt`` file is a pickle, and a pickle can name any callable (``os.system``) to be called while it is
read. Checkpoints get copied between machines and users, so every checkpoint this project reads goes through
torch's restricted unpickler (``weights_only=True``), which only builds tensors, containers, primitives and the
few classes allow-listed here: the ones Lightning and DeepSpeed themselves put in the files they write (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on real ZeRO 1/2/3 checkpoints). Anything else is refused
with one message naming the file and the global it asked for.

DeepSpeed reads its own shard files with ``weights_only=False``, so ``pretrain.checkpoints.verify_checkpoint``
first loads every file of a checkpoint through :func:`load` (memory-mapped: the pickle is checked, tensor data is
not read); a crafted file is refused before anything unpickles it without restrictions.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

# (module, name) of every non-tensor class Lightning / DeepSpeed store in checkpoints this project writes.
_ALLOWED = [
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
]
_registered = False


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that is not a readable torch file (truncated, corrupt), or one that is refused."""


class ForbiddenContentError(UnsafeCheckpointError):
    """A file whose pickle names a global outside the allow-list: crafted, not merely damaged."""


def allowed_globals() -> list[Any]:
    """The allow-listed classes that are importable here (DeepSpeed is optional for non-ZeRO runs)."""
    found = []
    for module, name in _ALLOWED:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def register_allowed_globals() -> None:
    """Add the allow-list to torch's safe globals once per process, so Lightning's own ``weights_only=True``
    loads (``trainer.fit(..., weights_only=True)``) accept our files too."""
    global _registered
    if not _registered:
        torch.serialization.add_safe_globals(allowed_globals())
        _registered = True


def load(path: str | Path, mmap: bool = True) -> Any:
    """``torch.load`` with the restricted unpickler; raises :class:`UnsafeCheckpointError` naming ``path`` and
    why (a forbidden global, a truncated/corrupt file)."""
    register_allowed_globals()
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n\n")[0].strip().replace("\n", " ")
        if "Unsupported global" in reason or "unsupported" in reason.lower():
            raise ForbiddenContentError(
                f"{path}: refused to read: the file asks to run code that checkpoints written by this project never "
                f"contain ({reason[:300]}). Do not use this file; resume from another checkpoint") from None
        raise UnsafeCheckpointError(f"{path}: not a readable checkpoint ({reason[:300]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        reason = str(err).split("\n")[0][:300] or type(err).__name__
        raise UnsafeCheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({reason})") from None

