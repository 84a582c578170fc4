"""`python -m data_prep shards`: packing, word boundaries, determinism, resume and bad input, on the bundled samples."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import pack
from data_prep import shard_format as sf
from data_prep.__main__ import main
from data_prep.corpus import CorpusOptions, iter_documents
from data_prep.errors import DataPrepError
from data_prep.text_tokenizer import load_tokenizer
from data_prep.word_boundaries import is_punct_or_space
from shard_helpers import (
    REPO, build_wordpiece_vocab, read_all, run_cli, sample_documents, train_spm_tokenizer, write_jsonl,
)


@pytest.fixture(scope="module")
def docs():
    return {lang: sample_documents(lang, limit=120) for lang in ("en", "zh", "ko")}


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, docs):
    return train_spm_tokenizer(tmp_path_factory.mktemp("spm"), docs["en"] + docs["zh"] + docs["ko"],
                               vocab_size=6000)  # the zh sample alone has ~2,200 distinct characters


@pytest.fixture(scope="module")
def wp_dir(tmp_path_factory, docs):
    return build_wordpiece_vocab(tmp_path_factory.mktemp("wp"), docs["zh"])


@pytest.fixture(scope="module")
def en_inputs(tmp_path_factory, docs):
    d = tmp_path_factory.mktemp("en")
    half = len(docs["en"]) // 2
    return [write_jsonl(d / "a.jsonl", docs["en"][:half]), write_jsonl(d / "b.jsonl", docs["en"][half:])]


def _read_docs(paths) -> list[str]:
    return [doc for p in paths for doc in iter_documents(Path(p), CorpusOptions())]


def _shards(inputs, tok, out, **kw) -> dict:
    workers = kw.pop("workers", 1)
    overwrite = kw.pop("overwrite", False)
    max_shards = kw.pop("max_shards", None)
    return pack.prepare_shards(
        [str(p) for p in inputs], tok, out, CorpusOptions(), pack.PackSettings(**kw), workers=workers,
        overwrite=overwrite, max_shards=max_shards,
    )


def _file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.bin"))}


# ------------------------------------------------------------------------------------------ round trip


def test_shards_decode_to_original_documents_identical_for_any_worker_count(tmp_path, en_inputs, spm_dir):
    m1 = _shards(en_inputs, spm_dir, tmp_path / "w1", seq_len=64, shard_size=40, workers=1)
    m2 = _shards(en_inputs, spm_dir, tmp_path / "w2", seq_len=64, shard_size=40, workers=2)
    assert len(m1["shards"]) >= 3
    assert _file_bytes(tmp_path / "w1") == _file_bytes(tmp_path / "w2")
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]

    ids, flags = read_all(tmp_path / "w1")
    assert ids.shape[1] == 64 and ids.dtype == np.uint16
    tok = load_tokenizer(spm_dir)
    assert (ids[:, 0] == tok.cls_id).all()
    # every sequence ends with [SEP] followed only by padding; [PAD] appears only in the very last sequence
    assert (ids[:-1, -1] == tok.sep_id).all()
    assert not (ids[:-1] == tok.pad_id).any()

    originals = _read_docs(en_inputs)
    decoded = sf.decode_documents(ids, flags)
    expected = tok.encode_batch(originals)
    assert [d.tolist() for d in decoded] == expected
    for text, d in zip(originals, decoded):
        assert " ".join(tok.decode(d).split()) == " ".join(text.split())
    assert m1["totals"]["documents"] == len(originals)


def test_cross_document_layout_puts_one_sep_between_documents(tmp_path, en_inputs, spm_dir):
    _shards(en_inputs, spm_dir, tmp_path / "o", seq_len=128, shard_size=1000)
    ids, flags = read_all(tmp_path / "o")
    tok = load_tokenizer(spm_dir)
    for row_ids, row_flags in zip(ids, flags):
        content = np.flatnonzero((row_flags & sf.SPECIAL) == 0)
        for pos in np.flatnonzero(row_flags & sf.DOC_START):
            if pos > 1:  # a document that does not open the sequence follows exactly one separator [SEP]
                assert row_ids[pos - 1] == tok.sep_id and row_flags[pos - 1] & sf.SPECIAL
                assert pos - 2 in content
    tok_docs = tok.encode_batch(_read_docs(en_inputs))
    assert int((flags & sf.SPECIAL == 0).sum()) == sum(map(len, tok_docs))


def test_no_cross_document_starts_every_document_in_a_new_sequence(tmp_path, en_inputs, spm_dir):
    m = _shards(en_inputs, spm_dir, tmp_path / "o", seq_len=48, shard_size=64, cross_document=False)
    assert m["settings"]["cross_document"] is False
    ids, flags = read_all(tmp_path / "o")
    tok = load_tokenizer(spm_dir)
    originals = _read_docs(en_inputs)
    lengths = [len(x) for x in tok.encode_batch(originals)]
    # each document occupies ceil(len / 46) sequences of its own, its first token right after [CLS]
    assert len(ids) == sum(-(-n // 46) for n in lengths)
    starts = np.flatnonzero(flags[:, 1] & sf.DOC_START)
    assert len(starts) == len(originals) == int((flags & sf.DOC_START).astype(bool).sum())
    assert [d.tolist() for d in sf.decode_documents(ids, flags)] == tok.encode_batch(originals)
    for row_ids, row_flags in zip(ids, flags):
        n_sep = int((row_ids == tok.sep_id).sum())
        assert n_sep == 1  # no separators: only the closing [SEP], then [PAD]
        end = int(np.flatnonzero(row_ids == tok.sep_id)[0])
        assert (row_ids[end + 1 :] == tok.pad_id).all()


# -------------------------------------------------------------------------------------- word boundaries


def test_sentencepiece_word_starts_follow_the_metaspace_rule_en_and_ko(tmp_path, docs, spm_dir):
    tok = load_tokenizer(spm_dir)
    for lang in ("en", "ko"):
        inputs = [write_jsonl(tmp_path / f"{lang}.jsonl", docs[lang])]
        _shards(inputs, spm_dir, tmp_path / lang, seq_len=96, shard_size=1000, lang=lang)
        ids, flags = read_all(tmp_path / lang)
        for i, f in zip(ids.ravel().tolist(), flags.ravel().tolist()):
            piece = tok.id_to_token(i)
            expected = f & sf.SPECIAL or piece.startswith("\u2581") or (len(piece) == 1 and is_punct_or_space(piece))
            assert bool(f & sf.WORD_START) == bool(expected), (lang, piece)
        if lang == "ko":
            # Korean: every eojeol (space-separated unit) begins with a word-start ▁ piece
            for text, d in zip(_read_docs(inputs), sf.decode_documents(ids, flags)):
                pieces = [tok.id_to_token(i) for i in d]
                assert sum(p.startswith("\u2581") for p in pieces) == len(text.split())


def test_chinese_word_starts_match_jieba_segmentation(tmp_path, docs, wp_dir):
    import jieba

    inputs = [write_jsonl(tmp_path / "zh.jsonl", docs["zh"])]
    m = _shards(inputs, wp_dir, tmp_path / "zh", seq_len=128, shard_size=1000, lang="zh", workers=2)
    assert m["tokenizer"]["kind"] == "wordpiece"
    ids, flags = read_all(tmp_path / "zh")
    tok = load_tokenizer(wp_dir)
    originals = _read_docs(inputs)
    content_flags = [f for f in np.split(flags.ravel()[(flags.ravel() & sf.SPECIAL) == 0],
                                         np.cumsum([len(x) for x in tok.encode_batch(originals)])[:-1])]
    encodings = tok.encode_batch(originals, offsets=True)
    n_words = 0
    for text, enc, f in zip(originals, encodings, content_flags):
        assert tok.unk_id not in enc.ids
        # group tokens into words by the stored flags; compare the character spans with jieba's words
        starts = np.flatnonzero(f & sf.WORD_START)
        groups = [(enc.offsets[a][0], enc.offsets[b - 1][1]) for a, b in zip(starts, list(starts[1:]) + [len(f)])]
        spans, pos = [], 0
        for word in jieba.lcut(text, HMM=True):
            if word.strip():
                spans.append((pos, pos + len(word)))
            pos += len(word)
        assert groups == spans
        n_words += len(spans)
    assert n_words > 100


def test_jieba_user_dictionary_changes_boundaries(tmp_path, wp_dir):
    text = "我们在研究蓝鲸模型预训练。"
    inputs = [write_jsonl(tmp_path / "zh.jsonl", [text])]
    user_dict = tmp_path / "dict.txt"
    user_dict.write_text("蓝鲸模型预训练 100000 n\n", encoding="utf-8")
    build_wordpiece_vocab(tmp_path / "wp", [text])
    _shards(inputs, tmp_path / "wp", tmp_path / "plain", seq_len=32, lang="zh")
    _shards(inputs, tmp_path / "wp", tmp_path / "dict", seq_len=32, lang="zh", jieba_dict=str(user_dict))
    _, plain = read_all(tmp_path / "plain")
    _, with_dict = read_all(tmp_path / "dict")
    span = slice(1 + text.index("蓝"), 1 + text.index("。"))
    assert (with_dict[0, span] & sf.WORD_START).tolist() == [1] + [0] * 6  # the dictionary word is one unit
    assert (plain[0, span] & sf.WORD_START).sum() > 1


# ------------------------------------------------------------------------------------ resume and reuse


def test_interrupted_run_resumes_and_untrusted_files_are_redone(tmp_path, en_inputs, spm_dir):
    ref = tmp_path / "ref"
    _shards(en_inputs, spm_dir, ref, seq_len=64, shard_size=20)
    out = tmp_path / "out"
    partial = _shards(en_inputs, spm_dir, out, seq_len=64, shard_size=20, max_shards=2)
    assert len(partial["shards"]) == 2
    assert not (out / sf.MANIFEST_NAME).exists() and (out / sf.PROGRESS_NAME).exists()
    with pytest.raises(DataPrepError, match="interrupted"):
        sf.load_manifest(out)
    # a half-written temp file and a shard that progress.json does not list must not be trusted
    (out / "shard-00002.bin.tmp").write_bytes(b"DEBSHARD" + b"\0" * 10)
    (out / "shard-00003.bin").write_bytes((ref / "shard-00000.bin").read_bytes())
    m = _shards(en_inputs, spm_dir, out, seq_len=64, shard_size=20, workers=2)
    assert _file_bytes(out) == _file_bytes(ref)
    assert not list(out.glob("*.tmp")) and not (out / sf.PROGRESS_NAME).exists()
    assert m["totals"] == json.loads((ref / sf.MANIFEST_NAME).read_text())["totals"]


def test_rerun_skips_verified_shards_and_redoes_a_corrupted_one(tmp_path, en_inputs, spm_dir):
    out = tmp_path / "out"
    _shards(en_inputs, spm_dir, out, seq_len=64, shard_size=20)
    before = _file_bytes(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.bin")}
    _shards(en_inputs, spm_dir, out, seq_len=64, shard_size=20)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.bin")} == mtimes  # nothing rewritten
    victim = out / "shard-00001.bin"
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF
    victim.write_bytes(bytes(data))
    _shards(en_inputs, spm_dir, out, seq_len=64, shard_size=20)
    assert _file_bytes(out) == before
    assert (out / "shard-00000.bin").stat().st_mtime_ns == mtimes["shard-00000.bin"]


def test_killed_process_resumes_to_identical_output(tmp_path, docs, spm_dir):
    corpus = write_jsonl(tmp_path / "big.jsonl", docs["en"] * 10)
    args = ["shards", "--input", corpus, "--tokenizer", spm_dir, "--seq-len", "32", "--shard-size", "64",
            "--workers", "1"]
    ref = run_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / sf.PROGRESS_NAME
    while proc.poll() is None and not (progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / sf.MANIFEST_NAME).exists(), "the run finished before it could be interrupted"
    resumed = run_cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    assert _file_bytes(out) == _file_bytes(tmp_path / "ref")


# ---------------------------------------------------------------------------------------- bad input


def test_different_tokenizer_against_existing_output_is_refused(tmp_path, en_inputs, spm_dir, wp_dir, capsys):
    out = tmp_path / "out"
    base = ["shards", "--input", *map(str, en_inputs), "--out", str(out), "--seq-len", "64", "--workers", "1"]
    assert main(base + ["--tokenizer", str(spm_dir)]) == 0
    before = _file_bytes(out)
    capsys.readouterr()
    assert main(base + ["--tokenizer", str(wp_dir)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer does not match the manifest" in err and str(out) in err
    assert _file_bytes(out) == before
    assert main(base + ["--tokenizer", str(wp_dir), "--overwrite"]) == 0
    assert sf.load_manifest(out)["tokenizer"]["kind"] == "wordpiece"


def test_vocabulary_too_large_for_dtype(tmp_path, en_inputs, docs):
    big = build_wordpiece_vocab(tmp_path / "big", docs["en"], extra=70000)
    with pytest.raises(DataPrepError, match="does not fit token dtype uint16"):
        _shards(en_inputs, big, tmp_path / "o16", dtype="uint16")
    assert not (tmp_path / "o16").exists() or not list((tmp_path / "o16").iterdir())
    m = _shards(en_inputs, big, tmp_path / "auto", seq_len=64)
    assert m["settings"]["dtype"] == "uint32"
    ids, _ = read_all(tmp_path / "auto")
    assert ids.dtype == np.uint32
    with pytest.raises(DataPrepError, match="does not fit"):
        sf.choose_dtype(2**33)


def test_missing_input_and_empty_corpus_are_clear_errors(tmp_path, spm_dir):
    missing = run_cli("shards", "--input", tmp_path / "nope.txt", "--tokenizer", spm_dir, "--out", tmp_path / "o1")
    assert missing.returncode == 2
    assert "nope.txt" in missing.stderr and missing.stderr.startswith("error:")
    assert not (tmp_path / "o1" / sf.MANIFEST_NAME).exists()

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n", encoding="utf-8")
    res = run_cli("shards", "--input", empty, "--tokenizer", spm_dir, "--out", tmp_path / "o2", "--workers", "1")
    assert res.returncode == 2
    assert "empty corpus" in res.stderr and "empty.txt" in res.stderr
    assert not (tmp_path / "o2" / sf.MANIFEST_NAME).exists()
    assert not list((tmp_path / "o2").glob("shard-*"))


def test_tokenizer_directory_without_tokenizer_files(tmp_path, en_inputs):
    (tmp_path / "tok").mkdir()
    with pytest.raises(DataPrepError, match="none of tokenizer.json, spm.model or vocab.txt"):
        _shards(en_inputs, tmp_path / "tok", tmp_path / "o")


def test_records_without_text_and_nul_files_are_refused_or_skipped_and_counted(tmp_path, spm_dir):
    """Half the records lack the text field: an error naming the file and the count, no manifest; with
    --skip-missing-text the shards are made and the manifest counts what was skipped. A file of NUL bytes is not
    text: an error naming the file and offset."""
    lines = [json.dumps({"text": f"Document number {i} has some words in it."} if i % 2 else {"id": i})
             for i in range(50)]
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = run_cli("shards", "--input", half, "--tokenizer", spm_dir, "--out", tmp_path / "o1", "--workers", "1",
                  "--seq-len", "32")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {half}: 25 of 50 records have no 'text' field" in res.stderr and "--skip-missing-text" in res.stderr
    assert not (tmp_path / "o1" / sf.MANIFEST_NAME).exists()
    res = run_cli("shards", "--input", half, "--tokenizer", spm_dir, "--out", tmp_path / "o2", "--workers", "1",
                  "--seq-len", "32", "--skip-missing-text")
    assert res.returncode == 0, res.stderr
    totals = json.loads((tmp_path / "o2" / sf.MANIFEST_NAME).read_text())["totals"]
    assert totals["documents"] == 25 and totals["skipped_missing_text"] == 25

    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\x00" * 4096)
    res = run_cli("shards", "--input", nul, "--tokenizer", spm_dir, "--out", tmp_path / "o3", "--workers", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {nul}: a NUL byte (not text: a binary file?) at byte offset 0" in res.stderr
    assert not (tmp_path / "o3" / sf.MANIFEST_NAME).exists()


def test_one_huge_document_is_tokenized_in_pieces_with_the_ids_of_the_whole(tmp_path, docs, spm_dir):
    """A single-line document several times MAX_PIECE_CHARS long goes to the tokenizer in whitespace-cut pieces
    (bounded memory); its ids and word starts equal those of the whole text tokenized at once."""
    text = " ".join(" ".join(d.split()) for d in docs["en"])
    assert len(text) > 3 * pack.MAX_PIECE_CHARS
    pieces = list(pack.split_long_text(text))
    assert len(pieces) > 3 and max(map(len, pieces)) <= pack.MAX_PIECE_CHARS
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(text + "\n", encoding="utf-8")
    _shards([corpus], spm_dir, tmp_path / "o", seq_len=256, shard_size=1000, workers=1)
    ids, flags = read_all(tmp_path / "o")
    decoded = sf.decode_documents(ids, flags)
    tok = load_tokenizer(spm_dir)
    whole = tok.encode_batch([text])[0]
    assert len(decoded) == 1 and decoded[0].tolist() == whole
    keep = (flags & sf.SPECIAL) == 0
    expected_starts = tok.word_start_table()[np.asarray(whole)]
    assert np.array_equal((flags[keep] & sf.WORD_START).astype(bool), expected_starts)


def test_failed_run_leaves_no_out_and_inputs_skip_the_projects_outputs(tmp_path, spm_dir):
    """A run stopped by invalid UTF-8 leaves no OUT (no tokenizer/ copy); with --skip-invalid-utf8 the skipped
    document is counted on the terminal and in `inspect`; a later directory or glob input holding that OUT reads
    only the text beside it."""
    sample = (REPO / "data_prep" / "samples" / "en" / "udhr_eng.txt").read_bytes()
    paragraphs = sample.split(b"\n\n")
    paragraphs[3] = paragraphs[3] + b" \xff\xfe broken"
    text = tmp_path / "data" / "text" / "udhr.txt"
    text.parent.mkdir(parents=True)
    text.write_bytes(b"\n\n".join(paragraphs))
    out = tmp_path / "data" / "shards"
    args = ["--tokenizer", spm_dir, "--workers", "1", "--seq-len", "64"]
    res = run_cli("shards", "--input", text, "--out", out, *args)
    assert res.returncode == 2 and "invalid UTF-8" in res.stderr, res.stderr
    assert not out.exists()

    res = run_cli("shards", "--input", text, "--out", out, *args, "--skip-invalid-utf8")
    assert res.returncode == 0, res.stderr
    assert "skipped 1 document with invalid UTF-8 or NUL bytes (--skip-invalid-utf8)" in res.stderr
    manifest = json.loads((out / sf.MANIFEST_NAME).read_text())
    assert manifest["totals"]["skipped_invalid_text"] == 1
    res = run_cli("inspect", out, "--fast", "--num", "0")
    assert res.returncode == 0 and "\nskipped 1 document with invalid UTF-8" in res.stdout, res.stdout

    for pattern in (tmp_path / "data", f"{tmp_path / 'data'}/*", f"{tmp_path / 'data'}/**/*.json"):
        again = tmp_path / f"again-{len(list(tmp_path.glob('again-*')))}"
        res = run_cli("shards", "--input", pattern, "--out", again, *args, "--skip-invalid-utf8")
        if str(pattern).endswith(".json"):  # only OUT's own files match: refused, nothing read as text
            assert res.returncode == 2 and "the glob matches only the project's own outputs" in res.stderr
            assert not again.exists()
            continue
        assert res.returncode == 0, res.stderr
        assert f"skipping {out} (a shard set written by `data_prep shards`, not text)" in res.stderr
        redone = json.loads((again / sf.MANIFEST_NAME).read_text())
        assert [i["path"] for i in redone["settings"]["inputs"]] == [i["path"] for i in manifest["settings"]["inputs"]]
        assert _file_bytes(again) == _file_bytes(out)
