"""What a sweep keeps on disk besides its records: the manifest, the resume state, the running markers.

- The manifest (``<results>/sweeps/<sweep id>.json``, ``"kind": "sweep"``,
  which record readers skip) lists every invocation of a sweep: provenance
  for a results README.
- Resume state is not kept anywhere: :func:`finished` derives it from the
  records, so a sweep can be stopped (Ctrl-C, crash, SIGKILL of the driver)
  and started again — even on another executor — and only the points without
  an ``ok`` record run.
- A worker on a remote engine leaves a marker file holding its pid while its
  point runs (``<results>/.sweep-running/<sweep id>/<token>``): the driver
  counts them for its progress display, and a scheduler's signal can be
  aimed at the pid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from milbench.records import iter_records, now_iso, write_json_atomic
from milbench.sweep.grid import PointKey, SweepSpec, point_key

#: Statuses that ``--skip-failed`` also treats as done (an interrupted point is always rerun).
RECORDED_STATUSES = ("ok", "failed", "oom", "timeout", "preempted")

SWEEPS_DIR = "sweeps"        # manifests (JSON with "kind": "sweep"; iter_records skips them)
MARKERS_DIR = ".sweep-running"  # one file per point being run right now, holding the worker's pid (progress)


def finished(results: Path, statuses: Sequence[str] = ("ok",)) -> dict[PointKey, dict[str, Any]]:
    """Latest record per point key among records whose status is in ``statuses``.

    This is the whole of resume: the driver skips every point found here.
    """
    out: dict[PointKey, dict[str, Any]] = {}
    for rec in iter_records(results, warn=False):
        if rec.get("status") not in statuses or not rec.get("config_hash"):
            continue
        key = point_key(rec)
        if key not in out or str(rec.get("created")) >= str(out[key].get("created")):
            out[key] = rec
    return out


def markers_dir(results: str | Path, sweep_id: str | None) -> Path:
    """The folder of a sweep's running markers (``adhoc`` for tasks outside a named sweep)."""
    return Path(results) / MARKERS_DIR / (sweep_id or "adhoc")


def remove_markers_dirs(folders: Sequence[Path]) -> None:
    """Remove the marker folders (and their parent) once empty: leave no empty folders behind."""
    for d in folders:
        for folder in (d, d.parent):
            try:
                folder.rmdir()
            except OSError:
                pass


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
    """The driver's command line, stored in each record and the manifest (a worker's own argv means nothing)."""
    return list(sys.argv[1:])
