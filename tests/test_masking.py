"""Masking statistics on real English text (the bundled World English Bible sample): rate, whole words, n-gram
spans, 80/10/10, labels, determinism, the RTD generator preset, replacement sampling and discriminator labels.

The tokenizer is a small SentencePiece unigram model trained here by the project's own trainer
(``data_prep.tokenizer.train_spm``): [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 inside the model and [MASK] appended after it,
the DeBERTa layout. Word starts are derived the way the shards mark them ("▁" pieces, special tokens and single
punctuation characters begin a word).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.objectives.masking import (
    IGNORE_INDEX,
    MLM_MASKING,
    RTD_GENERATOR_MASKING,
    MaskingConfig,
    mask_tokens,
    rtd_labels,
    sample_replacements,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "en" / "web_genesis_mark.txt"
PAD, CLS, SEP, UNK = 0, 1, 2, 3
FIRST_ORDINARY = 4  # random replacements are drawn from [4, vocab) without [MASK]
MASK = 800  # appended after the 800 spm pieces
SEQ_LEN = 128
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def corpus():
    """Packed rows like the shards: [CLS] line [SEP] line [SEP] ... padded to SEQ_LEN; every 7th row holds one line
    only, so many rows carry padding. Returns (input_ids, word_start, special_mask, vocab_size)."""
    import sentencepiece as spm

    from data_prep.tokenizer import TokenizerSettings, split_sentences, train_spm

    lines = [s for doc in SAMPLE.read_text(encoding="utf-8").split("\n\n") for s in split_sentences(doc)]
    sp = spm.SentencePieceProcessor(model_proto=train_spm(lines, TokenizerSettings(vocab_size=MASK)))
    assert sp.get_piece_size() == MASK and sp.id_to_piece(CLS) == "[CLS]"
    vocab_size = MASK + 1
    pieces = [sp.id_to_piece(i) for i in range(MASK)]
    starts = np.array([i <= UNK or p.startswith("\u2581") or (len(p) == 1 and not p.isalnum())
                       for i, p in enumerate(pieces)] + [True])

    rows, row = [], [CLS]
    for k, ids in enumerate(sp.encode(lines)):
        ids = ids[: SEQ_LEN - 2]
        if len(row) + len(ids) + 1 > SEQ_LEN or (len(row) > 1 and k % 7 == 0):
            rows.append(row)
            row = [CLS]
        row += ids + [SEP]
    rows.append(row)
    input_ids = torch.tensor([r + [PAD] * (SEQ_LEN - len(r)) for r in rows], dtype=torch.long)
    word_start = torch.from_numpy(starts)[input_ids]
    special = torch.isin(input_ids, torch.tensor([PAD, CLS, SEP, UNK, MASK]))
    assert (input_ids == PAD).sum() > 1000 and (input_ids == SEP).sum() > 2 * len(rows)  # padding, packed rows
    assert (~special).sum() > 15000 and (~word_start & ~special).sum() > 2000  # real words split into pieces
    return input_ids, word_start, special, vocab_size


def run(corpus, config, seed, **kwargs):
    ids, word_start, special, vocab = corpus
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, word_start, special, config, mask_token_id=MASK, vocab_size=vocab, generator=g,
                       random_token_low=FIRST_ORDINARY, **kwargs)


def word_ids(word_start: torch.Tensor, special: torch.Tensor) -> np.ndarray:
    """Per token, the index of its word in the row (-1 at special tokens). A word starts at a word-start token or
    after a special token; numbering runs on across special tokens, as the units do (an n-gram may span a [SEP],
    as in the original)."""
    ws, sp = word_start.numpy(), special.numpy()
    after_special = np.ones_like(sp)
    after_special[:, 1:] = sp[:, :-1]
    words = np.cumsum(~sp & (ws | after_special), axis=1) - 1
    return np.where(sp, -1, words)


def budget(special: torch.Tensor, config: MaskingConfig) -> torch.Tensor:
    n = (~special).sum(1).double()
    return torch.round(n * config.mask_prob).long().clamp(min=1).clamp(max=config.cap(special.shape[1]))


@pytest.mark.parametrize("config", [MLM_MASKING, RTD_GENERATOR_MASKING], ids=["mlm", "rtd"])
def test_selected_rate_is_mask_prob_and_budget_is_met(corpus, config):
    ids, word_start, special, _ = corpus
    selected_total = candidates = 0
    for seed in SEEDS:
        _, labels = run(corpus, config, seed)
        selected = labels != IGNORE_INDEX
        selected_total += selected.sum().item()
        candidates += (~special).sum().item()
        assert torch.all(selected.sum(1) >= budget(special, config))  # every row reaches its budget
    assert candidates > 45000
    assert abs(selected_total / candidates - config.mask_prob) < 0.015


@pytest.mark.parametrize("cap", [None, 5])
def test_budget_exceeded_only_within_the_last_word(corpus, cap):
    ids, word_start, special, _ = corpus
    config = MaskingConfig(max_predictions=cap)
    words = word_ids(word_start, special)
    for seed in SEEDS:
        selected = (run(corpus, config, seed)[1] != IGNORE_INDEX).numpy()
        limit = budget(special, config).numpy()
        for b in range(len(selected)):
            lengths = np.bincount(words[b][selected[b]])
            count = selected[b].sum()
            assert count >= limit[b]
            # the last word taken started below the budget, so dropping the longest selected word gets below it
            assert count - lengths.max() < limit[b]
            if cap is not None:
                assert count - lengths.max() < cap


def test_default_cap_follows_the_original():
    assert MaskingConfig().cap(512) == 80
    assert MaskingConfig().cap(128) == 20
    assert MaskingConfig(max_predictions=7).cap(512) == 7


def test_whole_words_are_never_split(corpus):
    ids, word_start, special, _ = corpus
    words = word_ids(word_start, special)
    split_with_tokens = 0
    for config in (MLM_MASKING, MaskingConfig(max_ngram=1), MaskingConfig(whole_word=False, max_ngram=1)):
        for seed in SEEDS:
            selected = (run(corpus, config, seed)[1] != IGNORE_INDEX).numpy()
            for b in range(len(selected)):
                w = words[b][words[b] >= 0]
                sel = selected[b][words[b] >= 0]
                any_sel = np.bincount(w, weights=sel) > 0
                all_sel = np.bincount(w, weights=sel) == np.bincount(w)
                partly = (any_sel & ~all_sel).sum()
                if config.whole_word:
                    assert partly == 0
                else:
                    split_with_tokens += partly
    assert split_with_tokens > 100  # token-level masking does split words: the grouping is what prevents it


def selected_runs(selected: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Lengths, in words, of the runs of consecutive selected words."""
    chosen = np.zeros((len(words), words.max() + 2), dtype=np.int8)  # a last column of zeros ends every row's run
    rows, cols = np.nonzero(selected)
    chosen[rows, words[rows, cols]] = 1
    edges = np.diff(np.concatenate([[0], chosen.ravel(), [0]]))
    return np.nonzero(edges == -1)[0] - np.nonzero(edges == 1)[0]


