"""Faults and interruptions: every run leaves exactly one record, no orphans,
bad input is one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import records_in, run_cli

ENV = {**os.environ, "MILBENCH_PLUGINS": "abmil,qmnist"}
LONG = ["-m", "abmil", "-d", "qmnist", "--set", "epochs=500", "--set", "n_train_bags=10", "--set", "n_val_bags=4",
        "--set", "bag_size=8"]


def _start(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "milbench", "run", *LONG, "--results", str(tmp_path)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    parent = psutil.Process(proc.pid)
    while time.time() < deadline:  # wait until the child is training
        logs = list((tmp_path / "logs").glob("*.log")) if (tmp_path / "logs").exists() else []
        if logs and "epoch 1" in logs[0].read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("child never started training")
    children = parent.children(recursive=True)
    assert children, "the run has no child process"
    return proc, children


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_gives_interrupted_record_and_no_orphans(tmp_path, sig):
    proc, children = _start(tmp_path)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    (rec,) = records_in(tmp_path)
    assert rec["status"] == "interrupted" and sig.name in rec["error"]
    assert len(rec["history"]) >= 1  # what was done before the interrupt is kept
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_parent_killed_child_follows(tmp_path):
    """SIGKILL of the parent: the child must not live on as an orphan."""
    proc, children = _start(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.time() + 30
    while time.time() < deadline and any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
        time.sleep(0.2)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert not records_in(tmp_path)  # no half-written record either
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_results_dir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root); permissions cannot be tested")
        res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--results", str(ro / "x"))
        assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr
    finally:
        ro.chmod(0o700)


def test_results_path_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--results", str(f))
    assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr


def test_cuda_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--device", "cuda", "--results", str(tmp_path))
    assert res.returncode == 2 and "no CUDA device" in res.stderr and "Traceback" not in res.stderr


def test_missing_data_root_is_one_line(tmp_path):
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--data-root", str(tmp_path / "nope"),
                  "--results", str(tmp_path))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_corrupt_data_file_is_one_line_and_recorded(tmp_path, data_root):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(data_root / "MNIST/raw/t10k-labels-idx1-ubyte.gz", raw)
    blob = (data_root / "MNIST/raw/t10k-images-idx3-ubyte.gz").read_bytes()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(blob[:5000])  # a truncated download
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--data-root", str(tmp_path / "data"),
                  "--results", str(tmp_path / "res"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = [l for l in res.stderr.strip().splitlines() if l.startswith("milbench: error")]
    assert "t10k-images-idx3-ubyte.gz" in line and "milbench data download qmnist" in line
    (rec,) = records_in(tmp_path / "res")  # the failed run still left its record
    assert rec["status"] == "failed" and rec["error_kind"] == "input"


SWEEP = ["sweep", "-m", "abmil", "-d", "qmnist", "--smoke", "--grid", "bag_size=4,5,6"]


def _ok_points(directory):
    recs = records_in(directory)
    return recs, [(r["config_hash"], r["seed"]) for r in recs if r["status"] == "ok"]


def test_sigkill_of_sweep_parent_then_rerun_completes_missing_points_only(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "milbench", *SWEEP, "--results", str(tmp_path)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not records_in(tmp_path):
        time.sleep(0.2)
    assert records_in(tmp_path), "the sweep wrote no record"
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(timeout=10)
    for c in children:  # the running point dies with its parent
        try:
            c.wait(timeout=30)
        except psutil.NoSuchProcess:
            pass
    done_before = _ok_points(tmp_path)[1]
    assert 1 <= len(done_before) < 3
    res = run_cli(*SWEEP, "--results", str(tmp_path), env={"MILBENCH_PLUGINS": "abmil,qmnist"})
    assert res.returncode == 0, res.stderr
    recs, ok = _ok_points(tmp_path)
    assert len(ok) == 3 and len(set(ok)) == 3  # every point once, nothing rerun
    assert set(done_before) <= set(ok)
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no half-written files


def test_two_sweeps_at_once_lose_and_corrupt_nothing(tmp_path):
    cmds = [[sys.executable, "-m", "milbench", "sweep", "-m", "abmil", "-d", "qmnist", "--smoke",
             "--grid", "bag_size=4,5", "--seeds", seeds, "--results", str(tmp_path)] for seeds in ("0", "1")]
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 4
    recs = records_in(tmp_path)  # every file parses as JSON
    assert len({r["run_id"] for r in recs}) == 4 and all(r["status"] == "ok" for r in recs)
    assert {(r["config"]["bag_size"], r["seed"]) for r in recs} == {(4, 0), (5, 0), (4, 1), (5, 1)}
