"""Tokenize a corpus in worker processes and pack it into fixed-length, verifiable, resumable shards.

Why this shape:

- The main process reads documents (``corpus.iter_documents``) and cuts them into batches of about 1 MB of text;
  a pool of worker processes tokenizes batches and computes word-start flags; the main process packs the results
  *in document order* and writes shards. At most ``2 * workers + 2`` batches are in flight, so memory is bounded
  by the batch size and one shard buffer, whatever the corpus size. The output depends only on the corpus and the
  settings, never on ``--workers``.
- Packing (the layout ``shard_format`` stores):

  * cross-document (default, as official DeBERTa and HF ``group_texts``): the documents form one stream, cut into
    sequences ``[CLS] <seq_len-2 tokens> [SEP]``; inside a sequence consecutive documents are separated by one
    [SEP] (never at the start of a sequence). A long document spans several sequences. Only the very last
    sequence of the corpus is padded with [PAD].
  * ``--no-cross-document``: every document starts a new sequence; the last sequence of each document is
    padded with [PAD] (nothing is dropped; the attention mask is ``input_ids != pad_id``).

- Resume: shard k is fully determined by the document/token position where it starts, recorded with it as
  ``start = {"doc": d, "offset": t}``. After every shard, ``progress.json`` (atomic) lists the finished shards;
  a re-run with the same settings verifies them (sha256) and continues from the first missing or bad one,
  re-reading but not re-tokenizing the documents before it. ``manifest.json`` is written last.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep import shard_format as sf
from data_prep.atomic_io import write_directory_atomic
from data_prep.errors import DataPrepError
from data_prep.shard_lock import ShardSetLock

DEFAULT_SEQ_LEN = 512
DEFAULT_SHARD_SIZE = 16384  # sequences per shard: 8 Mi tokens (24 MiB with uint16) at seq_len 512
BATCH_CHARS = 1 << 20
BATCH_DOCS = 8192


@dataclass(frozen=True)
class PackSettings:
    seq_len: int = DEFAULT_SEQ_LEN
    lang: str = "en"
    cross_document: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    dtype: str | None = None  # None: chosen from the vocabulary size
    jieba_dict: str | None = None

    def validate(self) -> None:
        if self.seq_len < 3:
            raise DataPrepError(f"--seq-len {self.seq_len} is too small: a sequence needs [CLS], a token and [SEP]")
        if self.shard_size < 1:
            raise DataPrepError(f"--shard-size {self.shard_size} must be at least 1 sequence")
        if self.jieba_dict and self.lang != "zh":
            raise DataPrepError(f"--jieba-dict is only used with --lang zh (got --lang {self.lang})")


# ------------------------------------------------------------------------------------------ worker side

_WORKER: dict = {}


def init_worker(tok_state: dict, lang: str, jieba_dict: str | None) -> None:
    """Pool initializer: rebuild the tokenizer from its JSON and the tables word boundaries need."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; parallelism comes from processes
    from data_prep import word_boundaries as wb
    from data_prep.text_tokenizer import from_serialized

    tok = from_serialized(tok_state)
    _WORKER.clear()
    _WORKER["tok"] = tok
    _WORKER["lang"] = lang
    _WORKER["start_table"] = wb.vocab_word_start_table(tok).astype(np.uint8)
    if lang == "zh":
        _WORKER["segmenter"] = wb.JiebaSegmenter(jieba_dict)
        _WORKER["continuation"] = wb.continuation_table(tok)
        _WORKER["special"] = wb.special_table(tok)


MAX_PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of at most this many characters
HUGE_BATCH_CHARS = 8 * BATCH_CHARS  # a batch this large (one huge document) is tokenized in the main process


