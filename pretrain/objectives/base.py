"""What every pretraining objective provides to the Lightning module: a loss on a batch and the models to export.

An objective is a plain ``nn.Module`` (no Lightning), so it can also be driven by a benchmark or a custom loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.model.deberta import DebertaPreTrained
from pretrain.objectives.masking import MaskingConfig, mask_tokens


PREDICTION_SLACK = 16
"""Extra logit rows per sequence above the masking cap (see ``PretrainingObjective.prediction_slots``)."""


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``weights`` is true/1, as a device tensor (0 when there is none)."""
    weights = weights.float()
    return (values.float() * weights).sum() / weights.sum().clamp(min=1)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the objectives need; taken from the shards' tokenizer."""

    pad: int
    cls: int
    sep: int
    unk: int
    mask: int

    def special_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True at ids that are never masked or replaced."""
        ids = torch.tensor([self.pad, self.cls, self.sep, self.unk, self.mask], device=input_ids.device)
        return torch.isin(input_ids, ids)


class PretrainingObjective(nn.Module):
    """Interface: ``forward(batch, generator) -> dict`` with a scalar ``loss`` plus detached metrics.

    Subclasses set ``special`` (SpecialTokens) and ``masking`` (MaskingConfig), which :meth:`mask_batch` uses.
    """

    special: SpecialTokens
    masking: MaskingConfig

    def mask_batch(self, batch: dict[str, torch.Tensor], vocab_size: int, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(attention mask, masked input ids, labels) of a batch from the shards, with this objective's masking."""
        input_ids = batch["input_ids"]
        masked_ids, labels = mask_tokens(
            input_ids, batch["word_start"], self.special.special_mask(input_ids), self.masking,
            mask_token_id=self.special.mask, vocab_size=vocab_size, generator=generator,
        )
        return input_ids != self.special.pad, masked_ids, labels

    def prediction_slots(self, batch_size: int, length: int) -> int:
        """Rows of MLM logits per micro-batch: the per-sequence masking cap plus room for the last selected word to
        overrun it (whole-word masking takes that word whole). A fixed row count keeps the step free of host
        syncs; labelled tokens beyond it (practically never) are reported as ``dropped_predictions``."""
        return batch_size * min(length, self.masking.cap(length) + PREDICTION_SLACK)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encoder_models(self) -> dict[str, nn.Module]:
        """Module name -> every DeBERTa model of the objective (the generator and discriminator of RTD, the one model
        of MLM): what takes the attention backend, gradient checkpointing and layer compilation. The shared
        embedding modules of GDES are not models and are left out."""
        return {name: m for name, m in self.named_modules() if isinstance(m, DebertaPreTrained) and hasattr(m, "deberta")}

    def export_models(self) -> dict[str, nn.Module]:
        """Sub-directory name -> native model to write in HuggingFace format (``hf``, ``hf_generator``)."""
        raise NotImplementedError

    def no_weight_decay(self, name: str, parameter: nn.Parameter) -> bool:
        """Biases and LayerNorm weights are not decayed (as in the original code; GDES residuals are)."""
        return parameter.ndim < 2 or "LayerNorm" in name
