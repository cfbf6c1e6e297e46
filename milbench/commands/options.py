"""Options several commands share, declared once so they read the same everywhere.

- :func:`common_run_options`: what ``run``, ``sweep`` and ``tune`` need to run
  a point (preset, ``--set``, smoke, limits, device, data root, results).
- :func:`record_filters`: which records ``report``, ``compare`` and ``plot``
  read (``--method``, ``--dataset``, ``--preset``, ``--include-smoke``), and
  :func:`names` to split what the user gave.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])


def common_run_options(f: F) -> F:
    """Options shared by ``run``, ``sweep`` and ``tune``."""
    f = click.option("--results", "results", default=None, help="results directory [$MILBENCH_RESULTS or ./results/runs]")(f)
    f = click.option("--data-root", default=None, help="where datasets are looked for first [$MILBENCH_DATA_ROOT, then ~/.cache/milbench]")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(f)
    f = click.option("--timeout", type=float, default=None, help="stop a run after this many seconds (status: timeout)")(f)
    f = click.option("--max-memory", default=None, help="memory limit per run, e.g. 2GB (CPU: RSS watchdog; GPU: allocator fraction); crossing it is status oom")(f)
    f = click.option("--smoke", is_flag=True, help="tiny configuration that runs in seconds; the record is marked smoke")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)")(f)
    f = click.option("--preset", "-p", default=None, help="named preset: built in (default, paper, ...) or saved by `milbench tune` under RESULTS/presets")(f)
    return f


def record_filters(method: bool = True) -> Callable[[F], F]:
    """``--method`` (unless ``method`` is False: ``compare`` names its methods as arguments),
    ``--dataset``, ``--preset`` (each comma-separated, passed on as ``methods``,
    ``datasets``, ``presets``) and ``--include-smoke``."""
    def decorate(f: F) -> F:
        f = click.option("--include-smoke", is_flag=True, help="include --smoke runs (excluded by default)")(f)
        f = click.option("--preset", "presets", default=None, help="only these presets (comma-separated)")(f)
        f = click.option("--dataset", "datasets", default=None, help="only these datasets (comma-separated)")(f)
        if method:
            f = click.option("--method", "methods", default=None, help="only these methods (comma-separated)")(f)
        return f
    return decorate


def names(text: str | None) -> list[str]:
    """``a, b,c`` → ``["a", "b", "c"]`` (blanks dropped); None or empty → ``[]`` (no filter)."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]