def test_ngram_spans_follow_one_over_n(corpus):
    """Runs of adjacent selected words are the sampled n-grams: p(n) = 6/11, 3/11, 2/11 for max_ngram=3, never
    longer than 3. Rows of 512 tokens (four packed rows joined), so that the one span per row cut short by the budget
    hardly shifts the proportions (at 128 tokens it adds about 4 points to the 1-grams)."""
    ids, word_start, special, vocab = corpus
    rows = len(ids) // 4 * 4
    long_rows = tuple(t[:rows].reshape(-1, 512) for t in (ids, word_start, special)) + (vocab,)
    words = word_ids(long_rows[1], long_rows[2])
    runs = np.concatenate([selected_runs((run(long_rows, MLM_MASKING, seed)[1] != IGNORE_INDEX).numpy(), words)
                           for seed in range(6)])
    counts = np.bincount(runs, minlength=4)[1:]
    assert len(counts) == 3  # nothing longer than max_ngram: chosen spans never touch
    assert counts.sum() > 8000
    freq = counts / counts.sum()
    for observed, expected in zip(freq, (6 / 11, 3 / 11, 2 / 11)):
        assert abs(observed - expected) < 0.03, freq

    words = word_ids(corpus[1], corpus[2])
    runs1 = np.concatenate([selected_runs((run(corpus, MaskingConfig(max_ngram=1), seed)[1] != IGNORE_INDEX).numpy(),
                                          words) for seed in SEEDS])
    assert np.mean(runs1 == 1) > 0.8  # unigram masking: mostly isolated words


