"""Corpus reading: inputs, document splitting, normalisation and one clear error per bad input."""

from __future__ import annotations

import argparse
import gzip
import json
import unicodedata
from pathlib import Path

import pytest

from data_prep.corpus import (
    CorpusOptions,
    CorpusStats,
    add_corpus_arguments,
    corpus_options_from_args,
    iter_corpus,
    iter_documents,
    normalize_text,
    resolve_inputs,
)
from data_prep.errors import DataPrepError

SAMPLES = Path(__file__).resolve().parents[1] / "data_prep" / "samples"


@pytest.mark.parametrize("lang", ["en", "zh", "ko"])
def test_bundled_samples_are_multi_document_utf8(lang):
    files = resolve_inputs([str(SAMPLES / lang)])
    assert files and all(f.suffix == ".txt" for f in files)
    stats = CorpusStats()
    docs = [d for f in files for d in iter_documents(f, CorpusOptions(), stats)]
    raw = "".join(f.read_text(encoding="utf-8") for f in files)
    assert len(docs) == raw.count("\n\n") + len(files)  # one blank line between documents, none at the end
    assert stats.documents == len(docs) and stats.skipped_invalid == 0
    assert stats.bytes == sum(len(d.encode()) for d in docs)
    assert all(d == d.strip() and "\n\n" not in d for d in docs)
    assert sum(f.stat().st_size for f in files) <= 400_000
    assert (SAMPLES / "README.md").read_text(encoding="utf-8").count(f"`{lang}/") == len(files)


def test_blank_line_and_line_documents(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"\xef\xbb\xbfone a\r\none b\r\n\r\n  \n\ntwo\n\n\nthree  \n")
    assert list(iter_documents(p, CorpusOptions())) == ["one a\none b", "two", "three"]
    assert list(iter_documents(p, CorpusOptions(doc_per_line=True))) == ["one a", "one b", "two", "three"]


def test_normalisation_is_explicit():
    text = "  Ｆｕｌｌ－ｗｉｄｔｈ，ﬁ ①  "
    assert normalize_text(text, CorpusOptions()) == unicodedata.normalize("NFKC", text).strip() == "Full-width,fi 1"
    assert normalize_text(text, CorpusOptions(normalization="none")) == text.strip()
    assert normalize_text("ÀB", CorpusOptions(lowercase=True)) == "àb"
    with pytest.raises(DataPrepError, match="normalization 'nfc'"):
        CorpusOptions(normalization="nfc")


def test_cli_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_corpus_arguments(parser)
    args = parser.parse_args(["--input", "a", "b", "--text-field", "body", "--doc-per-line", "--normalize", "none",
                              "--lowercase", "--skip-invalid-utf8"])
    options = corpus_options_from_args(args)
    assert args.input == ["a", "b"]
    assert options.to_dict() == {"text_field": "body", "doc_per_line": True, "normalization": "none",
                                 "lowercase": True, "skip_invalid_utf8": True, "skip_missing_text": False}
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --input is required


def test_resolve_inputs_globs_dirs_sorted_deduplicated(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt", ".hidden.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    got = resolve_inputs([str(tmp_path / "*.txt"), str(tmp_path), str(tmp_path / "a.txt")])
    assert got == sorted(got, key=str)
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["a.txt", "b.txt", "sub/c.txt"]


def test_missing_inputs_name_the_path(tmp_path):
    with pytest.raises(DataPrepError, match=r"nope\.txt: no such file"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataPrepError, match=r"the glob matches no file"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPrepError, match="contains no files"):
        resolve_inputs([str(tmp_path / "empty")])


def test_invalid_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good doc\n\nbad \xff doc\nsame doc\n\nlast\n")
    with pytest.raises(DataPrepError) as err:
        list(iter_documents(p, CorpusOptions()))
    message = str(err.value)
    assert str(p) in message and "byte offset 14" in message and "--skip-invalid-utf8" in message
    assert p.read_bytes()[14] == 0xFF

    stats = CorpusStats()
    assert list(iter_documents(p, CorpusOptions(skip_invalid_utf8=True), stats)) == ["good doc", "last"]
    assert stats.skipped_invalid == 1 and stats.documents == 2
    stats = CorpusStats()
    docs = list(iter_documents(p, CorpusOptions(skip_invalid_utf8=True, doc_per_line=True), stats))
    assert docs == ["good doc", "same doc", "last"] and stats.skipped_invalid == 1


def test_gzip_text_and_its_offsets(tmp_path):
    p = tmp_path / "c.txt.gz"
    good = "첫 문서\n\n두 번째\n".encode()
    with gzip.open(p, "wb") as f:
        f.write(good + b"\xc3(")
    with pytest.raises(DataPrepError, match=rf"byte offset {len(good)} of the decompressed text"):
        list(iter_documents(p, CorpusOptions()))
    assert list(iter_documents(p, CorpusOptions(skip_invalid_utf8=True)))[:1] == ["첫 문서"]


def test_jsonl_json_parquet_and_saved_datasets(tmp_path):
    import datasets

    rows = [{"text": "Ｆirst", "id": 1}, {"text": None, "id": 2}, {"text": " second ", "id": 3}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": ds, "validation": datasets.Dataset.from_list([{"text": "val", "id": 4}])}
    ).save_to_disk(str(tmp_path / "dict"))
    expected = ["First", "second"]
    skip = CorpusOptions(skip_missing_text=True)  # a null text is a record without text: skipped only when asked
    for name in ["a.jsonl", "b.json", "c.parquet", "saved"]:
        with pytest.raises(DataPrepError, match=r"1 of 3 records have no 'text' field or a null one"):
            list(iter_documents(tmp_path / name, CorpusOptions()))
        assert list(iter_documents(tmp_path / name, skip)) == expected, name
    assert list(iter_documents(tmp_path / "dict", skip)) == expected + ["val"]
    # a directory of inputs keeps saved datasets whole instead of reading their .arrow files one by one
    assert [p.name for p in resolve_inputs([str(tmp_path)])] == ["a.jsonl", "b.json", "c.parquet", "dict", "saved"]


def test_missing_text_field_lists_the_fields(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"body": "x", "title": "y"}\n')
    with pytest.raises(DataPrepError) as err:
        list(iter_documents(p, CorpusOptions()))
    assert str(p) in str(err.value) and "'text'" in str(err.value) and "body, title" in str(err.value)
    assert list(iter_documents(p, CorpusOptions(text_field="body"))) == ["x"]
    import datasets

    datasets.Dataset.from_list([{"body": "x"}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataPrepError, match=r"no column 'text' \(columns: body\)"):
        list(iter_documents(tmp_path / "saved", CorpusOptions()))


def test_non_text_field_and_unreadable_json(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"text": 5}\n')
    with pytest.raises(DataPrepError, match=r"record 0 field 'text' is a int"):
        list(iter_documents(p, CorpusOptions()))
    q = tmp_path / "broken.jsonl"
    q.write_text('{"text": "a"\n')
    with pytest.raises(DataPrepError, match=r"broken\.jsonl: cannot be read as json"):
        list(iter_documents(q, CorpusOptions()))


def test_empty_corpus_is_one_error_at_the_caller(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n  \n")
    b.write_text("")
    assert list(iter_documents(a, CorpusOptions())) == []  # one empty input is fine ...
    with pytest.raises(DataPrepError, match=r"empty corpus: .*a\.txt, .*b\.txt contain no non-empty documents"):
        list(iter_corpus([a, b], CorpusOptions()))  # ... a corpus without any document is not
