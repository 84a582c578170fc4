"""The native DeBERTa v2/v3 models: encoder, masked-LM model (v2, v3 generator) and RTD discriminator (v3).

Outputs mirror transformers (``.last_hidden_state``, ``.logits``, ``.loss``) so code written against HF reads the
same. Labels use HF's convention: ``-100`` marks positions without a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.attention import ATTENTION_BACKENDS, DisentangledSelfAttention, plan_attention
from pretrain.model.config import DebertaConfig
from pretrain.model.embeddings import Embeddings, TableOverride
from pretrain.model.encoder import Encoder
from pretrain.model.heads import LMPredictions, MaskedLMHead, ReplacedTokenDetectionHead, enhanced_mask_decoder

IGNORE_INDEX = -100


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (B, L, H)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embedding output + every layer's output
    attention_mask: torch.Tensor | None = None  # (B, L) bool, as used


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor  # (B, L, V); or (M, V) at the labelled positions when labels were given
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    label_mask: torch.Tensor | None = None  # (B, L) bool: the labelled positions
    prediction_positions: torch.Tensor | None = None  # (M,) flat index (b * L + i) of each `logits` row; B*L = empty
    prediction_targets: torch.Tensor | None = None  # (M,) the label of each `logits` row; -100 for an empty row


@dataclass
class ReplacedTokenDetectionOutput:
    logits: torch.Tensor  # (B, L): > 0 predicts "replaced"
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def init_weights(module: nn.Module, std: float) -> None:
    """Original DeBERTa/BERT initialisation: N(0, std) linear and embedding weights, zero biases, unit LayerNorms,
    zero padding row. The nGiE ``Conv1d`` keeps PyTorch's default initialisation, as in the original code and in
    transformers (neither re-initialises it)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, MaskedLMHead):
            nn.init.zeros_(m.bias)


def labelled_positions(label_mask: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """Flat indices (``b * L + i``) of the labelled positions, in order.

    ``slots=None``: exactly the labelled positions (their count decides the shape: a host sync on GPUs).
    ``slots=K``: always K entries, the first K labelled positions, then ``B * L`` for empty slots; a stable sort
    instead of ``nonzero`` keeps the shape static and the device queue running. Labelled positions beyond K are
    dropped; callers size K above the masking budget and report drops.
    """
    flat = label_mask.flatten()
    if slots is None:
        return flat.nonzero().squeeze(1)
    slots = min(slots, flat.numel())
    order = torch.sort((~flat).to(torch.uint8), stable=True).indices[:slots]  # labelled first, in position order
    return torch.where(flat.index_select(0, order), order, flat.numel())


class DebertaPreTrained(nn.Module):
    """Shared plumbing: weight init, attention backend choice, gradient checkpointing."""

    config: DebertaConfig

    def set_attention_backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; available: {sorted(ATTENTION_BACKENDS)}")
        for m in self.modules():
            if isinstance(m, DisentangledSelfAttention):
                m.backend = name

    def plan_attention(self, device_type: str, dtype: torch.dtype) -> dict:
        """Resolve the attention backend for a run on ``device_type`` computing attention in ``dtype`` (the autocast
        dtype under mixed precision): runs the fused kernel's self-check where it applies, eagerly. Call it before
        :meth:`compile_layers`, so compiled code only reads the outcome. Returns the JSON-ready record of
        :func:`~pretrain.model.attention.plan_attention`."""
        backends = {m.backend for m in self.modules() if isinstance(m, DisentangledSelfAttention)}
        if len(backends) != 1:
            raise ValueError(f"plan_attention needs one attention backend on every layer, found {sorted(backends)}; "
                             "call set_attention_backend first")
        c = self.config
        return plan_attention(backends.pop(), device_type, dtype, c.head_size, "c2p" in c.pos_att_type,
                              "p2c" in c.pos_att_type)

    def compile_layers(self, **options) -> None:
        """``torch.compile`` each encoder layer in place (attention projections, the attention kernel as one opaque
        op, FFN, LayerNorms, dropout fused by Inductor). Per layer rather than per model: the graphs are small,
        compile once for all layers of a shape, and leave the data-dependent parts (masking, sampling) eager."""
        for m in self.modules():
            if isinstance(m, Encoder):
                for layer in m.layer:
                    layer.compile(**options)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, Encoder):
                m.gradient_checkpointing = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DebertaModel(DebertaPreTrained):
    """Embeddings + encoder (HF ``DebertaV2Model``)."""

    def __init__(self, config: DebertaConfig, with_position_table: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, with_position_table=with_position_table)
        self.encoder = Encoder(config)
        init_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        word_embedding_weight: TableOverride = None,
        position_embedding_weight: TableOverride = None,
    ) -> EncoderOutput:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.embeddings(input_ids, mask, token_type_ids, position_ids, word_embedding_weight,
                            position_embedding_weight)
        states = self.encoder(x, mask)
        return EncoderOutput(states[-1], tuple(states) if output_hidden_states else None, mask)


