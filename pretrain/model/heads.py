"""Pretraining heads: the MLM head (decoder tied to the word embeddings), the enhanced mask decoder (EMD) and
the replaced-token-detection (RTD) head of the v3 discriminator. Formulas follow the original DeBERTa code."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model.activations import activation
from pretrain.model.config import DebertaConfig
from pretrain.model.encoder import Encoder


class MaskedLMHead(nn.Module):
    """``dense (H -> E) -> act -> LayerNorm(E) -> h @ word_embeddings^T + bias``.

    The decoder *is* the word-embedding matrix (no separate weight), as in the original ``BertLMPredictionHead``;
    HF calls these parameters ``lm_predictions.lm_head.*`` (``legacy=false``) or ``cls.predictions.transform.*``
    (``legacy=true``).
    """

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_width)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.embedding_width, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embedding_weight: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(self.act(self.dense(hidden)))
        return h @ word_embedding_weight.t() + self.bias


class LMPredictions(nn.Module):
    """Holder that gives the MLM head its checkpoint name ``lm_predictions.lm_head``."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.lm_head = MaskedLMHead(config)


def enhanced_mask_decoder(
    encoder: Encoder,
    hidden_states: list[torch.Tensor],
    position_embedding: torch.Tensor,  # (B or 1, L, H) raw absolute position embeddings
    mask: torch.Tensor,  # (B, L) bool
    steps: int = 2,
) -> torch.Tensor:
    """EMD: re-run the last encoder layer ``steps`` times with absolute positions injected into the query.

    Keys/values stay the input of the last layer (``hidden_states[-2]``); the query starts as that input plus the
    absolute position embeddings and is updated by each pass. This is the only place v2/v3 use absolute
    positions, which is why their MLM quality depends on it.
    """
    last_layer = encoder.layer[-1]
    keys = hidden_states[-2]
    rel_table = encoder.relative_embedding_table()
    rel_index = encoder.relative_index(keys.shape[1], keys.device)
    query = keys + position_embedding
    for _ in range(steps):
        query = last_layer(keys, mask, rel_table, rel_index, query_states=query)
    return query


class ReplacedTokenDetectionHead(nn.Module):
    """``LayerNorm(h + h[CLS]) -> dense -> act -> classifier``: one logit per token, > 0 means "replaced".

    Adding the [CLS] state to every position before the LayerNorm is what the original ``LMMaskPredictionHead``
    does; parameter names (``mask_predictions.{dense,LayerNorm,classifier}``) equal the original checkpoints'.
    """

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, L)
        h = self.LayerNorm(hidden + hidden[:, :1, :])
        return self.classifier(self.act(self.dense(h))).squeeze(-1)
