"""The native model's configuration, spelled with HuggingFace ``DebertaV2Config`` field names.

Why our own dataclass instead of ``transformers.DebertaV2Config``: HF reads several fields with ``getattr``
defaults (``position_buckets``, ``share_att_key``, ``norm_rel_ebd``, ``conv_*``, ``embedding_size``,
``attention_head_size``), and its defaults for ``relative_attention`` (False) and ``pos_att_type`` (None) build a
BERT-like model that no released checkpoint is. Here every computation-affecting field is explicit, validated once,
and written back in full on export, so a checkpoint can never be run with a silently different architecture.

Field names equal ``DebertaV2Config`` names so Hydra overrides read ``model.hidden_size=64`` and a ``config.json``
maps onto this class one to one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pretrain.model.activations import ACTIVATIONS


class ConfigError(ValueError):
    """An unsupported or inconsistent configuration value; the message names the field (and the file)."""


# Keys a HuggingFace config.json may carry that do not change what the encoder/heads compute (bookkeeping,
# generation, task-head or tokenizer metadata). They are accepted and ignored on import.
NON_COMPUTATIONAL_HF_KEYS = frozenset(
    {
        "_name_or_path", "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
        "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens", "bos_token_id",
        "chunk_size_feed_forward", "classifier_dropout", "cross_attention_hidden_size", "decoder_start_token_id",
        "diversity_penalty", "do_sample", "dtype", "early_stopping", "encoder_no_repeat_ngram_size",
        "eos_token_id", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
        "forced_eos_token_id", "gradient_checkpointing", "id2label", "is_decoder", "is_encoder_decoder",
        "label2id", "length_penalty", "max_length", "min_length", "model_type", "no_repeat_ngram_size",
        "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions", "output_hidden_states",
        "output_scores", "pooler_dropout", "pooler_hidden_act", "pooler_hidden_size", "prefix", "problem_type",
        "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
        "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
        "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
        "torch_dtype", "torchscript", "transformers_version", "typical_p", "use_bfloat16", "use_cache",
        "z_steps",
        # `legacy` only chooses HF's MLM-head key names; the import reads whichever names are present.
        "legacy",
        # The task head of a fine-tune (DebertaV2For{Sequence,Token}Classification): its label count and dropout.
        "num_labels", "cls_dropout",
    }
)

SUPPORTED_REL_EMBEDDING_NORMS = ("none", "layer_norm")
SUPPORTED_POS_ATT_TYPES = ("c2p", "p2c")


@dataclass
class DebertaConfig:
    """Architecture of a DeBERTa v2/v3 encoder (and its pretraining heads), in ``DebertaV2Config`` terms."""

    vocab_size: int = 128100
    """Rows of the word-embedding table and of the MLM output bias."""
    hidden_size: int = 768
    """Width H of the encoder."""
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    attention_head_size: int | None = None
    """Per-head width d; None means hidden_size // num_attention_heads (released models use 64)."""
    intermediate_size: int = 3072
    """Feed-forward width."""
    hidden_act: str = "gelu"
    """Activation of the feed-forward block, the MLM-head transform and the RTD head (exact erf GELU)."""
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    """Rows of the absolute position table; also the bucketing range when max_relative_positions < 1."""
    type_vocab_size: int = 0
    """0 = no token-type embedding (all released v2/v3 models)."""
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    """Disentangled relative attention. Every released v2/v3 model has it; False is rejected on import."""
    max_relative_positions: int = -1
    """< 1 means max_position_embeddings."""
    position_buckets: int = 256
    """> 0 enables log-bucketed relative positions with a table of 2 * position_buckets rows."""
    pos_att_type: list[str] = field(default_factory=lambda: ["p2c", "c2p"])
    """Which position terms enter the attention score: any of "c2p", "p2c"."""
    share_att_key: bool = True
    """Project relative embeddings with the content query/key projections (no pos_*_proj parameters)."""
    norm_rel_ebd: str = "layer_norm"
    """"layer_norm" applies encoder.LayerNorm to the relative-embedding table; "none" leaves it raw."""
    position_biased_input: bool = False
    """Add absolute position embeddings to the input (v1 style); v2/v3 use them only in the EMD."""
    conv_kernel_size: int = 0
    """> 0 adds the nGiE convolution after the first layer (v2 xlarge/xxlarge and the Chinese v2 models: 3)."""
    conv_act: str = "tanh"
    conv_groups: int = 1
    embedding_size: int | None = None
    """Width E of the embedding table; None means hidden_size. E != H adds embed_proj (E -> H)."""
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = [t.strip() for t in self.pos_att_type.lower().split("|") if t.strip()]
        self.pos_att_type = [str(t).strip().lower() for t in (self.pos_att_type or [])]
        self.norm_rel_ebd = "|".join(t.strip() for t in str(self.norm_rel_ebd).lower().split("|"))
        # Explicit values equal to the derived defaults are stored as None, so equal architectures compare equal.
        if self.embedding_size == self.hidden_size:
            self.embedding_size = None
        if (self.attention_head_size is not None and self.num_attention_heads
                and self.attention_head_size * self.num_attention_heads == self.hidden_size):
            self.attention_head_size = None
        self.validate()

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def head_size(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def all_head_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def relative_span(self) -> int:
        """k in the paper: half the number of rows of the relative-embedding table."""
        return self.position_buckets if self.position_buckets > 0 else self.bucket_max_position

    @property
    def bucket_max_position(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def score_scale(self) -> float:
        """1 / sqrt(d * (1 + number of position terms)), the scaling of every attention term."""
        return 1.0 / math.sqrt(self.head_size * (1 + len(self.pos_att_type)))

    @property
    def rel_embedding_layer_norm(self) -> bool:
        return "layer_norm" in self.norm_rel_ebd.split("|")

    # ------------------------------------------------------------------------------------------- validation
    def validate(self, source: str = "config") -> None:
        """Reject every value the native model would not compute exactly like the reference implementation."""

        def fail(key: str, message: str) -> None:
            raise ConfigError(f"{source}: field '{key}' = {getattr(self, key)!r}: {message}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                fail(key, "must be a positive integer")
        if self.attention_head_size is None and self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"must divide hidden_size={self.hidden_size} (or set attention_head_size)")
        if not self.relative_attention:
            fail("relative_attention", "only disentangled relative attention (true) is supported, as in every "
                 "released DeBERTa v2/v3 checkpoint")
        unknown = [t for t in self.pos_att_type if t not in SUPPORTED_POS_ATT_TYPES]
        if unknown:
            fail("pos_att_type", f"unsupported attention term(s) {unknown}; supported: 'c2p', 'p2c' "
                 "(e.g. \"p2c|c2p\"); 'p2p' exists only in the original research code")
        for t in self.norm_rel_ebd.split("|"):
            if t not in SUPPORTED_REL_EMBEDDING_NORMS:
                fail("norm_rel_ebd", f"unsupported value {t!r}; supported: 'none', 'layer_norm'")
        for key in ("hidden_act", "conv_act"):
            if getattr(self, key) not in ACTIVATIONS:
                fail(key, f"unsupported activation; supported: {sorted(ACTIVATIONS)}")
        if self.type_vocab_size < 0:
            fail("type_vocab_size", "must be >= 0")
        if self.conv_kernel_size < 0:
            fail("conv_kernel_size", "must be >= 0")
        if self.conv_kernel_size > 0:
            if self.conv_kernel_size % 2 == 0:
                fail("conv_kernel_size", "must be odd: the nGiE convolution pads (k-1)//2 on both sides, so an "
                     "even kernel would shift the sequence by one token")
            if self.conv_groups < 1 or self.hidden_size % self.conv_groups:
                fail("conv_groups", f"must be >= 1 and divide hidden_size={self.hidden_size}")
        if self.position_buckets > 0 and self.bucket_max_position <= self.position_buckets // 2 + 1:
            fail("position_buckets", f"needs max_relative_positions (or max_position_embeddings) > "
                 f"position_buckets // 2 + 1, got {self.bucket_max_position}")
        if self.embedding_size is not None and self.embedding_size < 1:
            fail("embedding_size", "must be a positive integer or null")
        if not 0 <= self.pad_token_id < self.vocab_size:
            fail("pad_token_id", f"must be a valid id below vocab_size={self.vocab_size}")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key, "must be in [0, 1)")

    # ------------------------------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json", strict: bool = True) -> DebertaConfig:
        """Build from a HuggingFace ``config.json`` dict, applying HF's ``getattr`` defaults.

        ``strict``: a key that is neither a known architecture field nor known bookkeeping raises
        :class:`ConfigError` naming it, because it might change the computation in a way we would not reproduce.
        """
        model_type = raw.get("model_type")
        if model_type not in (None, "deberta-v2"):
            raise ConfigError(f"{source}: field 'model_type' = {model_type!r}: only 'deberta-v2' checkpoints "
                              "(DeBERTa v2 and v3) are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in names and k not in NON_COMPUTATIONAL_HF_KEYS)
        if unknown and strict:
            raise ConfigError(f"{source}: unknown field(s) {unknown}: not part of DebertaV2Config as this framework "
                              "understands it; remove them, or load with strict_config=False if you know they do "
                              "not affect the computation")
        # Defaults HF applies when a key is absent (released configs often omit these).
        values: dict[str, Any] = {
            "relative_attention": False, "pos_att_type": None, "position_buckets": -1, "share_att_key": False,
            "norm_rel_ebd": "none", "position_biased_input": True, "conv_kernel_size": 0, "conv_act": "tanh",
            "conv_groups": 1, "embedding_size": None, "attention_head_size": None, "type_vocab_size": 0,
            "max_relative_positions": -1, "layer_norm_eps": 1e-7, "hidden_act": "gelu", "pad_token_id": 0,
        }
        values.update({k: v for k, v in raw.items() if k in names})
        if values["pad_token_id"] is None:
            values["pad_token_id"] = 0
        try:
            config = cls(**values)
        except ConfigError as err:  # re-label the message with the file it came from
            raise ConfigError(f"{source}:{str(err).split(':', 1)[1]}") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: invalid value: {err}") from err
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """A complete ``config.json`` body: every field HF reads with ``getattr`` is written explicitly."""
        out = dataclasses.asdict(self)
        out["pos_att_type"] = "|".join(self.pos_att_type)
        out["attention_head_size"] = self.head_size
        out["embedding_size"] = self.embedding_width
        out["model_type"] = "deberta-v2"
        out["pooler_hidden_size"] = self.hidden_size
        out["pooler_dropout"] = 0
        out["pooler_hidden_act"] = "gelu"
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
