"""The harness-owned training loop: the protocol of :mod:`milbench.protocol`
(AdamW, warm-up and decay, clipping, augmentation, selection, early stopping)
applied the same way to every method.

A method only supplies ``backward`` (one bag's gradient) and ``predict``; this
module does the rest, so differences in the table come from the methods.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from milbench.bag import Bag, LazyBag
from milbench.contract import Method, Prediction, RunContext, Splits
from milbench.measure import PhaseTimer
from milbench.errors import first_line
from milbench.metrics import bag_auc, bag_bce, evaluate
from milbench.protocol import Selection, lr_factor


def predict_split(method: Method, model: torch.nn.Module, bags: Sequence[Bag], config: Mapping[str, Any],
                  device: Any) -> list[Prediction]:
    """Predict every bag of a split in eval mode without autograd."""
    model.eval()
    preds = []
    with torch.no_grad():
        for bag in bags:
            preds.append(method.predict(model, bag.to(device), config))
    return preds


def fit(
    method: Method,
    model: torch.nn.Module,
    splits: Splits,
    config: Mapping[str, Any],
    ctx: RunContext,
    timer: PhaseTimer,
    on_epoch: Callable[[dict[str, Any]], None] = lambda h: None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    on_bag: Callable[[int, int, int, float], None] = lambda epoch, done, total, loss: None,
) -> dict[str, Any]:
    """Train under the protocol (:mod:`milbench.protocol`); keep the checkpoint
    that is best on the validation split; return a summary with the history.

    Per optimizer step: gradients of ``bags_per_step`` consecutive bags (each
    bag's from the method's ``backward``) are averaged, the global gradient
    norm is clipped to ``grad_clip``, and AdamW steps at the scheduled rate
    (linear warm-up over ``warmup_epochs``, then ``schedule``). ``augment``
    (the dataset's, when the protocol key ``augment`` is on) transforms each
    training bag's instances first. After each epoch the validation bags are
    predicted; :class:`~milbench.protocol.Selection` keeps the best weights
    and stops after ``patience`` epochs without a better one; those weights
    are restored before returning. ``on_bag(epoch, done, total, loss)`` is
    called after every training bag (progress display).
    """
    device = ctx.device
    params = list(model.parameters())  # all: a method may unfreeze a trunk in a later epoch
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    rng = np.random.default_rng(ctx.seed)
    aug_gen = torch.Generator().manual_seed(int(ctx.seed) + 7919)
    per_step = config["bags_per_step"]
    cap = config["max_train_bags_per_epoch"]
    n_epoch = min(len(splits.train), cap) if cap else len(splits.train)
    steps_per_epoch = max(1, math.ceil(n_epoch / per_step))
    total_steps = steps_per_epoch * config["epochs"]
    warmup_steps = int(round(config["warmup_epochs"] * steps_per_epoch))
    select = Selection(config["select_on"], config["patience"])
    best_state: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    bags_trained = 0
    step = 0
    stopped_early = False
    for epoch in range(1, config["epochs"] + 1):
        t_epoch = time.perf_counter()
        method.on_epoch_start(model, epoch, config)
        order = rng.permutation(len(splits.train))[:n_epoch]
        losses: list[float] = []
        loss_sum = 0.0
        norms: list[float] = []
        with timer.phase("train"):
            model.train()
            opt.zero_grad(set_to_none=True)
            pending = 0
            for k, idx in enumerate(order):
                bag = splits.train[int(idx)]
                if augment is not None and isinstance(bag, LazyBag):
                    # a lazy bag (tiles read from a slide on demand) is augmented as it is read
                    bag = bag.augmented(augment, int(torch.randint(2**62, (1,), generator=aug_gen)))
                elif augment is not None:
                    bag = dataclasses.replace(bag, instances=augment(bag.instances, aug_gen))
                losses.append(float(method.backward(model, bag.to(device), config)))
                pending += 1
                bags_trained += 1
                if pending == per_step or k == len(order) - 1:
                    trainable = [p for p in params if p.grad is not None]
                    if pending > 1:
                        for p in trainable:
                            p.grad.div_(pending)
                    if trainable:  # the pre-clipping norm is recorded whether or not it is clipped
                        clip = config["grad_clip"] if config["grad_clip"] is not None else float("inf")
                        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, clip)))
                    for group in opt.param_groups:
                        group["lr"] = config["lr"] * lr_factor(step, total_steps, warmup_steps, config["schedule"])
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    pending = 0
                    step += 1
                loss_sum += losses[-1]
                on_bag(epoch, k + 1, len(order), loss_sum / len(losses))
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
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": float(np.mean(norms)) if norms else None,
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t_epoch,
        }
        if select.update(epoch, entry["val_bag_auc"], entry["val_loss"]):
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        entry["selected"] = select.best_epoch == epoch
        history.append(entry)
        on_epoch(entry)
        if select.should_stop and epoch < config["epochs"]:
            stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"history": history, "best_epoch": select.best_epoch, "bags_trained": bags_trained,
            "stopped_early": stopped_early}


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
            metrics.setdefault("metric_errors", {})[name] = first_line(exc)
    return metrics, preds


def state_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of trainable parameters and of Adam's two moment buffers for them
    (what must be subtracted to compare activation memory across bag sizes)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"model_parameter_bytes": int(params), "model_buffer_bytes": int(buffers),
            "optimizer_state_bytes": int(2 * params)}

