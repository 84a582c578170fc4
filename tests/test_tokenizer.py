"""Tokenizer training on the bundled samples: DeBERTa id layout, round trip, HF agreement, extension, bad input.

What "normalised" means below: the corpus applies NFKC (``CorpusOptions()``); SentencePiece's ``nmt_nfkc`` rule then
maps every whitespace character (newlines included) to a space, collapses runs of spaces and strips the ends. On
NFKC text without control characters that is exactly ``" ".join(text.split())`` (``spm_normalized`` below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from data_prep import tokenizer as tk
from data_prep.corpus import CorpusOptions, iter_documents, resolve_inputs
from data_prep.errors import DataPrepError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_prep" / "samples"
VOCAB = {"en": 2000, "zh": 4000, "ko": 1000}


def quiet(_msg: str) -> None:
    pass


def docs(lang: str, options: CorpusOptions = CorpusOptions()) -> list[str]:
    return [d for p in resolve_inputs([str(SAMPLES / lang)]) for d in iter_documents(p, options)]


def spm_normalized(text: str) -> str:
    return " ".join(text.split())


def train(out: Path, lang: str, vocab: int | None = None, **kwargs) -> dict:
    settings = tk.TokenizerSettings(vocab_size=vocab or VOCAB[lang], lang=lang,
                                    max_sentences=kwargs.pop("max_sentences", 100_000))
    inputs = resolve_inputs([str(SAMPLES / lang)])
    return tk.train_tokenizer(inputs, out, settings, kwargs.pop("options", CorpusOptions()), log=quiet, **kwargs)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    """en through the CLI (a subprocess), zh and ko through the library, and en extended with zh."""
    base = tmp_path_factory.mktemp("tokenizers")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "tokenizer", "--input", str(SAMPLES / "en"), "--vocab-size",
         str(VOCAB["en"]), "--out", str(base / "en"), "--log-interval", "0"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for stage in ("sampling at most", "[tokenizer] read 1 documents", "training unigram model", "writing",
                  "[MASK]=2000"):
        assert stage in proc.stderr
    dirs = {"en": base / "en"}
    for lang in ("zh", "ko"):
        train(base / lang, lang)
        dirs[lang] = base / lang
    settings = tk.TokenizerSettings(vocab_size=4000, lang="zh")
    tk.train_tokenizer(resolve_inputs([str(SAMPLES / "zh")]), base / "en+zh", settings, CorpusOptions(),
                       extend=base / "en", log=quiet)
    dirs["en+zh"] = base / "en+zh"
    return dirs


def hf_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


# ------------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("lang", ["en", "zh", "ko"])
def test_deberta_special_token_layout(tok_dirs, lang):
    import sentencepiece as spm

    d = tok_dirs[lang]
    assert sorted(p.name for p in d.iterdir()) == [
        "data_prep_tokenizer.json", "special_tokens_map.json", "spm.model", "tokenizer.json", "tokenizer_config.json"
    ]
    sp = spm.SentencePieceProcessor(model_file=str(d / "spm.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert all(sp.is_control(i) for i in range(3)) and sp.is_unknown(3)
    assert sp.get_piece_size() == VOCAB[lang] and sp.piece_to_id("[MASK]") == sp.unk_id()  # not an spm piece

    hf = hf_tokenizer(d)
    assert type(hf).__name__ == "DebertaV2Tokenizer"
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.mask_token_id == VOCAB[lang] == len(hf) - 1  # [MASK] appended after the spm vocabulary

    config = json.loads((d / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "DebertaV2Tokenizer"
    assert config["do_lower_case"] is False and config["split_by_punct"] is False
    record = json.loads((d / "data_prep_tokenizer.json").read_text())
    assert record["layout"]["specials"] == {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "[MASK]": VOCAB[lang]}
    assert record["layout"]["vocab_size"] == VOCAB[lang] + 1 and record["layout"]["byte_fallback"] is False
    assert record["settings"]["tokenizer"]["character_coverage"] == (1.0 if lang == "en" else 0.9995)
    assert record["settings"]["corpus"] == CorpusOptions().to_dict()
    from data_prep.text_tokenizer import load_tokenizer

    loaded = load_tokenizer(d)  # the loader the shard packer uses agrees on checksum and specials
    assert loaded.checksum == record["checksum"] and loaded.mask_id == VOCAB[lang]


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("lang", ["en", "zh", "ko"])
def test_round_trip_decode_encode(tok_dirs, lang):
    native = tk.SpmTokenizer(tok_dirs[lang])
    texts = docs(lang)
    unknown_chars = total_chars = 0
    for text in texts:
        ids = native.encode(text)
        assert ids[0] == 1 and ids[-1] == 2
        total_chars += len(text)
        if 3 not in ids:
            assert native.decode(ids) == spm_normalized(text)
            continue
        # characters left out by character_coverage: each [UNK] covers a run of characters that have no piece
        for piece in native.sp.encode(text, return_type="proto").pieces:
            if piece.id == 3:
                run = piece.surface.strip()
                assert run and all(native.sp.piece_to_id(ch) == 3 for ch in run), piece.surface
                unknown_chars += len(run)
    if lang == "en":
        assert unknown_chars == 0  # coverage 1.0: every character of the corpus has a piece
    else:
        assert 0 < unknown_chars <= 0.001 * total_chars  # coverage 0.9995 leaves out only very rare characters


# ------------------------------------------------------------------------------------------ HF agreement


def _hf_classes():
    """Every DeBERTa-v2 tokenizer class the installed transformers offers (5.x: one, tokenizers-backed)."""
    import transformers

    names = ["DebertaV2Tokenizer", "DebertaV2TokenizerFast"]
    return [getattr(transformers, n) for n in names if hasattr(transformers, n)]


@pytest.mark.parametrize("name,lang", [("en", "en"), ("zh", "zh"), ("ko", "ko"), ("en+zh", "zh"), ("en+zh", "en")])
def test_hf_tokenizers_equal_native_ids(tok_dirs, name, lang):
    import tokenizers

    d = tok_dirs[name]
    native = tk.SpmTokenizer(d)
    normalized = docs(lang)
    expected = [native.encode(t) for t in normalized]
    hf = hf_tokenizer(d)
    assert [hf(t)["input_ids"] for t in normalized] == expected
    classes = _hf_classes()
    assert classes
    for cls in classes:
        tok = cls.from_pretrained(str(d))
        assert [tok(t)["input_ids"] for t in normalized] == expected, cls
    # tokenizer.json itself (what the shard packer loads) carries spm's own normaliser: equal on raw text too
    backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    raw = docs(lang, CorpusOptions(normalization="none"))
    assert [backend.encode(t).ids for t in raw] == [native.encode(t) for t in raw]
    # transformers 5.x rebuilds DebertaV2Tokenizer's normaliser as NFC: raw text agrees wherever NFKC is a no-op
    for t in raw:
        if unicodedata.normalize("NFKC", t) == t:
            assert hf(t)["input_ids"] == native.encode(t)


def test_lowercase_corpus_gives_a_lowercasing_tokenizer(tmp_path):
    out = tmp_path / "lower"
    train(out, "en", vocab=600, options=CorpusOptions(lowercase=True))
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is True
    native, hf = tk.SpmTokenizer(out), hf_tokenizer(out)
    texts = docs("en")[:20]
    assert [hf(t)["input_ids"] for t in texts] == [native.encode(t) for t in texts]
    assert native.encode("GOD SAID") == native.encode("god said")
    assert all(p == p.lower() for p in (native.sp.id_to_piece(i) for i in range(4, 600)))


def test_hf_loads_a_directory_with_only_spm_model(tok_dirs, tmp_path):
    """The layout of older DeBERTa saves (no tokenizer.json): HF converts spm.model and agrees too."""
    for name in ("spm.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tok_dirs["zh"] / name).read_bytes())
    hf = hf_tokenizer(tmp_path)
    native = tk.SpmTokenizer(tok_dirs["zh"])
    assert hf.mask_token_id == native.mask_id == VOCAB["zh"]
    assert [hf(t)["input_ids"] for t in docs("zh")] == [native.encode(t) for t in docs("zh")]


def test_byte_fallback_is_not_reproduced_by_hf(tmp_path):
    """Why byte fallback is off: transformers' DebertaV2Converter drops it, so HF would disagree with spm."""
    import sentencepiece as spm

    sentences = [s for d in docs("en") for s in tk.split_sentences(d)]
    for byte_fallback in (True, False):
        path = tmp_path / f"bf{int(byte_fallback)}.model"
        with open(path, "wb") as f:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=f, vocab_size=1000, model_type="unigram",
                byte_fallback=byte_fallback, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
                bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]", minloglevel=2,
            )
        sp = spm.SentencePieceProcessor(model_file=str(path))
        if byte_fallback:  # transformers says so itself
            with pytest.warns(UserWarning, match="byte fallback option which is not implemented"):
                fast = tk.build_fast_tokenizer(path, False, sp.get_piece_size())
        else:
            fast = tk.build_fast_tokenizer(path, False, sp.get_piece_size())
        text = "God said 世界"  # the Chinese characters are not in an English vocabulary
        same = sp.encode(text) == fast.encode(text, add_special_tokens=False).ids
        assert same is (not byte_fallback)
        if byte_fallback:
            assert "<0xE4>" in sp.encode(text, out_type=str) and 3 in fast.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------- extension


