"""Where sweep points run: this process (local), a SLURM job array (submitit), or Ray tasks.

milbench schedules nothing itself: SLURM and Ray are what people with shared
GPU clusters already use. Each executor only moves :class:`PointTask` objects
to workers and hands back an :class:`Outcome` for each; every worker calls
:func:`milbench.sweep.worker.run_point`, the one code path that runs a point
and writes its record. The engines are optional extras (``milbench[slurm]``,
``milbench[ray]``) imported only when chosen.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from milbench.errors import MilbenchError, first_line
from milbench.sweep.worker import PointTask, run_point


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


EXECUTORS = ("local", "slurm", "ray")
_EXTRA_MODULE = {"slurm": "submitit", "ray": "ray"}


def require(extra: str) -> Any:
    """Import an engine, or fail with one line saying which extra to install."""
    module = _EXTRA_MODULE[extra]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MilbenchError(f"--executor {extra} needs the '{module}' package: pip install 'milbench[{extra}]'") from None


def _remote_error(exc: BaseException) -> str:
    """The worker's own exception line out of an engine's wrapper (submitit puts the
    worker's traceback between two ``----`` rules; its last line is the error)."""
    text = str(exc)
    parts = [p for p in text.split("\n") if p.strip()]
    rules = [i for i, p in enumerate(parts) if set(p.strip()) == {"-"}]
    if len(rules) >= 2 and rules[1] - rules[0] > 1:
        line = parts[rules[1] - 1].strip()
        name, sep, msg = line.partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {msg}" if sep else line
    return first_line(exc)


class LocalExecutor:
    """Points one after another in this process (each still a fresh child via ``execute``)."""

    name = "local"

    def __init__(self) -> None:
        self._queue: deque[PointTask] = deque()
        self._running = False
        self.on_start: Callable[[PointTask], None] | None = None

    def submit(self, tasks: Sequence[PointTask]) -> None:
        self._queue.extend(tasks)

    def active(self) -> int:
        return len(self._queue) + int(self._running)

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._queue:
            return []
        task = self._queue.popleft()
        self._running = True
        try:
            if self.on_start:
                self.on_start(task)
            try:
                record = run_point(task)
            except KeyboardInterrupt:
                self._queue.clear()
                raise
            except Exception as exc:  # the point could not even start: a record says why
                return [Outcome(task, None, first_line(exc), "failed", {"name": "local"})]
            return [Outcome(task, record)]
        finally:
            self._running = False

    def cancel(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        pass


def parse_minutes(text: str | float | int | None) -> float | None:
    """SLURM-style time limit → minutes: ``90``, ``1:30:00``, ``2-00:00:00``, ``45:00`` (mm:ss)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip()
        try:
            days = 0
            if "-" in t:
                d, t = t.split("-", 1)
                days = int(d)
            parts = [float(p) for p in t.split(":")]
            if len(parts) == 1:
                value = parts[0]
            elif len(parts) == 2:
                value = parts[0] + parts[1] / 60
            elif len(parts) == 3:
                value = parts[0] * 60 + parts[1] + parts[2] / 60
            else:
                raise ValueError(text)
            value += days * 24 * 60
        except ValueError:
            raise MilbenchError(f"bad time limit {text!r}; valid: minutes (90), H:MM:SS (1:30:00) or D-HH:MM:SS") from None
    if value <= 0:
        raise MilbenchError(f"bad time limit {text!r}: must be positive")
    return value


def parse_params(items: Sequence[str], what: str = "--slurm-param") -> dict[str, str]:
    """``key=value`` items → dict (extra sbatch parameters such as ``qos=high`` or ``constraint=a100``)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise MilbenchError(f"bad {what} {item!r}: expected key=value, e.g. qos=high")
        k, v = item.split("=", 1)
        out[k.strip().lstrip("-").replace("-", "_")] = v.strip()
    return out


class SubmititExecutor:
    """A SLURM job array through submitit (``cluster='local'`` runs the same jobs as local processes).

    One array task per point; ``array_parallelism`` caps how many run at once.
    The time limit goes to each task so the worker can tell a timeout from a
    preemption when SLURM's warning signal (USR2, ``signal_delay_s`` before the
    limit) arrives; a job SLURM ends without a result (killed at the hard
    limit, out of its memory allocation, node failure) is turned into a record
    from the job's final state.
    """

    name = "slurm"

    def __init__(self, folder: str | os.PathLike, cluster: str = "slurm", *, partition: str | None = None,
                 time_min: float | None = 60.0, gpus: int = 0, cpus: int | None = None, mem_gb: float | None = None,
                 array_parallelism: int | None = None, sbatch: Mapping[str, str] | None = None,
                 setup: Sequence[str] = (), signal_delay_s: int | None = None, job_name: str = "milbench") -> None:
        submitit = require("slurm")
        if cluster not in ("slurm", "local"):
            raise MilbenchError(f"unknown submitit cluster '{cluster}'; valid: slurm, local")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise MilbenchError("--executor slurm: 'sbatch' is not on PATH (run the sweep on a SLURM login node, "
                                "or use --slurm-cluster local to try the job array on this machine)")
        self.cluster = cluster
        self.folder = Path(folder)
        self.time_limit_s = time_min * 60 if time_min else None
        params: dict[str, Any] = {"name": job_name, "gpus_per_node": int(gpus)}
        if cpus:
            params["cpus_per_task"] = int(cpus)
        if mem_gb:
            params["mem_gb"] = float(mem_gb)
        if cluster == "slurm":
            self._ex = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster="slurm")
            if time_min:
                params["timeout_min"] = int(math.ceil(time_min))
            params.update(slurm_partition=partition, slurm_array_parallelism=array_parallelism,
                          slurm_additional_parameters=dict(sbatch or {}) or None,
                          slurm_setup=list(setup) or None, slurm_signal_delay_s=signal_delay_s)
        else:  # the same jobs as local processes, with submitit's own timeout/USR2 controller
            self._ex = submitit.LocalExecutor(folder=str(self.folder / "%j"))
            params.update(timeout_min=time_min, signal_delay_s=signal_delay_s, setup=list(setup) or None)
        self._ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        # submitit's local cluster starts every job at once; throttle it to the array parallelism
        self._throttle = array_parallelism if cluster != "slurm" else None
        self._backlog: deque[PointTask] = deque()
        self.jobs: list[tuple[Any, PointTask]] = []
        self._cancelled = False

    def submit(self, tasks: Sequence[PointTask]) -> None:
        for t in tasks:
            t.time_limit_s = self.time_limit_s
        if self._throttle:
            self._backlog.extend(tasks)
            self._launch()
        elif tasks:
            jobs = self._ex.map_array(run_point, list(tasks))
            self.jobs.extend(zip(jobs, tasks))

    def _launch(self) -> None:
        while self._backlog and len(self.jobs) < (self._throttle or 1):
            task = self._backlog.popleft()
            self.jobs.append((self._ex.submit(run_point, task), task))

    def active(self) -> int:
        return len(self.jobs) + len(self._backlog)

    def _outcome(self, job: Any, task: PointTask) -> Outcome:
        engine = {"name": "slurm", "cluster": self.cluster, "job_id": str(job.job_id)}
        try:
            engine["log"] = str(job.paths.stderr)
        except Exception:
            pass
        if self._cancelled and not job.paths.result_pickle.exists():
            # cancelled before it could return: whatever it recorded is on disk; don't wait for a result file
            return Outcome(task, None, f"job {job.job_id} cancelled", "interrupted", engine)
        try:
            return Outcome(task, job.result(), engine=engine)
        except Exception as exc:
            state = ""
            try:
                state = str(job.state).upper()
            except Exception:
                pass
            text = str(exc)
            if "TIMEOUT" in state or "timed-out" in text:
                status = "timeout"
            elif "PREEMPT" in state or "preempted" in text:
                status = "preempted"
            elif "OUT_OF_ME" in state:
                status = "oom"
            elif "CANCEL" in state:
                status = "interrupted"
            else:
                status = "failed"
            where = f"job {job.job_id}" + (f" ended {state}" if state and state not in ("UNKNOWN", "FINISHED") else "")
            log = f" (log: {engine['log']})" if engine.get("log") else ""
            return Outcome(task, None, f"{where}: {_remote_error(exc)}{log}", status, engine)

    def wait(self, timeout: float) -> list[Outcome]:
        deadline = time.time() + timeout
        while True:
            done = [(j, t) for j, t in self.jobs if j.done()]
            if done or time.time() >= deadline:
                break
            time.sleep(min(0.2, max(0.0, deadline - time.time())))
        outs = []
        for job, task in done:
            self.jobs.remove((job, task))
            outs.append(self._outcome(job, task))
        self._launch()
        return outs

    def cancel(self) -> None:
        self._cancelled = True
        self._backlog.clear()
        for job, _ in self.jobs:
            try:
                job.cancel(check=False)
            except Exception:
                pass

    def close(self) -> None:
        pass


class RayExecutor:
    """One Ray task per point, with the CPUs/GPUs/memory each point needs.

    Connects to ``address`` (``auto`` for the cluster this machine belongs to,
    ``ray://host:10001`` for a remote one) or starts a local Ray instance. A
    Ray instance that was already initialised in this process is reused. The
    workers get the driver's ``MILBENCH_*`` environment variables; milbench
    and the plugins must be importable on every node, and the results
    directory should be shared (records are also gathered back to the
    driver's directory when it is not).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus: float = 1, gpus: float = 0, memory: int | None = None,
                 retries: int = 0, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
        ray = require("ray")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs.update(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus)
            try:
                ray.init(**kwargs)
            except Exception as exc:
                raise MilbenchError(f"--executor ray: could not {'connect to ' + address if address else 'start Ray'}: "
                                    f"{first_line(exc)}") from None
            self._started = True
        self._remote = ray.remote(run_point)
        self.options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": int(retries)}
        if memory:
            self.options["memory"] = int(memory)
        self.refs: dict[Any, PointTask] = {}
        self._cancelled: set[Any] = set()  # the refs cancel() asked Ray to stop

    def submit(self, tasks: Sequence[PointTask]) -> None:
        env = {k: v for k, v in os.environ.items() if k.startswith("MILBENCH_")}
        for task in tasks:
            ref = self._remote.options(**self.options, name=task.label[:100],
                                       runtime_env={"env_vars": env} if env else None).remote(task)
            self.refs[ref] = task

    def active(self) -> int:
        return len(self.refs)

    def _outcome(self, ref: Any, task: PointTask) -> Outcome:
        out = self._raw_outcome(ref, task)
        cancelled = ref in self._cancelled
        self._cancelled.discard(ref)
        if cancelled and out.record is None and out.status == "failed":
            # we cancelled it, so whatever error it came back with (Ray says TaskCancelledError for most, but
            # a task interrupted mid-start, or one that turns the KeyboardInterrupt into its own error, comes
            # back as a task error) it was interrupted, not broken, and a resumed sweep must run it again
            out.status, out.error = "interrupted", f"cancelled by the sweep; {out.error}"
        return out

    def _raw_outcome(self, ref: Any, task: PointTask) -> Outcome:
        ray = self._ray
        exc_mod = ray.exceptions
        engine = {"name": "ray"}
        try:
            return Outcome(task, ray.get(ref), engine=engine)
        except getattr(exc_mod, "TaskCancelledError", ()) as exc:
            return Outcome(task, None, f"Ray task cancelled: {first_line(exc)}", "interrupted", engine)
        except getattr(exc_mod, "OutOfMemoryError", ()) as exc:
            return Outcome(task, None, f"Ray's memory monitor killed the task: {first_line(exc)}", "oom", engine)
        except getattr(exc_mod, "RayTaskError", ()) as exc:
            cause = getattr(exc, "cause", None)
            return Outcome(task, None, f"Ray task failed: {first_line(cause or exc)}", "failed", engine)
        except Exception as exc:  # worker or node died, object lost, ...
            return Outcome(task, None, f"Ray lost the task: {first_line(exc)}", "failed", engine)

    def wait(self, timeout: float) -> list[Outcome]:
        if not self.refs:
            return []
        ray = self._ray
        refs = list(self.refs)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return [self._outcome(ref, self.refs.pop(ref)) for ref in ready]

    def cancel(self) -> None:
        """Ask Ray to stop every submitted point that has not finished.

        A finished one is left alone: its outcome stands, and cancelling a task
        whose reply the driver has not processed yet races Ray's own bookkeeping
        (``Check failed: ... Tried to complete task that was not pending``,
        ray-project/ray#54785), which aborts the driver process, the sweep with it.
        """
        refs = list(self.refs)
        if not refs:
            return
        try:
            done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        except Exception:
            done = []
        finished = set(done)
        for ref in refs:
            if ref in finished:
                continue
            self._cancelled.add(ref)
            try:
                self._ray.cancel(ref)
            except Exception:
                pass

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(name: str, *, results: Path, sweep_id: str, cpus: float | None = None, gpus: float = 0,
                  mem_bytes: int | None = None, retry: bool = False, slurm: Mapping[str, Any] | None = None,
                  ray_address: str | None = None) -> Executor:
    """The executor the CLI asked for, with its options checked (one-line errors)."""
    if name == "local":
        return LocalExecutor()
    if name == "slurm":
        s = dict(slurm or {})
        folder = Path(s.pop("folder", None) or Path(results) / ".submitit" / sweep_id)
        return SubmititExecutor(folder, s.pop("cluster", "slurm"), cpus=int(cpus) if cpus else None, gpus=int(gpus),
                                mem_gb=mem_bytes / 2**30 if mem_bytes else None, job_name=f"milbench-{sweep_id}", **s)
    if name == "ray":
        return RayExecutor(ray_address, cpus=cpus or 1, gpus=gpus, memory=mem_bytes, retries=1 if retry else 0)
    raise MilbenchError(f"unknown executor '{name}'; valid: {', '.join(EXECUTORS)}")