def split_long_text(text: str, limit: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at a space or newline in the second half of each
    window (that one character dropped), so that a huge document (one 50 MB line) never goes to the tokenizer
    whole: its per-token objects took ~150 bytes per character. SentencePiece, Metaspace and BERT pre-tokenizers
    all split at whitespace, so the ids equal the whole text's; a window with no whitespace at all (e.g. Chinese)
    is cut at the limit, which can change the tokens at that one position. Lazy: one piece at a time."""
    start, n = 0, len(text)
    while n - start > limit:
        end = start + limit
        cut = max(text.rfind(" ", start + limit // 2, end), text.rfind("\n", start + limit // 2, end))
        if cut > start:
            yield text[start:cut]
            start = cut + 1
        else:
            yield text[start:end]
            start = end
    yield text[start:] if start else text


def _encode_groups(tok, pieces: Iterator[tuple[int, str]]) -> Iterator[tuple[list[int], np.ndarray, np.ndarray | None]]:
    """(owner document of each piece, ids uint32, word-start flags for zh else None) per group of pieces; the
    tokenizer sees at most BATCH_CHARS of text per call, so its per-token objects stay bounded whatever the
    document size."""
    from data_prep import word_boundaries as wb

    def flush(group: list[tuple[int, str]]):
        owners, texts = [o for o, _ in group], [t for _, t in group]
        if _WORKER["lang"] == "zh":
            encodings = tok.encode_batch(texts, offsets=True)
            starts = wb.jieba_word_starts(
                encodings, texts, _WORKER["segmenter"], _WORKER["continuation"], _WORKER["special"]
            )
            lengths = [len(e.ids) for e in encodings]
            ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.uint32, count=sum(lengths))
            flags = np.concatenate(starts).astype(np.uint8) if starts else np.zeros(0, np.uint8)
        else:
            id_lists = tok.encode_batch(texts)
            lengths = [len(x) for x in id_lists]
            ids = np.fromiter(chain.from_iterable(id_lists), np.uint32, count=sum(lengths))
            flags = None
        return owners, lengths, ids, flags

    group: list[tuple[int, str]] = []
    size = 0
    for owner, piece in pieces:
        if group and size + len(piece) > BATCH_CHARS:
            yield flush(group)
            group, size = [], 0
        group.append((owner, piece))
        size += len(piece)
    if group:
        yield flush(group)


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Tokenize a batch: (ids uint32, flags uint8 with WORD_START/DOC_START, per-doc lengths, utf-8 bytes).

    Documents longer than ``MAX_PIECE_CHARS`` are tokenized piece by piece (``split_long_text``) and their ids
    concatenated: one document, as before, in bounded tokenizer memory."""
    tok = _WORKER["tok"]
    nbytes = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    pieces = ((d, piece) for d, text in enumerate(texts) for piece in split_long_text(text))
    lengths = np.zeros(len(texts), dtype=np.int64)
    id_chunks, flag_chunks = [], []
    for owners, piece_lengths, ids, flags in _encode_groups(tok, pieces):
        np.add.at(lengths, owners, piece_lengths)
        id_chunks.append(ids)
        flag_chunks.append(flags)
    ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, np.uint32)
    del id_chunks
    if _WORKER["lang"] == "zh":
        flags = np.concatenate(flag_chunks) if flag_chunks else np.zeros(0, np.uint8)
    else:
        flags = _WORKER["start_table"][ids]
    doc_starts = np.cumsum(lengths) - lengths
    doc_starts = doc_starts[lengths > 0]
    flags[doc_starts] |= sf.DOC_START
    return ids, flags, lengths, nbytes


# ------------------------------------------------------------------------------------------------ packer


