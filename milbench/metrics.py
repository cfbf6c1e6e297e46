"""Test-split metrics computed by the harness, the same way for every method.

Bag-level: accuracy at 0.5, ROC AUC and binary cross-entropy (both computed by
scikit-learn, which reviewers trust over hand-written code). Localisation: Dice of the key class, pooled over all test bags
(sum of intersections over sum of sizes), from the methods' instance or pixel
scores thresholded at 0.5 against the bags' key masks. Dense multi-class Dice
when a method returns class maps and the data has pixel masks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def bag_auc(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    """ROC AUC by scikit-learn (``roc_auc_score``: ties count one half, the
    Mann-Whitney statistic); ``None`` when the labels hold a single class."""
    y = [1 if v == 1 else 0 for v in labels]
    if not y or min(y) == max(y):
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, [float(p) for p in probs]))


def bag_log_loss(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    """Mean binary cross-entropy by scikit-learn (``log_loss``, probabilities clipped at 1e-7)."""
    if not labels:
        return None
    from sklearn.metrics import log_loss

    eps = 1e-7
    return float(log_loss([1 if v == 1 else 0 for v in labels],
                          [min(max(float(p), eps), 1 - eps) for p in probs], labels=[0, 1]))


def bag_accuracy(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    if not labels:
        return None
    return sum((p >= 0.5) == (y == 1) for p, y in zip(probs, labels)) / len(labels)


def bag_bce(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    """Mean binary cross-entropy of bag probabilities (clipped at 1e-7): :func:`bag_log_loss`."""
    return bag_log_loss(probs, labels)


def key_dice(predictions: Sequence[Any], bags: Sequence[Any]) -> float | None:
    """Pooled Dice of the key class over all bags, or ``None`` when no
    prediction carries instance or pixel scores (or nothing is key anywhere)."""
    inter = pred_sum = true_sum = 0.0
    seen = False
    for pred, bag in zip(predictions, bags):
        if not getattr(bag, "instance_labels_known", True):  # no truth to compare with (e.g. unannotated slide)
            continue
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
