"""Import and export of the HuggingFace DebertaV2 format (``config.json`` + safetensors/bin + tokenizer files).

``from_pretrained(path)`` builds the native model from any DebertaV2 directory: HF saves of ``DebertaV2Model`` or
``DebertaV2ForMaskedLM`` (both MLM-head key layouts, ``legacy`` true/false), the original Microsoft checkpoints
(``pytorch_model.bin`` with ``lm_predictions.*`` or ``mask_predictions.*``), single-file or sharded.
``save_pretrained(model, path)`` writes a directory that ``transformers.AutoModel``/``AutoModelForMaskedLM`` load
with no missing, unexpected or newly initialised weights.

The native module tree uses the HF/original names, so the mapping is only about prefixes and the two MLM-head
layouts; see ``to_native_key`` and ``to_hf_state_dict``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data_prep.atomic_io import STAGING_MARK, write_directory_atomic
from pretrain.model import (
    ConfigError,
    DebertaConfig,
    DebertaForMaskedLM,
    DebertaForReplacedTokenDetection,
    DebertaModel,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# transformers has no RTD head class; the discriminator head travels next to the backbone in its own file, which
# transformers does not read (so AutoModel sees exactly a DebertaV2Model).
RTD_HEAD_WEIGHTS = "rtd_head.safetensors"
TOKENIZER_FILES = (
    "spm.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "data_prep_tokenizer.json",
)

# Legacy HF MLM head (`legacy=true`) -> native/original names.
_LEGACY_HEAD = {
    "cls.predictions.transform.dense.": "lm_predictions.lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_predictions.lm_head.LayerNorm.",
    "cls.predictions.bias": "lm_predictions.lm_head.bias",
}
# Keys that carry nothing the native model needs: a buffer some older HF saves contain, the legacy decoder weight
# (HF ties it to the word embeddings on load, so the word embeddings are what HF computes with) and its bias
# duplicate, and fine-tuning heads.
_IGNORED_EXACT = {"deberta.embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
_IGNORED_PREFIXES = ("pooler.", "classifier.", "qa_outputs.", "deberta.pooler.")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as described; the message names the file and the key."""