class Packer:
    """Packs per-document token arrays into fixed-length sequences and hands full shards to ``on_shard``."""

    def __init__(
        self,
        seq_len: int,
        shard_size: int,
        dtype: np.dtype,
        special_ids: dict[str, int],
        cross_document: bool,
        on_shard: Callable[[np.ndarray, np.ndarray, dict, dict], None],  # ids, flags, start, next cursor
        start: dict,
    ):
        self.seq_len, self.payload = seq_len, seq_len - 2
        self.cls, self.sep, self.pad = special_ids["cls"], special_ids["sep"], special_ids["pad"]
        self.cross_document = cross_document
        self.on_shard = on_shard
        self.ids = np.zeros((shard_size, seq_len), dtype=dtype)
        self.flags = np.zeros((shard_size, seq_len), dtype=np.uint8)
        self.n_seq = 0  # completed sequences in the buffer
        self.pos = 0  # tokens of payload written in the open sequence
        self.shard_start = dict(start)
        self._open_sequence()

    def _open_sequence(self) -> None:
        self.ids[self.n_seq, 0] = self.cls
        self.flags[self.n_seq, 0] = sf.SPECIAL | sf.WORD_START
        self.pos = 0

    def _close_sequence(self, next_cursor: dict) -> None:
        row, end = self.n_seq, 1 + self.pos
        self.ids[row, end] = self.sep
        self.ids[row, end + 1 :] = self.pad
        self.flags[row, end:] = sf.SPECIAL | sf.WORD_START
        self.n_seq += 1
        if self.n_seq == len(self.ids):
            self._flush(next_cursor)
        self._open_sequence()

    def _flush(self, next_cursor: dict) -> None:
        if self.n_seq:
            self.on_shard(self.ids[: self.n_seq], self.flags[: self.n_seq], dict(self.shard_start), dict(next_cursor))
        self.n_seq = 0
        self.shard_start = dict(next_cursor)

    def add(self, doc: int, ids: np.ndarray, flags: np.ndarray, offset: int = 0) -> None:
        """Append document ``doc``; ``ids``/``flags`` start at token ``offset`` of it (non-zero only on resume).

        Empty documents are skipped (no separator).
        """
        n = len(ids)
        if n == 0:
            return
        if self.pos > 0:
            if not self.cross_document:
                self._close_sequence({"doc": doc, "offset": offset})
            else:
                self.ids[self.n_seq, 1 + self.pos] = self.sep
                self.flags[self.n_seq, 1 + self.pos] = sf.SPECIAL | sf.WORD_START
                self.pos += 1
                if self.pos == self.payload:
                    self._close_sequence({"doc": doc, "offset": offset})
        i = 0
        while i < n:
            take = min(n - i, self.payload - self.pos)
            a = 1 + self.pos
            self.ids[self.n_seq, a : a + take] = ids[i : i + take]
            self.flags[self.n_seq, a : a + take] = flags[i : i + take]
            self.pos += take
            i += take
            if self.pos == self.payload:
                cursor = {"doc": doc + 1, "offset": 0} if i == n else {"doc": doc, "offset": offset + i}
                self._close_sequence(cursor)

    def finish(self, end_doc: int) -> None:
        if self.pos > 0:
            self._close_sequence({"doc": end_doc, "offset": 0})
        self._flush({"doc": end_doc, "offset": 0})


# ----------------------------------------------------------------------------------------------- progress


class Progress:
    """tqdm bar (documents, MB/s) on a terminal, a plain log line every ``interval`` seconds otherwise."""

    def __init__(self, interval: float = 30.0, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.docs = 0
        self.bytes = 0
        self.t0 = time.monotonic()
        self.last = self.t0
        self.interval = interval
        self.bar = None
        self.enabled = enabled
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="doc", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        now = time.monotonic()
        rate = self.bytes / 1e6 / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.bytes / 1e6:.1f} MB, {rate:.2f} MB/s", refresh=False)
        elif self.enabled and now - self.last >= self.interval:
            self.last = now
            print(f"[shards] {self.docs} documents, {self.bytes / 1e6:.1f} MB, {rate:.2f} MB/s", file=self.stream)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------- batching


def iter_batches(
    docs: Iterable[str], start_doc: int, batch_chars: int = BATCH_CHARS, batch_docs: int = BATCH_DOCS
) -> Iterator[tuple[int, list[str]]]:
    """(index of first document, texts) batches; documents before ``start_doc`` are read and skipped."""
    batch: list[str] = []
    first = start_doc
    size = 0
    for index, text in enumerate(docs):
        if index < start_doc:
            continue
        if not batch:
            first = index
        batch.append(text)
        size += len(text)
        if size >= batch_chars or len(batch) >= batch_docs:
            yield first, batch
            batch, size = [], 0
    if batch:
        yield first, batch


# --------------------------------------------------------------------------------------------- main entry


