"""Probe task files and batching on the bundled real sentiment slices: the tasks of the probe/ config group resolve
by name from any working directory, every supported format reads to the same rows, string labels map to ids with
the list kept, long texts are truncated and counted, length grouping pads less than random batches while keeping a
fixed random order per seed, and the metrics score known cases."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from pretrain.probe import batching
from pretrain.probe.metrics import entities, regression_metrics, token_classification_metrics
from pretrain.probe.tasks import GROUP, TaskError, group_tasks, load_task, task_file

SAMPLES = Path(__file__).resolve().parents[1] / "pretrain" / "probe" / "samples"
LABEL_NAMES = {0: "negative", 1: "positive"}


def rows(task: str, split: str, limit: int = 60) -> list[dict]:
    with open(SAMPLES / task / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:limit]


def write_task(directory: Path, fmt: str) -> Path:
    """The first rows of the Korean slice with string labels, in format ``fmt``."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        data = [{"review": r["text"], "sentiment": LABEL_NAMES[r["label"]]} for r in rows("ko_sentiment", split)]
        if fmt == "jsonl":
            (directory / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data),
                                                      encoding="utf-8")
        elif fmt in ("csv", "tsv"):
            with open(directory / f"{split}.{fmt}", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=["review", "sentiment"], delimiter="," if fmt == "csv" else "\t")
                writer.writeheader()
                writer.writerows(data)
        else:
            import datasets

            datasets.Dataset.from_list(data).save_to_disk(str(directory / split))
    suffix = "" if fmt == "disk" else f".{fmt}"
    task = directory / "task.yaml"
    task.write_text(f"name: ko\ntype: classification\ntrain: train{suffix}\ndev: dev{suffix}\ntext: review\n"
                    "label: sentiment\n", encoding="utf-8")
    return task


def test_every_format_reads_the_same_rows_with_string_labels_mapped(tmp_path):
    loaded = {fmt: load_task(write_task(tmp_path / fmt, fmt)) for fmt in ("jsonl", "csv", "tsv", "disk")}
    reference = loaded["jsonl"]
    assert reference.labels == ["negative", "positive"]
    expected = [{"text": r["text"], "label": r["label"]} for r in rows("ko_sentiment", "dev")]
    assert reference.rows["dev"] == expected
    for fmt, task in loaded.items():
        assert task.labels == reference.labels and task.rows == reference.rows, fmt


