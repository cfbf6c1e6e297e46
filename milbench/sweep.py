"""Sweeps: a grid of benchmark points, run one fresh process per point, resumable.

A sweep is the Cartesian product methods × datasets × grid values × seeds.
Every point is resolved with :func:`milbench.runner.plan_run` before anything
runs, so a bad name, key or value is one line and no time is lost. A point's
identity is ``(config_hash, seed, smoke)``: the resolved config, not the
command line, decides whether a point already has a result, so a sweep can be
stopped (Ctrl-C, crash, SIGKILL of the driver) and started again — even on
another executor — and only the points without an ``ok`` record run.

Whatever runs a point (the local loop, a SLURM job array through submitit, a
Ray task) calls :func:`run_point` in its worker: that is the one code path that
calls :func:`milbench.runner.execute`, so every executor writes exactly one
record per point, atomically, with the same fields. The driver
(:func:`run_sweep`) only submits, gathers, retries preempted points and writes
a ``failed`` record itself when an engine lost a point without one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from milbench.errors import ConfigError, MilbenchError, unknown_name
from milbench.records import iter_records, now_iso, write_json_atomic, write_record
from milbench.runner import RunInterrupted, RunPlan, execute, plan_run

#: Statuses a point can end with (``preempted``: the scheduler took the job's node away).
TERMINAL_STATUSES = ("ok", "failed", "oom", "timeout", "preempted", "interrupted")
#: Statuses that ``--skip-failed`` also treats as done (an interrupted point is always rerun).
RECORDED_STATUSES = ("ok", "failed", "oom", "timeout", "preempted")
#: Engine outcomes that a ``--retry`` resubmits once.
RETRY_STATUSES = ("timeout", "preempted")

SWEEPS_DIR = "sweeps"        # manifests (JSON with "kind": "sweep"; iter_records skips them)
MARKERS_DIR = ".sweep-running"  # one file per point being run right now, holding the worker's pid (progress)


# --------------------------------------------------------------------------- parsing

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


@dataclass
class Point:
    """One resolved point of a sweep."""

    plan: RunPlan
    values: dict[str, str]
    index: int

    @property
    def key(self) -> tuple[str, int, bool]:
        return point_key(self.plan)

    @property
    def label(self) -> str:
        parts = [self.plan.method, self.plan.dataset] + [f"{k}={v}" for k, v in self.values.items()]
        return " · ".join(parts) + f" · seed {self.plan.seed}"


def point_key(obj: RunPlan | Mapping[str, Any]) -> tuple[str, int, bool]:
    """The identity resume compares: (config hash, seed, smoke) of a plan or a record."""
    if isinstance(obj, RunPlan):
        return (obj.config_hash, int(obj.seed), bool(obj.smoke))
    return (str(obj.get("config_hash")), int(obj.get("seed") or 0), bool(obj.get("smoke")))


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
    seen: set[tuple[str, int, bool]] = set()
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


def finished(results: Path, statuses: Sequence[str] = ("ok",)) -> dict[tuple[str, int, bool], dict[str, Any]]:
    """Latest record per point key among records whose status is in ``statuses``.

    This is the whole of resume: the driver skips every point found here.
    """
    out: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for rec in iter_records(results, warn=False):
        if rec.get("status") not in statuses or not rec.get("config_hash"):
            continue
        key = point_key(rec)
        if key not in out or str(rec.get("created")) >= str(out[key].get("created")):
            out[key] = rec
    return out


# --------------------------------------------------------------------------- the worker side

@dataclass
class PointTask:
    """Everything a worker needs to run one point (picklable: it travels to SLURM/Ray)."""

    plan: RunPlan
    label: str
    results: str
    device: str = "auto"
    data_root: str | None = None
    timeout: float | None = None
    max_memory: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    executor: str = "local"
    attempt: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    time_limit_s: float | None = None


def engine_info(task: PointTask) -> dict[str, Any]:
    """Which engine ran the point and under what id (goes into the record)."""
    import platform

    info: dict[str, Any] = {"name": task.executor, "attempt": task.attempt, "hostname": platform.node()}
    if task.executor == "slurm":
        try:
            import submitit

            env = submitit.JobEnvironment()
            info.update(job_id=str(env.job_id), cluster=os.environ.get("SUBMITIT_EXECUTOR", "slurm"))
        except Exception:  # not inside a submitit job (should not happen)
            pass
    elif task.executor == "ray":
        try:
            import ray

            ctx = ray.get_runtime_context()
            info.update(task_id=ctx.get_task_id(), node_id=ctx.get_node_id(), job_id=str(ctx.get_job_id()))
        except Exception:
            pass
    return info


class _EngineSignal:
    """Turns the scheduler's warning signal (SIGUSR2: preemption or time limit
    near) into a clean stop of the current run.

    ``execute`` stops its child on SIGTERM and writes the record; this handler
    remembers that the scheduler, not a user, asked, and forwards SIGTERM to
    its own process. :func:`run_point` then relabels the record ``timeout`` or
    ``preempted``, with submitit's own rule for telling the two apart.
    """

    def __init__(self, time_limit_s: float | None, install: bool = True):
        self.time_limit_s = time_limit_s
        self.install = install
        self.started = time.time()
        self.received_at: float | None = None
        self._old: Any = None
        name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.signum = getattr(signal, name, signal.SIGUSR2)

    def __enter__(self) -> "_EngineSignal":
        if not self.install:
            return self
        try:
            self._old = signal.signal(self.signum, self._handle)
        except ValueError:  # not the main thread of the worker
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received_at is None:
            self.received_at = time.time()
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(self.signum, self._old)

    def status(self) -> tuple[str, str]:
        """``timeout`` when the job used up its guaranteed time, else ``preempted`` (submitit's rule)."""
        elapsed = (self.received_at or time.time()) - self.started
        if self.time_limit_s:
            guaranteed = min(self.time_limit_s * 0.8, self.time_limit_s - 600)
            if elapsed >= guaranteed:
                return "timeout", (f"the job's time limit ({self.time_limit_s / 60:g} min) was near after "
                                   f"{elapsed:.0f} s: the scheduler signalled and the run was stopped")
        return "preempted", f"the scheduler preempted the job after {elapsed:.0f} s (signal {signal.Signals(self.signum).name}); the run was stopped"


def _marker(task: PointTask) -> Path:
    sweep_id = (task.extra.get("sweep") or {}).get("id", "adhoc")
    return Path(task.results) / MARKERS_DIR / sweep_id / task.token


def run_point(task: PointTask) -> dict[str, Any]:
    """Run one point in this worker and return its record (also written to ``task.results``).

    The single code path of every executor. It re-resolves the point with the
    worker's own plugins first: a worker whose milbench or plugins resolve a
    different config than the driver (version skew on a cluster) must not
    write a record under the driver's config hash, so that is an error here.
    """
    from milbench.plugins import get_registry

    plan = task.plan
    mine = plan_run(get_registry(warn=False), plan.method, plan.dataset, plan.preset, plan.overrides,
                    plan.seed, plan.smoke, Path(task.results), check=False)
    if mine.config_hash != plan.config_hash:
        raise MilbenchError(f"the worker resolves {plan.method} on {plan.dataset} to config {mine.config_hash}, "
                            f"the driver to {plan.config_hash}: milbench or plugin versions differ between them")
    extra = {**task.extra, "executor": engine_info(task)}
    remote = task.executor != "local"
    marker: Path | None = _marker(task) if remote else None
    try:
        if marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{os.getpid()}\n")  # the worker's pid: what a scheduler signals
    except OSError:
        marker = None  # progress display only; never a reason to fail a point
    try:
        with _EngineSignal(task.time_limit_s, install=remote) as engine:
            try:
                return execute(plan, Path(task.results), device=task.device, data_root=task.data_root,
                               timeout=task.timeout, max_memory=task.max_memory, quiet=True, extra=extra)
            except RunInterrupted as exc:
                record = exc.record
                if engine.received_at is not None:
                    record["status"], record["error"] = engine.status()
                    record.pop("_path", None)
                    write_record(Path(task.results), record)
                    return record
                if task.executor == "local":
                    raise  # the user pressed Ctrl-C: the local sweep stops
                return record  # a remote job cancelled by the driver or an admin: recorded, reported
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def engine_failure_record(task: PointTask, status: str, error: str, engine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record the driver writes when an engine lost a point without one
    (a worker that died, a task the engine refused, a job killed at its hard limit)."""
    from milbench.runner import new_record

    record = new_record(task.plan, task.device, task.data_root, task.max_memory, task.extra, status, error)
    record["executor"] = {"name": task.executor, "attempt": task.attempt, **(engine or {}), "lost_by_engine": True}
    write_record(Path(task.results), record)
    return record


# --------------------------------------------------------------------------- executors and the driver

@dataclass
class Outcome:
    """What an executor hands back for one task: the worker's record, or why there is none."""

    task: PointTask
    record: dict[str, Any] | None = None
    error: str | None = None
    status: str = "failed"          # status of the driver-written record when ``record`` is None
    engine: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    """How points reach workers. Executors never write records; :func:`run_point` does."""

    name: str

    def submit(self, tasks: Sequence[PointTask]) -> None:
        """Queue tasks (may start them)."""

    def wait(self, timeout: float) -> list[Outcome]:
        """Return the tasks that finished, waiting up to ``timeout`` seconds for one."""

    def active(self) -> int:
        """Submitted tasks not yet returned by :meth:`wait`."""

    def cancel(self) -> None:
        """Stop everything submitted (Ctrl-C): running points write ``interrupted`` records."""

    def close(self) -> None:
        """Release the engine (shut down a Ray instance this executor started)."""


@dataclass
class SweepState:
    """Counts the progress display shows."""

    total: int
    skipped: int = 0
    to_run: int = 0
    queued: int = 0
    running: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    current: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(self.counts.values())


class Reporter(Protocol):
    def start(self, state: SweepState) -> None: ...
    def update(self, state: SweepState) -> None: ...
    def finished(self, state: SweepState, task: PointTask, record: dict[str, Any]) -> None: ...


@dataclass
class SweepResult:
    """Records of this invocation, the points skipped as already done, and whether it was cut short."""

    records: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    interrupted: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.records:
            out[rec["status"]] = out.get(rec["status"], 0) + 1
        return out


def make_tasks(points: Sequence[Point], results: Path, executor: str, *, device: str = "auto",
               data_root: str | None = None, timeout: float | None = None, max_memory: int | None = None,
               sweep: Mapping[str, Any] | None = None, time_limit_s: float | None = None,
               command: Sequence[str] | None = None) -> list[PointTask]:
    """Tasks for ``points``: absolute paths (workers run elsewhere) and the sweep metadata each record carries."""
    results = Path(results).resolve()
    root = str(Path(data_root).resolve()) if data_root else None
    tasks = []
    for p in points:
        meta = {**(sweep or {}), "point": p.values, "index": p.index}
        extra: dict[str, Any] = {"sweep": meta}
        if command is not None:
            extra["command"] = list(command)
        tasks.append(PointTask(p.plan, p.label, str(results), device, root, timeout, max_memory, extra, executor,
                               time_limit_s=time_limit_s))
    return tasks


def _record_on_disk(results: Path, record: dict[str, Any]) -> None:
    """Gather a worker's record into the driver's results directory if the
    worker wrote it somewhere the driver cannot see (no shared filesystem)."""
    path = results / f"{record['run_id']}.json"
    if not path.exists():
        write_record(results, {k: v for k, v in record.items() if k != "_path"})


def _record_with_token(results: Path, token: str) -> dict[str, Any] | None:
    for rec in iter_records(results, warn=False):
        if ((rec.get("sweep") or {}).get("attempt") == token):
            return rec
    return None


def run_sweep(tasks: Sequence[PointTask], executor: Executor, reporter: Reporter | None = None, *,
              skipped: Sequence[dict[str, Any]] = (), retry: bool = False, cancel_grace_s: float = 30.0) -> SweepResult:
    """Run ``tasks`` on ``executor``; return every record this invocation produced.

    A point that ends ``timeout``/``preempted`` on an engine is resubmitted
    once when ``retry`` is set (the first record stays as history). An
    engine that returns no record for a point gets a ``failed`` (or
    ``timeout``) record written here, so no point is ever left without one.
    Ctrl-C cancels what was submitted, waits up to ``cancel_grace_s`` for the
    running points to write their ``interrupted`` records, and returns with
    ``interrupted`` set.
    """
    results_by_task: list[dict[str, Any]] = []
    state = SweepState(total=len(tasks) + len(skipped), skipped=len(skipped), to_run=len(tasks), queued=len(tasks))
    for t in tasks:
        t.extra.setdefault("sweep", {})["attempt"] = t.token
    if reporter:
        reporter.start(state)
    running_dirs = {Path(t.results) / MARKERS_DIR / (t.extra.get("sweep") or {}).get("id", "adhoc") for t in tasks}
    tokens = {t.token for t in tasks}

    def refresh() -> None:
        if executor.name != "local":
            live = 0
            for d in running_dirs:
                try:
                    live += sum(1 for f in d.iterdir() if f.name in tokens)
                except OSError:
                    pass
            state.running = live
            state.queued = max(0, executor.active() - live)

    def handle(out: Outcome) -> None:
        rec = out.record
        results = Path(out.task.results)
        if rec is None:
            rec = _record_with_token(results, out.task.token) or engine_failure_record(
                out.task, out.status, out.error or "the engine returned no result", out.engine)
        else:
            _record_on_disk(results, rec)
        if retry and rec["status"] in RETRY_STATUSES and out.task.attempt == 0:
            again = PointTask(**{**out.task.__dict__, "attempt": 1, "token": uuid.uuid4().hex[:12],
                                 "extra": json.loads(json.dumps(out.task.extra, default=str))})
            again.extra["sweep"]["attempt"] = again.token
            tokens.add(again.token)
            state.to_run += 1
            executor.submit([again])
            state.counts[rec["status"] + " (retried)"] = state.counts.get(rec["status"] + " (retried)", 0) + 1
        else:
            state.counts[rec["status"]] = state.counts.get(rec["status"], 0) + 1
        results_by_task.append(rec)
        if out.task.label in state.current:
            state.current.remove(out.task.label)
        if reporter:
            reporter.finished(state, out.task, rec)

    def on_start(task: PointTask) -> None:  # local executor: synchronous, so it tells us
        state.current = [task.label]
        state.running, state.queued = 1, executor.active() - 1
        if reporter:
            reporter.update(state)

    if hasattr(executor, "on_start"):
        executor.on_start = on_start  # type: ignore[attr-defined]
    interrupted = False
    try:
        executor.submit(list(tasks))
        while executor.active():
            for out in executor.wait(0.5):
                handle(out)
            refresh()
            if reporter:
                reporter.update(state)
    except KeyboardInterrupt as exc:
        interrupted = True
        if isinstance(exc, RunInterrupted):
            results_by_task.append(exc.record)
            state.counts["interrupted"] = state.counts.get("interrupted", 0) + 1
        if executor.name != "local":
            executor.cancel()
            deadline = time.time() + cancel_grace_s
            try:
                while executor.active() and time.time() < deadline:
                    for out in executor.wait(0.5):
                        if out.record is not None:
                            results_by_task.append(out.record)
            except KeyboardInterrupt:
                pass
    finally:
        executor.close()
        for d in running_dirs:  # progress markers: leave no empty folders behind
            for folder in (d, d.parent):
                try:
                    folder.rmdir()
                except OSError:
                    pass
    return SweepResult(results_by_task, list(skipped), interrupted)


# --------------------------------------------------------------------------- manifests

def write_manifest(results: Path, spec: SweepSpec, n_points: int, invocation: Mapping[str, Any]) -> Path:
    """Append this invocation to ``<results>/sweeps/<id>.json`` (provenance for a results README).

    The file carries ``"kind": "sweep"``, which record readers skip.
    """
    path = Path(results) / SWEEPS_DIR / f"{spec.sweep_id}.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = {"kind": "sweep", "id": spec.sweep_id, "spec": spec.as_dict(), "points": n_points,
                    "created": now_iso(), "invocations": []}
    manifest["invocations"] = [i for i in manifest.get("invocations", []) if i.get("started") != invocation.get("started")]
    manifest["invocations"].append(dict(invocation))
    manifest["updated"] = now_iso()
    write_json_atomic(path, manifest)
    return path


def default_command() -> list[str]:
    """The driver's command line, stored in each record (a worker's own argv means nothing)."""
    return list(sys.argv[1:])
