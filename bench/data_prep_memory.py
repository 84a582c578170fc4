"""Peak RSS (process tree) of ``python -m data_prep shards`` on a 200 MB corpus: normal, or the same as one line.

``python bench/data_prep_memory.py normal|oneline [--cache-dir DIR]``. The corpus and the 32k tokenizer are the ones
``bench/data_prep_bench.py --from-samples`` builds (the bundled English sample repeated to 200 MB); ``oneline`` is
that corpus with every newline replaced by a space: one 200 MB document. Default settings (workers = CPU count,
seq_len 512).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_prep_bench as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["normal", "oneline"])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/data_prep_memory"))
    parser.add_argument("--size-mb", type=int, default=200)
    args = parser.parse_args()
    cache = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    text = bench.base_text(cache, True)
    corpus = bench.build_corpus(cache, text, args.size_mb)
    tokenizer = bench.build_tokenizer(cache, text)
    path = corpus
    if args.kind == "oneline":
        path = cache / f"one-line-{args.size_mb}mb.txt"
        if not path.exists():
            with open(corpus, "rb") as src, open(path, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk.replace(b"\n", b" "))
                dst.write(b"\n")
    out = cache / f"shards-{args.kind}"
    shutil.rmtree(out, ignore_errors=True)
    result = bench.measure([sys.executable, "-m", "data_prep", "shards", "--input", str(path), "--tokenizer",
                            str(tokenizer), "--out", str(out), "--seq-len", "512"])
    print(f"{args.kind}: {path.stat().st_size / 1e6:.0f} MB, wall {result['wall_s']:.1f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
