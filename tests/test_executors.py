"""Sweeps on engines: submitit (its local cluster runs the same job array code
as SLURM, as local processes) and Ray (a local instance with 2 CPUs).

Each engine runs the same 4-point ``--smoke`` sweep as the local executor and
must produce the same records, metric for metric (same seeds, CPU, one thread
each). A point that fails on an engine becomes a ``failed`` record; a timeout
or preemption becomes a record with that status (retried once on request);
resume skips finished points whichever executor wrote them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from milbench import sweep as sw
from milbench.errors import MilbenchError
from milbench.sweep.executors import LocalExecutor, make_executor
from milbench.records import iter_records

from conftest import SHARED_DATA, needs_mnist as needs_data  # noqa: E402  (the one home of the data root)

DATA = str(SHARED_DATA)
HAS_SUBMITIT = importlib.util.find_spec("submitit") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_submitit = pytest.mark.skipif(not HAS_SUBMITIT, reason="submitit not installed: pip install 'milbench[slurm]'")
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray not installed: pip install 'milbench[ray]'")

ENV = {"MILBENCH_PLUGINS": "abmil,qmnist", "MILBENCH_DATA_ROOT": DATA, "OMP_NUM_THREADS": "1"}
SPEC = sw.SweepSpec(["abmil"], ["qmnist"], {"bag_size": ["4", "6"]}, [0, 1], smoke=True)
CLI_SWEEP = ["sweep", "-m", "abmil", "-d", "qmnist", "--grid", "bag_size=4,6", "--seeds", "0,1", "--smoke",
             "--device", "cpu"]


@pytest.fixture(scope="module")
def env():
    from milbench.plugins import reset_registry

    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        reset_registry()
        yield
    reset_registry()


def points():
    from milbench.plugins import get_registry

    return sw.expand(get_registry(warn=False), SPEC)


def run(executor, results: Path, pts=None, **kw) -> sw.SweepResult:
    tasks = sw.make_tasks(pts if pts is not None else points(), results, executor.name, device="cpu",
                          sweep={"id": SPEC.sweep_id, "grid": SPEC.grid, "executor": executor.name})
    return sw.run_sweep(tasks, executor, **kw)


def by_point(results: Path, status: str = "ok") -> dict[tuple, dict]:
    return {sw.point_key(r): r for r in iter_records(results, warn=False) if r["status"] == status}


def assert_same_metrics(got: dict, want: dict) -> None:
    assert set(got) == set(want) and len(want) == 4
    for key, rec in want.items():
        assert got[key]["metrics"] == rec["metrics"], key          # exact: same seeds, same CPU, one thread
        assert got[key]["config"] == rec["config"]
        assert got[key]["history"][-1]["train_loss"] == rec["history"][-1]["train_loss"]


@pytest.fixture(scope="module")
def local_records(env, tmp_path_factory):
    """The reference: the 4 points on the local executor."""
    out = tmp_path_factory.mktemp("local")
    result = run(LocalExecutor(), out)
    assert result.counts() == {"ok": 4} and not result.interrupted
    return out


@pytest.fixture(scope="module")
def ray_session(env):
    if not HAS_RAY:
        pytest.skip("ray not installed: pip install 'milbench[ray]'")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _submitit(folder: Path, **kw):
    from milbench.sweep.executors import SubmititExecutor

    return SubmititExecutor(folder / ".submitit", "local", **kw)


# ----------------------------------------------------------------------------- fast

@pytest.mark.parametrize("name, module", [("slurm", "submitit"), ("ray", "ray")])
def test_missing_extra_is_one_line_naming_the_pip_install(name, module, monkeypatch, tmp_path, capsys, env):
    from milbench.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the extra looks like to import
    with pytest.raises(MilbenchError, match=rf"--executor {name} needs the '{module}' package: pip install 'milbench\[{name}\]'"):
        make_executor(name, results=tmp_path, sweep_id="sw-x")
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "-m", "abmil", "-d", "qmnist", "--smoke", "--results", str(tmp_path), "--executor", name])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"milbench: error: --executor {name} needs the '{module}' package: pip install 'milbench[{name}]'"
    assert not list(iter_records(tmp_path, warn=False))


@needs_submitit
def test_slurm_without_sbatch_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MilbenchError, match="'sbatch' is not on PATH .* --slurm-cluster local"):
        make_executor("slurm", results=tmp_path, sweep_id="sw-x", slurm={"cluster": "slurm"})


# ----------------------------------------------------------------------------- slow: real engines

@needs_data
@needs_submitit
@pytest.mark.slow
def test_submitit_job_array_matches_local(local_records, tmp_path):
    result = run(_submitit(tmp_path, time_min=10), tmp_path)
    assert result.counts() == {"ok": 4}
    got = by_point(tmp_path)
    assert_same_metrics(got, by_point(local_records))
    job_ids = {r["executor"]["job_id"] for r in got.values()}
    assert len(job_ids) == 4 and all(r["executor"]["name"] == "slurm" for r in got.values())
    assert all(r["sweep"]["id"] == SPEC.sweep_id for r in got.values())
    assert len(list(iter_records(tmp_path, warn=False))) == 4   # one record per point, nothing else


@needs_data
@needs_ray
@pytest.mark.slow
@pytest.mark.ray_driver
def test_ray_tasks_match_local(local_records, ray_session, tmp_path):
    from milbench.sweep.executors import RayExecutor

    result = run(RayExecutor(cpus=1), tmp_path)
    assert result.counts() == {"ok": 4}
    got = by_point(tmp_path)
    assert_same_metrics(got, by_point(local_records))
    assert all(r["executor"]["name"] == "ray" and r["executor"]["task_id"] for r in got.values())
    assert len(list(iter_records(tmp_path, warn=False))) == 4


@needs_data
@needs_submitit
@pytest.mark.slow
def test_resume_skips_points_finished_by_another_executor(local_records, tmp_path):
    """Three points finished on the local executor; the sweep is finished on the
    (local) SLURM job array through the CLI, which runs only the fourth."""
    recs = sorted(local_records.glob("*.json"))
    for path in recs[:3]:
        shutil.copy(path, tmp_path / path.name)
    r = subprocess.run([sys.executable, "-m", "milbench", *CLI_SWEEP, "--results", str(tmp_path),
                        "--executor", "slurm", "--slurm-cluster", "local", "--slurm-time", "10"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert r.returncode == 0, r.stderr
    assert "3 already recorded, 1 to run on slurm" in r.stderr
    after = list(iter_records(tmp_path, warn=False))
    assert len(after) == 4
    new = [x for x in after if x["executor"]["name"] == "slurm"]
    assert len(new) == 1 and new[0]["status"] == "ok"
    assert_same_metrics(by_point(tmp_path), by_point(local_records))


def _lose_abmil(monkeypatch):
    """Workers whose environment lacks the abmil plugin (a cluster node without
    the package the driver has): the point cannot run there."""
    monkeypatch.setenv("MILBENCH_PLUGINS", "qmnist")


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "slurm", pytest.param("ray", marks=pytest.mark.ray_driver)])
def test_point_failing_on_the_engine_becomes_a_failed_record(engine, env, monkeypatch, tmp_path, request):
    if engine == "slurm" and not HAS_SUBMITIT:
        pytest.skip("submitit not installed: pip install 'milbench[slurm]'")
    if engine == "ray":
        request.getfixturevalue("ray_session")
    from milbench.sweep.executors import RayExecutor

    pts = points()[:1]  # planned by the driver, which has abmil
    _lose_abmil(monkeypatch)
    executor = {"local": LocalExecutor, "slurm": lambda: _submitit(tmp_path, time_min=10),
                "ray": lambda: RayExecutor(cpus=1)}[engine]()
    result = run(executor, tmp_path, pts)
    assert result.counts() == {"failed": 1}
    (rec,) = list(iter_records(tmp_path, warn=False))
    assert rec["status"] == "failed" and "unknown method 'abmil'" in rec["error"]
    assert rec["config_hash"] == pts[0].plan.config_hash and rec["sweep"]["id"] == SPEC.sweep_id
    assert sw.point_key(rec) not in sw.finished(tmp_path)  # a rerun retries it


@needs_data
@needs_submitit
@pytest.mark.slow
def test_slurm_time_limit_becomes_a_timeout_record(env, tmp_path):
    """submitit's controller sends USR2 ``signal_delay_s`` before the limit, as SLURM does."""
    result = run(_submitit(tmp_path, time_min=0.25, signal_delay_s=11), tmp_path, points()[:1])
    assert result.counts() == {"timeout": 1}
    (rec,) = list(iter_records(tmp_path, warn=False))
    assert rec["status"] == "timeout" and "time limit" in rec["error"]
    assert rec["executor"]["job_id"] and rec["timing"]["wall_s"] < 15


