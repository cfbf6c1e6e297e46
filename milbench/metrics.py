"""Test-split metrics computed by the harness, the same way for every method.

Bag-level: accuracy at 0.5, ROC AUC (Mann-Whitney, ties averaged), binary
cross-entropy. Localisation: Dice of the key class, pooled over all test bags
(sum of intersections over sum of sizes), from the methods' instance or pixel
scores thresholded at 0.5 against the bags' key masks. Dense multi-class Dice
when a method returns class maps and the data has pixel masks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def bag_auc(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    """ROC AUC; ``None`` when the labels hold a single class (undefined)."""
    pos = [p for p, y in zip(probs, labels) if y == 1]
    neg = [p for p, y in zip(probs, labels) if y != 1]
    if not pos or not neg:
        return None
    ranked = sorted((p, i) for i, p in enumerate(probs))
    ranks = [0.0] * len(probs)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def bag_accuracy(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    if not labels:
        return None
    return sum((p >= 0.5) == (y == 1) for p, y in zip(probs, labels)) / len(labels)


def bag_bce(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    """Mean binary cross-entropy of bag probabilities (clipped at 1e-7)."""
    if not labels:
        return None
    eps = 1e-7
    total = 0.0
    for p, y in zip(probs, labels):
        p = min(max(float(p), eps), 1 - eps)
        total -= math.log(p) if y == 1 else math.log(1 - p)
    return total / len(labels)


def key_dice(predictions: Sequence[Any], bags: Sequence[Any]) -> float | None:
    """Pooled Dice of the key class over all bags, or ``None`` when no
    prediction carries instance or pixel scores (or nothing is key anywhere)."""
    inter = pred_sum = true_sum = 0.0
    seen = False
    for pred, bag in zip(predictions, bags):
        if pred.pixel_scores is not None:
            pmap = pred.pixel_scores.float().cpu() >= 0.5
        elif pred.instance_scores is not None:
            pmap = bag.instance_map(pred.instance_scores.float().cpu()) >= 0.5
        else:
            continue
        seen = True
        tmap = bag.key_mask().cpu()
        inter += float((pmap & tmap).sum())
        pred_sum += float(pmap.sum())
        true_sum += float(tmap.sum())
    if not seen or pred_sum + true_sum == 0:
        return None
    return 2 * inter / (pred_sum + true_sum)


def evaluate(predictions: Sequence[Any], bags: Sequence[Any], class_names: Sequence[str] = ()) -> dict[str, Any]:
    """All harness metrics for one split."""
    probs = [float(p.bag_prob) for p in predictions]
    labels = [int(b.label) for b in bags]
    out: dict[str, Any] = {
        "bag_accuracy": bag_accuracy(probs, labels),
        "bag_auc": bag_auc(probs, labels),
        "bag_loss": bag_bce(probs, labels),
        "dice": key_dice(predictions, bags),
        "n_bags": len(labels),
        "n_positive": sum(labels),
    }
    dense = [(p.pixel_classes, b.mask) for p, b in zip(predictions, bags)
             if p.pixel_classes is not None and b.mask is not None]
    if dense:
        from milbench.segmentation_metrics import dense_class_metrics

        out.update(dense_class_metrics([d[0] for d in dense], [d[1] for d in dense],
                                       len(class_names), list(class_names)))
    return out
