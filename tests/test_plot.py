"""``milbench plot``: the figures carry the right series, OOM points are marked,
and files are written in the format their extension names."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from milbench.errors import MilbenchError
from milbench.records import write_record

MiB = 2**20


def record(method: str, bag_size: int, seed: int, status: str = "ok", *, peak_mib: float | None = None,
           s_per_bag: float | None = None, auc: float | None = None, limit_mib: float | None = None,
           dataset: str = "qmnist", gpu: bool = False) -> dict:
    """A record shaped like the ones ``execute`` writes (only the fields the plots read are real numbers)."""
    run_id = f"20260101T000000-{method}-{dataset}-s{seed}-b{bag_size}"
    mem = {"device": "cuda:0" if gpu else "cpu", "gpu_peak_bytes": int(peak_mib * MiB) if gpu and peak_mib else None,
           "gpu_peak_method": "nvml-process" if gpu else None, "torch_peak_allocated_bytes": None,
           "torch_peak_reserved_bytes": None, "cpu_peak_rss_bytes": int((peak_mib or 0) * MiB) if not gpu and peak_mib else 700 * MiB,
           "max_memory_bytes": int(limit_mib * MiB) if limit_mib else None}
    ok = status == "ok"
    return {
        "schema_version": 1, "run_id": run_id, "created": "2026-01-01T00:00:00+00:00", "status": status,
        "error": None if ok else ("MemoryLimitExceeded: resident memory crossed --max-memory" if status == "oom" else "boom"),
        "method": method, "dataset": dataset, "preset": "default", "seed": seed, "smoke": False, "supervision": "bag",
        "config": {"bag_size": bag_size, "instance_size": 28, "epochs": 10, "lr": 5e-4},
        "config_hash": f"h-{method}-{dataset}-{bag_size}",
        "metrics": {"bag_auc": auc, "bag_accuracy": 0.5, "dice": 0.1} if ok else {},
        "timing": {"train_s_per_bag": s_per_bag, "train_s": (s_per_bag or 0) * 200, "wall_s": 30.0} if ok else {"wall_s": 5.0},
        "memory": mem, "environment": {"cpu": "test cpu", "gpu": "A100" if gpu else None}, "git": {}, "history": [],
        "data": {"source": "mnist"},
    }


@pytest.fixture
def sweep_dir(tmp_path):
    """abmil: memory grows with the bag and the largest bag is out of memory;
    grad-accum: flat memory, one failed point at the largest bag."""
    for seed in (0, 1):
        for b in (10, 50, 100):
            write_record(tmp_path, record("abmil", b, seed, peak_mib=800 + 4 * b + seed, s_per_bag=0.01 * b,
                                          auc=0.7 + b / 1000 + seed * 0.01))
            write_record(tmp_path, record("grad-accum", b, seed, peak_mib=760 + seed, s_per_bag=0.02 * b,
                                          auc=0.7 + b / 1000 + seed * 0.01))
        write_record(tmp_path, record("abmil", 200, seed, "oom", peak_mib=1500, limit_mib=1500))
        write_record(tmp_path, record("grad-accum", 200, seed, peak_mib=761, s_per_bag=4.0, auc=0.9))
    write_record(tmp_path, record("grad-accum", 400, 0, "failed", peak_mib=900))
    return tmp_path


def frame(path):
    from milbench.report import load_frame

    return load_frame(str(path))


def by_gid(ax, prefix: str) -> dict[str, object]:
    return {a.get_gid(): a for a in ax.get_lines() if (a.get_gid() or "").startswith(prefix)}


def test_scaling_figure_has_one_line_per_method_and_marks_oom(sweep_dir):
    from milbench.plotting import scaling_figure

    fig = scaling_figure(frame(sweep_dir), "bag_size")
    mem_ax, time_ax = fig.axes[:2]
    assert "peak CPU resident memory" in mem_ax.get_ylabel() and mem_ax.get_xlabel() == "bag_size"
    assert "time per bag" in time_ax.get_ylabel()
    for ax in (mem_ax, time_ax):
        lines = by_gid(ax, "line:")
        assert set(lines) == {"line:abmil", "line:grad-accum"}
        assert list(lines["line:abmil"].get_xdata()) == [10, 50, 100]       # the oom point is not a point
        assert list(lines["line:grad-accum"].get_xdata()) == [10, 50, 100, 200]  # failed 400 is not either
        oom = by_gid(ax, "oom:")
        assert set(oom) == {"oom:abmil"} and list(oom["oom:abmil"].get_xdata()) == [200]
        assert oom["oom:abmil"].get_marker() == "x"
        assert oom["oom:abmil"].get_color() == lines["line:abmil"].get_color()  # whose oom it is
        failed = by_gid(ax, "failed:")
        assert set(failed) == {"failed:grad-accum"} and list(failed["failed:grad-accum"].get_xdata()) == [400]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert {"abmil", "grad-accum", "abmil: out of memory", "grad-accum: failed / timeout"} <= set(legend)
    # means over the two seeds
    np.testing.assert_allclose(by_gid(mem_ax, "line:")["line:abmil"].get_ydata(), [840.5, 1000.5, 1200.5])
    np.testing.assert_allclose(by_gid(time_ax, "line:")["line:grad-accum"].get_ydata(), [0.2, 1.0, 2.0, 4.0])
    # the --max-memory limit the oom runs hit is drawn on the memory panel only
    assert [a.get_gid() for a in mem_ax.get_lines() if a.get_gid() == "limit"] == ["limit"]
    np.testing.assert_allclose([a for a in mem_ax.get_lines() if a.get_gid() == "limit"][0].get_ydata(), [1500, 1500])
    assert not [a for a in time_ax.get_lines() if a.get_gid() == "limit"]


def test_scaling_log_axes_and_other_metrics(sweep_dir):
    from milbench.plotting import scaling_figure

    fig = scaling_figure(frame(sweep_dir), "bag_size", ["bag_auc"], logx=True, logy=True)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and ax.get_ylabel() == "bag_auc"
    np.testing.assert_allclose(by_gid(ax, "line:")["line:abmil"].get_ydata(), [0.715, 0.755, 0.805])


def test_gpu_records_label_the_memory_axis_as_nvml(tmp_path):
    from milbench.plotting import scaling_figure

    for b in (10, 20):
        write_record(tmp_path, record("abmil", b, 0, peak_mib=1000 + b, s_per_bag=0.1, auc=0.8, gpu=True))
    ax = scaling_figure(frame(tmp_path), "bag_size").axes[0]
    assert "GPU" in ax.get_ylabel() and "NVML" in ax.get_ylabel()
    np.testing.assert_allclose(by_gid(ax, "line:")["line:abmil"].get_ydata(), [1010, 1020])


def test_tradeoff_figure_one_point_per_configuration(sweep_dir):
    from milbench.plotting import tradeoff_figure

    fig = tradeoff_figure(frame(sweep_dir), "bag_auc")
    (ax,) = fig.axes
    lines = by_gid(ax, "line:")
    assert set(lines) == {"line:abmil", "line:grad-accum"}
    assert len(lines["line:abmil"].get_xdata()) == 3          # bag sizes 10, 50, 100 ok; 200 oom has no metric
    assert len(lines["line:grad-accum"].get_xdata()) == 4
    np.testing.assert_allclose(sorted(lines["line:abmil"].get_xdata()), [840.5, 1000.5, 1200.5])
    notes = {t.get_text() for t in ax.texts}
    assert {"bag_size=10", "bag_size=200"} <= notes
    assert ax.get_ylabel() == "bag_auc" and "memory" in ax.get_xlabel()


def test_bad_inputs_are_one_line_errors(sweep_dir, tmp_path):
    from milbench.plotting import save, scaling_figure, tradeoff_figure

    df = frame(sweep_dir)
    with pytest.raises(MilbenchError, match="no config key 'bag_sz' in these records; swept: bag_size"):
        scaling_figure(df, "bag_sz")
    with pytest.raises(MilbenchError, match="unknown metric 'auc'"):
        tradeoff_figure(df, "auc")
    with pytest.raises(MilbenchError, match="extension must be one of"):
        save(scaling_figure(df, "bag_size"), tmp_path / "x.jpg")
    with pytest.raises(MilbenchError, match="no records"):
        scaling_figure(frame(tmp_path / "empty"), "bag_size")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "milbench", "plot", *args], capture_output=True, text=True)


def test_cli_writes_png_and_svg(sweep_dir, tmp_path):
    png, svg = tmp_path / "out" / "scaling.png", tmp_path / "tradeoff.svg"
    r = _cli("--results", str(sweep_dir), "--x", "bag_size", "--logx", "-o", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = _cli("--results", str(sweep_dir), "--kind", "tradeoff", "--metric", "bag_auc", "--method", "abmil",
             "-o", str(svg))
    assert r.returncode == 0, r.stderr
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    r = _cli("--results", str(sweep_dir), "--method", "nope", "-o", str(png))
    assert r.returncode == 2 and "no records with method nope; present: abmil, grad-accum" in r.stderr
