"""The native DeBERTa v2/v3 model. Imports neither Lightning nor Hydra: export and benchmarks use it too.

Where things live: ``config`` (architecture fields, validation), ``embeddings``, ``relative_position`` (log
buckets), ``attention`` (disentangled attention + pluggable backends), ``encoder`` (layers, nGiE conv),
``heads`` (MLM head, EMD, RTD head), ``deberta`` (the assembled models).
"""

from pretrain.model.config import ConfigError, DebertaConfig
from pretrain.model.deberta import (
    IGNORE_INDEX,
    DebertaForMaskedLM,
    DebertaForReplacedTokenDetection,
    DebertaModel,
    EncoderOutput,
    MaskedLMOutput,
    ReplacedTokenDetectionOutput,
)

__all__ = [
    "ConfigError",
    "DebertaConfig",
    "DebertaForMaskedLM",
    "DebertaForReplacedTokenDetection",
    "DebertaModel",
    "EncoderOutput",
    "IGNORE_INDEX",
    "MaskedLMOutput",
    "ReplacedTokenDetectionOutput",
]
