"""The one definition of the on-disk shard format, shared by the writer (``pack``) and the readers.

Why a single module: the writer, the training reader and ``inspect`` must never disagree about a byte, so every
constant, the header layout, the flag bits, the manifest schema and the validation live here. It is numpy-only, so
the CPU data-preparation side never needs torch or lightning.

A shard directory looks like::

    out/
      manifest.json            written last, atomically: the directory is complete iff it exists
      tokenizer/               copy of the tokenizer files the shards were made with (hashed in the manifest)
      shard-00000.bin ...      fixed-length sequences, see below
      progress.json            only while a run is unfinished: finished shards + where to resume
      .shards.lock             the lock that keeps writers and training runs apart (data_prep.shard_lock)

Shard file (little-endian)::

    offset 0   header, HEADER_SIZE (64) bytes: magic "DEBSHARD", version u32, token itemsize u32 (2|4),
               seq_len u32, flag itemsize u32 (1), num_sequences u64, shard index u64, zero padding
    offset 64  input_ids  [num_sequences, seq_len]  uint16 (vocab <= 65535) or uint32
    then       flags      [num_sequences, seq_len]  uint8, bits: WORD_START | DOC_START | SPECIAL

Flag bits: ``WORD_START`` marks a token that begins a word (whole-word masking; the official
``part_of_whole_word`` is its negation). ``DOC_START`` marks the first token of a document. ``SPECIAL`` marks
tokens inserted by packing ([CLS], [SEP], [PAD]) as opposed to tokens that came from the text, so the text can be
recovered exactly even if a document literally contains "[SEP]": documents = the non-SPECIAL tokens of all
sequences in shard order, split before every DOC_START token.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.atomic_io import TMP_SUFFIX, temp_path, write_atomic, write_json_atomic  # noqa: F401  (re-exported)
from data_prep.errors import DataPrepError

MAGIC = b"DEBSHARD"
FORMAT_VERSION = 1
FORMAT_NAME = "deberta-pretrain-shards"
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIIIQQ")  # magic, version, token itemsize, seq_len, flag itemsize, n_seq, shard index

WORD_START = np.uint8(1)
DOC_START = np.uint8(2)
SPECIAL = np.uint8(4)

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
TOKENIZER_SUBDIR = "tokenizer"

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def choose_dtype(vocab_size: int, forced: str | None = None) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535, the reserved top value stays free), else uint32.

    ``forced`` ("uint16"/"uint32") pins the dtype; a vocabulary that does not fit it is a DataPrepError rather
    than silently wrapped ids.
    """
    if forced is not None:
        if forced not in _DTYPES:
            raise DataPrepError(f"--dtype {forced!r} is not supported: use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[forced]
    else:
        dtype = _DTYPES["uint16"] if vocab_size <= 65535 else _DTYPES["uint32"]
    limit = np.iinfo(dtype).max
    if vocab_size - 1 > limit or vocab_size > 2**32 - 1:
        raise DataPrepError(
            f"vocabulary of {vocab_size} tokens does not fit token dtype {dtype.name} (max id {limit}); "
            f"use --dtype uint32 or a smaller vocabulary"
        )
    return dtype


def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


def dtype_from_name(name: str) -> np.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise DataPrepError(f"unknown token dtype {name!r} in manifest; expected one of {sorted(_DTYPES)}") from None


# --------------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class ShardHeader:
    version: int
    token_itemsize: int
    seq_len: int
    num_sequences: int
    index: int

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.version, self.token_itemsize, self.seq_len, 1, self.num_sequences, self.index)
        return raw + b"\0" * (HEADER_SIZE - len(raw))

    @property
    def file_size(self) -> int:
        return shard_file_size(self.num_sequences, self.seq_len, self.token_itemsize)


def shard_file_size(num_sequences: int, seq_len: int, token_itemsize: int) -> int:
    return HEADER_SIZE + num_sequences * seq_len * (token_itemsize + 1)


