"""Read a corpus as a stream of normalised documents, whatever form its files take.

Every later stage (tokenizer training, shard packing) sees the corpus only through ``iter_documents``, so the
same inputs and the same ``CorpusOptions`` always give the same documents in the same order: that is what makes
a shard manifest reproducible and a resumed run consistent.

Inputs (``resolve_inputs`` expands them):

- plain text, any extension (``.gz``/``.bz2``/``.xz`` are decompressed on the fly): documents are separated by
  blank lines, or one document per line with ``doc_per_line``. Read as bytes, line by line, so memory stays
  bounded by the largest document and an invalid UTF-8 sequence is reported with its byte offset.
- ``.jsonl``/``.json`` (optionally ``.gz``) and ``.parquet``: the ``text_field`` of each record, read by
  ``datasets.load_dataset(..., streaming=True)`` (no Arrow cache is written for a one-pass read).
- ``.arrow`` files of the ``datasets`` cache: ``datasets.Dataset.from_file`` (memory-mapped).
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``;
  a ``DatasetDict`` is read split by split in the order its ``dataset_dict.json`` lists them.
- any other directory stands for every file below it (hidden files and the project's own outputs skipped:
  shard sets, tokenizers, runs; see ``project_output``), in sorted path order.

A document is the text stripped of leading/trailing whitespace, then NFKC-normalised (unless ``normalization`` is
``"none"``) and optionally lower-cased; empty documents are dropped. An empty corpus is not an error here (a
single input may legitimately be empty); callers check ``CorpusStats.documents`` at the end, or use
``iter_corpus``, which raises once every input is exhausted without a document.
"""

from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import lzma
import os
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from data_prep.errors import DataPrepError

# the record `data_prep tokenizer` writes into every tokenizer directory it makes (data_prep.tokenizer.RECORD_FILE);
# named here, where inputs are read, so that reading can recognise a tokenizer directory without importing the trainer
TOKENIZER_RECORD = "data_prep_tokenizer.json"

NORMALIZATIONS = ("nfkc", "none")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class CorpusOptions:
    """How input files become documents; recorded in shard manifests and tokenizer directories."""

    text_field: str = "text"  # field for .jsonl/.json/.parquet/datasets inputs
    doc_per_line: bool = False  # plain text: one document per line instead of blank-line separated
    normalization: str = "nfkc"  # "nfkc" or "none"
    lowercase: bool = False
    skip_invalid_utf8: bool = False  # default: invalid UTF-8 is an error naming the file and byte offset
    skip_missing_text: bool = False  # default: records without the text field are an error naming file and count

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise DataPrepError(
                f"normalization {self.normalization!r} is not supported; use one of {', '.join(NORMALIZATIONS)}"
            )
        if not self.text_field:
            raise DataPrepError("--text-field must name a field (it is empty)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CorpusStats:
    """Counters filled while documents are read (pass one instance through every ``iter_documents`` call)."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents yielded (after normalisation)
    skipped_invalid: int = 0  # documents (or lines, with doc_per_line) dropped for invalid UTF-8 or NUL bytes
    skipped_missing_text: int = 0  # records without the text field (or with a null one), --skip-missing-text
    inputs: list[str] = field(default_factory=list)  # inputs read, in order

    def to_dict(self) -> dict:
        return asdict(self)


def describe_skipped(invalid: int, missing_text: int) -> str:
    """The documents ``--skip-invalid-utf8`` / ``--skip-missing-text`` dropped, for the terminal and ``inspect``;
    ``""`` when none were."""
    parts = []
    if invalid:
        parts.append(f"skipped {invalid} document{'s' * (invalid != 1)} with invalid UTF-8 or NUL bytes "
                     "(--skip-invalid-utf8)")
    if missing_text:
        parts.append(f"skipped {missing_text} record{'s' * (missing_text != 1)} without the text field "
                     "(--skip-missing-text)")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------- CLI glue


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The input flags shared by every command that reads a corpus."""
    g = parser.add_argument_group("corpus")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files, directories or globs (quote globs): plain text (.gz/.bz2/.xz too), "
                        ".jsonl/.json/.parquet, datasets .arrow files, or a datasets save_to_disk directory; "
                        "other directories stand for all files below them. Read in sorted path order")
    g.add_argument("--text-field", default="text", metavar="NAME",
                   help="field holding the text in json/parquet/datasets inputs (default %(default)s)")
    g.add_argument("--doc-per-line", action="store_true",
                   help="plain text: every non-empty line is a document (default: documents are separated by "
                        "blank lines)")
    g.add_argument("--normalize", choices=NORMALIZATIONS, default="nfkc",
                   help="Unicode normalisation applied to every document (default %(default)s)")
    g.add_argument("--lowercase", action="store_true", help="lower-case every document (default: keep case)")
    g.add_argument("--skip-invalid-utf8", action="store_true",
                   help="skip (and count) plain-text documents with invalid UTF-8 or NUL bytes instead of stopping "
                        "with an error that names the file and byte offset")
    g.add_argument("--skip-missing-text", action="store_true",
                   help="skip (and count in the manifest) json/parquet records without the text field or with a "
                        "null one, instead of stopping with an error that names the file and the count")


