"""What every pretraining objective provides to the Lightning module: a loss on a batch and the models to export.

An objective is a plain ``nn.Module`` (no Lightning), so it can also be driven by a benchmark or a custom loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.objectives.masking import MaskingConfig, mask_tokens


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

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export_models(self) -> dict[str, nn.Module]:
        """Sub-directory name -> native model to write in HuggingFace format (``hf``, ``hf_generator``)."""
        raise NotImplementedError

    def no_weight_decay(self, name: str, parameter: nn.Parameter) -> bool:
        """Biases and LayerNorm weights are not decayed (as in the original code; GDES residuals are)."""
        return parameter.ndim < 2 or "LayerNorm" in name
