"""The training protocol: one declaration, the same for every method on a dataset.

A benchmark's numbers must belong to the methods, not to a recipe that differs
from method to method. So the optimizer (AdamW), its learning-rate warm-up and
cosine decay, gradient clipping, the epoch budget, augmentation on/off, model
selection (validation AUC, ties broken by validation loss) and early stopping
are declared here once, as config keys like any other, and applied by the
harness's training loop (:mod:`milbench.training`).

Who may set a protocol key:

- the protocol's own defaults (below);
- a dataset, in its ``defaults``/``presets`` (a dataset owns its budget and its
  augmentations: what ``augment`` does is the dataset's :meth:`Dataset.augment`);
- a tuned preset written by ``milbench tune`` (each method gets the same number
  of trials over the same protocol keys), and the user's ``--set``.

A method's ``defaults``/``presets``/``smoke`` may **not** set a protocol key:
:func:`check_method_layers` refuses it with a one-line error, and a test checks
every built-in method. A method that needs more epochs shows that in its
learning curve; it does not get a private budget.

Every record carries a ``protocol`` block (the keys, the dataset's augmentation
and a hash of both) so that tables can refuse to mix protocols.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from milbench.config import Param
from milbench.errors import PluginError

#: Bumped whenever the loop's meaning changes for the same keys (it enters the hash).
PROTOCOL_VERSION = 2

#: The protocol's keys. ``search`` marks the learning keys ``milbench tune`` explores.
PROTOCOL_PARAMS: dict[str, Param] = {
    "epochs": Param(10, int, "epoch budget (early stopping may end sooner)", low=1),
    "lr": Param(1e-3, float, "AdamW peak learning rate", low=0, low_open=True, search=("log", 1e-5, 1e-2)),
    "weight_decay": Param(1e-2, float, "AdamW decoupled weight decay", low=0, search=("log", 1e-5, 1e-1)),
    "warmup_epochs": Param(1.0, float, "linear learning-rate warm-up from 0, in epochs (fractions allowed)", low=0),
    "schedule": Param("cosine", str, "learning-rate decay after warm-up", choices=("cosine", "constant")),
    "grad_clip": Param(1.0, float, "clip the global gradient norm of each optimizer step (none: no clipping)",
                       low=0, low_open=True, nullable=True),
    "bags_per_step": Param(4, int, "bags whose gradients are averaged per optimizer step (the paper's 25)", low=1),
    "augment": Param(True, bool, "apply the dataset's training augmentations (per instance, before a bag image is "
                     "assembled)"),
    "select_on": Param("val_bag_auc", str, "which epoch's weights are evaluated on test: best validation AUC (ties: "
                       "lower validation loss), lowest validation loss, or the last",
                       choices=("val_bag_auc", "val_loss", "last")),
    # 10, not 5: a 200-bag validation AUC moves by about 0.02 from epoch to epoch, and on Imagenette a lucky
    # early epoch (abmil seeds 3 and 4: epochs 2 and 1) took 7-9 epochs to beat while the model was still
    # improving; patience 5 stopped both runs at 0.82/0.87 test AUC, training through gave 0.88/0.90
    # (results/imagenette-diagnostics/patience/). Early stopping is for overfitting, which comes late.
    "patience": Param(10, int, "early stopping: epochs without a better validation score before stopping (none: "
                      "never)", low=1, nullable=True),
    "max_train_bags_per_epoch": Param(None, int, "cap on training bags visited per epoch (none: all)", low=1,
                                      nullable=True),
}

#: ``--smoke`` overlay of the protocol: one epoch.
PROTOCOL_SMOKE: dict[str, Any] = {"epochs": 1}


def check_method_layers(method: Any) -> None:
    """Refuse a method whose defaults, presets or smoke overlay set a protocol key.

    Raises :class:`PluginError` naming the method, the layer and the key: the
    protocol is the same object for every method, so a method cannot carry a
    private epoch budget or learning rate (tune them with ``milbench tune``)."""
    layers = [("defaults", method.defaults), ("smoke", method.smoke)]
    layers += [(f"preset '{name}'", preset) for name, preset in method.presets.items()]
    for where, layer in layers:
        bad = sorted(set(layer) & set(PROTOCOL_PARAMS))
        if bad:
            raise PluginError(f"method '{method.name}' {where} sets protocol key(s) {', '.join(bad)}; the training "
                              "protocol is the same for every method (a dataset or a tuned preset may set them)")


def check_dataset_layers(dataset: Any) -> None:
    """Refuse a dataset whose ``defaults``/``presets``/``smoke`` set a key it does not
    declare (the harness supplies no dataset key: ``bag_size`` and friends come from the
    dataset's own ``params``, see :func:`milbench.api.bag_params`) or a value its key
    refuses. Checked at registration, so ``milbench list`` flags the plugin instead of
    every run failing."""
    from milbench.errors import MilbenchError

    params = {**PROTOCOL_PARAMS, **dict(dataset.params)}
    layers = [("defaults", dataset.defaults), ("smoke", dataset.smoke)]
    layers += [(f"preset '{name}'", preset) for name, preset in dataset.presets.items()]
    for where, layer in layers:
        for key, value in layer.items():
            if key not in params:
                raise PluginError(f"dataset '{dataset.name}' {where} sets key '{key}', which it does not declare in "
                                  f"its params (declare the shared bag keys with milbench.api.bag_params)")
            try:
                params[key].validate(key, value)
            except MilbenchError as exc:
                raise PluginError(f"dataset '{dataset.name}' {where}: {exc}") from None


def protocol_block(config: Mapping[str, Any], augmentation: str) -> dict[str, Any]:
    """The record's ``protocol`` block: version, protocol keys, the dataset's
    augmentation (what ``augment`` does on this dataset) and a hash of all three."""
    keys = {k: config[k] for k in PROTOCOL_PARAMS if k in config}
    body = {"version": PROTOCOL_VERSION, "keys": keys,
            "augmentation": augmentation if config.get("augment") else "none"}
    blob = json.dumps(body, sort_keys=True, default=str)
    return {**body, "hash": hashlib.sha256(blob.encode()).hexdigest()[:12]}


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (from 1/warmup_steps to 1, so the
    first step already moves), then constant or a cosine decay to 0 at
    ``total_steps``. Warm-up keeps AdamW's first, badly scaled steps from
    throwing a randomly initialised attention head off the plateau in the
    wrong direction; the decay lets the last epochs settle."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Selection:
    """Model selection and early stopping on the validation split.

    ``val_bag_auc``: higher AUC wins, an equal AUC with a lower validation loss
    wins too (AUC saturates at 1.0 on easy data; the loss still tells which
    epoch is better calibrated). ``val_loss``: lower loss wins. ``last``: every
    epoch wins. ``patience`` epochs without a win stop training."""

    criterion: str
    patience: int | None
    best_epoch: int | None = None
    best_auc: float | None = None
    best_loss: float | None = None
    since_best: int = 0

    @staticmethod
    def _num(x: float | None) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    def better(self, auc: float | None, loss: float | None) -> bool:
        """Whether an epoch with these validation scores beats the best so far."""
        auc, loss = self._num(auc), self._num(loss)
        if self.best_epoch is None or self.criterion == "last":
            return True
        if self.criterion == "val_loss":
            return loss is not None and (self.best_loss is None or loss < self.best_loss)
        if auc is None:
            return self.best_auc is None and loss is not None and (self.best_loss is None or loss < self.best_loss)
        if self.best_auc is None or auc > self.best_auc:
            return True
        return auc == self.best_auc and loss is not None and (self.best_loss is None or loss < self.best_loss)

    def update(self, epoch: int, auc: float | None, loss: float | None) -> bool:
        """Record one epoch; return True when it is the new best."""
        if self.better(auc, loss):
            self.best_epoch, self.best_auc, self.best_loss = epoch, self._num(auc), self._num(loss)
            self.since_best = 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.criterion != "last" and self.since_best >= self.patience
