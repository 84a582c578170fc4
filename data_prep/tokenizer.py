"""Train (or extend) a SentencePiece unigram tokenizer with DeBERTa's id layout and write a HuggingFace directory.

Id layout (the released DeBERTa v2/v3 ``spm.model`` convention, see the project's DeBERTa reference, section 7):

- inside the spm model: ``[PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3`` (control/unknown pieces), then the learned pieces;
  ``--vocab-size N`` counts these spm pieces, the four specials included;
- ``[MASK]`` is not an spm piece: it is appended after the spm vocabulary, ``[MASK] = N``, exactly as the official
  ``SPMTokenizer`` and HF (an added special token) place it. The model therefore needs ``N + 1`` embedding rows.

Characters the vocabulary lacks become ``[UNK]`` (one ``[UNK]`` per run of such characters, in spm and in the
HF tokenizers alike). Byte fallback is deliberately off: transformers' ``DebertaV2Converter`` builds the fast
tokenizer with ``byte_fallback=False`` whatever the spm model says, so an spm model with byte fallback would give
``<0xNN>`` pieces where every HF DeBERTa-v2 tokenizer gives ``[UNK]`` (``tests/test_tokenizer.py`` shows this).
Rare characters are kept out of the vocabulary by ``character_coverage`` instead: 1.0 for alphabetic languages
(every character seen in the sample gets a piece, as in the DeBERTa reproduction), 0.9995 for languages with
large character sets (zh, ja, ko: SentencePiece's recommendation), so a handful of very rare characters map to
``[UNK]`` rather than taking vocabulary slots.

Extension (``extend_model``) keeps every old id: pieces learned from the new corpus that the old vocabulary lacks
are appended to the spm model. Because the old ``[MASK]`` sits right after the old spm pieces, ``[MASK]`` is first
written into the spm model at that same id (as a control piece, which spm never produces from text), and the new
pieces follow it: ``0..N-1`` old pieces, ``N`` ``[MASK]``, ``N+1..N+A`` new pieces. HF reads ``[MASK]`` from the
vocabulary at id ``N``; a tokenizer extended again keeps that layout (``[MASK]`` stays where it is). New pieces keep
the scores (log probabilities) of the model learned on the new corpus. One known limit: when two segmentations tie
exactly (the same pieces in another order, e.g. ``111`` as ``11|1`` or ``1|11``), spm and ``tokenizers`` break the
tie differently; merged vocabularies make such ties likelier, so check agreement on your own text after extending.

Normalisation: the spm model uses the ``nmt_nfkc`` rule (NFKC plus control-character removal and whitespace
mapping) and collapses/strips whitespace; the converted ``tokenizer.json`` carries the same rule (the spm
``precompiled_charsmap``), so ``tokenizers`` reproduces spm on any text. transformers 5.x's ``DebertaV2Tokenizer``
rebuilds its normaliser as NFC instead; on text that is already NFKC-normalised (what ``corpus`` produces by
default) it gives the same ids, on raw text with compatibility characters (full-width punctuation, ligatures)
it can differ. That is transformers' behaviour for every DeBERTa-v2 checkpoint; shards are made from normalised
text, so training never sees the difference.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data_prep.atomic_io import write_directory_atomic
from data_prep.corpus import TOKENIZER_RECORD as RECORD_FILE  # the record that marks a directory this module wrote
from data_prep.errors import DataPrepError

SPM_FILE = "spm.model"
SPECIALS = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]"}  # ids 0..3 inside the spm model
MASK = "[MASK]"
FORMAT_VERSION = 1
# languages whose character inventory is too large to give every character seen a piece
LARGE_CHARSET_LANGS = {"zh", "ja", "ko", "zh-hans", "zh-hant", "yue"}
DEFAULT_MAX_SENTENCES = 2_000_000
MAX_SENTENCE_CHARS = 4096  # longer lines are cut at a space (or hard) so the spm trainer does not drop them


@dataclass(frozen=True)
class TokenizerSettings:
    """Everything that determines the trained model, recorded in ``data_prep_tokenizer.json``."""

    vocab_size: int
    lang: str = "en"
    character_coverage: float | None = None  # None: by language (see module docstring)
    max_sentences: int = DEFAULT_MAX_SENTENCES
    seed: int = 0
    split_digits: bool = False
    max_piece_length: int = 16
    normalization_rule: str = "nmt_nfkc"

    @property
    def coverage(self) -> float:
        if self.character_coverage is not None:
            return self.character_coverage
        return 0.9995 if self.lang.lower() in LARGE_CHARSET_LANGS else 1.0

    def validate(self) -> None:
        if self.vocab_size < 8:
            raise DataPrepError(f"--vocab-size {self.vocab_size} is too small; use at least 8 (4 are specials)")
        if not 0.9 <= self.coverage <= 1.0:
            raise DataPrepError(f"--character-coverage {self.coverage} must lie in [0.9, 1.0]")
        if self.max_sentences < 1:
            raise DataPrepError(f"--max-sentences {self.max_sentences} must be at least 1")

    def to_dict(self) -> dict:
        return {**asdict(self), "character_coverage": self.coverage, "byte_fallback": False, "model_type": "unigram"}


# ------------------------------------------------------------------------------------------------------- sampling


def split_sentences(doc: str) -> Iterator[str]:
    """spm's training unit is a line: a document's non-empty lines, long ones cut to ``MAX_SENTENCE_CHARS``."""
    for line in doc.split("\n"):
        line = line.strip()
        while len(line) > MAX_SENTENCE_CHARS:
            cut = line.rfind(" ", MAX_SENTENCE_CHARS // 2, MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            yield line[:cut].strip()
            line = line[cut:].strip()
        if line:
            yield line


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> tuple[list[str], int]:
    """Uniform sample of at most ``k`` items from a stream of unknown length (Algorithm R); memory O(k).

    Returns the sample (in reservoir order, deterministic for a seed) and the number of items seen.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for item in items:
        if seen < k:
            sample.append(item)
        else:
            j = rng.randrange(seen + 1)
            if j < k:
                sample[j] = item
        seen += 1
    return sample, seen