def corpus_options_from_args(args: argparse.Namespace) -> CorpusOptions:
    return CorpusOptions(
        text_field=args.text_field,
        doc_per_line=args.doc_per_line,
        normalization=args.normalize,
        lowercase=args.lowercase,
        skip_invalid_utf8=args.skip_invalid_utf8,
        skip_missing_text=args.skip_missing_text,
    )


# ------------------------------------------------------------------------------------------------------ inputs


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def project_output(directory: Path) -> str | None:
    """What this project wrote in ``directory``, recognised by its markers, or None: a shard set (its lock file,
    taken before anything is written, or its shard files; its ``tokenizer/`` copy and ``val/`` split lie inside), a
    tokenizer made by ``data_prep tokenizer``, a training run or an exported model. Directory and glob inputs skip
    these, so a corpus directory that also holds an earlier OUT is read as the text it is."""
    from data_prep.shard_lock import LOCK_NAME

    if not directory.is_dir():
        return None
    if (directory / LOCK_NAME).exists() or next(directory.glob("shard-[0-9][0-9][0-9][0-9][0-9].bin"), None):
        return "a shard set written by `data_prep shards`"
    if (directory / TOKENIZER_RECORD).is_file():
        return "a tokenizer written by `data_prep tokenizer`"
    if (directory / ".hydra").is_dir() or ((directory / ".lock").is_file() and (directory / "checkpoints").is_dir()):
        return "a training run's directory"  # (markers of pretrain.run: Hydra's record, the run lock)
    if (directory / "export_info.json").is_file():
        return "a model exported by training"
    return None


def _skip_note(origin: str, path: Path, what: str) -> None:
    print(f"[inputs] --input {origin}: skipping {path} ({what}, not text)", file=sys.stderr)


def _expand(path: Path, origin: str) -> list[Path]:
    """A file or saved dataset stands for itself; another directory for everything below it (hidden entries, the
    insides of saved datasets and the project's own outputs skipped)."""
    if not path.is_dir() or is_saved_dataset(path):
        return [path]
    what = project_output(path)
    if what is not None:
        raise DataPrepError(f"--input {origin}: {path} is {what}, not a corpus; give the text files it was made from")
    found = []
    for root, dirs, files in os.walk(path):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if is_saved_dataset(here / d):
                found.append(here / d)
                dirs.remove(d)
            elif (what := project_output(here / d)) is not None:
                _skip_note(origin, here / d, what)
                dirs.remove(d)
        found.extend(here / f for f in files if not f.startswith("."))
    if not found:
        raise DataPrepError(f"--input {origin}: directory {path} contains no files")
    return found


def _inside_project_output(path: Path, pattern: str) -> tuple[Path, str] | None:
    """The project output (directory, what) that a glob match lies inside, below the glob's fixed leading part."""
    fixed = Path(pattern.split("*")[0].split("?")[0].split("[")[0] or ".")
    top = fixed if str(fixed).endswith(os.sep) or fixed.is_dir() else fixed.parent
    top = top.resolve()
    for parent in [path, *path.parents] if path.is_dir() else path.parents:
        if parent.resolve() == top or top not in parent.resolve().parents:
            return None
        what = project_output(parent)
        if what is not None:
            return parent, what
    return None


