"""Config keys, their validation, and the resolution order of a run's config.

Every key a run accepts is declared once as a :class:`Param` by the harness, a
dataset or a method. A run's config is one flat dict resolved in this order
(later wins):

1. declared defaults (harness, then dataset, then method),
2. the dataset's ``defaults`` overrides, then the method's,
3. the preset (dataset's entry, then method's),
4. ``--smoke`` overlays (harness, dataset, method),
5. ``--set key=value``.

The resolved dict is validated and hashed; the hash is what sweeps resume on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from milbench.errors import ConfigError, did_you_mean

_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str"}


@dataclass(frozen=True)
class Param:
    """One config key: its default, type and valid range.

    ``low``/``high`` bound numbers (``low_open``/``high_open`` make a bound
    exclusive); ``choices`` restricts strings; ``nullable`` allows ``None``
    (written ``none`` on the command line).
    """

    default: Any
    type: type
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    #: Where ``milbench tune`` searches this key: ``("log", low, high)`` or
    #: ``("float", low, high)`` or ``("int", low, high)`` or ``("choice", a, b, ...)``;
    #: ``None``: not a learning key, never tuned.
    search: tuple[Any, ...] | None = None

    def describe(self) -> str:
        """A short human description of what values are valid."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        t = _TYPE_NAMES.get(self.type, self.type.__name__)
        if self.low is None and self.high is None:
            return t + (" or none" if self.nullable else "")
        lo = "" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        if self.low is not None and self.high is not None:
            rng = f"in {lo}, {hi}"
        elif self.low is not None:
            rng = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            rng = f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{t} {rng}" + (" or none" if self.nullable else "")

    def parse(self, key: str, text: str) -> Any:
        """Parse a ``--set`` string into this key's type, then validate it."""
        if self.nullable and text.strip().lower() in ("none", "null"):
            return None
        try:
            if self.type is bool:
                low = text.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    value: Any = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ValueError(text)
            elif self.type is int:
                value = int(text)
            elif self.type is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise ConfigError(f"bad value for '{key}': {text!r} is not {self.describe()}") from None
        return self.validate(key, value)

    def validate(self, key: str, value: Any) -> Any:
        """Check a value (already typed) and return it, coerced where lossless."""
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"bad value for '{key}': none is not allowed; valid: {self.describe()}")
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise ConfigError(f"bad value for '{key}': {value!r} is not {self.describe()}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"bad value for '{key}': {value!r}{did_you_mean(str(value), self.choices)}; valid: {self.describe()}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ConfigError(f"bad value for '{key}': {value!r} is out of range; valid: {self.describe()}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ConfigError(f"bad value for '{key}': {value!r} is out of range; valid: {self.describe()}")
        return value


@dataclass(frozen=True)
class AutoParam(Param):
    """An int key that also takes ``auto``: the plugin picks the value when it
    sees what it needs to (the data found, the memory budget), and says in the
    record what it picked. A Param of one type cannot say "int or auto", and a
    string key would lose the integer check, so this one parses both."""

    def describe(self) -> str:
        return "'auto' or " + super().describe()

    def parse(self, key: str, text: str) -> Any:
        if text.strip().lower() == "auto":
            return "auto"
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"bad value for '{key}': {text!r} is not {self.describe()}") from None
        return self.validate(key, value)

    def validate(self, key: str, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str):
            raise ConfigError(f"bad value for '{key}': {value!r} is not {self.describe()}")
        return super().validate(key, value)


def resolve(
    params: Mapping[str, Param],
    layers: list[tuple[str, Mapping[str, Any]]],
    overrides: list[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Resolve a flat config from declared params, overlay layers and ``--set``.

    ``layers`` are (name, mapping) pairs applied in order; a layer may only set
    declared keys (a plugin's preset that names an unknown key is a bug in the
    plugin and is reported with the layer's name). ``overrides`` are
    ``key=value`` strings (parsed by each key's type) or an already typed mapping.
    """
    config = {k: p.default for k, p in params.items()}
    for layer_name, layer in layers:
        for key, value in layer.items():
            if key not in params:
                raise ConfigError(f"{layer_name} sets unknown key '{key}'{did_you_mean(key, params)}")
            config[key] = params[key].validate(key, value)
    items: list[tuple[str, Any, bool]] = []
    if isinstance(overrides, Mapping):
        items = [(k, v, False) for k, v in overrides.items()]
    else:
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"bad --set {text!r}: expected key=value; valid keys: {', '.join(sorted(params))}")
            k, v = text.split("=", 1)
            items.append((k.strip(), v.strip(), True))
    for key, value, is_text in items:
        if key not in params:
            raise ConfigError(f"unknown config key '{key}'{did_you_mean(key, params)}; valid keys: {', '.join(sorted(params))}")
        config[key] = params[key].parse(key, value) if is_text else params[key].validate(key, value)
    return config


def config_hash(config: Mapping[str, Any], method: str, dataset: str) -> str:
    """A stable 16-hex-digit hash of method, dataset and the resolved config."""
    blob = json.dumps({"method": method, "dataset": dataset, "config": dict(config)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