# ------------------------------------------------------------------------------------------------------ training


def train_spm(sentences: list[str], settings: TokenizerSettings, vocab_size: int | None = None,
              normalizer: dict | None = None) -> bytes:
    """Train a unigram model on in-memory sentences; return the serialized ModelProto."""
    import sentencepiece as spm

    vocab_size = vocab_size or settings.vocab_size
    if not sentences:
        raise DataPrepError("no sentences to train on: the corpus has no non-empty lines")
    normalizer = normalizer or {}
    model = io.BytesIO()
    options = dict(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=settings.coverage,
        byte_fallback=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece=SPECIALS["pad"], bos_piece=SPECIALS["cls"], eos_piece=SPECIALS["sep"], unk_piece=SPECIALS["unk"],
        normalization_rule_name=normalizer.get("name", settings.normalization_rule),
        add_dummy_prefix=normalizer.get("add_dummy_prefix", True),
        remove_extra_whitespaces=normalizer.get("remove_extra_whitespaces", True),
        split_digits=settings.split_digits,
        max_sentencepiece_length=settings.max_piece_length,
        max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,
        input_sentence_size=0,  # we sampled already
        num_threads=max(1, min(os.cpu_count() or 1, 16)),
        minloglevel=2,
    )
    spm.set_random_generator_seed(settings.seed)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1]
        hint = "lower --vocab-size or give more text"
        if "required_chars" in message or "smaller than required" in message:
            hint = "raise --vocab-size or lower --character-coverage"
        raise DataPrepError(f"SentencePiece training failed with --vocab-size {vocab_size}: {message}; {hint}") from None
    return model.getvalue()


