"""Transformer layers, the nGiE convolution and the encoder stack of DeBERTa v2/v3.

Sub-module names (``attention.self``, ``attention.output``, ``intermediate``, ``output``, ``rel_embeddings``,
``LayerNorm``, ``conv``) equal the HuggingFace/original ones, so the native state dict *is* the DebertaV2 layout
and import/export is a renaming of prefixes only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.activations import activation
from pretrain.model.attention import DisentangledSelfAttention
from pretrain.model.config import DebertaConfig
from pretrain.model.relative_position import relative_position_index


class ResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: the post-LN sublayer output of BERT-style layers."""

    def __init__(self, in_features: int, config: DebertaConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = ResidualOutput(config.all_head_size, config)

    def forward(self, hidden_states, key_padding_mask, rel_embeddings, rel_index, query_states=None):
        context = self.self(hidden_states, key_padding_mask, rel_embeddings, rel_index, query_states)
        # The residual is the query stream: in the EMD the query differs from the keys/values.
        return self.output(context, hidden_states if query_states is None else query_states)


class Intermediate(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config.intermediate_size, config)

    def forward(self, hidden_states, key_padding_mask, rel_embeddings, rel_index, query_states=None):
        attended = self.attention(hidden_states, key_padding_mask, rel_embeddings, rel_index, query_states)
        return self.output(self.intermediate(attended), attended)


class ConvLayer(nn.Module):
    """nGiE (n-gram induced input encoding): a 1-D convolution over the *embedding output*, added to the first
    layer's output. Used by v2 xlarge/xxlarge and the Chinese v2 models."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        k = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, k, padding=(k - 1) // 2, groups=config.conv_groups)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = activation(config.conv_act)

    def forward(self, embeddings: torch.Tensor, layer_output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.conv(embeddings.transpose(1, 2)).transpose(1, 2)  # (B, L, H)
        out = out.masked_fill(~mask[..., None], 0.0)
        out = self.act(self.dropout(out))
        return self.LayerNorm(layer_output + out) * mask[..., None].to(out.dtype)


class Encoder(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size)
        if config.rel_embedding_layer_norm:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.conv = ConvLayer(config) if config.conv_kernel_size > 0 else None
        self.gradient_checkpointing = False

    def relative_embedding_table(self) -> torch.Tensor:
        """The (2k, H) table, LayerNormed once per forward and shared by all layers."""
        table = self.rel_embeddings.weight
        return self.LayerNorm(table) if self.config.rel_embedding_layer_norm else table

    def relative_index(self, length: int, device: torch.device) -> torch.Tensor:
        c = self.config
        return relative_position_index(length, length, c.relative_span, c.position_buckets, c.bucket_max_position, device)

    def run_layer(self, layer: EncoderLayer, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Return all hidden states: the embedding output, then each layer's output (the EMD needs ``[-2]``)."""
        rel_table = self.relative_embedding_table()
        rel_index = self.relative_index(embeddings.shape[1], embeddings.device)
        states = [embeddings]
        hidden = embeddings
        for i, layer in enumerate(self.layer):
            hidden = self.run_layer(layer, hidden, mask, rel_table, rel_index)
            if i == 0 and self.conv is not None:
                hidden = self.conv(embeddings, hidden, mask)
            states.append(hidden)
        return states
