"""The hand-off between a run's parent and its child process, in one place.

The parent (:func:`milbench.runner.execute`) writes a :class:`ChildSpec` to a
file and starts ``python -m milbench.child SPEC RESULT``; the child reads it
back, measures the run and keeps rewriting its result file; the parent turns
that file into the record. Both sides import this module, so what the spec
holds and which result fields exist (with their null values) is written down
once, not spelt out key by key on either side. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

#: Memory figures every record has; each stays None until measured (a missing measurement is None, never 0).
NULL_MEMORY_KEYS = ("gpu_peak_bytes", "gpu_peak_method", "torch_peak_allocated_bytes", "torch_peak_reserved_bytes",
                    "cpu_peak_rss_bytes")

#: Fields of the child's result that the parent copies into the record whenever the child set them (not None).
CHILD_FIELDS = ("metrics", "timing", "memory", "history", "data", "error", "error_kind", "traceback", "best_epoch",
                "stopped_early", "artifacts")


def null_fields() -> dict[str, Any]:
    """The measured fields of a run before anything was measured: null figures, empty tables.

    The parent's record starts from them (and keeps them when the child never
    reported: a lost or killed point), and so does the child's result file.
    Fields the child adds only when they apply (``traceback``, ``error_kind``,
    ``best_epoch``, ``stopped_early``, ``artifacts``) are not among them.
    """
    return {"error": None, "data": None, "metrics": {}, "timing": {}, "memory": dict.fromkeys(NULL_MEMORY_KEYS),
            "environment": {}, "history": []}


@dataclass
class ChildSpec:
    """Everything the child of one run needs, as the parent resolved it."""

    method: str
    dataset: str
    config: dict[str, Any]
    seed: int
    #: The canonical ``--device`` text (:func:`milbench.devices.parse_device`).
    device: str
    data_root: str | None = None
    #: Where the method may write its artifacts (``<results>/artifacts/<run_id>``).
    artifact_dir: str | None = None
    #: ``--max-memory``: the RSS watchdog's limit, and the CUDA allocator's fraction.
    max_memory_bytes: int | None = None
    #: The small file the child rewrites with the current epoch's progress (the parent's bar).
    progress_path: str | None = None
    #: ``<results>/cache``: where the run's dataset keeps derived files (``derived_cache_dir``).
    cache_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ChildSpec":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
