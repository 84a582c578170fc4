"""Reading checkpoint files without running code from them.

A ``.ckpt``/``.pt`` file is a pickle, and a pickle can name any callable (``os.system``) to be called while it is
read. Checkpoints get copied between machines and users, so every checkpoint this project reads goes through
torch's restricted unpickler (``weights_only=True``), which only builds tensors, containers, primitives and the
few classes allow-listed here: the ones Lightning and DeepSpeed themselves put in the files they write (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on real ZeRO 1/2/3 checkpoints). Anything else is refused
with one message naming the file and the global it asked for.

DeepSpeed reads its own shard files with ``weights_only=False``, so ``pretrain.checkpointing.find.verify_checkpoint``
first loads every file of a checkpoint through :func:`load` (memory-mapped: the pickle is checked, tensor data is
not read); a crafted file is refused before anything unpickles it without restrictions. DeepSpeed is then told
which tag directory to load, so it cannot be led by a ``latest`` file to files that were not checked.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

# (module, name) of every non-tensor class DeepSpeed stores in its ZeRO checkpoint files (Lightning's own files
# need none). Registered only when a DeepSpeed checkpoint is read: importing DeepSpeed costs seconds.
_DEEPSPEED_ALLOWED = [
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


def register_deepspeed_globals() -> None:
    """Add DeepSpeed's checkpoint classes to torch's safe globals (once per process)."""
    global _registered
    if _registered:
        return
    found = []
    for module, name in _DEEPSPEED_ALLOWED:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # an older/newer DeepSpeed without this class: its files cannot contain it either
    torch.serialization.add_safe_globals(found)
    _registered = True


def load(path: str | Path, mmap: bool = True, deepspeed: bool = False) -> Any:
    """``torch.load`` with the restricted unpickler (plus DeepSpeed's classes for a file of a ZeRO checkpoint);
    raises :class:`UnsafeCheckpointError` naming ``path`` and why (a forbidden global, a truncated/corrupt file)."""
    if deepspeed:
        register_deepspeed_globals()
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message: a paragraph about the weights_only default, then the unpickler's reason
        paragraphs = [p.strip().replace("\n", " ") for p in str(err).split("\n\n") if p.strip()]
        named = [p for p in paragraphs if "GLOBAL" in p or "Unsupported global" in p]
        if named:
            raise ForbiddenContentError(
                f"{path}: refused to read: the file asks to run code that checkpoints written by this project never "
                f"contain ({named[0][:300]}). Do not use this file; resume from another checkpoint") from None
        reason = paragraphs[1] if len(paragraphs) > 1 else (paragraphs[0] if paragraphs else type(err).__name__)
        raise UnsafeCheckpointError(f"{path}: not a readable checkpoint ({reason[:300]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        reason = str(err).split("\n")[0][:300] or type(err).__name__
        raise UnsafeCheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({reason})") from None

