"""The parent→child hand-off and the one device parser, without running a child."""

from __future__ import annotations

import pytest

from milbench.devices import DeviceRequest, check_device, parse_device
from milbench.errors import MilbenchError, first_line
from milbench.handoff import NULL_MEMORY_KEYS, ChildSpec, null_fields


@pytest.mark.parametrize("text, want", [
    ("auto", DeviceRequest("auto", "auto")), (" CPU ", DeviceRequest("cpu", "cpu")),
    ("cuda", DeviceRequest("cuda", "cuda", 0)), ("Cuda:3", DeviceRequest("cuda:3", "cuda", 3)),
])
def test_device_strings_parse_to_one_meaning(text, want):
    assert parse_device(text) == want
    assert check_device(text, probe=False) == want.text  # spelling only: a login node sees no worker GPU


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps"])
def test_bad_device_is_one_line(text):
    with pytest.raises(MilbenchError, match=r"bad --device .*; valid: auto, cpu, cuda, cuda:N"):
        parse_device(text)


def test_child_spec_round_trips_through_json():
    spec = ChildSpec("abmil", "qmnist", {"bag_size": 8}, 3, "cpu", None, "/r/artifacts/x", 2**30, "/tmp/p.json")
    assert ChildSpec.from_json(spec.to_json()) == spec


def test_null_fields_are_fresh_and_null():
    a, b = null_fields(), null_fields()
    a["metrics"]["x"] = 1
    a["memory"]["gpu_peak_bytes"] = 5
    assert b["metrics"] == {} and b["memory"] == dict.fromkeys(NULL_MEMORY_KEYS)
    assert b["error"] is None and b["data"] is None and b["history"] == []


def test_first_line_names_the_type_and_keeps_one_line():
    assert first_line(RuntimeError("boom\nmore")) == "RuntimeError: boom"
    assert first_line(ValueError()) == "ValueError"