def resolve_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of inputs.

    Sorted so that the corpus order (and hence every shard) does not depend on the order of the flags or of the
    file system. A missing path or a glob that matches nothing is an error: a typo must not silently shrink the
    corpus.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    found: dict[Path, Path] = {}
    for pattern in patterns:
        pattern = str(pattern)
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataPrepError(f"--input {pattern!r}: the glob matches no file; check the pattern and quoting")
            candidates, skipped = [], set()
            for match in map(Path, matches):
                inside = _inside_project_output(match, pattern)
                if inside is None:
                    candidates.append(match)
                elif inside[0] not in skipped:
                    skipped.add(inside[0])
                    _skip_note(pattern, *inside)
            if not candidates:
                raise DataPrepError(f"--input {pattern!r}: the glob matches only the project's own outputs (shard "
                                    "sets, tokenizers, runs), no text; check the pattern")
        else:
            candidates = [Path(pattern)]
            if not candidates[0].exists():
                raise DataPrepError(f"--input {pattern}: no such file or directory")
        for candidate in candidates:
            for p in _expand(candidate, pattern):
                if not p.is_dir() and not p.is_file():  # a FIFO would block the reader for ever
                    raise DataPrepError(
                        f"--input {pattern}: {p} is not a regular file (a FIFO, socket, device or broken link); "
                        "inputs are read more than once (a rerun resumes by re-reading them) and their sizes are "
                        "recorded: save the data to a file and pass that")
                found.setdefault(p.resolve(), p)
    if not found:
        raise DataPrepError("--input names no files")
    return sorted(found.values(), key=lambda p: str(p))


# --------------------------------------------------------------------------------------------------- documents


def normalize_text(text: str, options: CorpusOptions) -> str:
    """Strip, NFKC-normalise (unless ``none``) and optionally lower-case one document."""
    text = text.strip()
    if options.normalization == "nfkc":
        text = unicodedata.normalize("NFKC", text).strip()
    if options.lowercase:
        text = text.lower()
    return text


def _kind(path: Path) -> str:
    if path.is_dir():
        if is_saved_dataset(path):
            return "saved"
        raise DataPrepError(f"{path} is a directory but not a datasets save_to_disk directory; pass its files")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json", ".ndjson"):
        return "json"
    if last == ".parquet":
        return "parquet"
    if last == ".arrow":
        return "arrow"
    return "text"


def iter_documents(path: Path, options: CorpusOptions, stats: CorpusStats | None = None) -> Iterator[str]:
    """The normalised, non-empty documents of one input, in file order."""
    path = Path(path)
    if not path.exists():
        raise DataPrepError(f"input {path}: no such file or directory")
    if stats is not None:
        stats.inputs.append(str(path))
    kind = _kind(path)
    raw = _iter_text(path, options, stats) if kind == "text" else _iter_records(path, kind, options, stats)
    for text in raw:
        doc = normalize_text(text, options)
        if doc:
            if stats is not None:
                stats.documents += 1
                stats.bytes += len(doc.encode("utf-8"))
            yield doc


def iter_corpus(paths: Iterable[Path], options: CorpusOptions, stats: CorpusStats | None = None) -> Iterator[str]:
    """All documents of all inputs in order; raises DataPrepError at the end if there were none at all."""
    stats = stats if stats is not None else CorpusStats()
    paths = list(paths)
    for path in paths:
        yield from iter_documents(path, options, stats)
    require_documents(stats, paths, options)


def require_documents(stats: CorpusStats, paths: Sequence[Path], options: CorpusOptions) -> None:
    """The caller-level empty-corpus check: one error naming the inputs and the options that found nothing."""
    if stats.documents == 0:
        names = ", ".join(str(p) for p in paths)
        skipped = f"; {stats.skipped_invalid} skipped for invalid UTF-8" if stats.skipped_invalid else ""
        raise DataPrepError(
            f"empty corpus: {names} contain no non-empty documents (text field {options.text_field!r}, "
            f"doc_per_line={options.doc_per_line}{skipped}); check the inputs and the corpus options"
        )


def _open_binary(path: Path):
    opener = _COMPRESSED.get(path.suffix.lower())
    if opener is None:
        return open(path, "rb")
    return opener(path, "rb")


