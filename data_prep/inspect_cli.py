"""``python -m data_prep inspect DIR``: summarise a shard directory, decode a few sequences, validate the shards.

Exit status 1 when any shard fails validation (by default every shard's sha256, size and header, and the tokenizer
copy against the manifest; ``--fast`` skips the sha256, which reads all data), so it can gate a training launch. Word starts are marked with ``|`` in the decoded text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data_prep import shard_format as sf
from data_prep.errors import DataPrepError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="shard directory written by `python -m data_prep shards`")
    parser.add_argument("--fast", action="store_true",
                        help="skip the sha256 of every shard (which reads all data): sizes, headers and the "
                             "tokenizer copy only")
    parser.add_argument("--full", action="store_true", help="verify every shard's sha256 (the default)")
    parser.add_argument("--num", type=int, default=3, metavar="N", help="sequences to decode (default %(default)s)")


def render_sequence(tok, ids: np.ndarray, flags: np.ndarray) -> str:
    """Token strings with ``|`` before every word start; ▁ shown as a space, ``##`` stripped, [PAD] runs folded."""
    parts = []
    pads = 0
    for i, f in zip(ids.tolist(), flags.tolist()):
        if f & sf.SPECIAL and i == tok.pad_id:
            pads += 1
            continue
        piece = tok.id_to_token(i)
        if not f & sf.SPECIAL:
            if tok.kind == "wordpiece" and piece.startswith("##"):
                piece = piece[2:]
            piece = piece.replace("\u2581", " ")
        parts.append(("|" if f & sf.WORD_START else "") + piece)
    text = "".join(parts)
    return text + (f" [PAD]x{pads}" if pads else "")


def _summary(directory: Path, manifest: dict) -> list[str]:
    tok, st, tot = manifest["tokenizer"], manifest["settings"], manifest["totals"]
    corpus = ", ".join(f"{k}={v}" for k, v in (st.get("corpus") or {}).items())
    fill = tot["content_tokens"] / max(tot["tokens"], 1)
    return [
        f"shard directory: {directory}",
        f"format: {manifest['format']} v{manifest['format_version']}",
        f"tokenizer: {tok['kind']}, vocab {tok['vocab_size']}, dtype {st['dtype']}, checksum {tok['checksum'][:16]}..., "
        f"source {tok.get('source')}",
        "special ids: " + ", ".join(f"{k}={v}" for k, v in tok["special_ids"].items()),
        f"settings: seq_len {st['seq_len']}, lang {st['lang']}, cross_document {st['cross_document']}, "
        f"shard_size {st['shard_size']}, jieba_dict {(st.get('jieba_dict') or {}).get('path')}",
        f"corpus options: {corpus}",
        f"inputs: {len(st['inputs'])} files, {tot.get('input_bytes', 0) / 1e6:.2f} MB",
        f"totals: {len(manifest['shards'])} shards, {tot['documents']} documents, {tot['sequences']} sequences, "
        f"{tot['tokens']} tokens ({tot['content_tokens']} from text, {fill:.1%} fill)",
    ]


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    manifest = sf.load_manifest(directory)
    for line in _summary(directory, manifest):
        print(line)

    failures = []
    headers = {}
    from data_prep.text_tokenizer import load_tokenizer, tokenizer_checksum

    tok_dir = directory / manifest["tokenizer"].get("copy", sf.TOKENIZER_SUBDIR)
    tok = None
    if not tok_dir.is_dir():
        failures.append(f"tokenizer copy {tok_dir} is missing")
    elif tokenizer_checksum(tok_dir)[0] != manifest["tokenizer"]["checksum"]:
        failures.append(f"tokenizer copy {tok_dir} does not match the manifest checksum")
    else:
        tok = load_tokenizer(tok_dir)
        failures += [f"{directory / sf.MANIFEST_NAME}: {p}" for p in sf.tokenizer_mismatches(manifest, tok)]

    for i, entry in enumerate(manifest["shards"]):
        try:
            headers[i] = sf.check_shard(directory, entry, manifest["settings"], full=not args.fast, position=i)
        except DataPrepError as err:
            failures.append(str(err))

    shown = 0
    if tok is not None and args.num > 0:
        print(f"\nfirst {args.num} sequences ('|' marks a word start):")
        for i, entry in enumerate(manifest["shards"]):
            if i not in headers or shown >= args.num:
                continue
            ids, flags = sf.open_shard(directory / entry["file"], headers[i])
            for row in range(min(len(ids), args.num - shown)):
                print(f"[{entry['file']} #{row}] {render_sequence(tok, ids[row], flags[row])}")
                shown += 1

    mode = "fast (size + header)" if args.fast else "full (sha256)"
    if failures:
        print(f"\nvalidation {mode}: {len(failures)} problem(s)")
        for f in failures:
            print(f"FAIL {f}")
        return 1
    print(f"\nvalidation {mode}: all {len(manifest['shards'])} shards OK")
    return 0
