"""``milbench compare``: deltas with seed spread (paired by seed where possible),
time and memory ratios, two methods or two results directories."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from milbench.errors import MilbenchError
from milbench.records import write_record

MiB = 2**20


def record(method: str, seed: int, *, auc: float | None = None, s_per_bag: float | None = None, peak_mib: float = 800,
           bag_size: int = 10, status: str = "ok", dataset: str = "qmnist", extra_config: dict | None = None) -> dict:
    ok = status == "ok"
    return {
        "schema_version": 1, "run_id": f"r-{method}-{dataset}-{bag_size}-{seed}-{status}", "created": "2026-01-01T00:00:00+00:00",
        "status": status, "error": None if ok else "out of memory", "method": method, "dataset": dataset,
        "preset": "default", "seed": seed, "smoke": False, "supervision": "bag",
        "config": {"bag_size": bag_size, "epochs": 10, **(extra_config or {})},
        "config_hash": f"h-{method}-{bag_size}", "metrics": {"bag_auc": auc, "bag_accuracy": 0.5} if ok else {},
        "timing": {"train_s_per_bag": s_per_bag} if ok else {},
        "memory": {"gpu_peak_bytes": None, "cpu_peak_rss_bytes": int(peak_mib * MiB)},
        "environment": {}, "git": {}, "history": [], "data": {"source": "mnist"},
    }


A_AUC = {0: 0.80, 1: 0.70, 2: 0.75}
B_AUC = {0: 0.85, 1: 0.72, 2: 0.83}


@pytest.fixture
def results(tmp_path):
    for s in (0, 1, 2):
        write_record(tmp_path, record("abmil", s, auc=A_AUC[s], s_per_bag=0.10, peak_mib=1000 + s))
        write_record(tmp_path, record("grad-accum", s, auc=B_AUC[s], s_per_bag=0.25, peak_mib=500 + s,
                                      extra_config={"chunk_size": 4}))
        # at bag_size 50 abmil runs out of memory, grad-accum does not
        write_record(tmp_path, record("abmil", s, bag_size=50, status="oom", peak_mib=2000))
        write_record(tmp_path, record("grad-accum", s, auc=0.9, s_per_bag=1.0, peak_mib=510, bag_size=50,
                                      extra_config={"chunk_size": 4}))
    return tmp_path


def frame(path):
    from milbench.report import load_frame

    return load_frame(str(path))


def row(table, metric, **keys):
    sel = table[table["metric"] == metric]
    for k, v in keys.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, sel
    return sel.iloc[0]


def test_paired_deltas_and_ratios_between_methods(results):
    from milbench.compare import compare_methods

    t = compare_methods(frame(results), "abmil", "grad-accum")
    assert set(t["bag_size"]) == {10, 50}          # the swept key both share is matched on
    auc = row(t, "bag_auc", bag_size=10)
    diffs = np.array([B_AUC[s] - A_AUC[s] for s in (0, 1, 2)])
    assert auc["kind"] == "delta" and auc["pairing"] == "paired (3 seeds)"
    assert auc["delta"] == pytest.approx(diffs.mean())
    assert auc["delta_std"] == pytest.approx(diffs.std(ddof=1))
    assert auc["a_mean"] == pytest.approx(0.75) and auc["b_n"] == 3
    time_ = row(t, "train_s_per_bag", bag_size=10)
    assert time_["kind"] == "ratio" and time_["ratio"] == pytest.approx(2.5)
    mem = row(t, "peak_mib", bag_size=10)
    assert mem["ratio"] == pytest.approx(501 / 1001)
    # abmil out of memory at 50: no quality delta, the status is shown; its memory at the limit still compares
    oom = row(t, "bag_auc", bag_size=50)
    assert oom["a_n"] == 0 and math.isnan(oom["delta"]) and oom["a_status"] == "oom" and oom["a_runs"] == "3 oom"
    assert row(t, "peak_mib", bag_size=50)["ratio"] == pytest.approx(510 / 2000)
    # metrics the records lack (dice) are left out of the default set
    assert "dice" not in set(t["metric"])


def test_unpaired_spread_when_seeds_differ(tmp_path):
    from milbench.compare import compare_methods

    for s, v in ((0, 0.6), (1, 0.8)):
        write_record(tmp_path, record("abmil", s, auc=v, s_per_bag=0.1))
    for s, v in ((5, 0.7), (6, 0.9), (7, 1.0)):
        write_record(tmp_path, record("sampled", s, auc=v, s_per_bag=0.05))
    r = row(compare_methods(frame(tmp_path), "abmil", "sampled"), "bag_auc")
    assert r["pairing"] == "unpaired"
    assert r["delta"] == pytest.approx(np.mean([0.7, 0.9, 1.0]) - 0.7)
    assert r["delta_std"] == pytest.approx(math.hypot(np.std([0.6, 0.8], ddof=1), np.std([0.7, 0.9, 1.0], ddof=1)))


def test_two_result_directories(tmp_path):
    from milbench.compare import compare_dirs

    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    for s in (0, 1):
        write_record(cpu, record("abmil", s, auc=0.8, s_per_bag=0.4, peak_mib=900))
        write_record(gpu, record("abmil", s, auc=0.8 + 0.01 * s, s_per_bag=0.04, peak_mib=300))
        write_record(cpu, record("grad-accum", s, auc=0.8, s_per_bag=0.8, peak_mib=600))
    t = compare_dirs(frame(cpu), frame(gpu))
    assert set(t["method"]) == {"abmil"}            # grad-accum has no counterpart in gpu/
    assert row(t, "train_s_per_bag")["ratio"] == pytest.approx(0.1)
    assert row(t, "bag_auc")["delta"] == pytest.approx(0.005)


def test_errors_are_one_line(results, tmp_path):
    from milbench.compare import compare_dirs, compare_methods

    with pytest.raises(MilbenchError, match="no records of method 'abmill'; methods with records: abmil, grad-accum"):
        compare_methods(frame(results), "abmill", "grad-accum")
    with pytest.raises(MilbenchError, match="two different methods"):
        compare_methods(frame(results), "abmil", "abmil")
    with pytest.raises(MilbenchError, match="unknown metric 'auc'"):
        compare_methods(frame(results), "abmil", "grad-accum", ["auc"], strict=True)
    with pytest.raises(MilbenchError, match="side B has no records"):
        compare_dirs(frame(results), frame(tmp_path / "nothing"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "milbench", "compare", *args], capture_output=True, text=True)


def test_cli_formats(results, tmp_path):
    r = _cli("abmil", "grad-accum", "--results", str(results), "--format", "markdown")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| dataset | preset | bag_size | metric | abmil | grad-accum | grad-accum vs abmil |")
    auc10 = next(ln for ln in lines if "| 10 | bag_auc |" in ln)
    assert "0.750 ± 0.050" in auc10 and "+0.050 ± 0.030" in auc10 and "3 paired" in auc10
    assert any("| 10 | train_s_per_bag |" in ln and "×2.50" in ln for ln in lines)
    assert any("| 50 | bag_auc | oom |" in ln for ln in lines)

    r = _cli("abmil", "grad-accum", "--results", str(results), "--format", "csv", "--metric", "bag_auc")
    assert r.returncode == 0, r.stderr
    csv = pd.read_csv(io.StringIO(r.stdout))
    assert list(csv["metric"]) == ["bag_auc", "bag_auc"] and list(csv["bag_size"]) == [10, 50]

    out = tmp_path / "c.json"
    r = _cli("abmil", "grad-accum", "--results", str(results), "--format", "json", "-o", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert {d["metric"] for d in data} == {"bag_auc", "bag_accuracy", "train_s_per_bag", "peak_mib"}

    r = _cli("abmil", "grad-accum", "--results", str(results))
    assert r.returncode == 0 and "grad-accum" in r.stdout and "×2.50" in r.stdout

    r = _cli(str(results), "abmil")
    assert r.returncode == 2 and "is a directory but 'abmil' is not" in r.stderr