def _settings_dict(
    settings: PackSettings, tok, dtype: np.dtype, corpus_options: dict, inputs: list[Path], split: dict | None = None
) -> dict:
    jieba_dict = None
    if settings.jieba_dict:
        path = Path(settings.jieba_dict)
        if not path.is_file():
            raise DataPrepError(f"--jieba-dict {path}: no such file")
        jieba_dict = {"path": str(path.resolve()), "sha256": sf.file_sha256(path)}
    extra = {"split": split} if split is not None else {}  # absent without a split: older manifests stay equal
    return {
        **extra,
        "seq_len": settings.seq_len,
        "lang": settings.lang,
        "cross_document": settings.cross_document,
        "shard_size": settings.shard_size,
        "dtype": sf.dtype_name(dtype),
        "tokenizer_checksum": tok.checksum,
        "jieba_dict": jieba_dict,
        "corpus": corpus_options,
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in inputs],
        "packing": "cls-doc-sep-doc-sep" if settings.cross_document else "cls-doc-sep-pad",
    }


def _describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key == "tokenizer_checksum":
                diffs.append(
                    f"tokenizer checksum {str(old.get(key))[:12]}... (recorded) vs {str(new.get(key))[:12]}... "
                    f"(--tokenizer): the tokenizer does not match the manifest"
                )
            elif key == "inputs":
                diffs.append("inputs (paths or file sizes) differ")
            else:
                diffs.append(f"{key}: {old.get(key)!r} (recorded) vs {new.get(key)!r} (now)")
    return "; ".join(diffs)