def open_regular(path: Path, what: str = "shard") -> int:
    """Open ``path`` for reading and return its descriptor; only a regular file is accepted.

    Opened non-blocking, so a FIFO (or a device) named as a shard or manifest is refused here instead of blocking
    the reader for ever, with the shard set's lock held. Every later check and read goes through this descriptor:
    what was checked is what is read, even if the name is replaced meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DataPrepError(f"{what} {path} is missing; re-run `python -m data_prep shards`") from None
    except OSError as err:
        raise DataPrepError(f"cannot read {what} {path}: {err.strerror}; check it and its permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataPrepError(f"{what} {path} is not a regular file (a FIFO, socket, device or directory); a shard set "
                            "holds only files written by `python -m data_prep shards`: re-create it")
    return fd


def read_header(path: Path, fd: int | None = None) -> ShardHeader:
    """Parse and sanity-check a shard header (read through ``fd`` when given); DataPrepError naming the file."""
    own = fd is None
    if own:
        fd = open_regular(path)
    try:
        raw = os.pread(fd, HEADER_SIZE, 0)
    except OSError as err:
        raise DataPrepError(f"cannot read shard {path}: {err.strerror}; re-run `python -m data_prep shards`") from None
    finally:
        if own:
            os.close(fd)
    if len(raw) < HEADER_SIZE:
        raise DataPrepError(f"shard {path} is truncated ({len(raw)} bytes, no complete header); re-create it")
    magic, version, itemsize, seq_len, flag_size, n_seq, index = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataPrepError(f"{path} is not a data_prep shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise DataPrepError(
            f"shard {path} has format version {version}, this code reads version {FORMAT_VERSION}; "
            f"re-create the shards with this version of data_prep"
        )
    if itemsize not in (2, 4) or flag_size != 1 or seq_len <= 0:
        raise DataPrepError(f"shard {path} has a corrupted header (itemsize={itemsize}, seq_len={seq_len})")
    return ShardHeader(version, itemsize, seq_len, n_seq, index)


def write_shard(path: Path, index: int, input_ids: np.ndarray, flags: np.ndarray) -> dict[str, Any]:
    """Write one shard atomically (temp file, fsync, rename, fsync dir); return its manifest entry."""
    n_seq, seq_len = input_ids.shape
    header = ShardHeader(FORMAT_VERSION, input_ids.dtype.itemsize, seq_len, n_seq, index)
    digest = hashlib.sha256()

    def write(f) -> None:
        for chunk in (header.pack(), np.ascontiguousarray(input_ids).data, np.ascontiguousarray(flags).data):
            digest.update(chunk)
            f.write(chunk)

    write_atomic(path, write)  # through NAME.<pid>.tmp; a full disk removes it and names the shard
    content = int(np.count_nonzero((flags & SPECIAL) == 0))
    return {
        "file": path.name,
        "sequences": int(n_seq),
        "tokens": int(n_seq * seq_len),
        "content_tokens": content,
        "bytes": header.file_size,
        "sha256": digest.hexdigest(),
    }


def map_shard(fd: int, header: ShardHeader) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map (input_ids, flags) of the shard open as ``fd``, whose header and size have been checked through
    that same descriptor; read-only, nothing loaded. The mapping keeps the file alive: ``fd`` may be closed."""
    dtype = np.dtype("<u2") if header.token_itemsize == 2 else np.dtype("<u4")
    shape = (header.num_sequences, header.seq_len)
    n = header.num_sequences * header.seq_len
    if n == 0:
        return np.zeros(shape, dtype), np.zeros(shape, np.uint8)
    mapped = mmap.mmap(fd, header.file_size, access=mmap.ACCESS_READ)
    ids = np.frombuffer(mapped, dtype=dtype, count=n, offset=HEADER_SIZE).reshape(shape)
    flags = np.frombuffer(mapped, dtype=np.uint8, count=n, offset=HEADER_SIZE + n * dtype.itemsize).reshape(shape)
    return ids, flags


def open_shard(path: Path, header: ShardHeader) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map (input_ids, flags) of a shard whose header has been read; refused if its size no longer fits."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size != header.file_size:
            raise DataPrepError(f"shard {path} is {size} bytes, its header says {header.file_size} (truncated or "
                                "extended); re-create it")
        return map_shard(fd, header)
    finally:
        os.close(fd)


def file_sha256(source: Path | int, chunk: int = 1 << 22) -> str:
    """sha256 of a file given by path, or by an open descriptor (read with pread from offset 0: the descriptor's
    own offset is left alone, so other threads may use it)."""
    digest = hashlib.sha256()
    if isinstance(source, int):
        offset = 0
        while block := os.pread(source, chunk, offset):
            digest.update(block)
            offset += len(block)
        return digest.hexdigest()
    fd = open_regular(Path(source), "file")
    try:
        return file_sha256(fd, chunk)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- atomic json


