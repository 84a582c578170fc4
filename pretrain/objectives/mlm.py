"""DeBERTa-v2 masked language modelling: whole-word n-gram masking, loss through the enhanced mask decoder."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model import IGNORE_INDEX, DebertaConfig, DebertaForMaskedLM
from pretrain.objectives.base import PretrainingObjective, SpecialTokens, masked_mean
from pretrain.objectives.masking import MaskingConfig


class MaskedLMObjective(PretrainingObjective):
    def __init__(self, config: DebertaConfig, special: SpecialTokens, masking: MaskingConfig, use_emd: bool = True,
                 model: DebertaForMaskedLM | None = None):
        super().__init__()
        self.model = model if model is not None else DebertaForMaskedLM(config, enhanced_mask_decoder=use_emd)
        self.special = special
        self.masking = masking
        self.use_emd = use_emd

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        attention_mask, masked_ids, labels = self.mask_batch(batch, self.model.config.vocab_size, generator)
        out = self.model(masked_ids, attention_mask, labels=labels, use_emd=self.use_emd,
                         prediction_slots=self.prediction_slots(*masked_ids.shape))
        with torch.no_grad():
            predicted = out.prediction_targets != IGNORE_INDEX
            accuracy = masked_mean(out.logits.argmax(-1) == out.prediction_targets, predicted)
            masked = out.label_mask.sum()
        return {"loss": out.loss, "mlm_loss": out.loss.detach(), "mlm_accuracy": accuracy,
                "dropped_predictions": masked - predicted.sum(), "masked_tokens": masked}

    def export_models(self) -> dict[str, nn.Module]:
        return {"hf": self.model}
