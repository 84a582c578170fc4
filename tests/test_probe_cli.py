"""`python -m pretrain.probe` end to end on a real (tiny) pretraining run: every checkpoint of the run directory and
the random-init baseline are probed (a damaged checkpoint is skipped and named) on real reviews, each (model, step, task, seed) cell lands in probes.csv once,
a re-run adds only the missing cells, and an exported fine-tuned model gives transformers the same dev accuracy. A
fine-tune released by transformers is probed on its encoder, with a fresh head for the task."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from pretrain.probe import cli, models, results
from pretrain.train import train
from test_train import compose_config, tiny_run

SAMPLES = Path(__file__).resolve().parents[1] / "pretrain" / "probe" / "samples"


def small_task(directory: Path) -> Path:
    """The first 64 training and 40 dev reviews of the bundled English slice, with string labels."""
    directory.mkdir()
    for split, n in (("train", 64), ("dev", 40)):
        lines = (SAMPLES / "en_sentiment" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        rows = [{"text": json.loads(x)["text"], "label": ["neg", "pos"][json.loads(x)["label"]]} for x in lines]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (directory / "task.yaml").write_text("name: en_small\ntype: classification\ntrain: train.jsonl\ndev: dev.jsonl\n",
                                         encoding="utf-8")
    return directory / "task.yaml"


def test_probe_a_run_resume_and_export(shards, tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_config(tiny_run(shards, run, "mlm", 4, "checkpoint_every_n_steps=2")))
    damaged = run / "checkpoints" / "step-6.ckpt"
    damaged.write_bytes(b"PK\x03\x04 cut off while copying")  # a damaged checkpoint is skipped, and named
    task = small_task(tmp_path / "task")
    out, exported = tmp_path / "probes", tmp_path / "exported"
    common = ["--task", str(task), "--out", str(out), "--epochs", "1", "--max-length", "48"]
    assert cli.main([str(run), f"random:{run / 'hf'}", *common, "--seeds", "1", "--export", str(exported)]) == 0
    first = results.read_rows(out)
    cells = {(r["model"], r["step"], r["seed"]) for r in first}
    assert cells == {(str(run), "2", "0"), (str(run), "4", "0"), (f"random:{run / 'hf'}", "0", "0")}
    assert len(first) == 3 * 2  # accuracy and macro F1 on dev, per cell
    assert json.loads((out / "tasks.json").read_text())["en_small"]["labels"] == ["neg", "pos"]
    printed, warnings = capsys.readouterr()
    assert f"warning: skipping {damaged}: " in warnings
    assert "lr=" in printed and "epochs=1.0" in printed and "mean ± std" in printed

    # a re-run with a second seed adds exactly the missing cells and leaves the others as they were
    assert cli.main([str(run), f"random:{run / 'hf'}", *common, "--seeds", "2"]) == 0
    second = results.read_rows(out)
    assert second[:len(first)] == first
    added = {(r["model"], r["step"], r["seed"]) for r in second[len(first):]}
    assert added == {(m, s, "1") for m, s, _ in cells} and len(second) == 2 * len(first)
    table = {(t["model"], t["step"]): t for t in results.summary(second, {"en_small": "accuracy"})}
    assert all(t["seeds"] == 2 for t in table.values()) and len(table) == 3

    # the exported step-4 model: transformers loads it whole and scores the dev set as probes.csv says
    directory = next(exported.glob("*/step-4/en_small/seed-0"))
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    dev = [json.loads(x) for x in (task.parent / "dev.jsonl").read_text().splitlines()]
    with torch.no_grad():
        enc = tokenizer([r["text"] for r in dev], truncation=True, max_length=48, padding=True, return_tensors="pt")
        predicted = model.eval()(**enc).logits.argmax(-1).tolist()
    accuracy = sum(model.config.id2label[p] == r["label"] for p, r in zip(predicted, dev)) / len(dev)
    recorded = [r for r in first if r["step"] == "4" and r["metric"] == "accuracy" and r["model"] == str(run)]
    assert abs(accuracy - float(recorded[0]["value"])) < 1e-6


FINE_TUNES = ("DebertaV2ForSequenceClassification", "DebertaV2ForTokenClassification")
NLI_LABELS = ["contradiction", "neutral", "entailment"]


def released_fine_tune(directory: Path, tokenizer: Path, architecture: str) -> Path:
    """A fine-tune as transformers releases one: a small random DebertaV2For* (three labels of another task, the
    classifier dropout in config.json) saved with save_pretrained, the tokenizer beside it."""
    config = transformers.DebertaV2Config(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm", cls_dropout=0.1,
        id2label=dict(enumerate(NLI_LABELS)), label2id={x: i for i, x in enumerate(NLI_LABELS)})
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)
    return directory


def test_a_released_fine_tune_is_probed_with_a_fresh_head(shards, tmp_path, capsys):
    """A DebertaV2For{Sequence,Token}Classification directory is a MODEL: its encoder is loaded as it was released,
    its head is dropped (one note names the tensors), and the probe trains the task's own head; the probe's own
    --export (num_labels in config.json) is probed again the same way."""
    released = [released_fine_tune(tmp_path / name, shards.parent / "tok", name) for name in FINE_TUNES]
    raw = json.loads((released[0] / "config.json").read_text())
    assert raw["architectures"] == [FINE_TUNES[0]] and raw["cls_dropout"] == 0.1 and len(raw["id2label"]) == 3
    task = small_task(tmp_path / "task")
    out, exported = tmp_path / "probes", tmp_path / "exported"
    common = ["--task", str(task), "--out", str(out), "--seeds", "1", "--epochs", "1", "--max-length", "48"]
    assert cli.main([*map(str, released), *common, "--export", str(exported)]) == 0
    printed = capsys.readouterr().out
    labels = ", ".join(NLI_LABELS)
    assert (f"note: {released[0]} is a {FINE_TUNES[0]} fine-tune (labels {labels}): its task head (classifier.bias, "
            "classifier.weight, pooler.dense.bias, pooler.dense.weight) is dropped; each task trains a fresh head on "
            "its encoder") in printed.splitlines()
    assert (f"note: {released[1]} is a {FINE_TUNES[1]} fine-tune (labels {labels}): its task head (classifier.bias, "
            "classifier.weight) is dropped; each task trains a fresh head on its encoder") in printed.splitlines()
    rows = results.read_rows(out)
    assert sorted((r["model"], r["step"], r["metric"]) for r in rows) == \
        sorted((str(m), "-1", metric) for m in released for metric in ("accuracy", "macro_f1"))

    for name, directory in zip(FINE_TUNES, released):  # the encoder, weight for weight as transformers loads it
        theirs = getattr(transformers, name).from_pretrained(directory).deberta.state_dict()
        ours = models.encoder_factory(models.resolve(str(directory))[0], directory)(0).state_dict()
        assert ours.keys() <= theirs.keys() and len(ours) > 10
        assert all(torch.equal(value, theirs[key]) for key, value in ours.items())
    # the fine-tuned model is the probe task's: a sequence classifier over its two labels, whatever was released
    [again] = exported.glob(f"*{released[1].name}/step--1/en_small/seed-0")
    config = json.loads((again / "config.json").read_text())
    assert config["architectures"] == [FINE_TUNES[0]] and config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["num_labels"] == 2
    assert cli.main([str(again), *common]) == 0
    assert f"note: {again} is a {FINE_TUNES[0]} fine-tune (labels neg, pos): " in capsys.readouterr().out
    assert {r["model"] for r in results.read_rows(out)} == {*map(str, released), str(again)}
