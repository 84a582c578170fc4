"""``python -m data_prep inspect DIR``: summarise a shard directory, decode a few sequences, validate the shards.

Several directories (``inspect 'OUT/part-*'``, ``inspect A B``) or a weighted mixture (``inspect --source A 0.7
--source 'B/part-*' 0.3``) name a training corpus the way ``data.path`` / ``data.sources`` do: each directory is
inspected, then the corpus is summarised (sequences and tokens per source, share of the stream) and, with
``--steps N --global-batch B``, how many epochs of each source N optimizer steps go through.

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
    parser.add_argument("dir", metavar="DIR", nargs="*",
                        help="shard directory written by `python -m data_prep shards`, or a glob ('OUT/part-*'); "
                             "several are one corpus, as data.path=[...] trains it")
    parser.add_argument("--source", nargs=2, action="append", metavar=("PATH", "WEIGHT"), default=None,
                        help="a weighted mixture source (directory or glob) and its weight, repeated per source, "
                             "as data.sources=[{path: PATH, weight: WEIGHT}, ...] trains it")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="with --global-batch: print the epochs of each source after N optimizer steps")
    parser.add_argument("--global-batch", type=int, default=None, metavar="B",
                        help="sequences per optimizer step (data.global_batch_size)")
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
    from data_prep.corpus import describe_skipped

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
        describe_skipped(tot.get("skipped_invalid_text", 0), tot.get("skipped_missing_text", 0)) or "skipped: none",
    ]


def run(args: argparse.Namespace) -> int:
    from data_prep.mixture import ShardCorpus, parse_sources

    if args.dir and args.source:
        raise DataPrepError("give shard directories (one corpus) or --source PATH WEIGHT (a mixture), not both")
    if (args.steps is None) != (args.global_batch is None):
        raise DataPrepError("--steps and --global-batch go together: the epochs after N steps of B sequences")
    if args.steps is not None and (args.steps < 0 or args.global_batch < 1):
        raise DataPrepError(f"--steps {args.steps} --global-batch {args.global_batch}: need N >= 0 and B >= 1")
    sources = parse_sources(args.dir or None,
                            [{"path": p, "weight": w} for p, w in args.source] if args.source else None,
                            what="inspect")
    directories = [path for source in sources for path in source.paths]
    status = 0
    for i, directory in enumerate(directories):
        if i:
            print()
        status = max(status, inspect_directory(directory, args))
    if len(directories) == 1 and args.steps is None:
        return status
    print()
    try:
        corpus = ShardCorpus(sources, verify="none")
    except DataPrepError as err:
        print(f"FAIL {err}")
        return 1
    for line in mixture_summary(corpus, args.steps, args.global_batch):
        print(line)
    return status


def mixture_summary(corpus, steps: int | None, global_batch: int | None) -> list[str]:
    """The corpus as training sees it: per source its sequences, tokens, share of the stream and, after ``steps``
    steps of ``global_batch`` sequences, the epochs gone through (exact, from the blending table)."""
    seq_len = corpus.seq_len
    weighted = corpus.weighted
    total = len(corpus)
    lines = [f"corpus: {len(corpus.sets)} shard set(s), {len(corpus.sources)} source(s), {total} sequences, "
             f"{total * seq_len} tokens (seq_len {seq_len}), "
             + ("weighted mixture" if weighted else "one corpus, each sequence once per epoch")]
    consumed = None if steps is None else steps * global_batch
    if weighted:
        order = corpus.order(seed=0)
        shares = order.quotas / order.period
        epochs = order.source_epochs(consumed) if consumed is not None else None
    else:
        shares = [n / total for n in corpus.source_lengths]
        epochs = [consumed / total] * len(corpus.sources) if consumed is not None else None
    for k, (source, n) in enumerate(zip(corpus.sources, corpus.source_lengths)):
        text = (f"  source {k}: {source.name}: {n} sequences, {n * seq_len} tokens, "
                f"{shares[k]:.2%} of the stream" + (f" (weight {source.weight:g})" if weighted else ""))
        if epochs is not None:
            text += f", {epochs[k]:.3f} epochs after {steps} steps"
        lines.append(text)
    if consumed is not None:
        lines.append(f"{steps} steps x {global_batch} sequences = {consumed} sequences, {consumed * seq_len} tokens")
    return lines


def inspect_directory(directory: Path, args: argparse.Namespace) -> int:
    """Summary, decoded sequences and validation of one shard directory; 1 when a check fails."""
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
