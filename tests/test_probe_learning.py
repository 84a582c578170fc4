"""Learning, with a control, on the bundled real data: a quickstart-size model (conf/model/tiny.yaml, random
initial weights, a tokenizer trained on the bundled text) fine-tuned by the probe learns Chinese and Korean
sentiment well above chance, learns nothing from the same reviews with shuffled labels, and tags real text
(Korean word boundaries: the reviews' own spacing, one B/I tag per character) far above the majority tag.

Random initial weights keep the test cheap (no pretraining); what pretraining adds is measured by the probe
command itself, not here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.model import DebertaConfig, DebertaModel
from pretrain.probe import batching
from pretrain.probe.finetune import default_settings, finetune
from pretrain.probe.metrics import token_classification_metrics
from pretrain.probe.tasks import load_task, task_file

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "pretrain" / "probe" / "samples"


def texts(task: str, split: str = "train") -> list[str]:
    with open(SAMPLES / task / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tiny model's matrices gain nothing from two, and two threads spin-waiting against
    other work on a loaded 2-core machine made one of these tests 60x slower (400 s instead of 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from shard_helpers import sample_documents, train_spm_tokenizer

    docs = sample_documents("zh") + sample_documents("ko") + texts("zh_sentiment") + texts("ko_sentiment")
    return batching.load_tokenizer(train_spm_tokenizer(tmp_path_factory.mktemp("tok"), docs, vocab_size=5000))


def quickstart_encoder(tokenizer):
    fields = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    config = DebertaConfig(**{**fields, "vocab_size": len(tokenizer)})

    def fresh(seed: int) -> DebertaModel:
        torch.manual_seed(seed)
        return DebertaModel(config)
    return fresh, config


def run(task, tokenizer, max_length=64, seed=0):
    factory, config = quickstart_encoder(tokenizer)
    settings = default_settings(len(task.rows["train"]), config.hidden_size, max_length=max_length)
    encoded = {split: batching.encode_split(task, split, tokenizer, max_length) for split in task.rows}
    return finetune(factory, task, encoded, tokenizer.pad_token_id, settings, seed)[1]["dev"]


@pytest.mark.parametrize("language", ["zh", "ko"])
def test_sentiment_is_learned_and_shuffled_labels_are_not(language, tokenizer):
    task = load_task(task_file(f"{language}_sentiment"))
    assert task.labels == ["0", "1"] and sum(r["label"] for r in task.rows["dev"]) == 100  # balanced: chance 0.5
    learned = run(task, tokenizer)["accuracy"]
    gold = [r["label"] for r in task.rows["train"]]
    shuffled = gold[:]
    random.Random(0).shuffle(shuffled)
    for row, label in zip(task.rows["train"], shuffled):
        row["label"] = label
    control = run(task, tokenizer)["accuracy"]
    assert learned >= 0.62, (learned, control)
    assert abs(control - 0.5) <= 0.05, (learned, control)


def spacing_task(tmp_path: Path) -> Path:
    """Korean word boundaries as BIO tags: the characters of each review without spaces; a character that starts a
    word (in the writer's own spacing) is B-W, the others I-W."""
    for split in ("train", "dev"):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text in texts("ko_sentiment", split):
                tokens, tags = [], []
                for word in text.split():
                    tokens += list(word)
                    tags += ["B-W"] + ["I-W"] * (len(word) - 1)
                f.write(json.dumps({"tokens": tokens, "tags": tags}, ensure_ascii=False) + "\n")
    (tmp_path / "task.yaml").write_text("name: ko_spacing\ntype: token_classification\ntrain: train.jsonl\n"
                                        "dev: dev.jsonl\n", encoding="utf-8")
    return tmp_path / "task.yaml"


def test_token_classification_beats_the_majority_tag(tokenizer, tmp_path):
    task = load_task(spacing_task(tmp_path))
    assert task.labels == ["B-W", "I-W"]
    gold = [[task.labels[t] for t in r["tags"]] for r in task.rows["dev"]]
    counts = [sum(tag == name for g in gold for tag in g) for name in task.labels]
    majority = task.labels[counts.index(max(counts))]
    baseline = token_classification_metrics([[majority] * len(g) for g in gold], gold)["entity_f1"]
    scores = run(task, tokenizer, max_length=96)
    assert scores["entity_f1"] >= baseline + 0.1, (scores, baseline)
