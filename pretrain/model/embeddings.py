"""Input embeddings of DeBERTa v2/v3: word (+ absolute position) (+ token type) -> projection -> LayerNorm -> mask.

The absolute position table exists when ``position_biased_input`` is set (added to the input) or when the
enhanced mask decoder needs it (``with_position_table``): v2/v3 use absolute positions only in the EMD.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model.config import DebertaConfig


TableOverride = torch.Tensor | tuple[torch.Tensor, ...] | None


def lookup(ids: torch.Tensor, table: torch.Tensor | tuple[torch.Tensor, ...], padding_idx: int | None = None
           ) -> torch.Tensor:
    """Rows of ``table``, or of the sum of the tables in a tuple (one rounding per element either way).

    ``padding_idx``: the row that lookups never send gradient to, as ``nn.Embedding(padding_idx=...)`` (the original
    code and transformers build the word table that way). Without it, a real position holding the [PAD] id (text
    that contains the piece, or an unusual packing) would move the [PAD] row, which the original never does.
    """
    if isinstance(table, tuple):
        rows = nn.functional.embedding(ids, table[0], padding_idx)
        for part in table[1:]:
            rows = rows + nn.functional.embedding(ids, part, padding_idx)
        return rows
    return nn.functional.embedding(ids, table, padding_idx)


class Embeddings(nn.Module):
    def __init__(self, config: DebertaConfig, with_position_table: bool = False):
        super().__init__()
        self.config = config
        width = config.embedding_width
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        if config.position_biased_input or with_position_table:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        else:
            self.position_embeddings = None
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        else:
            self.token_type_embeddings = None
        self.embed_proj = nn.Linear(width, config.hidden_size, bias=False) if width != config.hidden_size else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_ids(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is not None:
            return position_ids
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings and self.position_embeddings is not None:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings={self.config.max_position_embeddings} "
                "of the absolute position table; shorten the sequences or enlarge the table"
            )
        return torch.arange(length, device=input_ids.device)[None, :]

    def position_embedding(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Raw absolute position embeddings in hidden width (what the EMD adds to its query)."""
        z = self.position_embeddings(self.position_ids(input_ids, position_ids))
        return self.embed_proj(z) if self.embed_proj is not None else z

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        mask: torch.Tensor,  # (B, L) bool
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        word_embedding_weight: TableOverride = None,
        position_embedding_weight: TableOverride = None,
    ) -> torch.Tensor:
        """``*_embedding_weight`` replace this module's own tables: embedding sharing between the v3 generator and
        discriminator passes the shared tables here; a tuple of tables is summed row-wise after the lookup
        (GDES: ``(shared.detach(), residual)``), which gives the same rows as looking up the summed table without
        adding two vocabulary-sized tables every step."""
        word = self.word_embeddings.weight if word_embedding_weight is None else word_embedding_weight
        x = lookup(input_ids, word, padding_idx=self.config.pad_token_id)  # shared tables too (ES, GDES)
        if self.config.position_biased_input:
            table = self.position_embeddings.weight if position_embedding_weight is None else position_embedding_weight
            x = x + lookup(self.position_ids(input_ids, position_ids), table)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x)
        # Padding is zeroed after the LayerNorm (the original `MaskedLayerNorm`).
        x = x * mask[..., None].to(x.dtype)
        return self.dropout(x)
