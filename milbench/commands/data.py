"""``milbench data``: where each dataset looks, what it found, and how to fetch what is missing.

- ``milbench data`` prints one row per registered dataset (a rich table, or
  ``--json``): its state (complete / partial / sample / missing), the folder it
  would read, what is there, where it looked, and the command that fetches it.
- ``milbench data verify [NAME] [--quick]`` runs each dataset's deep check
  (counts, readable files, checksums where known) and exits non-zero on problems.
- ``milbench data download NAME`` fetches the official files (network needed);
  offline it fails with one line that says what to download by hand.

Bad input and missing or unreachable data raise :class:`MilbenchError`, which
``milbench``'s entry point prints as one line (exit status 2), like every command.

Datasets come from :func:`milbench.plugins.get_registry` (a test may hand in its
own registry as ``obj={"registry": reg}``). Nothing here imports torch at module
import time; the datasets' own checks import it when they decode images.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import click

from milbench.errors import DataError, MilbenchError, first_line

_STATE_STYLE = {"full": ("complete", "green"), "partial": ("partial", "yellow"),
                "sample": ("sample only", "cyan"), "missing": ("missing", "red"), "error": ("error", "red")}
_DATA_ROOT_HELP = "data root searched first (then $MILBENCH_DATA_ROOT, then the user cache)"


def _registry(ctx: click.Context) -> Any:
    """The plugin registry: one handed in through ``ctx.obj['registry']``, else the process one."""
    obj = ctx.find_object(dict)
    if obj and obj.get("registry") is not None:
        return obj["registry"]
    from milbench.plugins import get_registry

    return get_registry()


def _data_root(ctx: click.Context, given: str | None) -> str | None:
    """A subcommand's ``--data-root``, else the one given to ``milbench data``."""
    return given if given else ctx.meta.get("milbench.data_root")


def _why(exc: BaseException) -> str:
    """A failure in one line: a :class:`MilbenchError`'s own message, else ``Type: first line``."""
    return " ".join(str(exc).split()) if isinstance(exc, MilbenchError) else first_line(exc)


def _status(dataset: Any, data_root: str | None, overrides: Sequence[str]) -> Any:
    """``dataset.status``, given the ``--set`` overrides only when there are any (so a
    dataset written against the one-argument ``status`` keeps working without them)."""
    return dataset.status(data_root, overrides=list(overrides)) if overrides else dataset.status(data_root)


