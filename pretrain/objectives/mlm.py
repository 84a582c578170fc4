"""DeBERTa-v2 masked language modelling: whole-word n-gram masking, loss through the enhanced mask decoder."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model import DebertaConfig, DebertaForMaskedLM
from pretrain.objectives.base import PretrainingObjective, SpecialTokens
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
        out = self.model(masked_ids, attention_mask, labels=labels, use_emd=self.use_emd)
        with torch.no_grad():
            accuracy = (out.logits.argmax(-1) == labels[out.label_mask]).float().mean()
        return {"loss": out.loss, "mlm_loss": out.loss.detach(), "mlm_accuracy": accuracy,
                "masked_tokens": out.label_mask.sum()}

    def export_models(self) -> dict[str, nn.Module]:
        return {"hf": self.model}
