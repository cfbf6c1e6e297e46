"""Config resolution order, parsing and one-line errors."""

from __future__ import annotations

import pytest

from conftest import run_cli
from milbench.config import Param, config_hash, resolve
from milbench.errors import ConfigError


def test_resolution_order_and_types():
    params = {"a": Param(1, int, low=0), "b": Param(0.5, float, low=0, high=1), "c": Param("x", str, choices=("x", "y"))}
    cfg = resolve(params, [("layer1", {"a": 2}), ("layer2", {"a": 3, "c": "y"})], ["b=0.25"])
    assert cfg == {"a": 3, "b": 0.25, "c": "y"}


@pytest.mark.parametrize("override, fragment", [
    (["zz=1"], "unknown config key 'zz'"),
    (["a=abc"], "is not int"),
    (["a=-1"], "out of range"),
    (["b=1.5"], "out of range"),
    (["c=z"], "valid: one of x, y"),
    (["novalue"], "expected key=value"),
])
def test_bad_overrides_are_one_line(override, fragment):
    params = {"a": Param(1, int, low=0), "b": Param(0.5, float, low=0, high=1), "c": Param("x", str, choices=("x", "y"))}
    with pytest.raises(ConfigError) as exc:
        resolve(params, [], override)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_hash_changes_with_config():
    assert config_hash({"a": 1}, "m", "d") != config_hash({"a": 2}, "m", "d")
    assert config_hash({"a": 1, "b": 2}, "m", "d") == config_hash({"b": 2, "a": 1}, "m", "d")


def test_plan_uses_presets_and_smoke():
    from milbench.plugins import get_registry
    from milbench.runner import plan_run

    reg = get_registry()
    paper = plan_run(reg, "abmil", "qmnist", "paper")
    assert paper.config["instance_size"] == 84 and paper.config["bag_size"] == 50
    assert paper.config["bags_per_step"] == 25 and paper.config["lr"] == 5e-5
    assert paper.config["encoder"] == "resnet18" and paper.config["feat_dim"] == 2048
    smoke = plan_run(reg, "abmil", "qmnist", smoke=True, overrides=["bag_size=5"])
    assert smoke.config["epochs"] == 1 and smoke.config["bag_size"] == 5
    assert smoke.config_hash != plan_run(reg, "abmil", "qmnist").config_hash


@pytest.mark.parametrize("args, fragment", [
    (["run", "-m", "abmill", "-d", "qmnist"], "did you mean 'abmil'"),
    (["run", "-m", "abmil", "-d", "qmnst"], "did you mean 'qmnist'"),
    (["run", "-m", "abmil", "-d", "qmnist", "--set", "bag_sise=3"], "did you mean 'bag_size'"),
    (["run", "-m", "abmil", "-d", "qmnist", "--set", "bag_size=-4"], "out of range"),
    (["run", "-m", "abmil", "-d", "qmnist", "--set", "lr=fast"], "is not float"),
    (["run", "-m", "abmil", "-d", "qmnist", "--preset", "papr"], "did you mean 'paper'"),
    (["run", "-m", "abmil", "-d", "qmnist", "--device", "tpu"], "valid: auto, cpu, cuda"),
    (["run", "-m", "abmil", "-d", "qmnist", "--max-memory", "lots"], "bad memory size"),
])
def test_cli_config_errors_are_one_line(args, fragment, tmp_path):
    res = run_cli(*args, "--results", str(tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if not l.startswith("milbench: warning")]
    assert len(lines) == 1 and fragment in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.glob("*.json"))  # bad input runs nothing
