"""The config keys every bag dataset declares, declared in one call.

The harness supplies no dataset key: a dataset reads only what its ``params``
declare. Bag datasets share the same vocabulary (``bag_size``, ``instance_size``,
``key_fraction``, bag counts), so that a sweep over ``bag_size`` or a ``--set
instance_size=...`` means the same on every dataset; :func:`bag_params` declares
them with the dataset's own defaults.
"""

from __future__ import annotations

from milbench.config import AutoParam, Param


def bag_params(*, bag_size: int, instance_size: int, key_fraction: float, n_train_bags: int | str = 200,
               n_val_bags: int = 200, n_test_bags: int = 300, bag_size_std: float | None = 0.0,
               min_instance_size: int = 8, max_instance_size: int | None = None,
               help: dict[str, str] | None = None) -> dict[str, Param]:
    """``{key: Param}`` for the shared bag keys, with this dataset's defaults.

    ``bag_size_std=None`` leaves that key out (a dataset whose bags have a fixed
    shape, e.g. a grid of tiles). ``help`` replaces a key's help text with one
    that says what it means on this dataset (e.g. what a key instance is).
    ``n_train_bags="auto"`` makes that key an :class:`~milbench.config.AutoParam`:
    the dataset sizes the training set to the data it finds (and records what it
    picked), so one default serves a shipped sample and the full data.

    The evaluation defaults (200 validation, 300 test bags) are what the built-in
    datasets found they need: on 50 balanced validation bags a bag AUC moves in
    steps of 0.0016 and reaches 1.0 early in training, so selection keeps a
    half-trained epoch; on 100 test bags one seed's AUC has a sampling error the
    size of a method's seed spread.
    """
    text = {
        "bag_size": "instances per bag (the mean when bag_size_std > 0)",
        "bag_size_std": "std of a Gaussian bag size around bag_size (0: fixed)",
        "instance_size": "instance side in pixels",
        "key_fraction": "share of key instances in a positive bag",
        "n_train_bags": "training bags",
        "n_val_bags": "validation bags (checkpoint selection)",
        "n_test_bags": "held-out test bags",
        **(help or {}),
    }
    params = {
        "bag_size": Param(bag_size, int, text["bag_size"], low=1),
        "bag_size_std": Param(bag_size_std, float, text["bag_size_std"], low=0),
        "instance_size": Param(instance_size, int, text["instance_size"], low=min_instance_size,
                               high=max_instance_size),
        "key_fraction": Param(key_fraction, float, text["key_fraction"], low=0, high=1, low_open=True),
        "n_train_bags": (AutoParam if n_train_bags == "auto" else Param)(n_train_bags, int, text["n_train_bags"],
                                                                         low=1),
        "n_val_bags": Param(n_val_bags, int, text["n_val_bags"], low=1),
        "n_test_bags": Param(n_test_bags, int, text["n_test_bags"], low=1),
    }
    if bag_size_std is None:
        del params["bag_size_std"]
    return params
