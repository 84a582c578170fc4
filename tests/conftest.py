"""Test-wide settings: no network for wandb, deterministic torch, one intra-op thread.

One thread, in this process and in every process a test starts (OMP_NUM_THREADS, unless a test sets it): the
suite's models are tiny, and on a 2-core machine that is busy with anything else (a rank the test started, another
job) torch's second intra-op thread spin-waits for a core and made single tests up to 60 times slower."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():  # Triton kernels run in Triton's CPU interpreter (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Packed shards (seq_len 64) of the bundled English sample with a small SentencePiece tokenizer, made by the
    real `python -m data_prep shards` command."""
    import subprocess
    import sys
    from pathlib import Path

    from shard_helpers import sample_documents, train_spm_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("train_data")
    docs = sample_documents("en")
    tokenizer = train_spm_tokenizer(root / "tok", docs, vocab_size=1000)
    corpus = write_jsonl(root / "corpus.jsonl", docs)
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer),
                    "--out", str(root / "shards"), "--seq-len", "64", "--workers", "1"],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return root / "shards"


@pytest.fixture(scope="session")
def split_shards(shards, tmp_path_factory):
    """(train, val) shard directories of the same corpus and tokenizer as ``shards``, split by document with the
    real `python -m data_prep shards --val-fraction 0.1` (the validation set lands in OUT/val)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("split_data") / "shards"
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(shards.parent / "corpus.jsonl"),
                    "--tokenizer", str(shards.parent / "tok"), "--out", str(out), "--seq-len", "64", "--workers", "1",
                    "--val-fraction", "0.1"], check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return out, out / "val"
