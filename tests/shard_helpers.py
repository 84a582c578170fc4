"""Helpers shared by the shard tests: small real tokenizers and corpus slices built from the bundled samples.

No hub access: the SentencePiece tokenizer is trained here with ``sentencepiece`` and converted to an HF directory
by ``transformers`` itself; the WordPiece ``vocab.txt`` is built from the characters of the Chinese sample, like
Erlangshen's single-character vocabulary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import data_prep
import numpy as np

from data_prep import shard_format as sf

REPO = Path(__file__).resolve().parents[1]


def sample_documents(lang: str, limit: int | None = None) -> list[str]:
    """Documents of the bundled sample corpus of ``lang``, read by the project's corpus reader."""
    from data_prep.corpus import CorpusOptions, iter_documents

    for root in data_prep.__path__:
        folder = Path(root) / "samples" / lang
        if folder.is_dir():
            break
    else:
        raise FileNotFoundError(f"no bundled samples for {lang!r} under data_prep/samples/")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".txt", ".jsonl", ".json", ".parquet"))
    docs = []
    for path in files:
        for doc in iter_documents(path, CorpusOptions()):
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                return docs
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return path


def train_spm_tokenizer(directory: Path, docs: list[str], vocab_size: int = 800) -> Path:
    """A DeBERTa-layout SentencePiece tokenizer directory ([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, [MASK] a symbol)."""
    import sentencepiece as spm
    from transformers import DebertaV2Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "train.txt"
    text.write_text("\n".join(docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "spm"), vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2,
        hard_vocab_limit=False,
    )
    text.unlink()
    (directory / "spm.vocab").unlink()
    hf = DebertaV2Tokenizer.from_pretrained(str(directory))
    hf.save_pretrained(str(directory))
    return directory


def build_wordpiece_vocab(directory: Path, docs: list[str], extra: int = 0) -> Path:
    """BERT-style vocab.txt: specials, every character of ``docs`` (+ ``##`` forms of ASCII alphanumerics)."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for d in docs for c in d.lower() if not c.isspace()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
    tokens += ["##" + c for c in chars if c.isascii() and c.isalnum()]
    tokens += [f"[unused{i}]" for i in range(extra)]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}), encoding="utf-8"
    )
    return directory


def read_all(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """All sequences (ids, flags) of a finished shard directory, in shard order."""
    manifest = sf.load_manifest(directory)
    ids, flags = [], []
    for entry in manifest["shards"]:
        header = sf.check_shard(directory, entry, manifest["settings"], full=True)
        a, b = sf.open_shard(directory / entry["file"], header)
        ids.append(np.array(a))
        flags.append(np.array(b))
    return np.concatenate(ids), np.concatenate(flags)


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
