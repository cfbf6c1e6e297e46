"""No traceback, ever — proven by search, not by example.

A Hypothesis property test: draw a method × dataset × up to three ``--set`` keys
from their *declared* ``Param`` ranges (edges: smallest, largest, just inside
an open bound, odd sizes, ``none``, every choice, a bogus free-form string),
run the real CLI (``milbench run ... --smoke --results TMP``) in a subprocess
and check what a user would see:

- the exit status is 0 (ran) or 2 (bad input: one ``milbench: error:`` line,
  the last line on stderr);
- no ``Traceback`` anywhere in stdout or stderr;
- every child that started (it has a log under ``RESULTS/logs``) left exactly
  one record, and exit 0 means that record is ``ok``.

Each example sets one key that shapes the data or the model (:data:`GEOMETRY`)
and up to two more declared keys. ``MILBENCH_HYPOTHESIS_LOG=FILE`` appends one
JSON line per example (command, exit status, record status, error line).

A run that exceeds the per-example ``--timeout`` is status ``timeout`` (exit 1):
that example was too expensive for the budget, not a bug, and is rejected.

Budget (2-core CI): the ``ci`` profile runs :data:`CI_EXAMPLES` derandomised
examples (the same ones every time, ~3 minutes). A larger search:

    MILBENCH_HYPOTHESIS_PROFILE=search MILBENCH_HYPOTHESIS_EXAMPLES=150 \\
        MILBENCH_DATA_ROOT=../shared/data python -m pytest -q tests/test_no_traceback.py

(random seed each time; the falsifying example is printed with ``--set`` flags
that reproduce it). The results README records the last such run.

"Largest" for a key without a declared upper bound, and for one whose bound is
far above the smoke value, is capped at :data:`CAP` × the smoke value (env
``MILBENCH_HYPOTHESIS_CAP``) so one example stays seconds long.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import run_cli  # noqa: E402

CI_EXAMPLES = 8
CAP = float(os.environ.get("MILBENCH_HYPOTHESIS_CAP", "4"))
#: Seconds one example may run before it is stopped (status timeout → rejected, not failed).
EXAMPLE_TIMEOUT = float(os.environ.get("MILBENCH_HYPOTHESIS_TIMEOUT", "120"))
#: Keys that decide shapes and sizes — where the crashes live; drawn half of the time.
GEOMETRY = ("bag_size", "instance_size", "patch_size", "stride", "tile_size", "tile_shape", "chunk_size",
            "bag_size_std", "key_fraction", "sample_fraction", "trunk_depth", "head_pool", "inst_k", "encoder",
            "n_val_bags", "n_test_bags", "image_scale", "trunk", "backbone", "vote_samples", "eval_batch")

settings.register_profile("ci", max_examples=int(os.environ.get("MILBENCH_HYPOTHESIS_EXAMPLES", CI_EXAMPLES)),
                          deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("search", max_examples=int(os.environ.get("MILBENCH_HYPOTHESIS_EXAMPLES", 150)),
                          deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                 HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("MILBENCH_HYPOTHESIS_PROFILE", "ci")


def _registry_and_params() -> tuple[list[str], list[str], dict[str, dict[str, Any]]]:
    """Methods, datasets, and per (method, dataset) the declared params and the smoke config."""
    from milbench.plugins import get_registry
    from milbench.runner import plan_run

    from milbench.protocol import PROTOCOL_PARAMS as harness
    reg = get_registry()
    methods, datasets = sorted(reg.methods), sorted(reg.datasets)
    table: dict[str, dict[str, Any]] = {}
    for m in methods:
        for d in datasets:
            params = {**harness, **reg.datasets[d].params, **reg.methods[m].params}
            try:
                smoke = plan_run(reg, m, d, smoke=True).config
            except Exception:  # a combination refused as is: still drawn, its defaults stand in
                smoke = {k: p.default for k, p in params.items()}
            table[f"{m}|{d}"] = {"params": params, "smoke": smoke}
    return methods, datasets, table


METHODS, DATASETS, TABLE = _registry_and_params()


def _text(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def values_for(p: Any, smoke_value: Any) -> st.SearchStrategy[str]:
    """Edge values of one declared Param, as ``--set`` text."""
    out: list[Any] = []
    if p.nullable:
        out.append(None)
    if p.choices:
        return st.sampled_from(list(p.choices) + out).map(_text)
    if p.type is bool:
        return st.sampled_from([True, False]).map(_text)
    if p.type is str:  # free-form: the value in force, and something no data or model has
        return st.sampled_from([smoke_value if smoke_value is not None else p.default, "zzz-not-a-thing"] + out
                               ).map(_text)
    base = smoke_value if isinstance(smoke_value, (int, float)) and not isinstance(smoke_value, bool) else p.default
    base = base if isinstance(base, (int, float)) else 1
    if p.type is int:
        low = int(p.low) + (1 if p.low_open else 0) if p.low is not None else 0
        cap = max(low + 3, int(CAP * max(int(base), 1)))
        high = min(int(p.high) - (1 if p.high_open else 0), cap) if p.high is not None else cap
        high = max(high, low)
        out += [low, low + 1, high, base, *(v for v in (3, 5, 7, 9, 15, 17, 31, 33) if low <= v <= high)]
        out = [v for v in out if v is None or low <= v <= high]
        return st.one_of(st.sampled_from(out), st.integers(low, high)).map(_text)
    # float
    eps = 1e-3
    low = float(p.low) + (eps if p.low_open else 0.0) if p.low is not None else 0.0
    high = float(p.high) - (eps if p.high_open else 0.0) if p.high is not None else max(CAP * abs(float(base)), low + 1)
    out += [low, high, float(base), (low + high) / 2, low + 1e-6 if low + 1e-6 <= high else low]
    return st.sampled_from(out).map(_text)


@st.composite
def cli_points(draw: st.DrawFn) -> tuple[str, str, list[str], int]:
    method = draw(st.sampled_from(METHODS))
    dataset = draw(st.sampled_from(DATASETS))
    entry = TABLE[f"{method}|{dataset}"]
    params, smoke = entry["params"], entry["smoke"]
    keys_all = sorted(params)
    geometry = [k for k in GEOMETRY if k in params]
    # the first key shapes the data or the model (where crashes live), up to two more are any declared key
    keys: list[str] = [draw(st.sampled_from(geometry or keys_all))]
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(keys_all))
        if key not in keys:
            keys.append(key)
    sets = [f"{k}={draw(values_for(params[k], smoke.get(k)))}" for k in keys]
    seed = draw(st.sampled_from([0, 1, 7]))
    return method, dataset, sets, seed


@pytest.mark.slow
@settings(settings.get_profile(PROFILE))
@given(point=cli_points())
def test_cli_run_never_shows_a_traceback(point, tmp_path_factory, data_root):
    method, dataset, sets, seed = point
    results = tmp_path_factory.mktemp("prop")
    args = ["run", "-m", method, "-d", dataset, "--smoke", "--device", "cpu", "--seed", str(seed),
            "--results", str(results), "--timeout", str(EXAMPLE_TIMEOUT)]
    for s in sets:
        args += ["--set", s]
    note("milbench " + " ".join(args))
    res = run_cli(*args, env={"OMP_NUM_THREADS": "1", "MILBENCH_DATA_ROOT": str(data_root)},
                  timeout=EXAMPLE_TIMEOUT + 60)
    records = [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))]
    logs = sorted((Path(results) / "logs").glob("*.log")) if (Path(results) / "logs").is_dir() else []
    if res.returncode == 1 and records and records[0]["status"] == "timeout":
        assume(False)  # too expensive for this budget, not a bug
    if os.environ.get("MILBENCH_HYPOTHESIS_LOG"):  # one JSON line per example, for the results README
        with open(os.environ["MILBENCH_HYPOTHESIS_LOG"], "a") as log:
            log.write(json.dumps({"args": args[1:], "exit": res.returncode,
                                  "status": records[0]["status"] if records else None,
                                  "error": (res.stderr.strip().splitlines() or [""])[-1][:200]
                                  if res.returncode else None}) + "\n")
    both = res.stdout + res.stderr
    assert "Traceback" not in both, both[-3000:]
    assert res.returncode in (0, 2), (
        f"exit {res.returncode}; record: {records[0].get('status') if records else None} "
        f"{(records[0].get('error') if records else '')!r}\n{(records[0].get('traceback') or '')[-2000:] if records else ''}"
        f"\n{res.stderr[-2000:]}")
    assert len(records) == len(logs), f"{len(logs)} child(ren) started, {len(records)} record(s)"
    assert len(records) <= 1
    if res.returncode == 0:
        assert len(records) == 1 and records[0]["status"] == "ok", records
    else:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("milbench: error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], res.stderr[-2000:]
        if records:  # bad input found inside the child: kept, and marked as such
            assert records[0].get("error_kind") == "input", records[0].get("error")