def test_selection_is_spread_evenly_over_the_sequence(corpus):
    """Unlike the original left-to-right cut, the end of a sequence is masked as often as its beginning."""
    ids, word_start, special, _ = corpus
    real = (~special).numpy()
    position = np.cumsum(real, axis=1) - 1
    quarter = np.minimum(4 * position // real.sum(1, keepdims=True), 3)
    for config in (MLM_MASKING, RTD_GENERATOR_MASKING):
        selected = sum((run(corpus, config, seed)[1] != IGNORE_INDEX).numpy() for seed in SEEDS)
        for q in range(4):
            in_q = real & (quarter == q)
            rate = selected[in_q].sum() / (len(SEEDS) * in_q.sum())
            assert abs(rate - config.mask_prob) < 0.02, (q, rate)


def test_replacements_are_80_10_10(corpus):
    ids, _, special, vocab = corpus
    mask = rand = keep = 0
    for seed in SEEDS:
        masked, labels = run(corpus, MLM_MASKING, seed)
        selected = labels != IGNORE_INDEX
        assert torch.equal(masked[~selected], ids[~selected])  # nothing outside the selection changes
        out = masked[selected]
        original = ids[selected]
        mask += (out == MASK).sum().item()
        replaced = (out != MASK) & (out != original)
        rand += replaced.sum().item()
        keep += (out == original).sum().item()
        # random tokens come from the ordinary ids and are never [MASK] or another special token
        assert torch.all((out[replaced] >= FIRST_ORDINARY) & (out[replaced] < vocab))
    total = mask + rand + keep
    assert total > 6000
    assert abs(mask / total - 0.8) < 0.02
    assert abs(rand / total - 0.1) < 0.015  # a random draw equal to the original (1 in ~800) counts as kept
    assert abs(keep / total - 0.1) < 0.015


def test_random_replacements_cover_the_range_without_mask(corpus):
    """[MASK] lies inside the range (as in the DeBERTa layout, right after the spm pieces); random replacements
    still never produce it, and they reach the whole range."""
    config = MaskingConfig(replace_with_mask=0.0, replace_with_random=1.0, mask_prob=0.5)
    ids, _, _, vocab = corpus
    g = torch.Generator().manual_seed(3)
    masked, labels = mask_tokens(ids, corpus[1], corpus[2], config, MASK, vocab, g, random_token_low=0)
    drawn = masked[labels != IGNORE_INDEX]
    assert not torch.any(drawn == MASK)
    assert drawn.min() >= 0 and drawn.max() < vocab
    assert torch.unique(drawn).numel() > 0.95 * (vocab - 1)


def test_labels_and_special_tokens(corpus):
    ids, _, special, _ = corpus
    for config in (MLM_MASKING, RTD_GENERATOR_MASKING):
        masked, labels = run(corpus, config, 5)
        selected = labels != IGNORE_INDEX
        assert torch.equal(labels[selected], ids[selected])
        assert torch.all(labels[~selected] == IGNORE_INDEX)
        assert not torch.any(selected & special)  # [CLS], [SEP], [PAD] never selected
        assert torch.equal(masked[special], ids[special])
        assert masked.dtype == ids.dtype and labels.dtype == ids.dtype


def test_same_seed_same_masks(corpus):
    a = run(corpus, MLM_MASKING, 11)
    b = run(corpus, MLM_MASKING, 11)
    c = run(corpus, MLM_MASKING, 12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_rtd_generator_preset_masks_every_selected_token(corpus):
    ids, word_start, special, _ = corpus
    assert RTD_GENERATOR_MASKING == MaskingConfig(max_ngram=1, whole_word=False, replace_with_mask=1.0,
                                                  replace_with_random=0.0)
    masked, labels = run(corpus, RTD_GENERATOR_MASKING, 4)
    selected = labels != IGNORE_INDEX
    assert torch.all(masked[selected] == MASK)
    assert torch.equal(masked[~selected], ids[~selected])
    assert torch.all(selected.sum(1) == budget(special, RTD_GENERATOR_MASKING))  # single tokens: budget exactly


def test_rtd_labels_count_a_sampled_original_as_original(corpus):
    ids, _, _, vocab = corpus
    masked, labels = run(corpus, RTD_GENERATOR_MASKING, 6)
    selected = labels != IGNORE_INDEX
    positions = selected.nonzero()
    sampled = torch.randint(FIRST_ORDINARY, vocab, (len(positions),), generator=torch.Generator().manual_seed(0))
    sampled[::3] = ids[selected][::3]  # every third position: the generator sampled the original token
    disc_input = ids.clone()
    disc_input[selected] = sampled
    replaced = rtd_labels(disc_input, ids, labels)
    assert replaced.shape == ids.shape and replaced.dtype == torch.float32
    assert torch.all(replaced[~selected] == 0)
    expected = (sampled != ids[selected]).float()
    assert torch.equal(replaced[selected], expected)
    assert replaced[selected][::3].sum() == 0 and replaced.sum() > 0.6 * selected.sum()
    # the generator's input itself: every selected position differs ([MASK]), so every one is "replaced"
    assert torch.equal(rtd_labels(masked, ids, labels), selected.float())


def chi_square(draws: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(draws, minlength=len(probs)).double()
    expected = probs.double() * len(draws)
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_replacements_follow_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    m = 20000
    draws = sample_replacements(logits.expand(m, -1), torch.Generator().manual_seed(0), temperature)
    assert draws.shape == (m,) and draws.dtype == torch.long
    probs = torch.softmax(logits / temperature, dim=-1)
    assert chi_square(draws, probs) < 20.5  # 5 degrees of freedom, p = 0.001
    # rows are independent: a different distribution per row is honoured
    mixed = torch.stack([logits, logits.flip(0)]).repeat(m // 2, 1)
    draws = sample_replacements(mixed, torch.Generator().manual_seed(1), temperature)
    assert chi_square(draws[0::2], probs) < 20.5 and chi_square(draws[1::2], probs.flip(0)) < 20.5


def test_sample_replacements_low_precision_detached_and_complete():
    logits = torch.zeros(30000, 8, dtype=torch.bfloat16, requires_grad=True)
    draws = sample_replacements(logits * 1, torch.Generator().manual_seed(2))
    assert not draws.requires_grad
    assert chi_square(draws, torch.full((8,), 1 / 8)) < 24.3  # 7 degrees of freedom, p = 0.001: no id is skipped
    assert sample_replacements(torch.zeros(0, 8)).shape == (0,)
    with pytest.raises(ValueError):
        sample_replacements(torch.zeros(3, 8), temperature=0.0)


@pytest.mark.parametrize("kwargs", [
    {"mask_prob": 0.0}, {"mask_prob": 1.5}, {"max_ngram": 0}, {"replace_with_mask": 0.95},
    {"replace_with_random": -0.1}, {"max_predictions": 0},
])
def test_invalid_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        MaskingConfig(**kwargs)


def test_shape_mismatch_is_refused(corpus):
    ids, word_start, special, vocab = corpus
    with pytest.raises(ValueError):
        mask_tokens(ids, word_start[:, :-1], special, MLM_MASKING, MASK, vocab)