def _status_row(name: str, dataset: Any, data_root: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One dataset's status as a plain dict; a dataset whose status() fails shows as ``error``.
    ``overrides`` (``--set key=value``) reach a dataset whose ``status`` takes them (e.g.
    ``slides``: which manifest, and the tiling settings its tile counts are for)."""
    try:
        row = asdict(_status(dataset, data_root, overrides))
    except Exception as exc:  # a broken plugin must not hide the other datasets
        row = {"name": name, "found": False, "complete": False, "root": None, "source": "error",
               "detail": _why(exc), "looked_in": [], "fetch_hint": f"milbench data download {name}"}
    return row


def _compact_looked(looked: list[str], roots: list[Path]) -> str:
    """Group looked-in paths by data root: ``/data: imagenette2-160, imagenette2-224``."""
    groups: dict[str, list[str]] = {}
    for path in looked:
        p = Path(path)
        for root in roots:
            try:
                rel = p.relative_to(root)
            except ValueError:
                continue
            groups.setdefault(str(root), []).append(str(rel) if str(rel) != "." else "(the root itself)")
            break
        else:
            groups.setdefault(path, [])
    return "\n".join(f"{k}: {', '.join(v)}" if v else k for k, v in groups.items())


def _root_origins(data_root: str | None) -> list[tuple[Path, str]]:
    """The data roots searched, in order, with where each came from."""
    from milbench.data.roots import ENV_DATA_ROOT, cache_dir, candidate_roots

    origins = []
    for root in candidate_roots(data_root):
        if data_root and root == Path(data_root).expanduser():
            why = "--data-root"
        elif os.environ.get(ENV_DATA_ROOT) and root == Path(os.environ[ENV_DATA_ROOT]).expanduser():
            why = f"${ENV_DATA_ROOT}"
        elif root == cache_dir():
            why = "user cache"
        else:
            why = ""
        origins.append((root, why))
    return origins


@click.group("data", invoke_without_command=True)
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help=_DATA_ROOT_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON instead of a table")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="dataset keys for datasets whose status depends on them (slides: manifest, instance_size, ...)")
@click.pass_context
def data_group(ctx: click.Context, data_root: str | None, as_json: bool, overrides: tuple[str, ...] = ()) -> None:
    """Show, verify and download the datasets' files.

    With no subcommand: for each dataset, where milbench looks, what it found,
    whether it is complete, and the command that fetches it.
    """
    ctx.meta["milbench.data_root"] = data_root
    if ctx.invoked_subcommand is not None:
        return
    registry = _registry(ctx)
    rows = [_status_row(name, ds, data_root, overrides) for name, ds in sorted(registry.datasets.items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _print_status(rows, data_root)


def _print_status(rows: list[dict[str, Any]], data_root: str | None) -> None:
    from milbench.console import make_console
    from rich.table import Table

    console = make_console()
    origins = _root_origins(data_root)
    console.print("Data roots, searched in order: "
                  + "; ".join(f"{i}. {r}" + (f" ({why})" if why else "") for i, (r, why) in enumerate(origins, 1)))
    if not rows:
        console.print("No datasets are registered (see 'milbench plugins').")
        return
    table = Table(show_lines=True)
    for col in ("dataset", "state", "found", "looked in", "to fetch"):
        table.add_column(col, overflow="fold")
    for row in rows:
        label, style = _STATE_STYLE.get(row["source"], (row["source"], "white"))
        found = row["detail"] + (f"\n{row['root']}" if row["root"] else "")
        fetch = "" if row["complete"] else (row["fetch_hint"] or "")
        table.add_row(row["name"], f"[{style}]{label}[/{style}]", found,
                      _compact_looked(row["looked_in"], [r for r, _ in origins]), fetch)
    console.print(table)


@data_group.command("verify")
@click.argument("name", required=False)
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help=_DATA_ROOT_HELP)
@click.option("--quick", is_flag=True, help="decode a sample of the images instead of all of them")
@click.pass_context
def verify_cmd(ctx: click.Context, name: str | None, data_root: str | None, quick: bool) -> None:
    """Check a dataset's files (all datasets without NAME): counts, readable files, checksums.

    Exits non-zero when a checked dataset has problems, or when NAME is given and
    its data is missing. Without NAME, missing datasets are listed and skipped.
    """
    registry = _registry(ctx)
    root = _data_root(ctx, data_root)
    targets = [(name, registry.dataset(name))] if name else sorted(registry.datasets.items())
    failed = False
    for ds_name, ds in targets:
        row = _status_row(ds_name, ds, root)
        if row["source"] in ("missing", "error"):
            click.echo(f"{ds_name}: {row['source']}: {row['detail']}"
                       + (f" (fetch: {row['fetch_hint']})" if row["fetch_hint"] else ""))
            failed = failed or bool(name) or row["source"] == "error"
            continue
        try:
            problems = list(ds.verify(root, quick=True) if quick else ds.verify(root))
        except Exception as exc:  # verify itself crashing is a problem to report, not a traceback
            problems = [f"verify raised {_why(exc)}"]
        where = row["root"] or "?"
        if problems:
            failed = True
            click.echo(f"{ds_name}: {len(problems)} problem(s) in {where}")
            for p in problems:
                click.echo(f"  - {p}")
        else:
            label = _STATE_STYLE.get(row["source"], (row["source"],))[0]
            click.echo(f"{ds_name}: ok ({label}{', quick' if quick else ''}): {row['detail']} [{where}]")
    if failed:
        ctx.exit(1)


def _entries(root: Path) -> set[str] | None:
    """Names directly under ``root`` before a download (None: ``root`` did not exist)."""
    try:
        return set(os.listdir(root)) if root.is_dir() else None
    except OSError:
        return set()


def _remove_empty_new_dirs(root: Path, before: set[str] | None) -> None:
    """After a failed download, remove the folders it created that hold no file (e.g. an empty
    ``QMNIST/raw`` or a new data root), so ``milbench data`` does not report a dataset folder
    that is only a husk. Anything holding a file — a partial archive, data placed by hand — stays;
    folders that existed before are never touched."""
    if not root.is_dir():
        return
    new = [root] if before is None else [root / n for n in os.listdir(root) if n not in before]
    for top in new:
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):  # deepest first
            try:
                os.rmdir(dirpath)  # only succeeds when empty
            except OSError:
                pass


@data_group.command("download")
@click.argument("name")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="where to put the files (default: $MILBENCH_DATA_ROOT, else the user cache)")
@click.option("--variant", default=None, help="which archive, for datasets that offer several (e.g. imagenette2-320)")
@click.pass_context
def download_cmd(ctx: click.Context, name: str, data_root: str | None, variant: str | None) -> None:
    """Fetch a dataset's official files into the data root (needs network access)."""
    from milbench.data.roots import download_root

    registry = _registry(ctx)
    root = download_root(_data_root(ctx, data_root))
    ds = registry.dataset(name)
    if variant is not None and not ds.variants:
        raise DataError(f"dataset '{name}' has no --variant choice for download")
    click.echo(f"downloading {name}{' ' + variant if variant else ''} into {root} ...", err=True)
    before = _entries(root)
    try:
        if variant is None:
            ds.download(str(root))
        else:
            ds.download(str(root), variant=variant)
    except OSError as exc:  # a plugin that lets a file-system error escape still gets one line
        _remove_empty_new_dirs(root, before)
        raise DataError(f"could not download {name} into {root}: {_why(exc)}") from None
    except BaseException:
        _remove_empty_new_dirs(root, before)
        raise
    row = _status_row(name, ds, str(root))
    click.echo(f"{name}: {row['detail']} [{row['root'] or root}]")
