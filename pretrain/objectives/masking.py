"""Token selection and corruption for the pretraining objectives: v2 whole-word n-gram MLM masking, v3 RTD generator
masking, replacement sampling and replaced-token labels.

Why tensor code: masking runs on whole batches in the collate function or on the accelerator, so every step here
is a batched tensor operation (sort, cumulative sums, gathers); there is no Python loop over tokens or sequences.
All randomness comes from the ``generator`` argument (which must live on the inputs' device), so a given seed gives
the same masks, bit for bit, which exact resume relies on.

Selection follows the original DeBERTa ``NGramMaskGenerator`` (microsoft/DeBERTa, ``mlm_task.py``):

- Units are whole words: a word-start token plus the continuation tokens after it (``word_start`` from the shards).
  Special tokens ([CLS], [SEP], [PAD], [UNK], [MASK]: ``special_mask``) are never units. With
  ``whole_word=False`` every non-special token is its own unit.
- Spans are n-grams of consecutive units with ``n`` in ``1..max_ngram`` drawn with p(n) proportional to 1/n
  (6/11, 3/11, 2/11 for 3). Spans never overlap and a unit is selected whole or not at all.
- Budget per sequence: ``min(max_predictions, max(1, round(mask_prob * non_special_tokens)))``. Spans are taken
  unit by unit until the selected-token count reaches the budget; the last unit is taken whole, so the budget can
  be exceeded only inside the last selected word (as in the original). The selected share is therefore a little
  above ``mask_prob`` with whole words: 15.2% at 512 tokens and 15.7% at 128 tokens on the bundled English sample
  with an 800-piece vocabulary (tokens are single units for the v3 generator, which hits 15% exactly).
- Each selected token becomes [MASK] with ``replace_with_mask``, a random token with ``replace_with_random``, and
  stays unchanged otherwise. ``labels`` hold the original id at selected positions and -100 elsewhere.

How spans are drawn here (vectorised): each sequence's units are tiled, left to right, by blocks made of an n-gram
(n drawn from p(n)) followed by one separator unit that the block never selects; blocks get a random order (a
random permutation per sequence); units are visited block by block in that order, each block's n-gram left to
right, and a cumulative sum of the units' token counts in that order decides which units fit in the budget. The
tiling starts at a random phase taken from the stationary distribution of the block process, so the first words of a
sequence are no more likely to be selected than any others.

Deviations from the original, all deliberate:

1. Span placement. The original walks windows of ``n * int(1/mask_prob)`` units, puts one n-gram at a uniform
   offset in each, and then masks the marked units left to right until the budget is met. Because the windows mark
   about 1/6 of the units and the budget is 15% of the tokens, the end of each sequence is masked less often than
   its beginning, and a short sequence can fall short of the budget. Here blocks are taken in random order, so every
   position is equally likely to be selected, and the budget is always met at the usual rates (the separators leave
   about 60% of the units selectable for ``max_ngram=3``, so only a ``mask_prob`` near that can fall short). The
   span-length distribution is the same (each chosen span is an n-gram with probability p(n); only the last span,
   cut by the budget, and spans cut by the end of the sequence are shorter, as in the original).
2. Separation. In the original, consecutive n-grams lie in different windows and rarely touch; here the separator
   unit in every block guarantees that two chosen n-grams never touch, so a run of adjacent selected words is
   exactly one n-gram. With ``max_ngram=1`` there is no separator: each unit is its own block and selection is a
   uniform random subset of units (the original's windows make the v3 generator masking a little more evenly
   spread than uniform; the masking rate is the same).
3. Whole-word grouping follows ``whole_word``, not ``max_ngram``: the original groups sub-words only when
   ``max_gram > 1``. The presets reproduce the original settings (v2 MLM: words; v3 generator: tokens).
4. The budget counts non-special tokens; the original counts [CLS] and [SEP] too (0.3 tokens more per sequence at
   15%). A continuation token that follows a special token starts its own unit instead of joining the word before
   the special token.
5. Random replacements are drawn uniformly from ``[random_token_low, vocab_size)`` without ``mask_token_id``. The
   original draws from the whole vocabulary, special tokens included; pass ``random_token_low`` = the number of
   leading special ids (4 for the DeBERTa layout [PAD] [CLS] [SEP] [UNK]) to keep them out.
6. Labels use -100 for "not selected" (the HuggingFace convention) instead of the original's 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingConfig:
    """How tokens are selected and corrupted; the defaults are the DeBERTa-v2 MLM settings (``MLM_MASKING``)."""

    mask_prob: float = 0.15
    """Fraction of the non-special tokens selected per sequence (the original ``mask_lm_prob``)."""
    max_ngram: int = 3
    """Longest span in units (words, or tokens with ``whole_word=False``); p(n) is proportional to 1/n."""
    whole_word: bool = True
    """Group sub-word tokens into words with ``word_start``, so a word is selected whole or not at all."""
    replace_with_mask: float = 0.8
    """Share of the selected tokens that become [MASK]."""
    replace_with_random: float = 0.1
    """Share of the selected tokens that become a random token; the rest keep their id."""
    max_predictions: int | None = None
    """Cap on selected tokens per sequence (exceeded only within the last word); None means
    ``ceil(L * mask_prob / 10) * 10`` for padded length L, as the original (80 at L=512)."""

    def __post_init__(self):
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob={self.mask_prob}: must be in (0, 1]")
        if self.max_ngram < 1:
            raise ValueError(f"max_ngram={self.max_ngram}: must be at least 1")
        if not (0.0 <= self.replace_with_mask <= 1.0 and 0.0 <= self.replace_with_random <= 1.0):
            raise ValueError("replace_with_mask and replace_with_random must be in [0, 1]")
        if self.replace_with_mask + self.replace_with_random > 1.0 + 1e-9:
            raise ValueError(f"replace_with_mask + replace_with_random = "
                             f"{self.replace_with_mask + self.replace_with_random}: must not exceed 1")
        if self.max_predictions is not None and self.max_predictions < 1:
            raise ValueError(f"max_predictions={self.max_predictions}: must be at least 1 (or None)")

    def cap(self, seq_len: int) -> int:
        """Selected-token cap for sequences padded to ``seq_len``."""
        if self.max_predictions is not None:
            return self.max_predictions
        return max(1, math.ceil(seq_len * self.mask_prob / 10) * 10)


MLM_MASKING = MaskingConfig(mask_prob=0.15, max_ngram=3, whole_word=True, replace_with_mask=0.8,
                            replace_with_random=0.1)
"""DeBERTa-v2 MLM as ``mlm.sh`` trains it: whole-word n-grams up to 3, 80% [MASK] / 10% random / 10% unchanged."""

RTD_GENERATOR_MASKING = MaskingConfig(mask_prob=0.15, max_ngram=1, whole_word=False, replace_with_mask=1.0,
                                      replace_with_random=0.0)
"""DeBERTa-v3 generator input (``rtd_task.py``): 15% of tokens, single tokens, all replaced by [MASK]."""


def _ngram_cdf(max_ngram: int, separator: int, size_biased: bool, device: torch.device) -> torch.Tensor:
    """Cumulative p(n) proportional to 1/n; ``size_biased`` weighs n by its block length n + separator."""
    n = torch.arange(1, max_ngram + 1, dtype=torch.float64)
    p = 1.0 / n
    if size_biased:
        p = p * (n + separator)
    return (torch.cumsum(p, 0) / p.sum()).to(device=device, dtype=torch.float32)


def _draw_ngram(u: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of n (1-based) from uniforms ``u``."""
    return (torch.searchsorted(cdf, u.contiguous(), right=True) + 1).clamp_(max=cdf.numel())


