"""Report tables in every format from a handful of records."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from milbench.records import write_record


def _rec(run_id, method, dataset, seed, status="ok", auc=0.9, rss=500, smoke=False, bag_size=20, source="full"):
    return {
        "schema_version": 1, "run_id": run_id, "created": "2026-11-23T00:00:00+00:00", "status": status,
        "error": None if status == "ok" else "boom", "method": method, "dataset": dataset, "preset": "default",
        "config": {"bag_size": bag_size, "lr": 1e-4}, "config_hash": f"h{method}{dataset}{bag_size}", "seed": seed,
        "supervision": "bag", "smoke": smoke, "data": {"source": source},
        "metrics": {"bag_auc": auc, "bag_accuracy": auc - 0.1, "dice": None} if status == "ok" else {},
        "timing": {"train_s_per_bag": 0.01 * (seed + 1), "total_s": 10.0},
        "memory": {"gpu_peak_bytes": None, "cpu_peak_rss_bytes": rss * 2**20}, "environment": {}, "git": {},
        "history": [],
    }


@pytest.fixture
def results(tmp_path):
    recs = [
        _rec("a0", "abmil", "qmnist", 0, auc=0.90), _rec("a1", "abmil", "qmnist", 1, auc=0.94),
        _rec("g0", "grad-accum", "qmnist", 0, auc=0.92, rss=300),
        _rec("g1", "grad-accum", "qmnist", 1, status="oom", rss=2000),
        _rec("i0", "abmil", "imagenette", 0, status="failed"),
        _rec("s0", "abmil", "qmnist", 5, smoke=True, auc=0.1),
    ]
    for r in recs:
        write_record(tmp_path, r)
    (tmp_path / "garbage.json").write_text("{not json")
    return tmp_path


def test_summary_mean_std_and_statuses(results):
    from milbench.report import load_frame, summarize

    s = summarize(load_frame(str(results)), ["bag_auc", "peak_mib"])
    cell = s[(s.method == "abmil") & (s.dataset == "qmnist") & (s.metric == "bag_auc")].iloc[0]
    assert cell["mean"] == pytest.approx(0.92) and cell["n"] == 2 and cell["std"] == pytest.approx(0.028284, abs=1e-5)
    ga = s[(s.method == "grad-accum") & (s.metric == "bag_auc")].iloc[0]
    assert ga["runs"] == "1 ok, 1 oom" and ga["n"] == 1
    failed = s[(s.dataset == "imagenette") & (s.metric == "bag_auc")].iloc[0]
    assert failed["cell"] == "failed" and failed["runs"] == "1 failed"


def test_smoke_excluded_unless_asked(results):
    from milbench.report import load_frame

    assert "s0" not in set(load_frame(str(results))["run_id"])
    assert "s0" in set(load_frame(str(results), include_smoke=True)["run_id"])


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_report_formats(results, fmt):
    res = run_cli("report", "--results", str(results), "--format", fmt)
    assert res.returncode == 0, res.stderr
    assert "skipping" in res.stderr and "garbage.json" in res.stderr  # bad file warned, rest printed
    out = res.stdout
    assert "abmil" in out and "grad-accum" in out
    if fmt == "markdown":
        assert out.startswith("| method |") and "0.920 ± 0.028" in out and "1 ok, 1 oom" in out
    if fmt == "csv":
        assert out.splitlines()[0].startswith("row,method,preset,dataset")
    if fmt == "json":
        rows = json.loads(out)
        assert any(r["method"] == "grad-accum" and r["runs"] == "1 ok, 1 oom" for r in rows)
    if fmt == "table":
        assert "0.920 ± 0.028" in out


def test_swept_key_becomes_row(tmp_path):
    from milbench.report import load_frame, summarize

    for i, bs in enumerate((16, 64)):
        write_record(tmp_path, _rec(f"r{i}", "abmil", "qmnist", 0, bag_size=bs))
    s = summarize(load_frame(str(tmp_path)), ["bag_auc"])
    assert sorted(s["row"]) == ["abmil [bag_size=16]", "abmil [bag_size=64]"]


def test_int_key_set_in_some_runs_only_is_labelled_as_int(tmp_path):
    """A key missing from some records makes pandas hold the others as floats;
    the row label must still say patch_size=32, not 32.0."""
    from milbench.report import load_frame, summarize

    plain, patched = _rec("p0", "abmil", "qmnist", 0), _rec("p1", "abmil", "qmnist", 0)
    patched["config"] = {**patched["config"], "patch_size": 32}
    patched["config_hash"] = "hpatched"
    for r in (plain, patched):
        write_record(tmp_path, r)
    rows = sorted(summarize(load_frame(str(tmp_path)), ["bag_auc"])["row"])
    assert rows == ["abmil", "abmil [patch_size=32]"]


def test_method_key_added_after_a_record_was_written_takes_its_declared_default(tmp_path):
    """transcriptome-cnn declared ``bag_score`` (default max) after two of a cell's seeds ran: the older
    records lack the key, and the cell stays one row of three seeds instead of splitting on nan vs max."""
    from milbench.report import load_frame, summarize

    for seed in (0, 1, 2):
        r = _rec(f"t{seed}", "transcriptome-cnn", "imagenette", seed)
        if seed == 2:
            r["config"] = {**r["config"], "bag_score": "max"}
        write_record(tmp_path, r)
    mean = _rec("t3", "transcriptome-cnn", "imagenette", 0)
    mean["config"] = {**mean["config"], "bag_score": "mean"}
    write_record(tmp_path, mean)
    df = load_frame(str(tmp_path))
    assert sorted(df["config.bag_score"]) == ["max", "max", "max", "mean"]
    s = summarize(df, ["bag_auc"])
    assert sorted(s["row"]) == ["transcriptome-cnn [bag_score=max]", "transcriptome-cnn [bag_score=mean]"]
    assert sorted(s["runs"]) == ["1 ok", "3 ok"]


def test_unknown_metric_is_one_line(results):
    res = run_cli("report", "--results", str(results), "--metric", "bag_aux")
    assert res.returncode == 2 and "unknown metric 'bag_aux'" in res.stderr and "Traceback" not in res.stderr
