"""Tokenising a task with the model's own tokenizer, and length-grouped dynamic padding.

Sentiment reviews are mostly short: padding every batch to the longest text of the task (or to 512) wastes most
of the compute. Batches here are padded to their own longest row, and rows of similar length are put together
(the mega-batch scheme of transformers' ``LengthGroupedSampler``), so the order is still random per seed but the
padding is small. :func:`padding_fraction` measures what that saves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pretrain.model import IGNORE_INDEX
from pretrain.probe.tasks import Task, TaskError

log = logging.getLogger(__name__)
TOKENIZER_MARKERS = ("tokenizer.json", "spm.model", "tokenizer_config.json", "vocab.txt")


def load_tokenizer(directory: str | os.PathLike):
    """The fast tokenizer saved with a model (SentencePiece or WordPiece, as exported)."""
    from transformers import AutoTokenizer

    path = Path(directory)
    if not any((path / name).is_file() for name in TOKENIZER_MARKERS):
        raise TaskError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); export the model with its "
                        "tokenizer (python -m pretrain.export) or copy the tokenizer files into the directory")
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError) as err:
        raise TaskError(f"{path}: the tokenizer files cannot be loaded ({str(err).splitlines()[0][:200]}); "
                        "re-export the tokenizer") from None


@dataclass
class Encoded:
    """One split, tokenized: per row ``input_ids``, ``token_type_ids`` and ``label`` (an int, a float, or per-token
    ids with -100 where no tag is scored); ``word_index`` maps token positions back to words (token tasks)."""

    rows: list[dict[str, Any]]
    truncated: int

    def lengths(self) -> list[int]:
        return [len(r["input_ids"]) for r in self.rows]


def encode_split(task: Task, split: str, tokenizer, max_length: int) -> Encoded:
    """Tokenize one split; texts longer than ``max_length`` tokens are truncated, counted and reported."""
    rows = task.rows[split]
    if task.spec.type == "token_classification":
        encoded = _encode_tokens(rows, tokenizer, max_length)
    else:
        encoded = _encode_texts(rows, tokenizer, max_length)
    if encoded.truncated:
        log.warning("%s: %d of %d rows are longer than max length %d tokens and were truncated (raise --max-length "
                    "to keep them whole)", task.spec.files[split], encoded.truncated, len(rows), max_length)
    return encoded


def _encode_texts(rows: list[dict[str, Any]], tokenizer, max_length: int) -> Encoded:
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
    full = tokenizer(texts, pairs, truncation=False)["input_ids"]
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_token_type_ids=True)
    out = [{"input_ids": ids, "token_type_ids": types, "label": r["label"]}
           for ids, types, r in zip(enc["input_ids"], enc["token_type_ids"], rows)]
    return Encoded(out, sum(len(ids) > max_length for ids in full))


def _encode_tokens(rows: list[dict[str, Any]], tokenizer, max_length: int) -> Encoded:
    """First piece of each word carries the word's tag; the other pieces and special tokens get -100."""
    words = [r["tokens"] for r in rows]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                    return_token_type_ids=True)
    out, truncated = [], 0
    for i, row in enumerate(rows):
        word_ids = enc.word_ids(i)
        labels, word_index, seen = [], [], set()
        for w in word_ids:
            first = w is not None and w not in seen
            labels.append(row["tags"][w] if first else IGNORE_INDEX)
            word_index.append(w if first else -1)
            if w is not None:
                seen.add(w)
        truncated += len(seen) < len(row["tokens"])
        out.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i], "label": labels,
                    "word_index": word_index, "num_words": len(row["tokens"])})
    return Encoded(out, truncated)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """A random order fixed by ``seed``, cut into mega-batches of ``mega * batch_size`` rows, each sorted by length
    and cut into batches; the batch order is then shuffled too. The same seed gives the same batches on any
    machine (a CPU ``torch.Generator``)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    batches = []
    span = mega * batch_size
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: rows sorted by length (no order to randomise), least padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the padded tensor that is padding."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def collate(rows: list[dict[str, Any]], pad_id: int, task_type: str) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the batch."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        types[i, :n] = torch.tensor(r["token_type_ids"])
        mask[i, :n] = 1
    if task_type == "token_classification":
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, :len(r["label"])] = torch.tensor(r["label"])
    elif task_type == "regression":
        labels = torch.tensor([float(r["label"]) for r in rows])
    else:
        labels = torch.tensor([int(r["label"]) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def iterate(encoded: Encoded, batches: list[list[int]], pad_id: int, task_type: str) -> Iterator[tuple[list[int], dict]]:
    for b in batches:
        yield b, collate([encoded.rows[i] for i in b], pad_id, task_type)