def test_probe_group_tasks_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    """`--task NAME` reads conf/probe/NAME.yaml. The bundled slices are read from the package (pkg://), whatever the
    working directory; the examples for the user's own data read it through ${oc.env:PROBE_DATA}; a path still
    names a task file. An unknown name or an unset variable is one TaskError naming the file; a run refuses the
    group as a training setting."""
    monkeypatch.chdir(tmp_path)
    assert {"en_sentiment", "zh_sentiment", "ko_sentiment", "en_sentiment_score", "my_reviews",
            "zh_ner"} == set(group_tasks())
    for name in ("en_sentiment", "zh_sentiment", "ko_sentiment"):
        task = load_task(task_file(name))
        assert task.spec.source == GROUP / f"{name}.yaml" and task.name == name and task.labels == ["0", "1"]
        assert task.spec.files == {split: SAMPLES / name / f"{split}.jsonl" for split in ("train", "dev")}
        assert task.rows["dev"] == [{"text": r["text"], "label": r["label"]} for r in rows(name, "dev", 200)]
    score = load_task(task_file("en_sentiment_score"))
    assert score.spec.type == "regression" and [r["label"] for r in score.rows["train"][:60]] == \
        [r["score"] for r in rows("en_sentiment", "train")]

    data = tmp_path / "data"  # the user's own data, in the layout the group's examples name
    own = write_task(data / "my_reviews", "csv")
    assert load_task(task_file(str(own))).name == "ko"  # a path is a path
    import jieba

    (data / "zh_ner").mkdir()
    for split in ("train", "dev"):
        with open(data / "zh_ner" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows("zh_sentiment", split, 20):  # word starts (jieba's) as BIO tags of the characters
                words = jieba.lcut(r["text"])
                tags = [tag for w in words for tag in ["B-W"] + ["I-W"] * (len(w) - 1)]
                f.write(json.dumps({"tokens": list("".join(words)), "tags": tags}, ensure_ascii=False) + "\n")
    monkeypatch.setenv("PROBE_DATA", str(data))
    mine = load_task(task_file("my_reviews"))
    assert mine.labels == ["negative", "positive"] and mine.rows == load_task(own).rows
    ner = load_task(task_file("zh_ner"))
    assert ner.spec.type == "token_classification" and ner.spec.metric == "entity_f1" and ner.labels == ["B-W", "I-W"]
    assert ner.spec.files["dev"] == data / "zh_ner" / "dev.jsonl" and len(ner.rows["dev"]) == 20

    monkeypatch.delenv("PROBE_DATA")
    with pytest.raises(TaskError, match=r"zh_ner\.yaml: 'train' = .*: Environment variable 'PROBE_DATA' not found"):
        load_task(task_file("zh_ner"))
    with pytest.raises(TaskError, match=r"en_sentimnt: no such task file, .*did you mean en_sentiment\?"):
        task_file("en_sentimnt")
    from pretrain.overrides import OverrideError, check_overrides

    with pytest.raises(OverrideError, match=r"\+probe=zh_ner: conf/probe/ holds the downstream tasks of"):
        check_overrides(["+experiment=quickstart", "+probe=zh_ner"])


def test_truncation_is_counted_and_length_grouping_pads_less(tmp_path, caplog):
    tokenizer_dir = tmp_path / "tok"
    from shard_helpers import train_spm_tokenizer

    texts = [r["text"] for r in rows("zh_sentiment", "train", 400)]
    train_spm_tokenizer(tokenizer_dir, texts, vocab_size=2500)
    tokenizer = batching.load_tokenizer(tokenizer_dir)
    task = load_task(task_file("zh_sentiment"))
    full = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    with caplog.at_level(logging.WARNING, logger="pretrain.probe"):
        encoded = batching.encode_split(task, "train", tokenizer, max_length=64)
    too_long = sum(n > 64 for n in full)
    assert 0 < too_long == encoded.truncated
    assert f"{too_long} of 400 rows are longer than max length 64" in caplog.text and "train.jsonl" in caplog.text
    assert max(encoded.lengths()) == 64

    lengths = encoded.lengths()
    grouped = batching.length_grouped_batches(lengths, 16, seed=3, mega=8)
    assert sorted(i for b in grouped for i in b) == list(range(400))  # every row once
    assert grouped == batching.length_grouped_batches(lengths, 16, seed=3, mega=8)  # fixed per seed
    assert grouped != batching.length_grouped_batches(lengths, 16, seed=4, mega=8)
    unsorted = [list(range(i, min(i + 16, 400))) for i in range(0, 400, 16)]
    assert batching.padding_fraction(lengths, grouped) < 0.5 * batching.padding_fraction(lengths, unsorted)


def test_entity_f1_and_rank_correlation_on_known_cases():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "I-ORG", "O"]]  # one of 3 found exactly, 1 partial
    scores = token_classification_metrics(pred, gold)
    assert scores["entity_precision"] == 0.5 and scores["entity_recall"] == pytest.approx(1 / 3)
    assert scores["entity_f1"] == pytest.approx(0.4)
    assert entities(["I-LOC", "I-LOC", "O"]) == {(0, 2, "LOC")}  # conlleval: a stray I- opens an entity
    assert entities(["B-PER", "B-PER"]) == {(0, 1, "PER"), (1, 2, "PER")}
    ties = regression_metrics([1.0, 2.0, 2.0, 3.0], [10.0, 20.0, 20.0, 35.0])
    assert ties["spearman"] == pytest.approx(1.0) and ties["pearson"] < 1.0
