"""How well the RTD discriminator separates replaced tokens from originals, beyond its accuracy.

Why: about 85% of tokens are originals, so a discriminator that says "original" everywhere has 85% accuracy and
an RTD loss at the base-rate entropy; accuracy alone cannot tell a learning discriminator from a broken one.
Precision, recall and F1 of "replaced" (logit > 0) and the ROC AUC (the probability that a replaced token scores
above an original one; 0.5 = chance) can. Everything is computed on the device from fixed-shape tensors (ranks by
one sort, no boolean indexing), so the training step stays free of host synchronisation.
"""

from __future__ import annotations

import torch


def detection_metrics(logits: torch.Tensor, replaced: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 (threshold: logit 0) and ROC AUC over the tokens where ``mask`` is true.

    ``logits`` (B, L) discriminator scores, ``replaced`` (B, L) 0/1 labels. A batch without both classes has no
    AUC; it reports 0.5 (chance) then. Tied scores are ranked by position (continuous logits rarely tie).
    """
    real = mask.bool().flatten()
    positive = replaced.bool().flatten() & real
    negative = real & ~positive
    predicted = (logits.flatten() > 0) & real
    tp = (predicted & positive).sum().float()
    fp = (predicted & negative).sum().float()
    fn = (~predicted & positive).sum().float()
    precision = tp / (tp + fp).clamp(min=1)
    recall = tp / (tp + fn).clamp(min=1)
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)

    # Mann-Whitney U: AUC = (sum of the positives' ranks among real tokens - n+(n+ + 1)/2) / (n+ n-). Padding sorts
    # below every real token, so a real token's rank among real tokens is its overall rank minus the padding count.
    scores = logits.flatten().float().masked_fill(~real, float("-inf"))
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty_like(order).scatter_(0, order, torch.arange(1, order.numel() + 1, device=order.device))
    n_pos, n_neg = positive.sum().float(), negative.sum().float()
    padding = (~real).sum().float()
    rank_sum = ((ranks.float() - padding) * positive.float()).sum()
    pairs = n_pos * n_neg
    auc = torch.where(pairs > 0, (rank_sum - n_pos * (n_pos + 1) / 2) / pairs.clamp(min=1), torch.full_like(pairs, 0.5))
    return {"discriminator_precision": precision, "discriminator_recall": recall, "discriminator_f1": f1,
            "discriminator_auc": auc}