def extend_model(old_proto: bytes, new_proto: bytes) -> tuple[bytes, int, int]:
    """Append the pieces of ``new_proto`` missing from ``old_proto``; old ids (and the old ``[MASK]`` id) unchanged.

    Returns the extended model, the number of pieces added and the ``[MASK]`` id.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    old, new = pb.ModelProto(), pb.ModelProto()
    old.ParseFromString(old_proto)
    new.ParseFromString(new_proto)
    if old.trainer_spec.model_type != pb.TrainerSpec.UNIGRAM:
        raise DataPrepError("--extend supports unigram SentencePiece models only (the old model is not unigram)")
    have = {p.piece: i for i, p in enumerate(old.pieces)}
    if MASK in have:
        mask_id = have[MASK]
    else:
        mask_id = len(old.pieces)  # where the appended [MASK] was: materialise it there
        piece = old.pieces.add()
        piece.piece, piece.score, piece.type = MASK, 0.0, pb.ModelProto.SentencePiece.CONTROL
        have[MASK] = mask_id
    added = 0
    for p in new.pieces:
        if p.type != pb.ModelProto.SentencePiece.NORMAL or p.piece in have:
            continue
        piece = old.pieces.add()
        piece.piece, piece.score, piece.type = p.piece, p.score, p.type
        have[p.piece] = len(old.pieces) - 1
        added += 1
    old.trainer_spec.vocab_size = len(old.pieces)
    return old.SerializeToString(), added, mask_id


def model_info(proto: bytes) -> dict:
    """Piece count, [MASK] id and the normaliser settings of a serialized spm model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(proto)
    pieces = [p.piece for p in m.pieces]
    for i, (key, token) in enumerate(SPECIALS.items()):
        if i >= len(pieces) or pieces[i] != token:
            raise DataPrepError(
                f"spm model has {pieces[i] if i < len(pieces) else 'nothing'!r} at id {i}, not {token}: it does not "
                f"follow DeBERTa's layout ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3); --extend needs a tokenizer written "
                f"by `python -m data_prep tokenizer`"
            )
    mask_id = pieces.index(MASK) if MASK in pieces else len(pieces)
    ns = m.normalizer_spec
    return {
        "pieces": len(pieces),
        "mask_id": mask_id,
        "vocab_size": max(len(pieces), mask_id + 1),
        "normalizer": {"name": ns.name, "add_dummy_prefix": ns.add_dummy_prefix,
                       "remove_extra_whitespaces": ns.remove_extra_whitespaces},
        "byte_fallback": bool(m.trainer_spec.byte_fallback),
    }


# ------------------------------------------------------------------------------------------ native encode/decode


class SpmTokenizer:
    """The native encoding: sentencepiece ids, ``[MASK]`` after the pieces, ``[CLS] ... [SEP]`` around a text."""

    def __init__(self, directory: str | Path):
        import sentencepiece as spm

        directory = Path(directory)
        path = directory / SPM_FILE
        if not path.is_file():
            raise DataPrepError(f"{directory} has no {SPM_FILE}; pass a directory written by `python -m data_prep "
                                f"tokenizer`")
        proto = path.read_bytes()
        self.info = model_info(proto)
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        config = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
        self.do_lower_case = bool(config.get("do_lower_case", False))
        self.mask_id = self.info["mask_id"]
        self.vocab_size = self.info["vocab_size"]
        self.pad_id, self.cls_id, self.sep_id, self.unk_id = 0, 1, 2, 3

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text.lower() if self.do_lower_case else text)
        return [self.cls_id, *ids, self.sep_id] if add_special_tokens else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; specials ([CLS], [SEP], [PAD], [MASK]) are dropped, [UNK] decodes to spm's `` ⁇ ``."""
        return self.sp.decode([int(i) for i in ids if int(i) not in (0, 1, 2, self.mask_id)])


# ---------------------------------------------------------------------------------------------- directory output


