"""The training protocol is one object for every method: declared once, never
overridden by a method, applied by the harness loop (schedule, clipping,
selection, early stopping), and stated in every record with its hash."""

from __future__ import annotations

import math

import pytest
import torch

from milbench.api import Bag, DataSpec, Method, Prediction, RunContext, Splits
from milbench.errors import PluginError
from milbench.measure import PhaseTimer
from milbench.plugins import get_registry
from milbench.protocol import PROTOCOL_PARAMS, Selection, check_method_layers, lr_factor, protocol_block
from milbench.runner import plan_run
from milbench.training import fit


def test_no_builtin_method_sets_a_protocol_key():
    """Every built-in method's defaults, presets and smoke overlay leave the protocol alone."""
    registry = get_registry(warn=False)
    assert registry.methods, "no methods registered"
    for name, method in registry.methods.items():
        layers = {"defaults": method.defaults, "smoke": method.smoke, **method.presets}
        for where, layer in layers.items():
            assert not set(layer) & set(PROTOCOL_PARAMS), f"{name} {where} sets {set(layer) & set(PROTOCOL_PARAMS)}"
        check_method_layers(method)


def test_a_method_that_sets_a_protocol_key_is_refused():
    class Greedy(Method):
        name = "greedy"
        presets = {"default": {"epochs": 40}}

    with pytest.raises(PluginError, match="greedy.*epochs"):
        check_method_layers(Greedy())


def test_protocol_is_the_same_for_every_method_on_a_dataset():
    registry = get_registry(warn=False)
    blocks = {m: plan_run(registry, m, "qmnist").protocol for m in registry.methods}
    assert len({b["hash"] for b in blocks.values()}) == 1, blocks
    block = next(iter(blocks.values()))
    assert set(block["keys"]) == set(PROTOCOL_PARAMS)
    assert block["augmentation"] and block["augmentation"] != "none"
    # a changed protocol key, or augmentation off, changes the hash (tables can tell them apart)
    other = plan_run(registry, "abmil", "qmnist", overrides=["lr=0.0123"]).protocol
    off = plan_run(registry, "abmil", "qmnist", overrides=["augment=false"]).protocol
    assert len({block["hash"], other["hash"], off["hash"]}) == 3
    assert off["augmentation"] == "none"


def test_lr_schedule_warms_up_then_decays_to_zero():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] < 0.01
    assert [lr_factor(s, total, 0, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_selection_prefers_auc_then_lower_loss_and_stops_after_patience():
    sel = Selection("val_bag_auc", patience=2)
    assert sel.update(1, 0.8, 0.6)
    assert not sel.update(2, 0.7, 0.1)           # lower AUC loses even with a lower loss
    assert sel.update(3, 0.8, 0.5)               # equal AUC, lower loss wins
    assert sel.best_epoch == 3 and not sel.should_stop
    assert not sel.update(4, 0.8, 0.55)
    assert not sel.update(5, float("nan"), 0.1)  # no AUC never beats a real one
    assert sel.should_stop
    loss_sel = Selection("val_loss", patience=None)
    assert loss_sel.update(1, 0.9, 0.5) and not loss_sel.update(2, 1.0, 0.6) and not loss_sel.should_stop


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.0))


class _ScriptedMethod(Method):
    """A method whose validation quality is scripted per epoch: good at epoch 2,
    then worse and worse, so early stopping must stop and restore epoch 2's weights."""

    name = "scripted"
    quality = {1: 0.6, 2: 0.95, 3: 0.7, 4: 0.65, 5: 0.6, 6: 0.55, 7: 0.5, 8: 0.5}

    def __init__(self):
        self.epoch = 0
        self.weights_at_end_of: dict[int, float] = {}

    def on_epoch_start(self, model, epoch, config):
        self.epoch = epoch

    def backward(self, model, bag, config):
        loss = (model.w - float(self.epoch)) ** 2  # pulls w towards the epoch number
        loss.backward()
        return float(loss.detach())

    def predict(self, model, bag, config):
        self.weights_at_end_of[self.epoch] = float(model.w.detach())
        q = self.quality[self.epoch]
        return Prediction(bag_prob=q if bag.label else 1 - q)


def _bags(n):
    return [Bag(torch.zeros(1, 1, 4, 4), i % 2, torch.zeros(1, 2, dtype=torch.long), (1, 1), torch.zeros(1))
            for i in range(n)]


def test_early_stopping_stops_and_restores_the_best_checkpoint():
    registry = get_registry(warn=False)
    config = {k: p.default for k, p in PROTOCOL_PARAMS.items()}
    config.update(epochs=8, patience=3, lr=0.5, warmup_epochs=0.0, schedule="constant", grad_clip=None,
                  weight_decay=0.0)
    assert registry  # plugins import cleanly alongside
    method, model = _ScriptedMethod(), _Scalar()
    splits = Splits(DataSpec(1, 4), _bags(4), _bags(4), _bags(2))
    seen = []
    out = fit(method, model, splits, config, RunContext(torch.device("cpu"), 0), PhaseTimer(torch.device("cpu")),
              on_epoch=seen.append)
    assert out["best_epoch"] == 2
    assert out["stopped_early"] and len(out["history"]) == 5  # epochs 3, 4, 5 did not beat epoch 2
    assert [h["selected"] for h in out["history"]] == [True, True, False, False, False]
    assert float(model.w.detach()) == pytest.approx(method.weights_at_end_of[2])
    assert float(model.w.detach()) != pytest.approx(method.weights_at_end_of[5])


def test_gradient_clipping_bounds_the_step_norm():
    config = {k: p.default for k, p in PROTOCOL_PARAMS.items()}
    config.update(epochs=1, patience=None, grad_clip=0.5, warmup_epochs=0.0, schedule="constant")
    method, model = _ScriptedMethod(), _Scalar()
    method.quality = {1: 0.9}
    with torch.no_grad():
        model.w.fill_(-100.0)  # gradient 2 * (w - 1) = -202: clipped to norm 0.5
    out = fit(method, model, Splits(DataSpec(1, 4), _bags(1), _bags(2), _bags(2)), config,
              RunContext(torch.device("cpu"), 0), PhaseTimer(torch.device("cpu")))
    assert out["history"][0]["grad_norm"] == pytest.approx(202.0)
    assert math.isfinite(out["history"][0]["val_loss"])


def test_protocol_block_is_stable():
    config = {k: p.default for k, p in PROTOCOL_PARAMS.items()}
    assert protocol_block(config, "flips")["hash"] == protocol_block(dict(config), "flips")["hash"]
    assert protocol_block(config, "flips")["hash"] != protocol_block(config, "shifts")["hash"]


def test_report_refuses_to_mix_protocols(tmp_path):
    from conftest import run_cli
    from milbench.records import write_record
    from test_report import _rec

    for seed, h in ((0, "aaaa"), (1, "bbbb")):
        r = _rec(f"r{seed}", "abmil", "qmnist", seed)
        r["protocol"] = {"version": 2, "keys": {}, "augmentation": "none", "hash": h}
        write_record(tmp_path, r)
    res = run_cli("report", "--results", str(tmp_path), "--format", "markdown")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "mix training protocols" in res.stderr and "aaaa" in res.stderr and "bbbb" in res.stderr
    res = run_cli("report", "--results", str(tmp_path), "--format", "markdown", "--protocol", "aaaa")
    assert res.returncode == 0, res.stderr
    assert "abmil" in res.stdout
