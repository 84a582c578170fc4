"""Per-token word-start flags for whole-word masking.

Why per token and at preparation time: whole-word masking needs to know which token begins a word, and for
Chinese that takes a word segmenter (jieba), far too slow to run in the training loop.

Rules (``../shared/reference/deberta.md`` §7.2, §7.3):

- SentencePiece vocabularies: a piece starting with "▁" begins a word; so do special tokens and single-character
  punctuation/whitespace/control pieces (the official ``part_of_whole_word`` returns False for them). Other pieces
  continue the previous word. This is a property of the token id alone, so it is a lookup table over the
  vocabulary, applied to whole arrays of ids at once.
- WordPiece vocabularies: a ``##`` piece continues the previous token, everything else starts a word.
- ``lang="zh"``: jieba segments each document; a token starts a word iff its first character is where a jieba
  word starts (``##`` pieces never start one, special tokens always do). With single-character Chinese tokens
  (Erlangshen's vocab.txt) a jieba word thus becomes one run of tokens, matching Fengshen's longest-jieba-word
  grouping.
"""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError

SPM_SPACE = "\u2581"

# The tables below take a loaded ``data_prep.text_tokenizer.TextTokenizer`` (``tok``); this module does not import
# it, since text_tokenizer imports this one (TextTokenizer.word_start_table).


def is_punct_or_space(ch: str) -> bool:
    """BERT's notion of a punctuation/whitespace/control char, as the official ``part_of_whole_word`` uses."""
    if ch.isspace():
        return True
    cat = unicodedata.category(ch)
    if cat.startswith("C") or cat.startswith("P"):
        return True
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126


def vocab_word_start_table(tok) -> np.ndarray:
    """Bool array over ids: does this token begin a word by the ▁ / ## rule."""
    table = np.ones(tok.vocab_size, dtype=bool)
    specials = set(tok.special_ids.values())
    specials.update(i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special)
    for i in range(tok.vocab_size):
        if i in specials:
            continue
        piece = tok.backend.id_to_token(i)
        if piece is None:
            continue
        if tok.kind == "wordpiece":
            table[i] = not piece.startswith("##")
        else:
            table[i] = piece.startswith(SPM_SPACE) or (len(piece) == 1 and is_punct_or_space(piece))
    return table


def continuation_table(tok) -> np.ndarray:
    """Bool array over ids: a WordPiece ``##`` piece (never a word start, also for Chinese)."""
    table = np.zeros(tok.vocab_size, dtype=bool)
    if tok.kind == "wordpiece":
        for i in range(tok.vocab_size):
            piece = tok.backend.id_to_token(i)
            table[i] = piece is not None and piece.startswith("##")
    return table


def special_table(tok) -> np.ndarray:
    table = np.zeros(tok.vocab_size, dtype=bool)
    table[list(tok.special_ids.values())] = True
    for i, t in tok.backend.get_added_tokens_decoder().items():
        if t.special and i < tok.vocab_size:
            table[i] = True
    return table


class JiebaSegmenter:
    """jieba word-start positions of a text, with an optional user dictionary (``--jieba-dict``)."""

    def __init__(self, user_dict: str | None = None):
        import jieba

        jieba.setLogLevel(logging.WARNING)
        self._jieba = jieba.Tokenizer()
        self._jieba.initialize()
        if user_dict:
            path = Path(user_dict)
            if not path.is_file():
                raise DataPrepError(f"--jieba-dict {path}: no such file")
            try:
                self._jieba.load_userdict(str(path))
            except Exception as err:  # jieba raises ValueError/UnicodeDecodeError with unhelpful text
                raise DataPrepError(
                    f"--jieba-dict {path} cannot be read by jieba ({err}); one entry per line: word [freq] [tag]"
                ) from None

    def words(self, text: str) -> list[str]:
        return self._jieba.lcut(text, HMM=True)

    def start_mask(self, text: str) -> np.ndarray:
        """Bool array of length len(text)+1: True at every character index where a jieba word starts."""
        mask = np.zeros(len(text) + 1, dtype=bool)
        pos = 0
        for word in self._jieba.cut(text, HMM=True):
            mask[pos] = True
            pos += len(word)
        mask[pos] = True
        return mask


def jieba_word_starts(
    encodings, texts: list[str], segmenter: JiebaSegmenter, continuation: np.ndarray, special: np.ndarray
) -> list[np.ndarray]:
    """Word-start flags of each encoding (tokenizers.Encoding with offsets) from jieba's segmentation."""
    out = []
    for enc, text in zip(encodings, texts):
        ids = np.asarray(enc.ids, dtype=np.int64)
        if len(ids) == 0:
            out.append(np.zeros(0, dtype=bool))
            continue
        starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(ids))
        mask = segmenter.start_mask(text)
        flags = mask[np.clip(starts, 0, len(text))]
        flags &= ~continuation[ids]
        flags |= special[ids]
        out.append(flags)
    return out
