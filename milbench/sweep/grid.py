"""A sweep's grid: what the user asked for, expanded into resolved points.

A sweep is the Cartesian product methods × datasets × grid values × seeds.
Every point is resolved with :func:`milbench.runner.plan_run` before anything
runs, so a bad name, key or value is one line and no time is lost. A point's
identity is defined here once (:data:`POINT_FIELDS`, :func:`point_key`): the
resolved config, not the command line, decides whether two runs are the same
point — for resume, for de-duplicating the grid, and for the report's "one
outcome per point".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from milbench.errors import ConfigError, MilbenchError, unknown_name
from milbench.runner import RunPlan, plan_run

#: The record fields that identify a sweep point: the resolved config's hash, the seed, and --smoke.
POINT_FIELDS = ("config_hash", "seed", "smoke")

#: A point's identity: (config hash, seed, smoke).
PointKey = tuple[str, int, bool]


# --------------------------------------------------------------------------- parsing the command line

def parse_names(text: str | Sequence[str], what: str, valid: Iterable[str]) -> list[str]:
    """``a,b`` (or ``all``) → names, each checked against ``valid``; duplicates dropped.

    Checked here rather than by ``plan_run`` so the error lists every valid
    name at once, before the grid is expanded.
    """
    items = [t.strip() for part in ([text] if isinstance(text, str) else text) for t in part.split(",")]
    items = [t for t in items if t]
    valid = sorted(valid)
    if not items:
        raise MilbenchError(f"no {what} given; valid: {', '.join(valid) or '(none)'} or all")
    out: list[str] = []
    for name in items:
        names = valid if name == "all" else [name]
        for n in names:
            if n not in valid:
                raise unknown_name(what, n, valid)
            if n not in out:
                out.append(n)
    return out


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``0,1,2`` or ``0-4`` (inclusive) or a mix → sorted unique non-negative seeds."""
    if not isinstance(text, str):
        seeds = [int(s) for s in text]
    else:
        seeds = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    seeds.extend(range(int(lo), int(hi) + 1))
                else:
                    seeds.append(int(part))
            except ValueError:
                raise MilbenchError(f"bad --seeds {text!r}; valid: comma-separated integers or ranges, e.g. 0,1,2 or 0-4") from None
    if not seeds or any(s < 0 for s in seeds):
        raise MilbenchError(f"bad --seeds {text!r}: need at least one seed, all >= 0")
    return sorted(set(seeds))


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``--grid key=v1,v2`` items → {key: [values]} (order kept).

    Values are split on ``;`` when the text has one (for values that contain
    commas themselves, e.g. ``pool_fractions=0.5,0.2,0.3;0.6,0.1,0.3``), else on
    ``,``. Values stay strings: each key's declared type parses them, exactly
    as ``--set`` does.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"bad --grid {item!r}: expected key=v1,v2,... e.g. bag_size=10,50,100")
        key, text = (s.strip() for s in item.split("=", 1))
        values = [v.strip() for v in text.split(";" if ";" in text else ",") if v.strip()]
        if not key or not values:
            raise ConfigError(f"bad --grid {item!r}: expected key=v1,v2,... with at least one value")
        if key in grid:
            raise ConfigError(f"--grid names '{key}' twice; give all its values in one --grid {key}=v1,v2")
        grid[key] = list(dict.fromkeys(values))
    return grid


# --------------------------------------------------------------------------- the grid

@dataclass
class SweepSpec:
    """What a user asked for; its hash names the sweep so a resumed sweep keeps its id."""

    methods: list[str]
    datasets: list[str]
    grid: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)
    smoke: bool = False

    @property
    def sweep_id(self) -> str:
        blob = json.dumps({"methods": sorted(self.methods), "datasets": sorted(self.datasets),
                           "grid": {k: list(v) for k, v in sorted(self.grid.items())}, "seeds": sorted(self.seeds),
                           "preset": self.preset, "overrides": sorted(self.overrides), "smoke": self.smoke},
                          sort_keys=True)
        return "sw-" + hashlib.sha256(blob.encode()).hexdigest()[:10]

    def as_dict(self) -> dict[str, Any]:
        return {"methods": self.methods, "datasets": self.datasets, "grid": self.grid, "seeds": self.seeds,
                "preset": self.preset, "overrides": self.overrides, "smoke": self.smoke}


def _missing(value: Any) -> bool:
    """None, or the NaN pandas puts where a record had no value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def point_key(obj: RunPlan | Mapping[str, Any]) -> PointKey:
    """The identity resume compares: (config hash, seed, smoke) of a plan, a record, or a
    report row (a missing seed counts as 0, a missing smoke flag as a real run)."""
    if isinstance(obj, RunPlan):
        return (obj.config_hash, int(obj.seed), bool(obj.smoke))
    config_hash, seed, smoke = (None if _missing(obj.get(k)) else obj.get(k) for k in POINT_FIELDS)
    return (str(config_hash), int(seed or 0), bool(smoke))


@dataclass
class Point:
    """One resolved point of a sweep."""

    plan: RunPlan
    values: dict[str, str]
    index: int

    @property
    def key(self) -> PointKey:
        return point_key(self.plan)

    @property
    def label(self) -> str:
        parts = [self.plan.method, self.plan.dataset] + [f"{k}={v}" for k, v in self.values.items()]
        return " · ".join(parts) + f" · seed {self.plan.seed}"


def expand(registry: Any, spec: SweepSpec, results: Path | None = None) -> list[Point]:
    """Resolve every point of the grid (methods × datasets × grid × seeds).

    Raises the first :class:`MilbenchError`, prefixed with the combination
    that caused it, before any point runs. Points whose resolved config is
    identical (a grid value equal to a default another point already uses)
    are kept once.
    """
    for key in spec.grid:
        for text in spec.overrides:
            if text.split("=", 1)[0].strip() == key:
                raise ConfigError(f"'{key}' is both --set and --grid; keep one")
    points: list[Point] = []
    seen: set[PointKey] = set()
    keys = list(spec.grid)
    for method, dataset in itertools.product(spec.methods, spec.datasets):
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            overrides = list(spec.overrides) + [f"{k}={v}" for k, v in values.items()]
            for seed in spec.seeds:
                try:
                    plan = plan_run(registry, method, dataset, spec.preset, overrides, seed, spec.smoke, results)
                except MilbenchError as exc:
                    where = f"{method} on {dataset}" + (f" with {', '.join(f'{k}={v}' for k, v in values.items())}"
                                                        if values else "")
                    raise type(exc)(f"{where}: {exc}") from None
                if point_key(plan) in seen:
                    continue
                seen.add(point_key(plan))
                points.append(Point(plan, values, len(points)))
    return points