def read_json(path: Path) -> dict:
    """A JSON object from ``path``: one DataPrepError naming the file if it is missing, not a regular file, not
    JSON or not an object."""
    try:
        fd = open_regular(path, "file")
    except DataPrepError:
        if not os.path.lexists(path):
            raise DataPrepError(f"{path} not found: is this a directory written by `python -m data_prep shards`?") \
                from None
        raise
    try:
        with open(fd, encoding="utf-8", closefd=True) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataPrepError(f"{path} is not valid JSON ({err}); re-run `python -m data_prep shards`") from None
    if not isinstance(data, dict):
        raise DataPrepError(f"{path} holds a JSON {type(data).__name__}, not an object; re-run "
                            "`python -m data_prep shards`")
    return data


# ---------------------------------------------------------------------------------------------- manifest


def load_manifest(directory: Path) -> dict:
    """Read and schema-check ``manifest.json``; a directory without one is an unfinished run."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.exists():
        hint = (
            "the run that writes it was interrupted: re-run the same `python -m data_prep shards` command to finish it"
            if (directory / PROGRESS_NAME).exists()
            else "run `python -m data_prep shards --out DIR ...` first"
        )
        raise DataPrepError(f"{path} not found: {hint}")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT_NAME:
        raise DataPrepError(f"{path}: key 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataPrepError(
            f"{path}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
            f"re-create the shards with this version of data_prep"
        )
    validate_manifest(manifest, path)
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")
_COUNT = "a whole number >= 0"
# key -> (check, what it must be) for the parts of a manifest that readers (training, inspect) use
_SCHEMA: dict[str, dict[str, tuple]] = {
    "tokenizer": {"checksum": (str, "a string"), "kind": (str, "a string"), "vocab_size": (int, _COUNT),
                  "special_ids": (dict, "an object")},
    "settings": {"seq_len": (int, _COUNT), "dtype": (str, f"one of {sorted(_DTYPES)}"), "lang": (str, "a string"),
                 "cross_document": (bool, "true or false"), "shard_size": (int, _COUNT), "inputs": (list, "a list")},
    "totals": {key: (int, _COUNT) for key in ("documents", "sequences", "tokens", "content_tokens")},
}
_SHARD_ENTRY = {"file": (str, "a shard file name"), "sequences": (int, _COUNT), "bytes": (int, _COUNT),
                "sha256": (str, "64 hex digits")}
SPECIAL_NAMES = ("pad", "cls", "sep", "mask", "unk")


def _valid(value: Any, kind: type) -> bool:
    if kind is int:  # JSON whole numbers only: not true/false, not "20", not 20.5
        return type(value) is int and value >= 0
    return isinstance(value, kind)


def validate_manifest(manifest: dict, path: Path) -> None:
    """Every key a reader uses is present with the type ``data_prep shards`` writes, checked before anything is
    read: an edited or damaged manifest is one error naming the key, never a traceback later (or, for a shard
    without its sha256, a background check that dies while training waits for it)."""
    def refuse(key: str, value: Any, what: str) -> None:
        shown = "missing" if value is _MISSING else f"{value!r}"[:60] + f" ({type(value).__name__})"
        raise DataPrepError(f"{path}: {key} is {shown}, expected {what}; the manifest was edited or damaged: "
                            "re-create the shards with `python -m data_prep shards`")

    for section, keys in _SCHEMA.items():
        part = manifest.get(section, _MISSING)
        if not isinstance(part, dict):
            refuse(section, part, "an object")
        for key, (kind, what) in keys.items():
            value = part.get(key, _MISSING)
            if not _valid(value, kind):
                refuse(f"{section}.{key}", value, what)
    if manifest["settings"]["dtype"] not in _DTYPES:
        refuse("settings.dtype", manifest["settings"]["dtype"], f"one of {sorted(_DTYPES)}")
    special = manifest["tokenizer"]["special_ids"]
    for name in SPECIAL_NAMES:
        if not _valid(special.get(name, _MISSING), int):
            refuse(f"tokenizer.special_ids.{name}", special.get(name, _MISSING), _COUNT)
    shards = manifest.get("shards", _MISSING)
    if not isinstance(shards, list):
        refuse("shards", shards, "a list")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            refuse(f"shards[{i}]", entry, "an object")
        check_entry(entry, lambda key, value, what: refuse(f"shards[{i}].{key}", value, what))


def check_entry(entry: dict, refuse) -> None:
    """The keys of one manifest shard entry (a plain file name, counts, a sha256); ``refuse(key, value, what)``."""
    for key, (kind, what) in _SHARD_ENTRY.items():
        value = entry.get(key, _MISSING)
        if not _valid(value, kind):
            refuse(key, value, what)
    name = entry["file"]
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        refuse("file", name, "a shard file name inside the shard directory")
    if not _SHA256.fullmatch(entry["sha256"]):
        refuse("sha256", entry["sha256"], "64 hex digits")


class _Missing:
    pass


_MISSING = _Missing()


def check_shard(directory: Path, entry: dict, settings: dict, full: bool = False,
                position: int | None = None) -> ShardHeader:
    """Validate one shard against its manifest entry: size + header (fast), plus sha256 when ``full``.

    ``position`` (the entry's place in the manifest) is compared with the index in the shard's header, so two
    same-shape shards swapped or renamed are caught by the fast check. Raises DataPrepError naming the shard and
    what differs.
    """
    path = Path(directory) / entry["file"]
    fd = open_regular(path)
    try:
        return check_open_shard(fd, path, entry, settings, full, position)
    finally:
        os.close(fd)


def check_open_shard(fd: int, path: Path, entry: dict, settings: dict, full: bool = False,
                     position: int | None = None) -> ShardHeader:
    """``check_shard`` through an open descriptor (``open_regular``): the size, header and (``full``) sha256 of
    the very file that will be read through it."""
    header = read_header(path, fd)
    itemsize = dtype_from_name(settings["dtype"]).itemsize
    problems = []
    if header.seq_len != settings["seq_len"]:
        problems.append(f"seq_len {header.seq_len} != manifest {settings['seq_len']}")
    if header.token_itemsize != itemsize:
        problems.append(f"token itemsize {header.token_itemsize} != manifest dtype {settings['dtype']}")
    if position is not None and header.index != position:
        problems.append(f"its header says shard {header.index}, but it is shard {position} in the manifest "
                        "(shards swapped, renamed or copied from another shard set?)")
    if header.num_sequences != entry["sequences"]:
        problems.append(f"{header.num_sequences} sequences != manifest {entry['sequences']}")
    size = os.fstat(fd).st_size
    if size != entry["bytes"] or size != header.file_size:
        problems.append(f"size {size} bytes != expected {entry['bytes']} (truncated or extended)")
    if problems:
        raise DataPrepError(f"shard {path} does not match the manifest: {'; '.join(problems)}; re-create it")
    if full:
        actual = file_sha256(fd)
        if actual != entry["sha256"]:
            raise DataPrepError(
                f"shard {path} is corrupted: sha256 {actual[:16]}... != manifest {entry['sha256'][:16]}...; "
                f"re-create it (delete it and re-run the same `python -m data_prep shards` command)"
            )
    return header


def tokenizer_mismatches(manifest: dict, tok) -> list[str]:
    """What the manifest says about its tokenizer (special ids, vocabulary size) that the shard set's own
    tokenizer copy ``tok`` contradicts: an edited manifest (``special_ids.mask=5``) would otherwise train with
    wrong ids without a word."""
    recorded = manifest["tokenizer"]
    problems = []
    for name, value in sorted(recorded.get("special_ids", {}).items()):
        actual = tok.special_ids.get(name)
        if actual is not None and int(value) != int(actual):
            problems.append(f"special_ids.{name}={value} in the manifest, but the tokenizer copy has {actual}")
    if int(recorded.get("vocab_size", tok.vocab_size)) != int(tok.vocab_size):
        problems.append(f"vocab_size={recorded['vocab_size']} in the manifest, but the tokenizer copy has "
                        f"{tok.vocab_size}")
    return problems


def decode_documents(ids: np.ndarray, flags: np.ndarray) -> list[np.ndarray]:
    """Split packed sequences (any shape) back into the token ids of each document, in order.

    A document that started before ``ids`` (a continuation) comes out as the first element.
    """
    ids = np.asarray(ids).reshape(-1)
    flags = np.asarray(flags).reshape(-1)
    keep = (flags & SPECIAL) == 0
    content, content_flags = ids[keep], flags[keep]
    starts = np.flatnonzero(content_flags & DOC_START)
    if len(content) == 0:
        return []
    bounds = list(starts)
    if not bounds or bounds[0] != 0:
        bounds = [0] + bounds
    return [content[a:b] for a, b in zip(bounds, bounds[1:] + [len(content)])]
