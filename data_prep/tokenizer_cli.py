"""``python -m data_prep tokenizer``: train (or extend) a DeBERTa SentencePiece tokenizer (see ``tokenizer``)."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from data_prep.corpus import add_corpus_arguments
    from data_prep.tokenizer import DEFAULT_MAX_SENTENCES

    parser.description = (
        "Train a SentencePiece unigram tokenizer with DeBERTa's id layout ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 in "
        "the spm model, [MASK] appended after it) and write a HuggingFace tokenizer directory (spm.model, "
        "tokenizer.json, tokenizer_config.json, special_tokens_map.json, data_prep_tokenizer.json)."
    )
    add_corpus_arguments(parser)
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N",
                        help="SentencePiece pieces, the 4 specials included; [MASK] is one more id (= N), so the "
                             "model needs N+1 embedding rows. With --extend: pieces of the model learned on the new "
                             "corpus; those the old vocabulary lacks are appended")
    parser.add_argument("--out", required=True, metavar="DIR", help="output tokenizer directory (written atomically)")
    parser.add_argument("--lang", default="en",
                        help="corpus language: zh/ja/ko use character coverage 0.9995 (rare characters -> [UNK]), "
                             "others 1.0 (default %(default)s)")
    parser.add_argument("--character-coverage", type=float, default=None, metavar="F",
                        help="share of characters the vocabulary must cover (default: by --lang)")
    parser.add_argument("--extend", default=None, metavar="DIR",
                        help="tokenizer directory to extend: every old id is kept, new pieces get ids after [MASK]")
    parser.add_argument("--max-sentences", type=int, default=DEFAULT_MAX_SENTENCES, metavar="N",
                        help="train on a uniform sample (reservoir, --seed) of at most N lines; bounds memory "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and training seed (default %(default)s)")
    parser.add_argument("--split-digits", action="store_true", help="split numbers into single digits")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out made with different settings (default: refuse)")
    parser.add_argument("--log-interval", type=float, default=30.0,
                        help="seconds between progress lines when stderr is not a terminal (default %(default)s)")


class _Progress:
    """tqdm bar (documents, MB) on a terminal; a plain line every ``interval`` seconds otherwise."""

    def __init__(self, interval: float, stream=sys.stderr):
        self.stream, self.interval = stream, interval
        self.docs = self.bytes = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="doc", file=stream, dynamic_ncols=True, desc="reading corpus")

    def __call__(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(docs)
            if self.docs % 1000 == 0:
                self.bar.set_postfix_str(f"{self.bytes / 1e6:.1f} MB", refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            rate = self.bytes / 1e6 / max(now - self.t0, 1e-9)
            print(f"[tokenizer] read {self.docs} documents, {self.bytes / 1e6:.1f} MB, {rate:.2f} MB/s",
                  file=self.stream, flush=True)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    from data_prep.corpus import corpus_options_from_args, resolve_inputs
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    settings = TokenizerSettings(
        vocab_size=args.vocab_size,
        lang=args.lang,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
        seed=args.seed,
        split_digits=args.split_digits,
    )
    settings.validate()
    options = corpus_options_from_args(args)
    inputs = resolve_inputs(args.input)
    progress = _Progress(args.log_interval)
    try:
        train_tokenizer(inputs, args.out, settings, options, extend=args.extend, overwrite=args.overwrite,
                        log=progress.log, progress=progress)
    finally:
        progress.close()
    return 0
