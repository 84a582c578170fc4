"""The discriminator's detection metrics against their definitions, computed the slow, obvious way."""

from __future__ import annotations

import torch

from pretrain.objectives.detection_metrics import detection_metrics


def brute_force(logits, replaced, mask):
    real = mask.bool()
    scores, labels = logits[real].tolist(), replaced[real].bool().tolist()
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    tp = sum(1 for s, y in zip(scores, labels) if y and s > 0)
    fp = sum(1 for s, y in zip(scores, labels) if not y and s > 0)
    fn = sum(1 for s, y in zip(scores, labels) if y and s <= 0)
    return {"discriminator_precision": tp / max(tp + fp, 1), "discriminator_recall": tp / max(tp + fn, 1),
            "discriminator_f1": 2 * tp / max(2 * tp + fp + fn, 1),
            "discriminator_auc": wins / (len(positives) * len(negatives))}


def test_metrics_match_their_definitions_with_padding():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        replaced = (torch.rand(4, 30, generator=g) < 0.15).long()
        logits = torch.randn(4, 30, generator=g) + 1.5 * replaced * trial / 4  # from chance to well separated
        mask = torch.ones(4, 30, dtype=torch.bool)
        mask[1, 20:] = False
        mask[3, 5:] = False
        replaced[~mask] = 1  # labels under padding must not count
        logits[~mask] = 100.0
        got = detection_metrics(logits, replaced, mask)
        for name, value in brute_force(logits, replaced, mask).items():
            assert abs(got[name].item() - value) < 1e-6, (trial, name, got[name].item(), value)


def test_separation_shows_in_auc_not_in_accuracy():
    """A discriminator that never says "replaced" has the base-rate accuracy but AUC 0.5 when its scores are
    noise, and AUC 1 when they rank every replaced token first."""
    replaced = torch.zeros(2, 20, dtype=torch.long)
    replaced[:, :3] = 1
    mask = torch.ones(2, 20, dtype=torch.bool)
    noise = -1 - torch.rand(2, 20, generator=torch.Generator().manual_seed(1))
    ranked = -2 + replaced.float()  # all negative (never "replaced"), but replaced tokens score higher
    assert detection_metrics(ranked, replaced, mask)["discriminator_auc"].item() == 1.0
    assert detection_metrics(ranked, replaced, mask)["discriminator_recall"].item() == 0.0
    assert 0.2 < detection_metrics(noise, replaced, mask)["discriminator_auc"].item() < 0.8
    assert detection_metrics(noise, torch.zeros_like(replaced), mask)["discriminator_auc"].item() == 0.5