def test_extension_keeps_old_ids_and_helps_the_new_language(tok_dirs):
    import sentencepiece as spm

    old = spm.SentencePieceProcessor(model_file=str(tok_dirs["en"] / "spm.model"))
    new = spm.SentencePieceProcessor(model_file=str(tok_dirs["en+zh"] / "spm.model"))
    n = old.get_piece_size()
    for i in range(n):
        assert (new.id_to_piece(i), new.get_score(i)) == (old.id_to_piece(i), old.get_score(i))
    assert new.id_to_piece(n) == "[MASK]" and new.is_control(n)  # the old [MASK] id, now inside the model
    record = json.loads((tok_dirs["en+zh"] / "data_prep_tokenizer.json").read_text())
    added = record["added_pieces"]
    assert added > 1000 and new.get_piece_size() == n + 1 + added
    assert record["layout"]["specials"]["[MASK]"] == n and record["layout"]["vocab_size"] == n + 1 + added
    assert record["settings"]["extend"]["dir"] == str(tok_dirs["en"].resolve())

    hf_old, hf_new = hf_tokenizer(tok_dirs["en"]), hf_tokenizer(tok_dirs["en+zh"])
    assert hf_new.mask_token_id == hf_old.mask_token_id == n and len(hf_new) == n + 1 + added
    base, extended = tk.SpmTokenizer(tok_dirs["en"]), tk.SpmTokenizer(tok_dirs["en+zh"])
    zh = docs("zh")
    unk_old = sum(base.encode(t).count(3) for t in zh)
    unk_new = sum(extended.encode(t).count(3) for t in zh)
    assert unk_new * 50 < unk_old
    exact_old = sum(base.decode(base.encode(t)) == spm_normalized(t) for t in zh)
    exact_new = sum(extended.decode(extended.encode(t)) == spm_normalized(t) for t in zh)
    assert exact_old == 0 and exact_new >= 0.95 * len(zh)
    for t in docs("en"):  # English still round-trips; its ids stay in the old id range or the new pieces
        assert extended.decode(extended.encode(t)) == spm_normalized(t)