# ------------------------------------------------------------------------------------------------ reading
def load_config(path: str | os.PathLike, strict: bool = True) -> DebertaConfig:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; expected a HuggingFace DebertaV2 model directory")
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a DebertaV2 model directory needs config.json next to its "
                              "weights")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    try:
        return DebertaConfig.from_hf_dict(raw, source=str(config_file), strict=strict)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def _load_one(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the restricted unpickler refused it: nothing in it was run
        reason = " ".join(str(err).split("\n\n")[1:2]).strip() or str(err)[:200]
        raise CheckpointError(f"{file}: refused to read: not a plain weights file ({reason}); do not load it with "
                              "weights_only=False: re-download or re-export it") from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot be read as a weights file ({err}); re-download or re-export it") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: does not hold a state dict")
    return state


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a model directory and the file they came from: single files before sharded indexes,
    safetensors before pickled ``.bin`` (which is read with ``weights_only=True``)."""
    directory = Path(path)
    for name in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX):
        file = directory / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return _load_one(file), str(file)
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file}: malformed shard index ({err})") from err
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{file}: lists shard '{shard}', which is missing from {directory}")
            state.update(_load_one(directory / shard))
        return state, str(file)
    raise CheckpointError(f"{directory}: no weights found; expected {SAFE_WEIGHTS} or {TORCH_WEIGHTS} "
                          "(or a sharded index)")


def to_native_key(key: str) -> str | None:
    """Native name of a checkpoint key, or None when the key is to be ignored."""
    if key.startswith("bert."):  # very old saves
        key = "deberta." + key[len("bert."):]
    if key.startswith(("embeddings.", "encoder.")):  # a bare DebertaV2Model save
        key = "deberta." + key
    if key in _IGNORED_EXACT or key.startswith(_IGNORED_PREFIXES):
        return None
    for old, new in _LEGACY_HEAD.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _detect_head(keys: set[str]) -> str:
    if any(k.startswith("lm_predictions.") for k in keys):
        return "mlm"
    if any(k.startswith("mask_predictions.") for k in keys):
        return "rtd"
    return "none"


def from_pretrained(
    path: str | os.PathLike,
    head: str = "auto",
    strict_config: bool = True,
    dtype: torch.dtype = torch.float32,
    enhanced_mask_decoder: bool = True,
) -> DebertaModel | DebertaForMaskedLM | DebertaForReplacedTokenDetection:
    """Build the native model from a HuggingFace DebertaV2 directory.

    ``head``: "auto" (MLM model when the directory has an MLM head, RTD discriminator when it has the original
    ``mask_predictions`` head or an ``rtd_head.safetensors``, else the bare encoder), or "mlm"/"rtd"/"none" to
    force one; a forced head the checkpoint lacks is freshly initialised (logged). For MLM models the EMD's
    absolute position table is loaded when the checkpoint has it (original checkpoints do) and initialised
    otherwise (HF drops it), so continued pretraining with the EMD works from either.
    """
    directory = Path(path)
    config = load_config(directory, strict=strict_config)
    raw_state, source = read_state_dict(directory)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw_state.items():
        native = to_native_key(key)
        if native is not None and native not in state:
            state[native] = tensor
    rtd_file = directory / RTD_HEAD_WEIGHTS
    if rtd_file.is_file():
        state.update(_load_one(rtd_file))

    found = _detect_head(set(state))
    chosen = found if head == "auto" else head
    if chosen == "mlm":
        model: Any = DebertaForMaskedLM(config, enhanced_mask_decoder=enhanced_mask_decoder)
    elif chosen == "rtd":
        model = DebertaForReplacedTokenDetection(config)
    elif chosen == "none":
        model = DebertaModel(config)
        state = {k[len("deberta."):]: v for k, v in state.items() if k.startswith("deberta.")}
    else:
        raise ValueError(f"head must be 'auto', 'mlm', 'rtd' or 'none', got {head!r}")
    if chosen != "none":
        state = {k: v for k, v in state.items() if k.startswith("deberta.") or k.startswith(_head_prefix(chosen))}

    expected = model.state_dict()
    # Original checkpoints carry the absolute position table even when only the EMD uses it; a model without
    # the EMD (encoder, discriminator) does not need it, and HF drops it the same way.
    for key in ("embeddings.position_embeddings.weight", "deberta.embeddings.position_embeddings.weight"):
        if key in state and key not in expected:
            del state[key]
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                              f" for the architecture in config.json; the checkpoint and config.json disagree")
    optional = _optional_keys(model, chosen, found)
    missing = sorted(k for k in set(expected) - set(state) if k not in optional)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                              "the file is incomplete or was saved from a different architecture than config.json")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: tensor '{key}' has shape {list(tensor.shape)} but config.json implies "
                                  f"{list(expected[key].shape)}")
    fresh = sorted(set(expected) - set(state))
    if fresh:
        log.info("%s: initialised %d tensor(s) absent from the checkpoint: %s", directory, len(fresh), fresh)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return model.to(dtype)


def _head_prefix(head: str) -> str:
    return {"mlm": "lm_predictions.", "rtd": "mask_predictions."}[head]


def _optional_keys(model: torch.nn.Module, chosen: str, found: str) -> set[str]:
    """Tensors a checkpoint may legitimately lack: a head that was asked for but not saved, and the EMD's position
    table (HF never saves it when ``position_biased_input`` is false)."""
    keys = set()
    if chosen != found and chosen in ("mlm", "rtd"):
        keys |= {k for k in model.state_dict() if k.startswith(_head_prefix(chosen))}
    if not model.config.position_biased_input:
        prefix = "" if isinstance(model, DebertaModel) else "deberta."
        keys.add(prefix + "embeddings.position_embeddings.weight")
    return keys


# ------------------------------------------------------------------------------------------------ writing
def uses_legacy_head(config: DebertaConfig) -> bool:
    """HF's non-legacy head maps H -> H and multiplies by the (V, E) embeddings, so it cannot express
    ``embedding_size != hidden_size``; the legacy layout (H -> E transform + tied decoder) can."""
    return config.embedding_width != config.hidden_size


def to_hf_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights for ``model.safetensors``, RTD head weights or empty) in HF names, contiguous and unshared."""
    native = {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, DebertaModel):
        native = {"deberta." + k: v for k, v in native.items()}
    legacy = uses_legacy_head(model.config)
    main: dict[str, torch.Tensor] = {}
    rtd: dict[str, torch.Tensor] = {}
    for key, tensor in native.items():
        tensor = tensor.contiguous().clone()
        if key.startswith("mask_predictions."):
            rtd[key] = tensor
            continue
        if legacy and key.startswith("lm_predictions.lm_head."):
            for old, new in _LEGACY_HEAD.items():
                if key.startswith(new):
                    key = old + key[len(new):]
                    break
        if isinstance(model, DebertaModel):
            key = key[len("deberta."):]  # HF saves a bare DebertaV2Model without the prefix
        main[key] = tensor
    return main, rtd


