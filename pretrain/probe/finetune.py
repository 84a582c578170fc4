"""One probe cell: fine-tune a task head on a pretrained encoder with one seed, then score dev (and test).

A plain PyTorch loop rather than a Lightning Trainer: a cell is seconds to minutes of single-device work, and a
probe runs hundreds of them; what matters is that the seed fixes everything (head initialisation, dropout, data
order) and that the hyperparameters are the recipe's.

Defaults follow the original DeBERTa GLUE recipes (AdamW, linear warmup over ~6% of steps then linear decay,
weight decay 0.01, batch 32, max length 128, 2-3 epochs on large tasks and 6 on small ones), scaled to the task
size, and the learning rate scaled by model width as ``3e-5 * (768 / H) ** 1.5`` (at most 1e-3): 3e-5 for base,
1.9e-5 for large, 8.5e-5 for xsmall (the recipes use 3e-5, 1e-5 to 2e-5 and ~1e-4), 1e-3 for the 64-wide
quickstart model. :func:`default_settings` is the whole rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from pretrain.model import DebertaModel
from pretrain.model.task_heads import HeadConfig, task_model
from pretrain.probe import batching
from pretrain.probe.metrics import classification_metrics, regression_metrics, token_classification_metrics
from pretrain.probe.tasks import Task


@dataclass
class FinetuneSettings:
    lr: float
    epochs: float
    batch_size: int
    max_length: int
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    eval_batch_size: int = 64
    grad_clip: float = 1.0

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def default_settings(train_rows: int, hidden_size: int, **overrides: Any) -> FinetuneSettings:
    """The recipe for a task of ``train_rows`` examples and a model of width ``hidden_size``."""
    lr = min(1e-3, 3e-5 * (768 / hidden_size) ** 1.5)
    epochs = 6 if train_rows <= 10_000 else 3 if train_rows <= 100_000 else 2
    batch_size = 16 if train_rows <= 2_000 else 32
    settings = FinetuneSettings(lr=lr, epochs=epochs, batch_size=batch_size, max_length=128)
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def head_config(task: Task) -> HeadConfig:
    return HeadConfig(task.spec.type, list(task.labels))


def _optimizer(model: torch.nn.Module, settings: FinetuneSettings) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def finetune(encoder_factory: Callable[[int], DebertaModel], task: Task, encoded: dict[str, batching.Encoded],
             pad_id: int, settings: FinetuneSettings, seed: int, device: str = "cpu",
             log: Callable[[str], None] | None = None) -> tuple[torch.nn.Module, dict[str, dict[str, float]]]:
    """Fine-tune with ``seed`` and return (the model, ``scores[split][metric]`` for every split but train).

    ``encoder_factory(seed)`` builds a fresh encoder (the pretrained weights, or a random init from ``seed``) each
    call, so cells never share state. ``encoded``: the task's splits tokenized by :func:`batching.encode_split`.
    """
    torch.manual_seed(seed)
    encoder = encoder_factory(seed)
    model = task_model(encoder.config, head_config(task), encoder).to(device)
    train = encoded["train"]
    lengths = train.lengths()
    steps_per_epoch = math.ceil(len(lengths) / settings.batch_size)
    total = max(1, round(steps_per_epoch * settings.epochs))
    optimizer = _optimizer(model, settings)
    scheduler = _schedule(optimizer, total, round(total * settings.warmup_fraction))
    model.train()
    step, epoch = 0, 0
    while step < total:
        batches = batching.length_grouped_batches(lengths, settings.batch_size, seed=seed * 1_000 + epoch)
        for _, batch in batching.iterate(train, batches, pad_id, task.spec.type):
            if step >= total:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
        epoch += 1
        if log:
            log(f"epoch {epoch}: loss {loss.item():.4f}")
    scores = {split: evaluate(model, task, split, enc, pad_id, settings.eval_batch_size, device)
              for split, enc in encoded.items() if split != "train"}
    return model, scores


@torch.no_grad()
def predict(model: torch.nn.Module, encoded: batching.Encoded, pad_id: int, task_type: str, batch_size: int,
            device: str = "cpu") -> list[Any]:
    """Per row: a class id, a float (regression), or a tag id per word (words past the truncation get -1)."""
    was_training = model.training
    model.eval()
    out: list[Any] = [None] * len(encoded.rows)
    for index, batch in batching.iterate(encoded, batching.sorted_batches(encoded.lengths(), batch_size), pad_id,
                                         task_type):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**batch).logits.float().cpu()
        for row, i in enumerate(index):
            if task_type == "regression":
                out[i] = logits[row].item()
            elif task_type == "classification":
                out[i] = int(logits[row].argmax())
            else:
                words = [-1] * encoded.rows[i]["num_words"]
                for position, w in enumerate(encoded.rows[i]["word_index"]):
                    if w >= 0:
                        words[w] = int(logits[row, position].argmax())
                out[i] = words
    model.train(was_training)
    return out


def evaluate(model: torch.nn.Module, task: Task, split: str, encoded: batching.Encoded, pad_id: int,
             batch_size: int, device: str = "cpu") -> dict[str, float]:
    predictions = predict(model, encoded, pad_id, task.spec.type, batch_size, device)
    rows = task.rows[split]
    if task.spec.type == "classification":
        return classification_metrics(predictions, [r["label"] for r in rows], len(task.labels))
    if task.spec.type == "regression":
        return regression_metrics(predictions, [r["label"] for r in rows])
    names = task.labels
    outside = names.index("O") if "O" in names else 0  # a word the model never saw (truncated) counts as "O"
    predicted = [[names[t if t >= 0 else outside] for t in p] for p in predictions]
    return token_classification_metrics(predicted, [[names[t] for t in r["tags"]] for r in rows])
