"""Load any tokenizer directory a DeBERTa checkpoint may ship, as one fast `tokenizers.Tokenizer`.

Why not just ``AutoTokenizer``: checkpoints ship three layouts, and transformers 5.x handles them unevenly.

- ``tokenizer.json`` (our own tokenizer, HF DeBERTa v2/v3 saves): loaded directly with ``tokenizers``.
- ``spm.model`` only (older DeBERTa saves): converted by ``DebertaV2Tokenizer.from_pretrained`` (reads
  ``do_lower_case``/``split_by_punct`` from ``tokenizer_config.json``), the same conversion HF users get.
- ``vocab.txt`` only (BERT-style WordPiece, e.g. Erlangshen-DeBERTa-v2 Chinese): ``AutoTokenizer`` would pick
  the DeBERTa class from ``config.json`` and fail, so ``BertTokenizer`` is used explicitly.

The result is a plain ``tokenizers.Tokenizer``. Worker processes rebuild it from its JSON string (``to_str``)
instead of importing transformers, which keeps start-up cheap and the encoding identical in every process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.word_boundaries import vocab_word_start_table

# Files that define tokenization. Only these are hashed and copied: a checkpoint directory may also hold weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "spm.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

SPECIAL_NAMES = ("cls", "sep", "pad", "mask", "unk")
_DEFAULT_SPECIALS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}


@dataclass
class TextTokenizer:
    """A loaded tokenizer: the fast backend plus what packing and word boundaries need."""

    backend: object  # tokenizers.Tokenizer
    kind: str  # "sentencepiece" (▁ word starts) or "wordpiece" (## continuations)
    special_ids: dict[str, int]
    vocab_size: int  # number of ids, added tokens included (max id + 1)
    checksum: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    source: str = ""

    @property
    def cls_id(self) -> int:
        return self.special_ids["cls"]

    @property
    def sep_id(self) -> int:
        return self.special_ids["sep"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    @property
    def mask_id(self) -> int:
        return self.special_ids["mask"]

    @property
    def unk_id(self) -> int:
        return self.special_ids["unk"]

    def id_to_token(self, i: int) -> str:
        return self.backend.id_to_token(int(i)) or f"<{i}>"

    def encode_batch(self, texts: list[str], offsets: bool = False):
        """Token ids of each text, no [CLS]/[SEP]. With ``offsets`` returns the Encoding objects instead."""
        if offsets:
            return self.backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def word_start_table(self) -> np.ndarray:
        """Per-id word-start flag for the vocabulary (bool array of length vocab_size); see word_boundaries."""
        return vocab_word_start_table(self)

    def copy_files(self, dest: Path) -> None:
        """Copy the hashed tokenizer files into ``dest`` (so a shard directory carries its own tokenizer)."""
        dest.mkdir(parents=True, exist_ok=True)
        for name in self.files:
            shutil.copyfile(Path(self.source) / name, dest / name)


def tokenizer_checksum(directory: Path) -> tuple[str, dict[str, str]]:
    """sha256 over the tokenization files present (name + content, sorted by name), and each file's own sha256."""
    files = {}
    combined = hashlib.sha256()
    for name in sorted(TOKENIZER_FILES):
        path = directory / name
        if path.is_file():
            data = path.read_bytes()
            files[name] = hashlib.sha256(data).hexdigest()
            combined.update(name.encode() + b"\0" + files[name].encode() + b"\n")
    return combined.hexdigest(), files


def _read_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataPrepError(f"{path} is not valid JSON ({err}); fix or remove it") from None


def _special_token_names(directory: Path, config: dict) -> dict[str, str]:
    names = dict(_DEFAULT_SPECIALS)
    stm = directory / "special_tokens_map.json"
    sources = [config]
    if stm.is_file():
        try:
            sources.append(json.loads(stm.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataPrepError(f"{stm} is not valid JSON ({err}); fix or remove it") from None
    for source in sources:
        for key in SPECIAL_NAMES:
            value = source.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


def _build_backend(directory: Path, config: dict):
    import tokenizers

    if (directory / "tokenizer.json").is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataPrepError(f"{directory / 'tokenizer.json'} cannot be loaded by `tokenizers`: {err}") from None
    if (directory / "spm.model").is_file():
        from transformers import DebertaV2Tokenizer

        return DebertaV2Tokenizer.from_pretrained(str(directory)).backend_tokenizer
    if (directory / "vocab.txt").is_file():
        from transformers import BertTokenizer

        return BertTokenizer.from_pretrained(str(directory)).backend_tokenizer
    raise DataPrepError(
        f"tokenizer directory {directory} has none of tokenizer.json, spm.model or vocab.txt; "
        f"pass a HuggingFace tokenizer directory (e.g. one written by `python -m data_prep tokenizer`)"
    )


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """Load a tokenizer directory; DataPrepError naming the directory/token when it is unusable for DeBERTa."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataPrepError(f"--tokenizer {directory}: no such directory")
    config = _read_config(directory)
    backend = _build_backend(directory, config)
    model_kind = type(backend.model).__name__
    kind = "wordpiece" if model_kind == "WordPiece" else "sentencepiece"
    names = _special_token_names(directory, config)
    special_ids = {}
    for key, token in names.items():
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise DataPrepError(
                f"tokenizer {directory} has no {key} token {token!r} in its vocabulary; DeBERTa pretraining needs "
                f"[CLS], [SEP], [PAD], [MASK] and [UNK]"
            )
        special_ids[key] = int(token_id)
    vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
    vocab_size = max(vocab_size, max(special_ids.values()) + 1)
    checksum, files = tokenizer_checksum(directory)
    return TextTokenizer(backend, kind, special_ids, vocab_size, checksum, files, str(directory.resolve()))


def from_serialized(state: dict) -> TextTokenizer:
    """Rebuild in a worker process from ``serialize`` output (no transformers import, no file access)."""
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(state["backend"])
    return TextTokenizer(
        backend, state["kind"], state["special_ids"], state["vocab_size"], state["checksum"], state["files"],
        state["source"],
    )


def serialize(tok: TextTokenizer) -> dict:
    return {
        "backend": tok.backend.to_str(),
        "kind": tok.kind,
        "special_ids": tok.special_ids,
        "vocab_size": tok.vocab_size,
        "checksum": tok.checksum,
        "files": tok.files,
        "source": tok.source,
    }