def hf_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    import transformers

    config: DebertaConfig = model.config
    out = config.to_hf_dict()
    is_mlm = isinstance(model, DebertaForMaskedLM)
    out["architectures"] = ["DebertaV2ForMaskedLM" if is_mlm else "DebertaV2Model"]
    out["legacy"] = uses_legacy_head(config)
    out["tie_word_embeddings"] = True
    out["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    out["transformers_version"] = transformers.__version__
    return dict(sorted(out.items()))


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        source = Path(tokenizer)
        names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
        if not names:
            raise CheckpointError(f"{source}: no tokenizer files found (looked for {', '.join(TOKENIZER_FILES)})")
        for name in names:
            shutil.copy2(source / name, directory / name)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    else:
        raise TypeError("tokenizer must be a tokenizer directory or an object with save_pretrained()")


EXPORT_INFO = "export_info.json"  # what a directory was exported from (transformers does not read it)


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                    info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a HuggingFace DebertaV2 directory (safetensors, complete config.json, tokenizer files, and
    ``export_info.json`` with ``info``, e.g. the training step, when given).

    The directory is assembled next to ``path`` and swapped in at the end, so an interrupted export never
    leaves a half-written model where a finished one is expected.
    """
    if not isinstance(model, (DebertaModel, DebertaForMaskedLM, DebertaForReplacedTokenDetection)):
        raise TypeError(f"cannot export {type(model).__name__}; expected a native DeBERTa model")

    main, rtd = to_hf_state_dict(model)
    weights = {SAFE_WEIGHTS: main, **({RTD_HEAD_WEIGHTS: rtd} if rtd else {})}
    return write_model_directory(path, weights, hf_config_dict(model), tokenizer, info)


def write_model_directory(path: str | os.PathLike, weights: dict[str, dict[str, torch.Tensor]],
                          config: dict[str, Any], tokenizer: Any = None, info: dict[str, Any] | None = None) -> Path:
    """Write a transformers model directory: each state dict of ``weights`` as the safetensors file it is keyed
    by, ``config`` as config.json, the tokenizer files of a directory or tokenizer object, and ``info`` as
    export_info.json; assembled beside ``path`` and swapped in whole (:func:`write_directory`)."""
    def fill(staging: Path) -> None:
        for name, state in weights.items():
            save_file(state, str(staging / name), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _save_tokenizer(tokenizer, staging)

    return write_directory(path, fill, info)


def write_directory(path: str | os.PathLike, fill, info: dict[str, Any] | None = None) -> Path:
    """Assemble a model directory with ``fill(staging)`` in ``.<name>.tmp-<pid>-*`` beside ``path`` and swap it in
    whole (:func:`data_prep.atomic_io.write_directory_atomic`: the user's modes, fsynced, one exchange). A failed
    write (a full disk) raises ``OSError`` naming ``path``, the destination, and leaves ``path`` as it was."""
    target = Path(path)

    def fill_with_info(staging: Path) -> None:
        try:
            fill(staging)
        except SafetensorError as err:  # a failed write (ENOSPC), reported as "... I/O error: ... (os error 28)"
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(target)) from None
        if info is not None:
            (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return write_directory_atomic(target, fill_with_info)


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Delete what killed exports left beside ``parent/name``: ``.<name>.tmp-*`` (a directory being assembled, or
    the previous export just swapped out) and ``.<name>.old-*`` (older versions). Only safe while the caller holds
    the lock on ``parent`` (every export into an output directory does: :mod:`pretrain.run.lock`), so no live export
    is writing there."""
    removed = []
    if parent.is_dir():
        for pattern in (f".{name}{STAGING_MARK}*", f".{name}.old-*"):
            for stale in parent.glob(pattern):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                    removed.append(stale)
    return removed
