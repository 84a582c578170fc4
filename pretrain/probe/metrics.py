"""Probe metrics: accuracy and macro F1 (classification), Pearson/Spearman (regression), entity-level F1 over BIO
tags (token classification, scored like CoNLL's conlleval / seqeval's default mode).

Plain Python/torch: the numbers are small, and one definition here keeps every run's scores comparable.
"""

from __future__ import annotations

import torch

METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "regression": ("pearson", "spearman"),
    "token_classification": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "pearson", "token_classification": "entity_f1"}


def classification_metrics(predictions: list[int], gold: list[int], num_labels: int) -> dict[str, float]:
    correct = sum(p == g for p, g in zip(predictions, gold))
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(predictions, gold))
        fp = sum(p == c and g != c for p, g in zip(predictions, gold))
        fn = sum(p != c and g == c for p, g in zip(predictions, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": correct / max(len(gold), 1), "macro_f1": sum(f1s) / num_labels}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


def regression_metrics(predictions: list[float], gold: list[float]) -> dict[str, float]:
    p, g = torch.tensor(predictions, dtype=torch.float64), torch.tensor(gold, dtype=torch.float64)
    return {"pearson": _pearson(p, g), "spearman": _pearson(_ranks(p), _ranks(g))}


def entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) spans of a BIO sequence. An ``I-X`` that does not continue an ``X`` span opens one (the
    conlleval convention), so a model that never predicts ``B-`` is not scored as finding nothing."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and kind == label
        if start is not None and not continues:
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, label
    return spans


def token_classification_metrics(predictions: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    found = correct = expected = tokens = right = 0
    for pred, ref in zip(predictions, gold):
        p, g = entities(pred), entities(ref)
        found, expected, correct = found + len(p), expected + len(g), correct + len(p & g)
        tokens, right = tokens + len(ref), right + sum(a == b for a, b in zip(pred, ref))
    precision = correct / found if found else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "token_accuracy": right / max(tokens, 1)}