def select_tokens(
    word_start: torch.Tensor,
    special_mask: torch.Tensor,
    config: MaskingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool [B, L]: the tokens chosen for prediction (whole units, n-gram spans, per-sequence budget).

    The selection only depends on the word structure and the random draws, not on token ids.
    """
    if word_start.shape != special_mask.shape or word_start.dim() != 2:
        raise ValueError(f"word_start {tuple(word_start.shape)} and special_mask {tuple(special_mask.shape)} "
                         "must both be [batch, length]")
    device = special_mask.device
    batch, length = special_mask.shape
    candidate = ~special_mask.bool()
    positions = torch.arange(length, device=device).expand(batch, length)

    # Units: a unit starts at a non-special token that begins a word, follows a special token, or (token-level
    # masking) at every non-special token.
    if config.whole_word:
        after_special = torch.ones_like(candidate)
        after_special[:, 1:] = ~candidate[:, :-1]
        unit_start = candidate & (word_start.bool() | after_special)
    else:
        unit_start = candidate
    unit_index = torch.cumsum(unit_start.long(), dim=1) - 1  # [B, L]: the unit each token belongs to
    unit_first = torch.cummax(torch.where(unit_start, positions, -1), dim=1).values
    offset_in_unit = positions - unit_first  # continuation tokens: 1, 2, ... after their word start

    # Blocks over units: n-gram (n ~ p(n)) + separator unit; K blocks always cover every unit index < L.
    separator = 1 if config.max_ngram > 1 else 0
    num_blocks = length + config.max_ngram + 1
    if config.max_ngram > 1:
        u = torch.rand(batch, num_blocks, device=device, generator=generator)
        ngram = _draw_ngram(u[:, 1:], _ngram_cdf(config.max_ngram, separator, False, device))
        first = _draw_ngram(u[:, :1], _ngram_cdf(config.max_ngram, separator, True, device))
        ngram = torch.cat([first, ngram], dim=1)  # [B, K]
        # Stationary phase: the unit at index 0 sits at a uniform offset inside the (size-biased) first block.
        phase_u = torch.rand(batch, 1, device=device, generator=generator)
        phase = (phase_u * (first + separator)).long().clamp_(max=first + separator - 1)
    else:
        ngram = torch.ones(batch, num_blocks, dtype=torch.long, device=device)
        phase = torch.zeros(batch, 1, dtype=torch.long, device=device)
    block_len = ngram + separator
    block_start = torch.cumsum(block_len, dim=1) - block_len - phase  # [B, K], block 0 starts at -phase <= 0
    rank = torch.argsort(torch.rand(batch, num_blocks, device=device, generator=generator), dim=1)  # random order

    unit = unit_index.clamp(min=0)
    block = torch.searchsorted(block_start, unit, right=True) - 1  # [B, L]
    pos_in_block = unit - block_start.gather(1, block)
    selectable = candidate & (pos_in_block < ngram.gather(1, block))

    # Visit tokens in (block rank, position in block, token position) order: units of one span stay together, and
    # a unit's tokens are contiguous. A unit is taken when the tokens taken before it are fewer than the budget.
    span_width = config.max_ngram + separator
    big = (num_blocks * span_width + 1) * length
    key = torch.where(selectable, (rank.gather(1, block) * span_width + pos_in_block) * length + positions, big)
    order = torch.argsort(key, dim=1)
    counts = selectable.gather(1, order).long()
    before_sorted = torch.cumsum(counts, dim=1) - counts
    before = torch.empty_like(before_sorted).scatter_(1, order, before_sorted)  # back to token positions
    before_unit = before - offset_in_unit  # tokens taken before this token's unit starts

    budget = torch.round(candidate.sum(dim=1).double() * config.mask_prob).long().clamp_(min=1)
    budget = budget.clamp_(max=config.cap(length)).unsqueeze(1)
    return selectable & (before_unit < budget)


def mask_tokens(
    input_ids: torch.Tensor,
    word_start: torch.Tensor,
    special_mask: torch.Tensor,
    config: MaskingConfig,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    random_token_low: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select tokens and corrupt them: returns ``(masked_input_ids, labels)``, both [B, L] like ``input_ids``.

    ``special_mask`` is True at [CLS]/[SEP]/[PAD]/[UNK]/[MASK] (never selected). ``labels`` is the original id at
    selected positions and -100 elsewhere. Random replacements are uniform over ``[random_token_low, vocab_size)``
    minus ``mask_token_id``, so a "random" token is never a [MASK] and the 80/10/10 split stays exact.
    """
    if input_ids.shape != word_start.shape or input_ids.shape != special_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, word_start {tuple(word_start.shape)} and "
                         f"special_mask {tuple(special_mask.shape)} must have the same [batch, length] shape")
    selected = select_tokens(word_start, special_mask, config, generator)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    r = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    to_mask = selected & (r < config.replace_with_mask)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    if config.replace_with_random > 0:
        skip_mask = int(random_token_low <= mask_token_id < vocab_size)
        choices = vocab_size - random_token_low - skip_mask
        if choices < 1:
            raise ValueError(f"no token id to draw random replacements from: [{random_token_low}, {vocab_size}) "
                             f"without [MASK]={mask_token_id}")
        random_ids = torch.randint(0, choices, input_ids.shape, device=input_ids.device, generator=generator)
        random_ids = random_ids + random_token_low
        if skip_mask:
            random_ids = random_ids + (random_ids >= mask_token_id).long()
        to_random = selected & (r >= config.replace_with_mask) & (
            r < config.replace_with_mask + config.replace_with_random)
        masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    return masked, labels


def sample_replacements(
    logits_at_masked: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """One token per masked position drawn from ``softmax(logits / temperature)``: LongTensor [M].

    As the original RTD task: a multinomial draw (not argmax, not Gumbel noise), in fp32 whatever the logits'
    precision (bf16/fp16 probabilities over 128k entries lose the tail), detached from the graph. Every vocabulary
    entry can be drawn, the original token included (the discriminator then labels that position "original").
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be positive")
    if logits_at_masked.dim() != 2:
        raise ValueError(f"logits_at_masked must be [masked positions, vocab], got {tuple(logits_at_masked.shape)}")
    with torch.no_grad():
        if logits_at_masked.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=logits_at_masked.device)
        probs = torch.softmax(logits_at_masked.detach().float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def rtd_labels(
    masked_or_sampled_input_ids: torch.Tensor, original_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Discriminator targets, float [B, L]: 1 where a selected position (``labels != -100``) holds a token other
    than the original, 0 elsewhere; a position where the generator sampled the original token counts as original,
    as in the original ``rtd_task.py``."""
    replaced = (labels != IGNORE_INDEX) & (masked_or_sampled_input_ids != original_ids)
    return replaced.float()