def test_extending_twice_keeps_the_mask_id(tok_dirs, tmp_path):
    settings = tk.TokenizerSettings(vocab_size=1000, lang="ko")
    record = tk.train_tokenizer(resolve_inputs([str(SAMPLES / "ko")]), tmp_path / "en+zh+ko", settings,
                                CorpusOptions(), extend=tok_dirs["en+zh"], log=quiet)
    before = json.loads((tok_dirs["en+zh"] / "data_prep_tokenizer.json").read_text())["layout"]
    assert record["layout"]["specials"]["[MASK]"] == VOCAB["en"]
    assert record["layout"]["spm_pieces"] == before["spm_pieces"] + record["added_pieces"]
    assert hf_tokenizer(tmp_path / "en+zh+ko").mask_token_id == VOCAB["en"]


# -------------------------------------------------------------------------------------------------- sampling


def test_reservoir_sample_is_bounded_uniform_and_seeded():
    items = [str(i) for i in range(10_000)]
    a, seen = tk.reservoir_sample(iter(items), 100, seed=1)
    assert seen == 10_000 and len(a) == 100 and len(set(a)) == 100 and set(a) <= set(items)
    assert tk.reservoir_sample(iter(items), 100, seed=1)[0] == a != tk.reservoir_sample(iter(items), 100, seed=2)[0]
    assert sum(int(x) < 5000 for x in a) in range(30, 71)  # not a prefix: both halves represented
    assert tk.reservoir_sample(iter(items[:10]), 100, seed=1) == (items[:10], 10)


def test_training_sees_at_most_max_sentences(tmp_path, monkeypatch):
    seen_by_trainer = []
    real = tk.train_spm

    def spy(sentences, *args, **kwargs):
        seen_by_trainer.append(len(sentences))
        return real(sentences, *args, **kwargs)

    monkeypatch.setattr(tk, "train_spm", spy)
    record = train(tmp_path / "small", "en", vocab=500, max_sentences=700)
    assert seen_by_trainer == [700]
    assert record["corpus_stats"]["sentences_sampled"] == 700 < record["corpus_stats"]["sentences_seen"]
    assert record["settings"]["tokenizer"]["max_sentences"] == 700


