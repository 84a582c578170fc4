"""Validation split: `data_prep shards --val-fraction` holds documents out, training evaluates on them
(`data.val_path`), MLM logs the token-mean `val/loss` and `val/perplexity`; bad fractions and a validation set of
another tokenizer are refused with one clear error."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep import shard_format as sf
from data_prep.corpus import CorpusOptions, iter_documents
from data_prep.reader import ShardedDataset
from data_prep.split import is_held_out
from pretrain.settings import SettingsError
from pretrain.train import train
from shard_helpers import sample_documents, train_spm_tokenizer, write_jsonl
from test_train import REPO, compose_config, tiny_run


def documents(path) -> list[tuple[int, ...]]:
    data = ShardedDataset(path)
    ids = np.concatenate([data.raw(i)[0][None] for i in range(len(data))])
    flags = np.concatenate([data.raw(i)[1][None] for i in range(len(data))])
    return [tuple(d.tolist()) for d in sf.decode_documents(ids, flags)]


def test_val_fraction_holds_out_whole_documents_and_records_the_split(shards, split_shards):
    train_dir, val_dir = split_shards
    texts = list(iter_documents(shards.parent / "corpus.jsonl", CorpusOptions()))
    held_out = sum(is_held_out(t, 0.1) for t in texts)
    train_docs, val_docs, all_docs = documents(train_dir), documents(val_dir), documents(shards)
    assert 0 < len(val_docs) == held_out < len(all_docs) // 4
    assert len(train_docs) + len(val_docs) == len(all_docs)
    assert sorted(train_docs + val_docs) == sorted(all_docs)  # every document once, on exactly one side
    assert not set(train_docs) & set(val_docs)
    for directory, part in ((train_dir, "train"), (val_dir, "val")):
        manifest = sf.load_manifest(directory)
        assert manifest["settings"]["split"]["part"] == part and manifest["settings"]["split"]["val_fraction"] == 0.1
        assert manifest["totals"]["documents"] == (len(train_docs) if part == "train" else held_out)
    assert "split" not in sf.load_manifest(shards)["settings"]  # without the option, manifests are as before


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1"])
def test_val_fraction_out_of_range_is_one_clear_error(fraction, tmp_path):
    result = subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", "data_prep/samples/en",
                             "--tokenizer", str(tmp_path / "unused"), "--out", str(tmp_path / "out"),
                             "--val-fraction", fraction], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --val-fraction {float(fraction)}: must be between 0 and 1 (exclusive), e.g. 0.05 holds out about 5% "
        "of the documents"]
    assert not (tmp_path / "out").exists()


def test_validation_set_of_another_tokenizer_is_refused(split_shards, tmp_path):
    docs = sample_documents("en", limit=12)
    other = train_spm_tokenizer(tmp_path / "other_tok", docs, vocab_size=300)
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(write_jsonl(tmp_path / "c.jsonl", docs)),
                    "--tokenizer", str(other), "--out", str(tmp_path / "other"), "--seq-len", "64", "--workers", "1"],
                   check=True, capture_output=True, cwd=REPO)
    train_dir, _ = split_shards
    config = compose_config(tiny_run(train_dir, tmp_path / "run", "mlm", 2, f"data.val_path={tmp_path / 'other'}"))
    with pytest.raises(SettingsError, match=r"data.val_path=.*other was made with another tokenizer .* than "
                                            r"the training corpus .*shards .*make both with the same --tokenizer"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mlm_validation_logs_token_mean_loss_and_perplexity(split_shards, tmp_path):
    """`val/loss` is the cross-entropy averaged over every predicted token of the evaluation and `val/perplexity`
    its exponential, checked against a recomputation from the trained model on the same batches and masks."""
    train_dir, val_dir = split_shards
    run = tmp_path / "mlm"
    metrics, objects = train(compose_config(tiny_run(
        train_dir, run, "mlm", 20, "optim.lr=3e-3", f"data.val_path={val_dir}", "trainer.val_check_interval=10",
        "trainer.limit_val_batches=4", "export_hf=false")))
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/perplexity")]
    assert len(rows) == 2  # evaluations after steps 10 and 20
    for r in rows:
        assert math.isclose(float(r["val/perplexity"]), math.exp(float(r["val/loss"])), rel_tol=1e-5)
    assert float(rows[1]["val/loss"]) < float(rows[0]["val/loss"])  # the held-out loss falls while training

    module, data = objects["module"], objects["datamodule"]
    module.eval()
    loss_sum, tokens, batch_means = 0.0, 0, []
    with torch.no_grad():
        for index, batch in zip(range(4), data.val_dataloader()):
            g = torch.Generator().manual_seed(module.seed + index)
            out = module.objective(batch, g)
            n = int(out["masked_tokens"] - out["dropped_predictions"])
            loss_sum, tokens = loss_sum + float(out["loss"]) * n, tokens + n
            batch_means.append(float(out["loss"]))
    token_mean = loss_sum / tokens
    assert math.isclose(float(rows[1]["val/loss"]), token_mean, rel_tol=1e-5)
    assert math.isclose(metrics["val/perplexity"], math.exp(token_mean), rel_tol=1e-5)
    # what it must not be: the mean of per-batch perplexities (larger, by Jensen's inequality)
    assert sum(math.exp(m) for m in batch_means) / len(batch_means) > metrics["val/perplexity"]
