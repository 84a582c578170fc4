"""Command line of the data preparation pipeline: ``python -m data_prep {tokenizer,shards,inspect,split} ...``.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so ``--help`` stays fast and a broken optional
dependency of one stage does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from data_prep.cli_errors import one_line_errors
from data_prep.errors import DataPrepError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "tokenizer": ("data_prep.tokenizer_cli", "train (or extend) a DeBERTa SentencePiece tokenizer"),
    "shards": ("data_prep.shards_cli", "tokenize and pack a corpus into verifiable binary shards"),
    "inspect": ("data_prep.inspect_cli", "summarise, decode and validate a shard directory or a mixture"),
    "split": ("data_prep.array_split", "the inputs of one array task: split an input list across N tasks"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Prepare corpora for DeBERTa pretraining: tokenizer training, shard packing, inspection.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(only=command).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        with one_line_errors(DataPrepError, hint="check the path and its permissions, then re-run the same command",
                             disk_full_hint="free space there (or choose another --out), then re-run the same "
                                            "command: finished shards are kept and it resumes") as outcome:
            return int(module.run(args) or 0)
        return outcome.status
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