def test_long_lines_are_cut_not_dropped():
    line = "word " * 3000
    pieces = list(tk.split_sentences(line))
    assert len(pieces) > 1 and all(len(p) <= tk.MAX_SENTENCE_CHARS for p in pieces)
    assert " ".join(pieces) == line.strip()


# ------------------------------------------------------------------------------------ bad input, atomicity


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_cli_missing_input_is_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "tokenizer", "--input", str(tmp_path / "missing.txt"),
         "--vocab-size", "100", "--out", str(tmp_path / "tok")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --input {tmp_path / 'missing.txt'}: no such file or directory"]
    assert not (tmp_path / "tok").exists()


def _bad_input(tmp_path: Path, name: str, content: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"\n\n   \n", r"empty corpus: .*empty\.txt"),
    ("bad.txt", b"fine\n\nnot \xfe fine\n", r"bad\.txt: invalid UTF-8 at byte offset 10"),
    ("rows.jsonl", b'{"body": "x"}\n', r"rows\.jsonl: records have no field 'text' \(fields: body\)"),
])
def test_bad_input_leaves_no_output(tmp_path, name, content, message):
    path = _bad_input(tmp_path, name, content)
    out = tmp_path / "out" / "tok"
    with pytest.raises(DataPrepError, match=message):
        tk.train_tokenizer([path], out, tk.TokenizerSettings(vocab_size=100), CorpusOptions(), log=quiet)
    assert not out.exists() and (not out.parent.exists() or _leftovers(out.parent) == [])


def test_skip_invalid_utf8_counts_and_records(tmp_path):
    text = b"\n\n".join(d.encode() for d in docs("en")) + b"\n\nbroken \xff document\n"
    path = _bad_input(tmp_path, "c.txt", text)
    record = tk.train_tokenizer([path], tmp_path / "tok", tk.TokenizerSettings(vocab_size=500),
                                CorpusOptions(skip_invalid_utf8=True), log=quiet)
    assert record["corpus_stats"]["skipped_invalid_utf8"] == 1
    assert record["settings"]["corpus"]["skip_invalid_utf8"] is True


def test_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(DataPrepError, match=r"--vocab-size 50000: .*Vocabulary size too high.*lower --vocab-size"):
        train(tmp_path / "tok", "ko", vocab=50_000)
    assert not (tmp_path / "tok").exists() and _leftovers(tmp_path) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "tok"
    train(out, "ko")
    stamp = (out / "spm.model").stat().st_mtime_ns
    train(out, "ko")  # same settings: nothing to do
    assert (out / "spm.model").stat().st_mtime_ns == stamp
    with pytest.raises(DataPrepError, match=r"already holds a tokenizer made with different settings.*--overwrite"):
        train(out, "ko", vocab=800)
    checksum = json.loads((out / "data_prep_tokenizer.json").read_text())["checksum"]

    def broken(*args, **kwargs):
        raise DataPrepError("simulated failure while writing tokenizer.json")

    monkeypatch.setattr(tk, "build_fast_tokenizer", broken)
    with pytest.raises(DataPrepError, match="simulated failure"):
        train(out, "ko", vocab=800, overwrite=True)
    assert json.loads((out / "data_prep_tokenizer.json").read_text())["checksum"] == checksum  # old one intact
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    record = train(out, "ko", vocab=800, overwrite=True)
    assert record["layout"]["specials"]["[MASK]"] == 800 and _leftovers(tmp_path) == []

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DataPrepError, match=r"exists and is not empty"):
        train(tmp_path / "other", "ko")
    # --overwrite replaces only a directory this project wrote (its data_prep_tokenizer.json): never `--out .`
    result = subprocess.run([sys.executable, "-m", "data_prep", "tokenizer", "--input", str(tmp_path / "other"),
                             "--vocab-size", "100", "--out", str(tmp_path / "other"), "--overwrite"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--out {tmp_path / 'other'} is not a tokenizer directory written by" in result.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "x"


def test_extend_needs_our_tokenizer_dir(tmp_path):
    (tmp_path / "vocab-only").mkdir()
    (tmp_path / "vocab-only" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(DataPrepError, match=r"--extend .*vocab-only: no spm\.model there"):
        train(tmp_path / "tok", "ko", extend=tmp_path / "vocab-only")
