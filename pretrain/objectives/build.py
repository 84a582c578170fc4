"""Build an objective from its settings, exactly as training does: one place for ``pretrain.train``, export and
the benchmarks.

Why a module of its own: the GPU benchmarks must build the objectives on machines that have torch and transformers
but none of the training stack (Hydra, omegaconf, Lightning, DeepSpeed), so nothing here imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model import DebertaConfig
from pretrain.objectives.base import PretrainingObjective, SpecialTokens
from pretrain.objectives.masking import MaskingConfig
from pretrain.objectives.mlm import MaskedLMObjective
from pretrain.objectives.rtd import ReplacedTokenDetectionObjective


@dataclass
class ObjectiveSettings:
    name: str = "rtd"
    """"mlm" (DeBERTa-v2: whole-word n-gram MLM through the EMD) or "rtd" (DeBERTa-v3: generator + discriminator)."""
    mask_prob: float = 0.15
    max_ngram: int = 3
    """MLM: whole-word n-gram spans up to this length (original v2 recipe: 3). RTD generator masking uses 1."""
    whole_word: bool = True
    use_emd: bool = True
    """MLM/generator loss through the enhanced mask decoder, as the original code trains."""
    generator_layers: int | None = None
    """RTD: generator depth; None = half the discriminator's layers (the v3 recipe)."""
    embedding_sharing: str = "gdes"
    """RTD: gdes | es | nes (the v3 paper's ablation)."""
    rtd_weight: float = 50.0
    """RTD: loss = MLM + rtd_weight * BCE. 50 is ELECTRA's and the v3 paper's value; the original code defaults to
    10 (with decoupled optimisers). We use one optimiser for both models (DeepSpeed needs that), as ELECTRA does."""
    temperature: float = 1.0
    """RTD: sampling temperature of the generator."""


def build_objective(model: DebertaConfig, o: ObjectiveSettings, special: SpecialTokens) -> PretrainingObjective:
    if o.name == "mlm":
        masking = MaskingConfig(mask_prob=o.mask_prob, max_ngram=o.max_ngram, whole_word=o.whole_word)
        return MaskedLMObjective(model, special, masking, use_emd=o.use_emd)
    masking = MaskingConfig(mask_prob=o.mask_prob, max_ngram=o.max_ngram, whole_word=o.whole_word,
                            replace_with_mask=1.0, replace_with_random=0.0)
    layers = o.generator_layers or max(1, model.num_hidden_layers // 2)
    generator_config = DebertaConfig(**{**model.to_dict(), "num_hidden_layers": layers})
    return ReplacedTokenDetectionObjective(model, special, generator_config, o.embedding_sharing, o.rtd_weight,
                                           masking, o.temperature)
