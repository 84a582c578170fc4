"""Fine-tuning heads: sequence classification/regression and token classification on the native encoder.

They compute what transformers' ``DebertaV2ForSequenceClassification`` / ``DebertaV2ForTokenClassification``
compute, with the same parameter names (``deberta.*``, ``pooler.dense.*``, ``classifier.*``), so a probe fine-tuned
here exports to a directory transformers loads as-is, and a transformers fine-tune loads here. Built on the native
encoder so fine-tuning uses the same attention backends (the fused path on a GPU) as pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.activations import activation
from pretrain.model.config import DebertaConfig
from pretrain.model.deberta import IGNORE_INDEX, DebertaModel, DebertaPreTrained, init_weights

TASK_TYPES = ("classification", "regression", "token_classification")


@dataclass
class HeadConfig:
    """What a task head adds to the encoder's architecture, in ``DebertaV2Config`` field names.

    ``labels`` is the ordered label list (index = class id); a regression head has one output and no labels.
    ``cls_dropout=None`` means ``hidden_dropout_prob``, as in transformers.
    """

    task_type: str
    labels: list[str] = field(default_factory=list)
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task type {self.task_type!r} is not one of {', '.join(TASK_TYPES)}")
        if self.task_type == "regression" and self.labels:
            raise ValueError("a regression head has no label list")
        if self.task_type != "regression" and len(self.labels) < 2:
            raise ValueError(f"a {self.task_type} head needs at least 2 labels, got {self.labels}")
        activation(self.pooler_hidden_act)  # rejects names whose meaning is not reproduced exactly

    @property
    def num_labels(self) -> int:
        return 1 if self.task_type == "regression" else len(self.labels)

    def to_hf_dict(self) -> dict:
        """The config.json keys transformers reads for the head (labels, problem type, pooler)."""
        out = {"num_labels": self.num_labels, "pooler_hidden_act": self.pooler_hidden_act,
               "pooler_dropout": self.pooler_dropout, "cls_dropout": self.cls_dropout}
        if self.task_type == "regression":
            out["problem_type"] = "regression"
        else:
            out["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
            out["label2id"] = {name: i for i, name in enumerate(self.labels)}
            if self.task_type == "classification":
                out["problem_type"] = "single_label_classification"
        return out


@dataclass
class TaskOutput:
    logits: torch.Tensor  # (B, C) sequence classification, (B,) regression, (B, L, C) token classification
    loss: torch.Tensor | None = None


class ContextPooler(nn.Module):
    """``act(dense(dropout(h[CLS])))``: transformers' ``ContextPooler`` (the original ``ContextPooler``)."""

    def __init__(self, config: DebertaConfig, head: HeadConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(head.pooler_dropout)
        self.act = activation(head.pooler_hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(self.dropout(hidden[:, 0])))


class _TaskModel(DebertaPreTrained):
    def __init__(self, config: DebertaConfig, head: HeadConfig, encoder: DebertaModel | None):
        super().__init__()
        self.config = config
        self.head = head
        self.deberta = DebertaModel(config) if encoder is None else encoder
        drop = config.hidden_dropout_prob if head.cls_dropout is None else head.cls_dropout
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, head.num_labels)


class DebertaForSequenceClassification(_TaskModel):
    """Encoder + pooler + linear classifier (one text or a pair); one output and MSE loss for regression.

    ``encoder``: a pretrained :class:`DebertaModel` to fine-tune (taken over, not copied); the head is freshly
    initialised the way transformers initialises it (N(0, initializer_range), zero bias).
    """

    def __init__(self, config: DebertaConfig, head: HeadConfig, encoder: DebertaModel | None = None):
        if head.task_type == "token_classification":
            raise ValueError("use DebertaForTokenClassification for a token_classification head")
        super().__init__(config, head, encoder)
        self.pooler = ContextPooler(config, head)
        init_weights(self.pooler, config.initializer_range)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> TaskOutput:
        hidden = self.deberta(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.classifier(self.dropout(self.pooler(hidden)))
        loss = None
        if self.head.task_type == "regression":
            logits = logits.squeeze(-1)
            if labels is not None:
                loss = F.mse_loss(logits.float(), labels.float())
        elif labels is not None:
            loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return TaskOutput(logits, loss)


class DebertaForTokenClassification(_TaskModel):
    """Encoder + dropout + linear classifier at every position; labels ``-100`` mark positions without a tag
    (padding, special tokens, continuation pieces of a word)."""

    def __init__(self, config: DebertaConfig, head: HeadConfig, encoder: DebertaModel | None = None):
        if head.task_type != "token_classification":
            raise ValueError(f"DebertaForTokenClassification needs a token_classification head, got {head.task_type}")
        super().__init__(config, head, encoder)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> TaskOutput:
        hidden = self.deberta(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return TaskOutput(logits, loss)


def task_model(config: DebertaConfig, head: HeadConfig,
               encoder: DebertaModel | None = None) -> DebertaForSequenceClassification | DebertaForTokenClassification:
    """The model class a head needs."""
    cls = DebertaForTokenClassification if head.task_type == "token_classification" else DebertaForSequenceClassification
    return cls(config, head, encoder)
