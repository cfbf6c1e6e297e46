"""Where datasets look for their files: ``--data-root``, then the
``MILBENCH_DATA_ROOT`` environment variable, then a per-user cache directory.
A dataset falls back to the sample shipped inside the package when none of
these holds its files, and says so in the record."""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_ROOT = "MILBENCH_DATA_ROOT"
#: Set by the harness in a run's process: the results folder's ``cache/`` (:func:`derived_cache_dir`).
ENV_DERIVED_CACHE = "MILBENCH_DERIVED_CACHE"


def cache_dir() -> Path:
    """The per-user data cache (``$XDG_CACHE_HOME/milbench`` or ``~/.cache/milbench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "milbench"


def derived_cache_dir() -> Path:
    """Where a dataset keeps what it computes from its files (a slide's tile coordinates).

    Inside a run it is ``<results>/cache`` (the harness sets ``MILBENCH_DERIVED_CACHE`` in the
    run's process), so the cache lives beside the records it served: the next run or sweep
    point on those results reuses it, on SLURM and Ray workers too, and deleting a results
    folder deletes its cache. Outside a run (``milbench data``) it is the per-user cache.
    """
    value = os.environ.get(ENV_DERIVED_CACHE)
    return Path(value) if value else cache_dir()


def candidate_roots(data_root: str | os.PathLike | None) -> list[Path]:
    """The roots searched, in order, without duplicates."""
    roots: list[Path] = []
    for r in (data_root, os.environ.get(ENV_DATA_ROOT), cache_dir()):
        if r:
            p = Path(r).expanduser()
            if p not in roots:
                roots.append(p)
    return roots


def find_in_roots(data_root: str | os.PathLike | None, relpaths: list[str]) -> tuple[Path | None, list[str]]:
    """First ``root/relpath`` that exists, for each root in order; plus every path tried."""
    tried = []
    for root in candidate_roots(data_root):
        for rel in relpaths:
            p = root / rel
            tried.append(str(p))
            if p.exists():
                return p, tried
    return None, tried


def download_root(data_root: str | os.PathLike | None) -> Path:
    """Where ``milbench data download`` writes: the first explicit root, else the cache."""
    return candidate_roots(data_root)[0]