@needs_data
@needs_submitit
@pytest.mark.slow
def test_slurm_preemption_is_recorded_and_retried_once(env, tmp_path):
    """USR2 to a running job's worker long before its time limit is a preemption;
    with retry the point is resubmitted once and finishes."""
    markers = tmp_path / sw.MARKERS_DIR

    class Preempt:
        sent = False

        def start(self, state):
            pass

        def update(self, state):
            files = [f for f in markers.rglob("*") if f.is_file()] if markers.exists() else []
            if files and not self.sent:
                time.sleep(1.0)
                os.kill(int(files[0].read_text()), signal.SIGUSR2)  # what SLURM sends the job step
                self.sent = True

        def finished(self, state, task, record):
            pass

    reporter = Preempt()
    result = run(_submitit(tmp_path, time_min=30), tmp_path, points()[:1], reporter=reporter, retry=True)
    assert reporter.sent
    recs = sorted(iter_records(tmp_path, warn=False), key=lambda r: r["executor"]["attempt"])
    assert [r["status"] for r in recs] == ["preempted", "ok"], [r.get("error") for r in recs]
    assert "preempted" in recs[0]["error"] and recs[1]["executor"]["attempt"] == 1
    assert recs[0]["executor"]["job_id"] != recs[1]["executor"]["job_id"]
    assert result.counts() == {"preempted": 1, "ok": 1}


