"""Run records: one JSON file per run, written atomically, read leniently.

A record is the unit of truth (as in asv): every run, failed or not, leaves
one, with the machine and environment that produced it. Writes go to a
temporary file in the same directory and are renamed into place, so a crash
or a concurrent writer never leaves a half-written record; an index, where
needed, is derived from the records rather than kept beside them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from milbench.errors import MilbenchError

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "oom", "timeout", "interrupted", "preempted")
ENV_RESULTS = "MILBENCH_RESULTS"
DEFAULT_RESULTS = "results/runs"

#: Top-level keys every record has (values may be null).
REQUIRED_KEYS = (
    "schema_version", "run_id", "created", "status", "error", "method", "dataset", "preset",
    "config", "config_hash", "seed", "supervision", "smoke", "data", "metrics", "timing",
    "memory", "environment", "git", "history",
)


def results_dir(path: str | os.PathLike | None) -> Path:
    """The results directory: explicit, else ``$MILBENCH_RESULTS``, else ``./results/runs``."""
    return Path(path or os.environ.get(ENV_RESULTS) or DEFAULT_RESULTS)


def existing_results_dir(path: str | os.PathLike | None) -> Path:
    """The results directory to *read* (report, compare, plot). A folder named with
    ``--results`` or ``$MILBENCH_RESULTS`` that does not exist is a one-line error:
    a typo must not pass as "no records found". The default ``./results/runs`` may
    be absent (nothing was run here yet) and simply holds no records."""
    directory = results_dir(path)
    explicit = path or os.environ.get(ENV_RESULTS)
    if explicit and not directory.is_dir():
        where = "--results" if path else f"${ENV_RESULTS}"
        what = "is not a folder" if directory.exists() else "does not exist"
        raise MilbenchError(f"results directory {directory} ({where}) {what}; pass the folder your runs wrote to")
    return directory


def ensure_writable(directory: Path) -> None:
    """Create ``directory`` and prove it is writable, or fail with one line."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MilbenchError(f"results directory {directory} is not writable ({exc.strerror or exc}); "
                            f"choose another with --results or ${ENV_RESULTS}") from None


def new_run_id(method: str, dataset: str, seed: int) -> str:
    """Unique, sortable: UTC time, names, seed and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{method}-{dataset}-s{seed}-{uuid.uuid4().hex[:8]}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON to ``path`` via a temp file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set):
        return sorted(obj)
    return str(obj)


def write_record(directory: Path, record: dict[str, Any]) -> Path:
    """Write one record as ``<run_id>.json``."""
    return write_json_atomic(directory / f"{record['run_id']}.json", record)


def iter_records(directory: str | os.PathLike, warn: bool = True) -> Iterator[dict[str, Any]]:
    """Every readable record under ``directory`` (recursively); a file that is
    not valid JSON or not a record is skipped with a one-line warning."""
    root = Path(directory)
    if not root.exists():
        return
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            if warn:
                print(f"milbench: warning: skipping {path}: not valid JSON ({exc})", file=sys.stderr)
            continue
        if not isinstance(rec, dict) or "run_id" not in rec or "status" not in rec:
            if warn and not (isinstance(rec, dict) and rec.get("kind")):
                print(f"milbench: warning: skipping {path}: not a milbench record", file=sys.stderr)
            continue
        rec["_path"] = str(path)
        yield rec
