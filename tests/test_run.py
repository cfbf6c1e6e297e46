"""One run end to end: a child process, one atomic record, its schema,
failures recorded, determinism on CPU."""

from __future__ import annotations


import pytest

from conftest import records_in, run_cli
from milbench.records import REQUIRED_KEYS, STATUSES
from test_plugins import FIXTURES, make_dist

SMOKE = ["-m", "abmil", "-d", "qmnist", "--smoke"]
ENV = {"MILBENCH_PLUGINS": "abmil,qmnist"}


@pytest.fixture(scope="module")
def smoke_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = run_cli("run", *SMOKE, "--results", str(out), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    (rec,) = records_in(out)
    return rec, out, res


def test_record_schema(smoke_record):
    rec, out, res = smoke_record
    for key in REQUIRED_KEYS:
        assert key in rec, key
    assert rec["status"] in STATUSES and rec["status"] == "ok"
    assert rec["schema_version"] == 1 and rec["smoke"] is True and rec["supervision"] == "bag"
    assert rec["config"]["bag_size"] == 8 and len(rec["config_hash"]) == 16
    m, t, mem = rec["metrics"], rec["timing"], rec["memory"]
    assert 0 <= m["bag_accuracy"] <= 1 and 0 <= m["bag_auc"] <= 1
    for k in ("total_s", "train_s", "eval_s", "setup_s", "train_s_per_bag"):
        assert t[k] > 0, k
    # no GPU here: GPU figures are null, never 0; CPU RSS is real
    assert mem["gpu_peak_bytes"] is None and mem["torch_peak_allocated_bytes"] is None
    assert mem["cpu_peak_rss_bytes"] > 50 * 2**20
    assert mem["cpu_peak_rss_bytes"] >= mem["cpu_setup_rss_bytes"] >= mem["cpu_baseline_rss_bytes"]
    assert rec["environment"]["torch"] and rec["environment"]["python"]
    # the machine's load around the run, so a loaded-machine time is recognisable as one
    assert all(len(rec["environment"][k]) == 3 and min(rec["environment"][k]) >= 0
               for k in ("load_avg_before", "load_avg_after"))
    h = rec["history"]
    assert len(h) == 1 and {"epoch", "train_loss", "val_loss", "val_bag_auc", "seconds"} <= set(h[0])
    assert rec["data"]["source"] in ("sample", "mnist", "qmnist")
    assert set(rec["data"]["instance_id_hash"]) == {"train", "val", "test"}
    assert "record:" in res.stdout and "ok" in res.stdout


def test_log_is_named_relative_to_the_results_folder(smoke_record):
    rec, out, _ = smoke_record
    assert rec["log"] == f"logs/{rec['run_id']}.log" and (out / rec["log"]).stat().st_size > 0


def test_git_dirty_means_the_code_differs_not_the_results(tmp_path):
    """A tuned record was marked dirty because its study's SQLite file (tracked
    under results/) changes before every trial; only code makes a record dirty."""
    import subprocess

    from milbench.environment import git_state

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    for rel in ("milbench/core.py", "plugins/p.py", "results/study.db", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "results/study.db").write_text("1")
    (tmp_path / "README.md").write_text("1")
    (tmp_path / "results/new.json").write_text("{}")
    state = git_state(tmp_path)
    assert state["dirty"] is False and len(state["commit"]) == 40
    for rel in ("plugins/p.py", "milbench/core.py"):
        (tmp_path / rel).write_text("1")
        assert git_state(tmp_path)["dirty"] is True, rel
        git("checkout", "--", rel)
    assert git_state(tmp_path)["dirty"] is False
    assert git_state(tmp_path.parent / "not-a-checkout-here") == {"commit": None, "dirty": None}


def test_no_temp_files_left(smoke_record):
    _, out, _ = smoke_record
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_same_seed_same_history(smoke_record, tmp_path):
    rec, _, _ = smoke_record
    res = run_cli("run", *SMOKE, "--results", str(tmp_path), env=ENV)
    assert res.returncode == 0
    (again,) = records_in(tmp_path)
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]
    assert strip(again["history"]) == strip(rec["history"])
    assert again["metrics"] == rec["metrics"]
    assert again["data"]["instance_id_hash"] == rec["data"]["instance_id_hash"]


@pytest.fixture
def crash_env(tmp_path):
    site = make_dist(tmp_path / "site", "milbench-crash", {"crash": "crash_method"},
                     [FIXTURES / "broken_plugins" / "crash_method.py"])
    return {"PYTHONPATH": str(site), "MILBENCH_PLUGINS": "qmnist,crash"}


def test_child_exception_leaves_failed_record(crash_env, tmp_path):
    out = tmp_path / "res"
    res = run_cli("run", "-m", "crash-mid-training", "-d", "qmnist", "--smoke", "--results", str(out), env=crash_env)
    assert res.returncode == 1
    (rec,) = records_in(out)
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: diverged on bag 2"
    assert "Traceback" in rec["traceback"] and rec["memory"]["cpu_peak_rss_bytes"] > 0


def test_killed_child_leaves_failed_record(crash_env, tmp_path):
    out = tmp_path / "res"
    res = run_cli("run", "-m", "die-hard", "-d", "qmnist", "--smoke", "--results", str(out), env=crash_env)
    assert res.returncode == 1
    (rec,) = records_in(out)
    assert rec["status"] == "failed" and "SIGKILL" in rec["error"]
    assert rec["exit_code"] == -9


def test_cpu_memory_limit_gives_oom_record(tmp_path):
    res = run_cli("run", *SMOKE, "--max-memory", "300MB", "--results", str(tmp_path), env=ENV)
    assert res.returncode == 1
    (rec,) = records_in(tmp_path)
    assert rec["status"] == "oom" and "max-memory" in rec["error"]
    assert rec["memory"]["cpu_peak_rss_bytes"] > 300 * 2**20


def test_cpu_memory_limit_makes_malloc_release_freed_blocks(tmp_path):
    """Under --max-memory on a CPU the child makes glibc return freed tensors to the OS at once
    (the limit is enforced on resident memory) and says so in the record."""
    import platform

    res = run_cli("run", *SMOKE, "--max-memory", "16GB", "--results", str(tmp_path), env=ENV)
    assert res.returncode == 0, res.stderr
    (rec,) = records_in(tmp_path)
    glibc = platform.libc_ver()[0] == "glibc"
    assert rec["memory"]["cpu_malloc_release_bytes"] == (4 * 2**20 if glibc else None)


def test_timeout_gives_timeout_record(tmp_path):
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--set", "epochs=50", "--timeout", "6",
                  "--results", str(tmp_path), env=ENV)
    assert res.returncode == 1
    (rec,) = records_in(tmp_path)
    assert rec["status"] == "timeout" and "timeout" in rec["error"]