@needs_ray
@pytest.mark.ray_driver
def test_a_cancelled_ray_task_that_errors_is_interrupted_and_a_finished_one_is_not_cancelled(ray_session, tmp_path):
    """A point the sweep cancelled can come back as a task error rather than TaskCancelledError (its
    worker interrupted mid-start, or its code turning the KeyboardInterrupt into its own error): the sweep
    stopped it, so it is ``interrupted`` and a resumed sweep runs it again. A point that had already failed
    when the sweep cancelled stays ``failed`` and is not cancelled: cancelling a finished task races Ray's
    reply handling and can abort the driver (ray-project/ray#54785; it took a CI run down once)."""
    from milbench.sweep.executors import RayExecutor

    @ray_session.remote(max_retries=0)
    def breaks():
        raise RuntimeError("broke before the cancel")

    @ray_session.remote(max_retries=0)
    def breaks_after_the_cancel(marker: str):
        # ends with its own error 3 s after it starts, whether or not Ray delivers the cancel's
        # KeyboardInterrupt (once, in CI, it did not): the outcome does not depend on that delivery
        Path(marker).touch()
        end = time.time() + 3
        while time.time() < end:
            try:
                time.sleep(0.1)
            except KeyboardInterrupt:
                pass
        raise RuntimeError("worker interrupted while starting")

    task = sw.make_tasks(points()[:1], Path("/nonexistent"), "ray", device="cpu", sweep={"id": SPEC.sweep_id})[0]
    ex = RayExecutor(cpus=1)
    failed = breaks.remote()
    ray_session.wait([failed], timeout=60)
    marker = tmp_path / "running"
    running = breaks_after_the_cancel.remote(str(marker))
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the task never started"
    ex.refs[failed], ex.refs[running] = task, task
    ex.cancel()
    outs = []
    while ex.active():
        outs += ex.wait(5.0)
    seen = [(o.status, o.error) for o in outs]
    before = [o for o in outs if "broke before the cancel" in (o.error or "")]
    assert len(outs) == 2 and len(before) == 1 and all(o.record is None for o in outs), seen
    cancelled = next(o for o in outs if o is not before[0])
    assert before[0].status == "failed" and cancelled.status == "interrupted", seen


@needs_data
@needs_ray
@pytest.mark.slow
@pytest.mark.ray_driver
def test_cancel_stops_running_ray_tasks_with_interrupted_records(env, ray_session, tmp_path):
    """Ctrl-C's path: cancel what was submitted; running points record ``interrupted``, queued ones nothing."""
    from milbench.sweep.executors import RayExecutor

    ex = RayExecutor(cpus=1)
    tasks = sw.make_tasks(points()[:3], tmp_path, "ray", device="cpu", sweep={"id": SPEC.sweep_id})
    ex.submit(tasks)
    markers = tmp_path / sw.MARKERS_DIR
    deadline = time.time() + 120
    while time.time() < deadline and not (markers.exists() and any(f.is_file() for f in markers.rglob("*"))):
        time.sleep(0.2)
    time.sleep(1.0)
    ex.cancel()
    outs = []
    while ex.active():
        outs += ex.wait(1.0)
    recs = list(iter_records(tmp_path, warn=False))
    assert recs and all(r["status"] == "interrupted" for r in recs)
    assert len(recs) == sum(o.record is not None for o in outs) <= 2  # 2 CPUs: at most 2 were running
    assert all(o.status == "interrupted" for o in outs if o.record is None), [(o.status, o.error) for o in outs]


@needs_ray
@pytest.mark.slow
def test_ray_driver_tests_pass_in_their_own_process():
    """The ``ray_driver`` tests above, in a child pytest process (``conftest.pytest_collection_modifyitems``
    says why): it must pass every one of them, skip none, and exit on its own."""
    from conftest import RAY_DRIVER_ENV

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "ray_driver", str(Path(__file__))]

    def child() -> tuple[subprocess.CompletedProcess, str, str]:
        r = subprocess.run(cmd, env={**os.environ, RAY_DRIVER_ENV: "1"}, cwd=str(Path(__file__).resolve().parents[1]),
                           capture_output=True, text=True, timeout=1200)
        lines = r.stdout.strip().splitlines()
        return r, (lines[-1] if lines else ""), (r.stdout + r.stderr)[-6000:]

    r, summary, out = child()
    if not re.search(r"\d+ (passed|failed)", summary):
        # the child died without pytest's summary: Ray aborted the driver (an engine crash, not one of these
        # tests failing); said in the warnings summary, and tried once more
        warnings.warn(f"the ray_driver child pytest died (exit {r.returncode}) without a summary; rerun once. "
                      f"Its output ended: {out[-500:]!r}")
        r, summary, out = child()
    assert r.returncode == 0, f"the child pytest exited {r.returncode}:\n{out}"
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"skipped|failed|error", summary), out