def _clear_outputs(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith("shard-") or p.name in (sf.MANIFEST_NAME, sf.PROGRESS_NAME):
            p.unlink()
    if (out / sf.TOKENIZER_SUBDIR).is_dir():
        shutil.rmtree(out / sf.TOKENIZER_SUBDIR)
    _remove_temps(out)


def _remove_temps(out: Path) -> None:
    """Temp files and directories (``*.tmp``) that a killed writer left; called under the exclusive lock, so none
    belongs to a live writer."""
    for p in out.iterdir():
        if p.name.endswith(sf.TMP_SUFFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _check_out_apart(out: Path, patterns: list[str]) -> None:
    """``--out`` must not be an input or lie inside one: the shards would be written into the corpus, and a rerun
    would read them back as text."""
    import glob

    target = out.resolve()
    for pattern in patterns:
        pattern = str(pattern)
        candidates = [Path(m) for m in glob.glob(pattern, recursive=True)] if glob.has_magic(pattern) else [Path(pattern)]
        for candidate in candidates:
            source = candidate.resolve()
            if target == source or source in target.parents:
                where = "is" if target == source else "lies inside"
                raise DataPrepError(f"--out {out} {where} the input {candidate}: the shards would be written into "
                                    "the corpus they are made from; choose an --out outside every --input")


def _verified_prefix(out: Path, shards: list[dict], settings: dict, log) -> list[dict]:
    """The longest prefix of recorded shards that pass the full check; the rest are redone."""
    kept = []
    for i, entry in enumerate(shards):
        try:
            if not isinstance(entry, dict):
                raise DataPrepError(f"recorded shard {i} is not an entry")
            sf.check_entry(entry, lambda key, value, what: _bad_entry(i, key, value, what))
            sf.check_shard(out, entry, settings, full=True)
        except DataPrepError as err:
            log(f"[shards] {err} -> redoing from this shard on")
            break
        kept.append(entry)
    return kept


def _bad_entry(index: int, key: str, value, what: str) -> None:
    raise DataPrepError(f"the record of shard {index} has {key}={value!r}, expected {what}")


def _install_tokenizer(out: Path, tok) -> None:
    """Copy the tokenizer files to ``out/tokenizer`` atomically (assembled beside it, swapped in whole) unless an
    equal copy exists."""
    from data_prep.text_tokenizer import tokenizer_checksum

    dest = out / sf.TOKENIZER_SUBDIR
    if dest.is_dir() and tokenizer_checksum(dest)[0] == tok.checksum:
        return
    # both temp names end with TMP_SUFFIX, so a killed writer's leftovers go with the other temps (_remove_temps)
    write_directory_atomic(dest, tok.copy_files, staging=sf.temp_path(dest),
                           old=sf.temp_path(out / f"{sf.TOKENIZER_SUBDIR}.old"))


def prepare_shards(
    input_patterns: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    corpus_options,
    settings: PackSettings = PackSettings(),
    workers: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
    max_shards: int | None = None,
    split: dict | None = None,
) -> dict:
    """Run (or resume, or verify) a shard preparation; return the manifest. ``max_shards`` stops early (tests).

    ``split`` (``data_prep.split.record``): pack only the documents of that side of a train/validation split;
    document indices (resume cursors, totals) then count the documents of that side only."""
    from data_prep import corpus
    from data_prep.text_tokenizer import load_tokenizer

    settings.validate()
    progress = progress or Progress(enabled=False)
    inputs = corpus.resolve_inputs(input_patterns)
    tok = load_tokenizer(tokenizer_dir)
    dtype = sf.choose_dtype(tok.vocab_size, settings.dtype)
    wanted = _settings_dict(settings, tok, dtype, corpus_options.to_dict(), inputs, split)

    out = Path(out_dir)
    _check_out_apart(out, input_patterns)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # exclusive for the whole run: no training run reads the set meanwhile, no other writer shares the directory
    with ShardSetLock(out, exclusive=True) as lock:
        try:
            return _prepare_locked(out, inputs, tok, dtype, wanted, corpus_options, settings, workers, overwrite,
                                   progress, max_shards, split)
        except BaseException:
            if created and {p.name for p in out.iterdir()} <= {lock.path.name}:  # failed before its first shard
                lock.path.unlink(missing_ok=True)
                out.rmdir()
            raise


def _prepare_locked(out: Path, inputs: list[Path], tok, dtype, wanted: dict, corpus_options, settings: PackSettings,
                    workers: int, overwrite: bool, progress: Progress, max_shards: int | None,
                    split: dict | None) -> dict:
    from data_prep import corpus
    from data_prep import split as splitting
    from data_prep.text_tokenizer import serialize

    shards: list[dict] = []
    recorded = None
    if (out / sf.MANIFEST_NAME).exists():
        recorded = sf.read_json(out / sf.MANIFEST_NAME)
    elif (out / sf.PROGRESS_NAME).exists():
        recorded = sf.read_json(out / sf.PROGRESS_NAME)
    if recorded is not None and recorded.get("settings") != wanted:
        if not overwrite:
            settings_now = recorded.get("settings")
            raise DataPrepError(
                f"output directory {out} already holds shards made with different settings: "
                f"{_describe_difference(settings_now if isinstance(settings_now, dict) else {}, wanted)}. Re-run "
                f"with the original arguments to resume, pass --overwrite to replace them, or choose another --out"
            )
        recorded = None
    if overwrite and recorded is None:
        _clear_outputs(out)
    if recorded is not None:
        listed = recorded.get("shards") if isinstance(recorded.get("shards"), list) else []
        shards = _verified_prefix(out, listed, wanted, progress.log)
        if (out / sf.MANIFEST_NAME).exists() and listed and len(shards) == len(listed):
            _install_tokenizer(out, tok)
            progress.log(f"[shards] {out} is complete and verified ({len(shards)} shards); nothing to do")
            return recorded
        if (out / sf.MANIFEST_NAME).exists():
            # a finished directory with a bad shard becomes an unfinished run again
            sf.write_json_atomic(out / sf.PROGRESS_NAME, {**recorded, "shards": shards})
            (out / sf.MANIFEST_NAME).unlink()

    # nothing unverified is trusted: temp files and shards past the verified prefix go
    _remove_temps(out)
    for p in out.iterdir():
        if p.name.startswith("shard-") and p.name.endswith(".bin") and p.name not in {s["file"] for s in shards}:
            p.unlink()
    if shards:  # a fresh run copies the tokenizer with its first shard: one that fails before leaves no tokenizer/
        _install_tokenizer(out, tok)

    start = dict(shards[-1]["next"]) if shards else {"doc": 0, "offset": 0}
    if shards:
        progress.log(f"[shards] resuming after {len(shards)} verified shards at document {start['doc']}")
    state = {"settings": wanted, "tokenizer": _tokenizer_record(tok, dtype), "shards": shards}

    class _Stop(Exception):
        pass

    def on_shard(ids: np.ndarray, flags: np.ndarray, shard_start: dict, next_cursor: dict) -> None:
        index = len(shards)
        if index == 0:
            _install_tokenizer(out, tok)
        entry = sf.write_shard(out / sf.shard_name(index), index, ids, flags)
        entry["start"] = shard_start
        entry["next"] = next_cursor
        shards.append(entry)
        sf.write_json_atomic(out / sf.PROGRESS_NAME, state)
        if max_shards is not None and len(shards) >= max_shards:
            raise _Stop()

    packer = Packer(
        settings.seq_len, settings.shard_size, dtype, tok.special_ids, settings.cross_document, on_shard, start
    )

    stats = corpus.CorpusStats()  # skipped records/documents (--skip-*), recorded in the manifest
    docs = chain.from_iterable(corpus.iter_documents(p, corpus_options, stats) for p in inputs)
    if split is not None:
        docs = (text for text in docs if splitting.keeps(text, split))
    batches = iter_batches(docs, start["doc"])
    n_docs = start["doc"]
    stopped = False

    def handle(first: int, result) -> None:
        nonlocal n_docs
        ids, flags, lengths, nbytes = result
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for j in range(len(lengths)):
            doc = first + j
            a, b = int(bounds[j]), int(bounds[j + 1])
            skip = start["offset"] if doc == start["doc"] else 0
            packer.add(doc, ids[a + skip : b], flags[a + skip : b], skip)
        n_docs = first + len(lengths)
        progress.update(len(lengths), nbytes)

    tok_state = serialize(tok)
    try:
        if workers <= 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            init_worker(tok_state, settings.lang, settings.jieba_dict)
            for first, texts in batches:
                handle(first, encode_batch(texts))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=init_worker, initargs=(tok_state, settings.lang, settings.jieba_dict)) as pool:
                inflight: deque = deque()
                for first, texts in batches:
                    if sum(map(len, texts)) > HUGE_BATCH_CHARS:
                        # a huge document: tokenized here, piece by piece, instead of being copied to a worker
                        # and its ids back (each copy as large as the document)
                        while inflight:
                            f, res = inflight.popleft()
                            handle(f, res.get())
                        if "tok" not in _WORKER:
                            init_worker(tok_state, settings.lang, settings.jieba_dict)
                        handle(first, encode_batch(texts))
                        continue
                    inflight.append((first, pool.apply_async(encode_batch, (texts,))))
                    while len(inflight) >= 2 * workers + 2:
                        f, res = inflight.popleft()
                        handle(f, res.get())
                while inflight:
                    f, res = inflight.popleft()
                    handle(f, res.get())
        packer.finish(n_docs)
    except _Stop:
        stopped = True
    finally:
        progress.close()
    if stopped:
        return state

    if not shards and split is not None:
        raise DataPrepError(
            f"--val-fraction {split['val_fraction']}: no document of {', '.join(str(p) for p in inputs)} falls in "
            f"the {split['part']} split (the split is by document); choose a "
            f"{'larger' if split['part'] == 'val' else 'smaller'} --val-fraction or a corpus with more documents"
        )
    if not shards:
        raise DataPrepError(
            f"empty corpus: {', '.join(str(p) for p in inputs)} produced no tokens "
            f"(no non-empty documents with --text-field {getattr(corpus_options, 'text_field', '?')!r}); "
            f"check the inputs and the corpus options"
        )
    manifest = {
        "format": sf.FORMAT_NAME,
        "format_version": sf.FORMAT_VERSION,
        "tokenizer": state["tokenizer"],
        "settings": wanted,
        "totals": {
            "documents": n_docs,
            "sequences": sum(s["sequences"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "content_tokens": sum(s["content_tokens"] for s in shards),
            "input_bytes": sum(i["bytes"] for i in wanted["inputs"]),
            "skipped_invalid_text": stats.skipped_invalid,
            "skipped_missing_text": stats.skipped_missing_text,
        },
        "shards": shards,
    }
    sf.write_json_atomic(out / sf.MANIFEST_NAME, manifest)
    (out / sf.PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def _tokenizer_record(tok, dtype: np.dtype) -> dict:
    return {
        "checksum": tok.checksum,
        "files": tok.files,
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "special_ids": tok.special_ids,
        "source": tok.source,
        "copy": sf.TOKENIZER_SUBDIR,
        "dtype": sf.dtype_name(dtype),
    }
