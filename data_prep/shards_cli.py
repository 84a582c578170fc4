"""``python -m data_prep shards``: tokenize and pack a corpus into verifiable binary shards (see ``pack``)."""

from __future__ import annotations

import argparse
import os
import sys

from data_prep import pack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from data_prep.corpus import add_corpus_arguments

    add_corpus_arguments(parser)
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="HuggingFace tokenizer directory: tokenizer.json, spm.model or WordPiece vocab.txt")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (shards + manifest.json)")
    parser.add_argument("--seq-len", type=int, default=pack.DEFAULT_SEQ_LEN,
                        help="tokens per sequence, [CLS] and [SEP] included (default %(default)s)")
    parser.add_argument("--lang", default="en",
                        help="corpus language; 'zh' takes word boundaries from jieba instead of ▁/## pieces")
    parser.add_argument("--jieba-dict", default=None, metavar="FILE", help="jieba user dictionary (--lang zh)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer worker processes (default: CPU count); the output does not depend on it")
    parser.add_argument("--no-cross-document", dest="cross_document", action="store_false",
                        help="start every document in a new sequence (tail padded with [PAD]) instead of packing "
                             "documents back to back separated by [SEP]")
    parser.add_argument("--shard-size", type=int, default=pack.DEFAULT_SHARD_SIZE, metavar="SEQUENCES",
                        help="sequences per shard file (default %(default)s)")
    parser.add_argument("--dtype", choices=["uint16", "uint32"], default=None,
                        help="token id dtype (default: uint16 when the vocabulary fits, else uint32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards in --out made with different settings (default: refuse)")
    parser.add_argument("--log-interval", type=float, default=30.0,
                        help="seconds between progress lines when stderr is not a terminal (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from data_prep.corpus import corpus_options_from_args

    settings = pack.PackSettings(
        seq_len=args.seq_len,
        lang=args.lang,
        cross_document=args.cross_document,
        shard_size=args.shard_size,
        dtype=args.dtype,
        jieba_dict=args.jieba_dict,
    )
    if args.workers < 1:
        from data_prep.errors import DataPrepError

        raise DataPrepError(f"--workers {args.workers} must be at least 1")
    progress = pack.Progress(interval=args.log_interval)
    manifest = pack.prepare_shards(
        args.input, args.tokenizer, args.out, corpus_options_from_args(args), settings,
        workers=args.workers, overwrite=args.overwrite, progress=progress,
    )
    t = manifest["totals"]
    print(
        f"{args.out}: {len(manifest['shards'])} shards, {t['sequences']} sequences of {args.seq_len} tokens, "
        f"{t['content_tokens']} text tokens from {t['documents']} documents",
        file=sys.stderr,
    )
    return 0