class DebertaForMaskedLM(DebertaPreTrained):
    """Encoder + MLM head, optionally through the enhanced mask decoder (v2 MLM, v3 generator).

    ``use_emd=True`` is how the original code trains and evaluates MLM; ``use_emd=False`` is what HF's
    ``DebertaV2ForMaskedLM`` computes (HF has no EMD), used for parity and for the exported HF model.
    """

    def __init__(self, config: DebertaConfig, enhanced_mask_decoder: bool = True):
        super().__init__()
        self.config = config
        self.deberta = DebertaModel(config, with_position_table=enhanced_mask_decoder)
        self.lm_predictions = LMPredictions(config)
        init_weights(self.lm_predictions, config.initializer_range)

    @property
    def has_emd(self) -> bool:
        return self.deberta.embeddings.position_embeddings is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_emd: bool = False,
        output_hidden_states: bool = False,
        word_embedding_weight: torch.Tensor | None = None,
        prediction_slots: int | None = None,
    ) -> MaskedLMOutput:
        """With ``labels``, logits are computed only at labelled positions (``labels != -100``): the vocabulary
        projection is the largest matmul of the model and ~85% of positions have no target.

        ``prediction_slots`` fixes the number of logits rows (see :func:`labelled_positions`), which keeps the step
        free of host-device synchronisation; None gives exactly one row per labelled position (a sync on GPUs).
        """
        enc = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, True, word_embedding_weight)
        hidden = enc.last_hidden_state
        if use_emd and not self.config.position_biased_input:
            if not self.has_emd:
                raise ValueError("use_emd=True needs the absolute position table: build the model with "
                                 "enhanced_mask_decoder=True")
            z = self.deberta.embeddings.position_embedding(input_ids, position_ids)
            hidden = enhanced_mask_decoder(self.deberta.encoder, list(enc.hidden_states), z, enc.attention_mask)
        weight = self.deberta.embeddings.word_embeddings.weight if word_embedding_weight is None else word_embedding_weight
        states = enc.hidden_states if output_hidden_states else None
        if labels is None:
            return MaskedLMOutput(self.lm_predictions.lm_head(hidden, weight), None, hidden, states)
        label_mask = labels != IGNORE_INDEX
        positions = labelled_positions(label_mask, prediction_slots)
        rows = positions.clamp(max=label_mask.numel() - 1)
        logits = self.lm_predictions.lm_head(hidden.flatten(0, 1).index_select(0, rows), weight)  # (M, V)
        targets = torch.where(positions < label_mask.numel(), labels.flatten().index_select(0, rows), IGNORE_INDEX)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / count
        return MaskedLMOutput(logits, loss, hidden, states, label_mask, positions, targets)


class DebertaForReplacedTokenDetection(DebertaPreTrained):
    """v3 discriminator: encoder + RTD head. Loss: BCE over every non-padding token (original RTD task)."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.deberta = DebertaModel(config)
        self.mask_predictions = ReplacedTokenDetectionHead(config)
        init_weights(self.mask_predictions, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B, L) 1 = replaced, 0 = original
        output_hidden_states: bool = False,
        word_embedding_weight: TableOverride = None,
        position_embedding_weight: TableOverride = None,
    ) -> ReplacedTokenDetectionOutput:
        enc = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           word_embedding_weight, position_embedding_weight)
        logits = self.mask_predictions(enc.last_hidden_state)
        loss = None
        if labels is not None:
            valid = enc.attention_mask.float()  # a masked mean, not logits[valid]: no data-dependent shapes
            per_token = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
            loss = (per_token * valid).sum() / valid.sum().clamp(min=1)
        return ReplacedTokenDetectionOutput(logits, loss, enc.last_hidden_state, enc.hidden_states)
