"""Sweeps: a grid of benchmark points, run one fresh process per point, resumable.

A sweep is the Cartesian product methods × datasets × grid values × seeds,
resolved before anything runs; a point's identity is its resolved config hash,
seed and smoke flag, so a sweep stopped in any way and started again — even
on another executor — runs only the points without an ``ok`` record. The
package, by idea:

- :mod:`~milbench.sweep.grid`: parsing ``--method/--dataset/--grid/--seeds``,
  :class:`SweepSpec`, expanding it into :class:`Point` objects, and a point's
  identity (:func:`point_key`).
- :mod:`~milbench.sweep.manifest`: what a sweep keeps on disk besides records
  (the manifest, resume state derived from the records, running markers).
- :mod:`~milbench.sweep.worker`: :class:`PointTask` and :func:`run_point`, the
  one code path that runs a point and writes its record, whatever the engine.
- :mod:`~milbench.sweep.executors`: where points run (local, SLURM, Ray).
- :mod:`~milbench.sweep.driver`: :func:`run_sweep`, the loop that submits,
  gathers, retries and records what an engine lost.

The names below are re-exported so ``from milbench import sweep as sw`` reaches
all of them.
"""

from __future__ import annotations

from milbench.sweep.driver import RETRY_STATUSES, Reporter, SweepResult, SweepState, make_tasks, run_sweep
from milbench.sweep.executors import (EXECUTORS, Executor, LocalExecutor, Outcome, RayExecutor, SubmititExecutor,
                                      make_executor, parse_minutes, parse_params, require)
from milbench.sweep.grid import (POINT_FIELDS, Point, PointKey, SweepSpec, expand, parse_grid, parse_names,
                                 parse_seeds, point_key)
from milbench.sweep.manifest import (MARKERS_DIR, RECORDED_STATUSES, SWEEPS_DIR, default_command, finished,
                                     write_manifest)
from milbench.sweep.worker import PointTask, engine_failure_record, engine_info, run_point

__all__ = [
    # grid
    "POINT_FIELDS", "Point", "PointKey", "SweepSpec", "expand", "parse_grid", "parse_names", "parse_seeds",
    "point_key",
    # on disk
    "MARKERS_DIR", "RECORDED_STATUSES", "SWEEPS_DIR", "default_command", "finished", "write_manifest",
    # worker
    "PointTask", "engine_failure_record", "engine_info", "run_point",
    # executors
    "EXECUTORS", "Executor", "LocalExecutor", "Outcome", "RayExecutor", "SubmititExecutor", "make_executor",
    "parse_minutes", "parse_params", "require",
    # driver
    "RETRY_STATUSES", "Reporter", "SweepResult", "SweepState", "make_tasks", "run_sweep",
]