def _iter_text(path: Path, options: CorpusOptions, stats: CorpusStats | None) -> Iterator[str]:
    """Plain text, read line by line as bytes so an invalid sequence is located exactly (byte offset)."""
    compressed = path.suffix.lower() in _COMPRESSED
    where = " of the decompressed text" if compressed else ""
    lines: list[str] = []
    bad = False  # the current blank-line document holds an invalid line and will be skipped
    offset = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                start = offset
                offset += len(raw)
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                    start += 3
                try:
                    line = raw.decode("utf-8")
                    if "\x00" in line:  # valid UTF-8, but never text: a binary file or a NUL-filled one
                        raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL")
                except UnicodeDecodeError as err:
                    if not options.skip_invalid_utf8:
                        what = "a NUL byte (not text: a binary file?)" if err.reason == "NUL" else "invalid UTF-8"
                        raise DataPrepError(
                            f"{path}: {what} at byte offset {start + err.start}{where} (line {lineno}); "
                            f"convert the file to UTF-8 text or pass --skip-invalid-utf8 to skip such "
                            f"{'lines' if options.doc_per_line else 'documents'}"
                        ) from None
                    if options.doc_per_line:
                        if stats is not None:
                            stats.skipped_invalid += 1
                    else:
                        bad = True
                        lines.append("")  # keeps the document open until the next blank line
                    continue
                if options.doc_per_line:
                    yield line
                elif line and not line.isspace():  # (not line.strip(): no copy of a huge line)
                    lines.append(line.rstrip("\r\n"))
                    raw = line = None  # a generator keeps its locals: do not hold two more copies of the line
                elif lines:
                    if bad:
                        if stats is not None:
                            stats.skipped_invalid += 1
                    else:
                        yield "\n".join(lines)
                    lines, bad = [], False
    except (OSError, EOFError, lzma.LZMAError) as err:
        if isinstance(err, DataPrepError):
            raise
        raise DataPrepError(f"{path}: cannot be read ({err}); check the file (a truncated archive?)") from None
    if lines:
        if bad:
            if stats is not None:
                stats.skipped_invalid += 1
        else:
            yield "\n".join(lines)


def _iter_records(path: Path, kind: str, options: CorpusOptions, stats: CorpusStats | None = None) -> Iterator[str]:
    """json/parquet/arrow/saved datasets through the ``datasets`` library, one field of each record.

    Records without the field (or with a null one) are counted; unless ``--skip-missing-text`` they end the file
    with an error naming the count (the shard manifest, written last, is then never written)."""
    name = options.text_field
    missing, first_missing, total = 0, None, 0
    try:
        for index, record in enumerate(_iter_rows(path, kind, name)):
            total += 1
            if index == 0 and name not in record:
                fields = ", ".join(sorted(record)) or "none"
                raise DataPrepError(
                    f"{path}: records have no field {name!r} (fields: {fields}); pass --text-field with one of them"
                )
            value = record.get(name)
            if value is None:
                missing += 1
                first_missing = index if first_missing is None else first_missing
                continue
            if not isinstance(value, str):
                raise DataPrepError(
                    f"{path}: record {index} field {name!r} is a {type(value).__name__}, not text; "
                    f"pass --text-field naming a string field"
                )
            yield value
        if missing and not options.skip_missing_text:
            raise DataPrepError(
                f"{path}: {missing} of {total} records have no {name!r} field or a null one (the first is record "
                f"{first_missing}); fix the file, or pass --skip-missing-text to skip them (counted in the manifest)")
        if stats is not None:
            stats.skipped_missing_text += missing
    except DataPrepError:
        raise
    except Exception as err:  # pyarrow/datasets raise many types for unreadable files
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataPrepError(f"{path}: cannot be read as {kind} by `datasets` ({type(err).__name__}: {message}); "
                            f"check the file's format (invalid UTF-8 in json is reported here too)") from None


def _iter_rows(path: Path, kind: str, name: str) -> Iterator[dict]:
    import datasets

    datasets.disable_progress_bars()
    if kind in ("json", "parquet"):
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        yield from ds
        return
    if kind == "arrow":
        parts = [datasets.Dataset.from_file(str(path))]
    else:
        loaded = datasets.load_from_disk(str(path))
        parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for ds in parts:
        if name not in ds.column_names:
            raise DataPrepError(
                f"{path}: the dataset has no column {name!r} (columns: {', '.join(ds.column_names) or 'none'}); "
                f"pass --text-field with one of them"
            )
        for batch in ds.select_columns([name]).iter(batch_size=1024):
            for value in batch[name]:
                yield {name: value}
