"""The harness-owned training loop: the same optimizer, schedule, accumulation
over bags, checkpoint selection and evaluation for every method.

A method only supplies ``backward`` (one bag's gradient) and ``predict``; this
module does the rest, so differences in the table come from the methods.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from milbench.api import Bag, Method, Prediction, RunContext, Splits
from milbench.measure import PhaseTimer
from milbench.metrics import bag_auc, bag_bce, evaluate


def predict_split(method: Method, model: torch.nn.Module, bags: Sequence[Bag], config: Mapping[str, Any],
                  device: Any) -> list[Prediction]:
    """Predict every bag of a split in eval mode without autograd."""
    model.eval()
    preds = []
    with torch.no_grad():
        for bag in bags:
            preds.append(method.predict(model, bag.to(device), config))
    return preds


def _better(criterion: str, new: float | None, best: float | None) -> bool:
    if criterion == "last":
        return True
    if new is None or (isinstance(new, float) and np.isnan(new)):
        return best is None
    if best is None:
        return True
    return new < best if criterion == "val_loss" else new > best


def fit(
    method: Method,
    model: torch.nn.Module,
    splits: Splits,
    config: Mapping[str, Any],
    ctx: RunContext,
    timer: PhaseTimer,
    on_epoch: Callable[[dict[str, Any]], None] = lambda h: None,
) -> dict[str, Any]:
    """Train for ``config['epochs']``; keep the checkpoint that is best on the
    validation split (``select_on``); return a summary with the history.

    Gradients of ``bags_per_step`` consecutive bags are summed by the method's
    ``backward`` calls and averaged here before each Adam step (the paper's
    accumulation over 25 bags).
    """
    device = ctx.device
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    rng = np.random.default_rng(ctx.seed)
    criterion = config["select_on"]
    best_score: float | None = None
    best_state: dict[str, Any] | None = None
    best_epoch = None
    history: list[dict[str, Any]] = []
    bags_trained = 0
    per_step = config["bags_per_step"]
    cap = config["max_train_bags_per_epoch"]
    for epoch in range(1, config["epochs"] + 1):
        t_epoch = time.perf_counter()
        method.on_epoch_start(model, epoch, config)
        order = rng.permutation(len(splits.train))
        if cap:
            order = order[:cap]
        losses = []
        with timer.phase("train"):
            model.train()
            opt.zero_grad(set_to_none=True)
            pending = 0
            for k, idx in enumerate(order):
                bag = splits.train[int(idx)].to(device)
                losses.append(float(method.backward(model, bag, config)))
                pending += 1
                bags_trained += 1
                if pending == per_step or k == len(order) - 1:
                    if pending > 1:
                        for p in model.parameters():
                            if p.grad is not None:
                                p.grad.div_(pending)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    pending = 0
        train_seconds = time.perf_counter() - t_epoch
        with timer.phase("val"):
            preds = predict_split(method, model, splits.val, config, device)
        probs = [p.bag_prob for p in preds]
        labels = [b.label for b in splits.val]
        # A method that computes its own loss (e.g. an instance-supervised one) is
        # selected on that loss; otherwise on the bag cross-entropy of its probabilities.
        own = [p.loss for p in preds]
        val_loss = float(np.mean(own)) if own and all(v is not None for v in own) else bag_bce(probs, labels)
        entry = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else None,
            "val_loss": val_loss,
            "val_bag_auc": bag_auc(probs, labels),
            "val_bag_accuracy": float(np.mean([(p >= 0.5) == (y == 1) for p, y in zip(probs, labels)])),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t_epoch,
        }
        score = entry["val_loss"] if criterion == "val_loss" else entry["val_bag_auc"]
        if _better(criterion, score, best_score):
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        entry["selected"] = best_epoch == epoch
        history.append(entry)
        on_epoch(entry)
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"history": history, "best_epoch": best_epoch, "bags_trained": bags_trained}


def test_metrics(method: Method, model: torch.nn.Module, splits: Splits, config: Mapping[str, Any],
                 ctx: RunContext, extra_metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[Prediction]]:
    """Evaluate the selected checkpoint on the held-out test split."""
    preds = predict_split(method, model, splits.test, config, ctx.device)
    metrics = evaluate(preds, splits.test, splits.spec.instance_classes)
    for name, metric in extra_metrics.items():
        try:
            metrics[name] = metric.fn(preds, splits.test)
        except Exception as exc:  # a third-party metric must not lose the run
            metrics[name] = None
            metrics.setdefault("metric_errors", {})[name] = f"{type(exc).__name__}: {exc}"
    return metrics, preds


def state_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of trainable parameters and of Adam's two moment buffers for them
    (what must be subtracted to compare activation memory across bag sizes)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"model_parameter_bytes": int(params), "model_buffer_bytes": int(buffers),
            "optimizer_state_bytes": int(2 * params)}

