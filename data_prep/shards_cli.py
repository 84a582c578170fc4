"""``python -m data_prep shards``: tokenize and pack a corpus into verifiable binary shards (see ``pack``)."""

from __future__ import annotations

import argparse
import os
import sys

from data_prep import pack
from data_prep import split as splitting
from data_prep.errors import DataPrepError


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
    parser.add_argument("--val-fraction", type=float, default=None, metavar="F",
                        help="hold out about F of the documents (0 < F < 1, chosen by a hash of each document's "
                             "text, so the same corpus always gives the same split) as validation shards in "
                             "--val-out; --out then holds the other documents (default: no split)")
    parser.add_argument("--val-out", default=None, metavar="DIR",
                        help="directory of the validation shards (default: OUT/val); train with "
                             "data.path=OUT data.val_path=DIR")
    parser.add_argument("--log-interval", type=float, default=30.0,
                        help="seconds between progress lines when stderr is not a terminal (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from data_prep.corpus import corpus_options_from_args, describe_skipped

    settings = pack.PackSettings(
        seq_len=args.seq_len,
        lang=args.lang,
        cross_document=args.cross_document,
        shard_size=args.shard_size,
        dtype=args.dtype,
        jieba_dict=args.jieba_dict,
    )
    if args.workers < 1:
        raise DataPrepError(f"--workers {args.workers} must be at least 1")
    parts: list[tuple[str, dict | None]] = [(args.out, None)]
    if args.val_fraction is not None:
        fraction = splitting.check_fraction(args.val_fraction)
        val_out = args.val_out or os.path.join(args.out, splitting.VAL_SUBDIR)
        parts = [(args.out, splitting.record(fraction, "train")), (val_out, splitting.record(fraction, "val"))]
    elif args.val_out is not None:
        raise DataPrepError("--val-out is used only with --val-fraction F; add it or drop --val-out")
    for out, split in parts:
        progress = pack.Progress(interval=args.log_interval)
        manifest = pack.prepare_shards(
            args.input, args.tokenizer, out, corpus_options_from_args(args), settings,
            workers=args.workers, overwrite=args.overwrite, progress=progress, split=split,
        )
        t = manifest["totals"]
        role = f" ({split['part']} split)" if split else ""
        skipped = describe_skipped(t.get("skipped_invalid_text", 0), t.get("skipped_missing_text", 0))
        print(
            f"{out}{role}: {len(manifest['shards'])} shards, {t['sequences']} sequences of {args.seq_len} tokens, "
            f"{t['content_tokens']} text tokens from {t['documents']} documents" + (f"; {skipped}" if skipped else ""),
            file=sys.stderr,
        )
    return 0
