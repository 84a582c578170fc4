"""`python -m data_prep inspect DIR`: summary, decoded sequences with word starts, validation exit status."""

from __future__ import annotations

import shutil

import pytest

from data_prep import pack
from data_prep import shard_format as sf
from data_prep.__main__ import main
from data_prep.corpus import CorpusOptions
from shard_helpers import build_wordpiece_vocab, run_cli, sample_documents, write_jsonl


@pytest.fixture(scope="module")
def zh_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    docs = sample_documents("zh", limit=40)
    tok = build_wordpiece_vocab(root / "wp", docs)
    inputs = [str(write_jsonl(root / "zh.jsonl", docs))]
    settings = pack.PackSettings(seq_len=48, shard_size=10, lang="zh")
    pack.prepare_shards(inputs, tok, root / "shards", CorpusOptions(), settings)
    return root / "shards"


def test_inspect_prints_summary_and_word_boundaries(zh_shards, capsys):
    assert main(["inspect", str(zh_shards), "--num", "2", "--full"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: wordpiece" in out and "lang zh" in out
    assert out.count("[shard-00000.bin #") == 2
    assert "|[CLS]" in out and "[SEP]" in out
    assert "all " in out and "shards OK" in out


def test_inspect_exits_nonzero_on_a_corrupted_shard(zh_shards, tmp_path):
    bad = shutil.copytree(zh_shards, tmp_path / "bad")
    victim = bad / "shard-00000.bin"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x04
    victim.write_bytes(bytes(data))
    fast = run_cli("inspect", bad, "--fast")
    assert fast.returncode == 0  # size and header are intact
    full = run_cli("inspect", bad)  # the default reads everything: flipped bytes fail
    assert full.returncode == 1
    assert "FAIL shard" in full.stdout and "shard-00000.bin is corrupted" in full.stdout


def test_inspect_exits_nonzero_on_a_truncated_shard_and_missing_manifest(zh_shards, tmp_path, capsys):
    bad = shutil.copytree(zh_shards, tmp_path / "bad")
    victim = bad / "shard-00000.bin"
    victim.write_bytes(victim.read_bytes()[:100])
    assert main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "shard-00000.bin" in out and "FAIL" in out
    (bad / sf.MANIFEST_NAME).unlink()
    assert main(["inspect", str(bad)]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_inspect_flags_a_tokenizer_copy_that_does_not_match(zh_shards, tmp_path, capsys):
    bad = shutil.copytree(zh_shards, tmp_path / "bad")
    vocab = bad / "tokenizer" / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8") + "extra\n", encoding="utf-8")
    assert main(["inspect", str(bad)]) == 1
    assert "does not match the manifest checksum" in capsys.readouterr().out
