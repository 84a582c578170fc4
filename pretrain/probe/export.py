"""A fine-tuned probe model as a transformers directory, and back.

``save_task_model`` writes what ``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` load
with no missing or newly initialised weights (the native names already are transformers'); ``load_task_model``
reads such a directory, from this project or from transformers, into the native task model. The directory is
assembled beside its destination and swapped in whole (:func:`pretrain.hf.write_model_directory`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pretrain import hf
from pretrain.model import ConfigError, DebertaConfig
from pretrain.model.task_heads import (
    DebertaForSequenceClassification,
    DebertaForTokenClassification,
    HeadConfig,
    task_model,
)

ARCHITECTURES = {"classification": "DebertaV2ForSequenceClassification",
                 "regression": "DebertaV2ForSequenceClassification",
                 "token_classification": "DebertaV2ForTokenClassification"}
_HEAD_KEYS = ("num_labels", "cls_dropout", "pooler_hidden_size")


def task_config_dict(model: DebertaForSequenceClassification | DebertaForTokenClassification) -> dict[str, Any]:
    import transformers

    out = model.config.to_hf_dict()
    out.update({k: v for k, v in model.head.to_hf_dict().items() if v is not None})
    out["architectures"] = [ARCHITECTURES[model.head.task_type]]
    out["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    out["transformers_version"] = transformers.__version__
    return dict(sorted(out.items()))


def save_task_model(model: DebertaForSequenceClassification | DebertaForTokenClassification,
                    path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` (and the tokenizer files of a directory or tokenizer object) as a transformers directory."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return hf.write_model_directory(path, {hf.SAFE_WEIGHTS: state}, task_config_dict(model), tokenizer)


def head_config_from_hf(raw: dict[str, Any], source: str) -> HeadConfig:
    """The head a transformers ``config.json`` describes (architecture, labels, pooler, problem type)."""
    arch = (raw.get("architectures") or [""])[0]
    if arch == "DebertaV2ForTokenClassification":
        task_type = "token_classification"
    elif arch == "DebertaV2ForSequenceClassification":
        task_type = "regression" if raw.get("problem_type") == "regression" or raw.get("num_labels") == 1 \
            or len(raw.get("id2label") or {}) == 1 else "classification"
    else:
        raise hf.CheckpointError(f"{source}: architectures = {raw.get('architectures')}; expected "
                                 "DebertaV2ForSequenceClassification or DebertaV2ForTokenClassification")
    labels: list[str] = []
    if task_type != "regression":
        id2label = raw.get("id2label") or {}
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    pooler_size = raw.get("pooler_hidden_size", raw.get("hidden_size"))
    if pooler_size != raw.get("hidden_size"):
        raise hf.CheckpointError(f"{source}: pooler_hidden_size {pooler_size} != hidden_size {raw.get('hidden_size')};"
                                 " transformers' classifier reads a pooler output of hidden_size")
    return HeadConfig(task_type, labels, raw.get("pooler_hidden_act", "gelu"), raw.get("pooler_dropout", 0.0),
                      raw.get("cls_dropout"))


def load_task_model(path: str | os.PathLike) -> DebertaForSequenceClassification | DebertaForTokenClassification:
    """A fine-tuned DebertaV2 classification directory as the native task model (every tensor must be there)."""
    directory = Path(path)
    config_file = directory / hf.CONFIG_NAME
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise hf.CheckpointError(f"{config_file}: cannot be read as JSON ({err})") from None
    head = head_config_from_hf(raw, str(config_file))
    try:
        config = DebertaConfig.from_hf_dict({k: v for k, v in raw.items() if k not in _HEAD_KEYS}, str(config_file))
    except ConfigError as err:
        raise hf.CheckpointError(str(err)) from None
    model = task_model(config, head)
    state, source = hf.read_state_dict(directory)
    state = {k: v for k, v in state.items() if k != "deberta.embeddings.position_ids"}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise hf.CheckpointError(f"{source}: missing tensor(s) {missing[:5]}, unexpected {unexpected[:5]} for a "
                                 f"{type(model).__name__} as config.json describes it")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model
