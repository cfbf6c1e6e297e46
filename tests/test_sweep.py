"""``milbench sweep``: grid expansion, resume, interruption, out-of-memory points.

The slow tests run real ``--smoke`` points (abmil × qmnist, a few seconds each
plus torch's import) through the CLI in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from milbench import sweep as sw
from milbench.errors import ConfigError, MilbenchError
from milbench.records import iter_records, write_record

from conftest import SHARED_DATA, needs_mnist as needs_data  # noqa: E402  (the one home of the data root)

DATA = str(SHARED_DATA)


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    """Only the plugins these tests use, so other plugins' state cannot break them."""
    from milbench.plugins import reset_registry

    monkeypatch.setenv("MILBENCH_PLUGINS", "abmil,qmnist")
    monkeypatch.setenv("MILBENCH_DATA_ROOT", DATA)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reset_registry()
    yield
    reset_registry()


def registry():
    from milbench.plugins import get_registry

    return get_registry(warn=False)


def milbench(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "milbench", *args], capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------- fast: parsing and the grid

def test_parse_grid_seeds_and_names():
    assert sw.parse_grid(["bag_size=10,50", "pool_fractions=0.5,0.2,0.3;0.6,0.1,0.3"]) == {
        "bag_size": ["10", "50"], "pool_fractions": ["0.5,0.2,0.3", "0.6,0.1,0.3"]}
    assert sw.parse_seeds("0-2,5,1") == [0, 1, 2, 5]
    assert sw.parse_names("all", "method", ["b", "a"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="expected key=v1"):
        sw.parse_grid(["bag_size"])
    with pytest.raises(ConfigError, match="twice"):
        sw.parse_grid(["bag_size=1", "bag_size=2"])
    with pytest.raises(MilbenchError, match="bad --seeds"):
        sw.parse_seeds("a,b")
    with pytest.raises(MilbenchError, match=r"unknown method 'abmill' \(did you mean 'abmil'\?\); valid: abmil"):
        sw.parse_names("abmill", "method", ["abmil"])


def test_expand_is_the_cartesian_product_resolved_up_front():
    spec = sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4", "6"], "instance_size": ["28", "32"]}, [0, 1],
                        smoke=True)
    points = sw.expand(registry(), spec)
    assert len(points) == 2 * 2 * 2
    assert {(p.plan.config["bag_size"], p.plan.config["instance_size"], p.plan.seed) for p in points} == {
        (b, i, s) for b in (4, 6) for i in (28, 32) for s in (0, 1)}
    # seeds share a config hash; grid values do not
    assert len({p.plan.config_hash for p in points}) == 4
    assert all(p.plan.smoke and p.plan.config["epochs"] == 1 for p in points)
    # a grid value equal to another point's resolved config is one point, not two
    dup = sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["8", "08"]}, [0], smoke=True)
    assert len(sw.expand(registry(), dup)) == 1
    # the id is stable (a resumed sweep keeps it) and depends on the grid
    assert spec.sweep_id == sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4", "6"], "instance_size": ["28", "32"]},
                                         [1, 0], smoke=True).sweep_id
    assert spec.sweep_id != dup.sweep_id


