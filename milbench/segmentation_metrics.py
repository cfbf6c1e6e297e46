"""Dense (per-pixel) class-map metrics: Dice, precision and recall per class.

Why pooled confusion: test bags differ in size and many hold no pixel of some
class, so a per-bag Dice would be undefined (0/0) or dominated by tiny bags.
Summing one confusion matrix over every test pixel first and deriving the
scores from it gives each pixel the same weight, as a Dice over the whole
held-out area would. A class that occurs neither in the truth nor in the
prediction has no defined score: it is reported as ``None`` and left out of the
mean, never counted as 0 or 1.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np

from milbench.errors import ConfigError


def _as_numpy(a: Any) -> np.ndarray:
    """Accept numpy arrays and torch tensors (without importing torch here)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def metric_key(name: str) -> str:
    """A class name as a metric-key fragment: lower case, ``[a-z0-9_]`` only."""
    key = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    return key or "class"


def confusion_matrix(pred: Any, true: Any, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts, rows = true class, cols = predicted.

    Raises :class:`ConfigError` if the maps differ in shape or hold a value
    outside ``0..n_classes-1`` (a silent clip would hide a label bug).
    """
    p = _as_numpy(pred).astype(np.int64, copy=False).ravel()
    t = _as_numpy(true).astype(np.int64, copy=False).ravel()
    if _as_numpy(pred).shape != _as_numpy(true).shape:
        raise ConfigError(
            f"class maps differ in shape: predicted {_as_numpy(pred).shape} vs true {_as_numpy(true).shape}")
    for what, a in (("predicted", p), ("true", t)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ConfigError(
                f"{what} class map holds value {int(a.min() if a.min() < 0 else a.max())}; valid: 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Dice, precision and recall per class, their means, and pixel accuracy.

    Keys: ``dice_<class>``, ``precision_<class>``, ``recall_<class>``,
    ``mean_dice`` (over classes with a defined Dice), ``pixel_accuracy`` and
    ``n_pixels``. Undefined scores (0/0) are ``None``.
    """
    conf = np.asarray(conf, dtype=np.int64)
    n = conf.shape[0]
    if conf.shape != (n, n) or len(class_names) != n:
        raise ConfigError(f"confusion matrix {conf.shape} does not match {len(class_names)} class names")
    tp = np.diag(conf).astype(np.float64)
    true_n = conf.sum(axis=1).astype(np.float64)
    pred_n = conf.sum(axis=0).astype(np.float64)
    out: dict[str, Any] = {}
    dices = []
    for k, name in enumerate(class_names):
        key = metric_key(name)
        denom = true_n[k] + pred_n[k]
        dice = None if denom == 0 else float(2 * tp[k] / denom)
        out[f"dice_{key}"] = dice
        out[f"precision_{key}"] = None if pred_n[k] == 0 else float(tp[k] / pred_n[k])
        out[f"recall_{key}"] = None if true_n[k] == 0 else float(tp[k] / true_n[k])
        if dice is not None:
            dices.append(dice)
    total = conf.sum()
    out["mean_dice"] = float(np.mean(dices)) if dices else None
    out["pixel_accuracy"] = float(tp.sum() / total) if total else None
    out["n_pixels"] = int(total)
    return out


def dense_class_metrics(
    pred_maps: Iterable[Any],
    true_maps: Iterable[Any],
    n_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Pooled per-class Dice/precision/recall over pairs of dense class maps.

    ``pred_maps`` and ``true_maps`` are matching sequences of integer maps
    (numpy arrays or torch tensors, any equal shapes per pair), e.g. each test
    bag's ``Prediction.pixel_classes`` and ``Bag.mask``. One confusion matrix
    is summed over all pixels of all pairs, then scored
    (:func:`scores_from_confusion`). The summed matrix is returned too under
    ``confusion`` (a nested list, rows = true class) for the record.
    """
    names = list(class_names) if class_names is not None else [str(k) for k in range(n_classes)]
    if len(names) != n_classes:
        raise ConfigError(f"{len(names)} class names given for {n_classes} classes")
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    preds, trues = list(pred_maps), list(true_maps)
    if len(preds) != len(trues):
        raise ConfigError(f"{len(preds)} predicted maps but {len(trues)} true maps")
    for p, t in zip(preds, trues):
        conf += confusion_matrix(p, t, n_classes)
    out = scores_from_confusion(conf, names)
    out["confusion"] = conf.tolist()
    return out
