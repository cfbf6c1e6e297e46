"""What runs one sweep point, wherever it runs.

Whatever runs a point (the local loop, a SLURM job array through submitit, a
Ray task) calls :func:`run_point` in its worker: that is the one code path that
calls :func:`milbench.runner.execute`, so every executor writes exactly one
record per point, atomically, with the same fields. A :class:`PointTask` is
what travels to the worker (it is pickled by submitit and Ray).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from milbench.errors import MilbenchError
from milbench.records import write_record
from milbench.runner import RunInterrupted, RunPlan, execute, new_record, plan_run
from milbench.sweep.manifest import markers_dir


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

    @property
    def sweep_id(self) -> str | None:
        """The id of the sweep (or tune study) the task belongs to, if any."""
        return (self.extra.get("sweep") or {}).get("id")

    @property
    def marker(self) -> Path:
        """The file that holds the worker's pid while the point runs on a remote engine."""
        return markers_dir(self.results, self.sweep_id) / self.token


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

    def __init__(self, time_limit_s: float | None, install: bool = True) -> None:
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
    marker: Path | None = task.marker if remote else None
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
    record = new_record(task.plan, task.device, task.data_root, task.max_memory, task.extra, status, error)
    record["executor"] = {"name": task.executor, "attempt": task.attempt, **(engine or {}), "lost_by_engine": True}
    write_record(Path(task.results), record)
    return record