def test_expand_errors_name_the_point_and_what_is_valid():
    with pytest.raises(ConfigError, match=r"abmil on qmnist with bag_sz=4: unknown config key 'bag_sz' \(did you mean 'bag_size'\?\)"):
        sw.expand(registry(), sw.SweepSpec(["abmil"], ["qmnist"], {"bag_sz": ["4"]}))
    with pytest.raises(ConfigError, match=r"bag_size=x: bad value for 'bag_size': 'x' is not int >= 1"):
        sw.expand(registry(), sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4", "x"]}))
    with pytest.raises(ConfigError, match="both --set and --grid"):
        sw.expand(registry(), sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4"]}, overrides=["bag_size=5"]))


def _record(plan, status: str, run_id: str, created: str = "2026-01-01T00:00:00+00:00") -> dict:
    return {"run_id": run_id, "status": status, "config_hash": plan.config_hash, "seed": plan.seed,
            "smoke": plan.smoke, "created": created, "method": plan.method, "dataset": plan.dataset}


def test_finished_is_what_resume_skips(tmp_path):
    points = sw.expand(registry(), sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4", "6"]}, [0, 1], smoke=True))
    a, b, c, d = points
    write_record(tmp_path, _record(a.plan, "ok", "r1"))
    write_record(tmp_path, _record(b.plan, "oom", "r2"))
    write_record(tmp_path, _record(c.plan, "interrupted", "r3"))
    # same config and seed but not smoke: a different point
    write_record(tmp_path, {**_record(d.plan, "ok", "r4"), "smoke": False})
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "x.json").write_text(json.dumps({"kind": "sweep"}))
    not_smoke = (d.plan.config_hash, d.plan.seed, False)
    assert set(sw.finished(tmp_path)) == {a.key, not_smoke}
    assert set(sw.finished(tmp_path, sw.RECORDED_STATUSES)) == {a.key, b.key, not_smoke}  # --skip-failed
    assert d.key not in sw.finished(tmp_path)
    # the latest ok record of a point is the one kept
    write_record(tmp_path, _record(a.plan, "ok", "r5", created="2026-02-01T00:00:00+00:00"))
    assert sw.finished(tmp_path)[a.key]["run_id"] == "r5"


def test_bad_input_is_one_line_before_anything_runs(tmp_path):
    out = tmp_path / "res"
    for args, msg in [
        (["-m", "abmil", "-d", "qmnist,nope"], "unknown dataset 'nope'; valid: qmnist"),
        (["-m", "abmil", "-d", "qmnist", "--grid", "bag_sz=4"], "unknown config key 'bag_sz'"),
        (["-m", "abmil", "-d", "qmnist", "--preset", "papr"], "unknown preset 'papr'"),
        (["-m", "abmil", "-d", "qmnist", "--executor", "slurm"], "--executor slurm"),
    ]:
        r = milbench("sweep", *args, "--smoke", "--results", str(out))
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("milbench: error")]
        assert len(lines) == 1 and msg in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not list(iter_records(out))


def test_dry_run_lists_points_and_skips(tmp_path):
    points = sw.expand(registry(), sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4", "6"]}, [0], smoke=True))
    write_record(tmp_path, _record(points[0].plan, "ok", "done-1"))
    r = milbench("sweep", "-m", "abmil", "-d", "qmnist", "--grid", "bag_size=4,6", "--smoke", "--results",
                 str(tmp_path), "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("skip (ok)") and "bag_size=4" in lines[0]
    assert lines[1].startswith("run") and "bag_size=6" in lines[1]
    assert "1 already recorded, 1 to run" in r.stderr


def test_report_helpers_one_outcome_per_point_and_why_cells_are_empty(tmp_path):
    """A resumed point keeps its interrupted record on disk; the table counts its ok rerun
    once. A configuration with no ok run gets a note saying why."""
    from milbench.report import failure_notes, failure_notes_markdown, latest_per_point, load_frame, summarize

    points = sw.expand(registry(), sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4", "6"]}, [0, 1]))
    a0, a1, b0, b1 = points
    base = {"metrics": {"bag_auc": 0.9}, "config": None}
    for plan, status, rid, created, err in [
        (a0.plan, "interrupted", "i1", "2026-01-01T00:00:00", "interrupted by SIGINT; the run was stopped"),
        (a0.plan, "ok", "o1", "2026-01-01T00:01:00", None),
        (a1.plan, "ok", "o2", "2026-01-01T00:02:00", None),
        (b0.plan, "oom", "m1", "2026-01-01T00:03:00", "MemoryLimitExceeded: resident memory 1505 MiB crossed"),
        (b1.plan, "oom", "m2", "2026-01-01T00:04:00", "MemoryLimitExceeded: resident memory 1507 MiB crossed"),
        (b1.plan, "failed", "f1", "2026-01-01T00:05:00", "RuntimeError: boom\nTraceback..."),
    ]:
        write_record(tmp_path, {**_record(plan, status, rid, created), **base, "config": plan.config, "error": err,
                                "preset": "default"})
    df = load_frame(str(tmp_path))
    assert len(df) == 6
    latest = latest_per_point(df)
    assert sorted(latest["run_id"]) == ["f1", "m1", "o1", "o2"]   # the interrupted i1 was superseded by o1
    summary = summarize(latest, ["bag_auc"])
    assert list(summary["runs"]) == ["2 ok", "1 failed, 1 oom"]
    assert list(summary["cell"]) == ["0.900 ± 0.000", "failed, oom"]
    notes = failure_notes(latest)
    assert notes == ["abmil [bag_size=6] on qmnist: 1 failed (RuntimeError: boom), "
                     "1 oom (MemoryLimitExceeded: resident memory 1505 MiB crossed)"]
    assert failure_notes_markdown(latest).strip().splitlines()[-1].startswith("- abmil [bag_size=6] on qmnist")
    assert failure_notes_markdown(df[df["status"] == "ok"]) == ""
    # an ok record beats a later failed one of the same point
    write_record(tmp_path, {**_record(a1.plan, "failed", "f2", "2026-01-02T00:00:00"), **base, "config": a1.plan.config,
                            "error": "x", "preset": "default"})
    assert "o2" in set(latest_per_point(load_frame(str(tmp_path)))["run_id"])


# ----------------------------------------------------------------------------- slow: real smoke sweeps

def _records(path: Path) -> list[dict]:
    return sorted(iter_records(path, warn=False), key=lambda r: r["created"] + r["run_id"])


@needs_data
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_points(tmp_path):
    """Ctrl-C during the second point: exit 130, the first point's ok record and
    an interrupted one; the rerun runs only the second point."""
    args = ["sweep", "-m", "abmil", "-d", "qmnist", "--grid", "bag_size=4,6", "--smoke", "--device", "cpu",
            "--results", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "milbench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(r["status"] == "ok" for r in iter_records(tmp_path, warn=False)):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)  # the second point's child is starting
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    first = _records(tmp_path)
    assert [r["status"] for r in first] == ["ok", "interrupted"]
    assert first[0]["config"]["bag_size"] == 4 and first[1]["config"]["bag_size"] == 6
    assert first[0]["sweep"]["id"] == first[1]["sweep"]["id"]
    assert first[0]["sweep"]["point"] == {"bag_size": "4"}

    r = milbench(*args, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "1 already recorded, 1 to run" in r.stderr
    after = _records(tmp_path)
    assert len(after) == 3
    new = [x for x in after if x["run_id"] not in {f["run_id"] for f in first}]
    assert len(new) == 1 and new[0]["status"] == "ok" and new[0]["config"]["bag_size"] == 6
    # the finished point was not rerun: still exactly one record with its config
    assert sum(x["config_hash"] == first[0]["config_hash"] for x in after) == 1
    # one sweep id across both invocations; the manifest lists both
    manifest = json.loads((tmp_path / "sweeps" / f"{first[0]['sweep']['id']}.json").read_text())
    assert manifest["kind"] == "sweep" and len(manifest["invocations"]) == 2
    assert manifest["invocations"][0]["interrupted"] is True
    # and a third run has nothing to do
    r = milbench(*args, timeout=60)
    assert r.returncode == 0 and "all already recorded" in r.stderr
    assert len(_records(tmp_path)) == 3

    # the report gives one row per bag_size (the swept parameter), interrupted runs counted, not dropped
    from milbench.report import load_frame, summarize

    summary = summarize(load_frame(str(tmp_path), include_smoke=True), ["bag_auc"])
    # smoke points, shown with include_smoke, are marked as such (issue 19)
    assert list(summary["row"]) == ["abmil [bag_size=4] (smoke)", "abmil [bag_size=6] (smoke)"]
    assert list(summary["runs"]) == ["1 ok", "1 ok, 1 interrupted"]


@needs_data
@pytest.mark.slow
def test_out_of_memory_point_does_not_stop_the_sweep(tmp_path):
    """The first point (512-pixel digits) crosses --max-memory and is recorded
    oom; the sweep carries on to the second point and exits 0."""
    r = milbench("sweep", "-m", "abmil", "-d", "qmnist", "--grid", "instance_size=512,28", "--smoke",
                 "--device", "cpu", "--max-memory", "1500MB", "--results", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    recs = {x["config"]["instance_size"]: x for x in iter_records(tmp_path, warn=False)}
    assert recs[512]["status"] == "oom" and "max-memory" in recs[512]["error"]
    assert recs[28]["status"] == "ok" and recs[28]["metrics"]["bag_auc"] is not None
    assert "1 oom" in r.stderr and "1 ok" in r.stderr
    # --strict turns a non-ok point into exit 1; resume still skips the ok point and reruns the oom one
    r = milbench("sweep", "-m", "abmil", "-d", "qmnist", "--grid", "instance_size=512,28", "--smoke",
                 "--device", "cpu", "--max-memory", "1500MB", "--results", str(tmp_path), "--strict", timeout=300)
    assert r.returncode == 1, r.stderr
    assert "1 already recorded, 1 to run" in r.stderr
    # --skip-failed treats the oom point as done too
    r = milbench("sweep", "-m", "abmil", "-d", "qmnist", "--grid", "instance_size=512,28", "--smoke",
                 "--device", "cpu", "--max-memory", "1500MB", "--results", str(tmp_path), "--skip-failed", timeout=60)
    assert r.returncode == 0 and "all already recorded" in r.stderr
    assert sorted(x["status"] for x in iter_records(tmp_path, warn=False)) == ["ok", "oom", "oom"]