def build_fast_tokenizer(spm_path: Path, do_lower_case: bool, mask_id: int):
    """The ``tokenizers`` backend transformers' own ``DebertaV2Converter`` makes from the spm model, plus [MASK]."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import DebertaV2Converter

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))

    class _Original:  # the attributes DebertaV2Converter reads from a slow tokenizer
        vocab_file = str(spm_path)
        split_by_punct = False
        add_prefix_space = True
        legacy = True

        def __init__(self):
            self.do_lower_case = do_lower_case

        def convert_tokens_to_ids(self, token):
            return sp.piece_to_id(token)

    fast = DebertaV2Converter(_Original()).converted()
    fast.add_special_tokens([AddedToken(MASK, special=True, normalized=False)])
    if fast.token_to_id(MASK) != mask_id:
        raise DataPrepError(f"internal: [MASK] got id {fast.token_to_id(MASK)} in tokenizer.json, expected {mask_id}")
    return fast


def tokenizer_config(do_lower_case: bool) -> tuple[dict, dict]:
    specials = {
        "bos_token": SPECIALS["cls"], "eos_token": SPECIALS["sep"], "unk_token": SPECIALS["unk"],
        "sep_token": SPECIALS["sep"], "pad_token": SPECIALS["pad"], "cls_token": SPECIALS["cls"], "mask_token": MASK,
    }
    config = {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": do_lower_case, "split_by_punct": False,
              "add_prefix_space": True, "vocab_type": "spm", **specials}
    return config, specials


def write_tokenizer_dir(tmp: Path, proto: bytes, do_lower_case: bool, record: dict) -> dict:
    """Write every file into ``tmp`` (not yet the final directory); return the completed record."""
    from data_prep.text_tokenizer import tokenizer_checksum

    info = model_info(proto)
    (tmp / SPM_FILE).write_bytes(proto)
    config, specials = tokenizer_config(do_lower_case)
    _write_json(tmp / "tokenizer_config.json", config)
    _write_json(tmp / "special_tokens_map.json", specials)
    fast = build_fast_tokenizer(tmp / SPM_FILE, do_lower_case, info["mask_id"])
    fast.save(str(tmp / "tokenizer.json"))
    checksum, files = tokenizer_checksum(tmp)
    record = {
        **record,
        "format_version": FORMAT_VERSION,
        "layout": {
            "specials": {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, MASK: info["mask_id"]},
            "spm_pieces": info["pieces"],
            "vocab_size": info["vocab_size"],
            "mask_in_spm_model": info["mask_id"] < info["pieces"],
            "byte_fallback": False,
        },
        "checksum": checksum,
        "files": files,
    }
    _write_json(tmp / RECORD_FILE, record)
    return record


def check_existing(out: Path, wanted: dict, overwrite: bool) -> bool:
    """True when ``out`` already holds this exact tokenizer (nothing to do). Error if it holds something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataPrepError(f"--out {out} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return False
    record = out / RECORD_FILE
    if record.is_file() and not overwrite:
        try:
            recorded = _read_json(record).get("settings")
        except DataPrepError:
            recorded = None
        if recorded == wanted:
            return True
        raise DataPrepError(
            f"--out {out} already holds a tokenizer made with different settings "
            f"({_describe_difference(recorded or {}, wanted)}); pass --overwrite to replace it or choose another --out"
        )
    if not overwrite:
        raise DataPrepError(f"--out {out} exists and is not empty; pass --overwrite to replace it or choose another --out")
    if not record.is_file():  # --overwrite replaces only what this command wrote (`--out . --overwrite`...)
        raise DataPrepError(
            f"--out {out} is not a tokenizer directory written by `python -m data_prep tokenizer` (no {RECORD_FILE} "
            "there), so --overwrite will not delete it; choose another --out, or remove the directory yourself")
    return False


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unreadable record"


# ----------------------------------------------------------------------------------------------------- pipeline


def train_tokenizer(
    inputs: list[Path],
    out: str | Path,
    settings: TokenizerSettings,
    corpus_options,
    extend: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    progress=None,
) -> dict:
    """Sample, train (or extend), write ``out`` atomically; return the record written to ``data_prep_tokenizer.json``.

    ``progress`` (optional) is called as ``progress(documents, bytes)`` while the corpus is read.
    """
    from data_prep import corpus

    settings.validate()
    out = Path(out)
    base = None
    if extend is not None:
        extend = Path(extend)
        base_model = extend / SPM_FILE
        if not base_model.is_file():
            raise DataPrepError(f"--extend {extend}: no {SPM_FILE} there; pass a directory written by "
                                f"`python -m data_prep tokenizer`")
        base = {"dir": str(extend.resolve()), "sha256": hashlib.sha256(base_model.read_bytes()).hexdigest()}
        if out.resolve() == extend.resolve():
            raise DataPrepError(f"--out {out} is the --extend directory; write the extended tokenizer elsewhere")
    wanted = {
        "tokenizer": settings.to_dict(),
        "corpus": corpus_options.to_dict(),
        "inputs": [str(p) for p in inputs],
        "input_bytes": sum(_size(p) for p in inputs),  # a changed corpus is a different tokenizer
        "extend": base,
    }
    if check_existing(out, wanted, overwrite):
        log(f"[tokenizer] {out} already holds this tokenizer; nothing to do")
        return _read_json(out / RECORD_FILE)

    stats = corpus.CorpusStats()

    def documents() -> Iterator[str]:
        for path in inputs:
            for doc in corpus.iter_documents(path, corpus_options, stats):
                if progress is not None:
                    progress(1, len(doc.encode("utf-8")))
                yield doc

    log(f"[tokenizer] sampling at most {settings.max_sentences} sentences from {len(inputs)} input(s)")
    t0 = time.monotonic()
    sentences = (s for doc in documents() for s in split_sentences(doc))
    sample, seen = reservoir_sample(sentences, settings.max_sentences, settings.seed)
    corpus.require_documents(stats, inputs, corpus_options)
    log(f"[tokenizer] sampled {len(sample)} of {seen} sentences ({stats.documents} documents, "
        f"{stats.bytes / 1e6:.1f} MB) in {time.monotonic() - t0:.1f}s")
    skipped = corpus.describe_skipped(stats.skipped_invalid, stats.skipped_missing_text)
    if skipped:
        log(f"[tokenizer] {skipped}")

    t0 = time.monotonic()
    if base is None:
        log(f"[tokenizer] training unigram model: {settings.vocab_size} pieces, "
            f"character_coverage {settings.coverage}")
        proto = train_spm(sample, settings)
        added = None
    else:
        old_proto = (extend / SPM_FILE).read_bytes()
        old = model_info(old_proto)
        if old["normalizer"]["name"] != settings.normalization_rule:
            log(f"[tokenizer] using the base model's normalisation rule {old['normalizer']['name']!r}")
        log(f"[tokenizer] training a {settings.vocab_size}-piece model on the new corpus to extend {extend} "
            f"({old['pieces']} pieces, [MASK]={old['mask_id']})")
        new_proto = train_spm(sample, settings, normalizer=old["normalizer"])
        proto, added, mask_id = extend_model(old_proto, new_proto)
        total = model_info(proto)["pieces"]
        log(f"[tokenizer] added {added} new pieces (ids {total - added}..{total - 1}); [MASK] stays {mask_id}")
    log(f"[tokenizer] trained in {time.monotonic() - t0:.1f}s")
    del sample

    record = {
        "settings": wanted,
        "corpus_stats": {"documents": stats.documents, "bytes": stats.bytes,
                         "skipped_invalid_utf8": stats.skipped_invalid,
                         "skipped_missing_text": stats.skipped_missing_text,
                         "sentences_seen": seen, "sentences_sampled": min(seen, settings.max_sentences)},
        "input_sizes": {str(p): _size(p) for p in inputs},
        "added_pieces": added,
    }
    log(f"[tokenizer] writing {out}")

    def fill(tmp: Path) -> None:
        record.update(write_tokenizer_dir(tmp, proto, corpus_options.lowercase, record))

    # assembled in .OUT.tmp-PID beside --out, swapped in whole
    write_directory_atomic(out, fill, staging=out.with_name(f".{out.name}.tmp-{os.getpid()}"))
    layout = record["layout"]
    log(f"[tokenizer] {out}: {layout['spm_pieces']} spm pieces, [MASK]={layout['specials'][MASK]}, "
        f"{layout['vocab_size']} ids")
    return record


# ------------------------------------------------------------------------------------------------------ helpers


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataPrepError(f"{path} cannot be read as JSON ({err}); remove it or rewrite the directory") from None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


