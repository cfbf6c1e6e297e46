"""The sweep driver: hand tasks to an executor, gather what comes back, never leave a point without a record.

The driver (:func:`run_sweep`) runs in the ``milbench sweep`` (or ``tune``)
process. It only submits, gathers, retries preempted points and writes a
``failed`` record itself when an engine lost a point without one; the workers
(:mod:`milbench.sweep.worker`) write every other record. What to run was
decided before: the command plans the grid (:mod:`milbench.sweep.grid`) and
drops the points resume finds done (:mod:`milbench.sweep.manifest`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from milbench.records import iter_records, write_record
from milbench.runner import RunInterrupted
from milbench.sweep.executors import Executor, Outcome
from milbench.sweep.grid import Point
from milbench.sweep.manifest import markers_dir, remove_markers_dirs
from milbench.sweep.worker import PointTask, engine_failure_record

#: Engine outcomes that a ``--retry`` resubmits once.
RETRY_STATUSES = ("timeout", "preempted")


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
    """What the driver tells a progress display (``milbench sweep``'s rich bar; a test's probe)."""

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
    running_dirs = {markers_dir(t.results, t.sweep_id) for t in tasks}
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
        remove_markers_dirs(sorted(running_dirs))  # progress markers: leave no empty folders behind
    return SweepResult(results_by_task, list(skipped), interrupted)
