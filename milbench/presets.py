"""Named presets written to disk (by ``milbench tune``) and read back by ``run --preset``.

A built-in preset lives in a plugin (``Method.presets``/``Dataset.presets``).
A tuned preset belongs to one method on one dataset and lives beside the
results it was tuned on: ``RESULTS/presets/<name>.json``::

    {"kind": "preset", "name": "tuned-grad-accum-imagenette", "method": "grad-accum", "dataset": "imagenette",
     "values": {"lr": 0.0012, "weight_decay": 0.003, "dropout": 0.1},
     "tuned": {"study": ..., "trials": 20, "best_trial": 7, "objective": "val_bag_auc", ...}}

(``kind`` tells ``milbench report``, which reads every ``.json`` under the results, that the file is
not a run record.)

``values`` are applied as the preset layer of the config (``--set`` still
wins), so a tuned preset may set protocol learning keys for its own method:
every method is tuned with the same number of trials over the same protocol
keys, which keeps the comparison fair.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from milbench.errors import ConfigError

PRESETS_DIR = "presets"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def preset_path(results: Path, name: str) -> Path:
    """Where a named preset of this results folder lives."""
    if not _NAME.match(name):
        raise ConfigError(f"bad preset name {name!r}: use letters, digits, '.', '_' and '-'")
    return Path(results) / PRESETS_DIR / f"{name}.json"


def saved_presets(results: Path | None) -> list[str]:
    """Names of the presets saved under ``results`` (sorted)."""
    if results is None or not (Path(results) / PRESETS_DIR).is_dir():
        return []
    return sorted(p.stem for p in (Path(results) / PRESETS_DIR).glob("*.json"))


def load_preset(results: Path | None, name: str, method: str, dataset: str) -> dict[str, Any] | None:
    """The values of a saved preset for this method and dataset: ``name`` is a
    preset saved under ``results`` or a path to a preset ``.json`` file (to
    use a preset tuned in another results folder); ``None`` if no file by
    that name exists. A preset tuned for another method or dataset
    is a one-line error (its values would mean something else there)."""
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"preset file {name} does not exist")
    else:
        if results is None:
            return None
        try:
            path = preset_path(results, name)
        except ConfigError:
            return None
        if not path.is_file():
            return None
    try:
        doc = json.loads(path.read_text())
        values = doc["values"]
        if not isinstance(values, dict):
            raise TypeError("values is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"preset file {path} does not parse ({exc}); expected JSON with a 'values' object") from None
    for what, want in (("method", method), ("dataset", dataset)):
        have = doc.get(what)
        if have is not None and have != want:
            raise ConfigError(f"preset '{name}' was tuned for {what} '{have}', not '{want}' ({path})")
    return values


def save_preset(results: Path, name: str, method: str, dataset: str, values: Mapping[str, Any],
                tuned: Mapping[str, Any] | None = None) -> Path:
    """Write a preset atomically; return its path."""
    from milbench.records import write_json_atomic

    path = preset_path(results, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"kind": "preset", "name": name, "method": method, "dataset": dataset, "values": dict(values),
                             "tuned": dict(tuned or {})})
    return path
