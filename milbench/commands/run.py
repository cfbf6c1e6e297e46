"""``milbench run``: one method on one dataset in a fresh process, one record."""

from __future__ import annotations

from pathlib import Path

import click

from milbench.commands.options import common_run_options
from milbench.errors import MilbenchError


def fmt_bytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def summary_line(rec: dict) -> str:
    """One line saying how a run ended: status, headline metrics, time, memory."""
    m, t, mem = rec.get("metrics") or {}, rec.get("timing") or {}, rec.get("memory") or {}
    parts = [f"{rec['method']} on {rec['dataset']} (seed {rec['seed']}): {rec['status']}"]
    for key in ("bag_auc", "bag_accuracy", "dice", "mean_dice"):
        if m.get(key) is not None:
            parts.append(f"{key} {m[key]:.3f}")
    if t.get("train_s_per_bag") is not None:
        parts.append(f"{t['train_s_per_bag'] * 1000:.1f} ms/bag")
    if t.get("wall_s") is not None:
        parts.append(f"{t['wall_s']:.1f} s")
    if mem.get("gpu_peak_bytes") is not None:
        parts.append(f"GPU peak {fmt_bytes(mem['gpu_peak_bytes'])} ({mem.get('gpu_peak_method')})")
    parts.append(f"CPU peak RSS {fmt_bytes(mem.get('cpu_peak_rss_bytes'))}")
    line = ", ".join(parts)
    if rec.get("error"):
        line += f"\n  error: {rec['error']}"
    return line


def where_lines(rec: dict, out: Path, results_option: str | None) -> str:
    """Where the run left its files (record, log, artifacts) and the command that shows it next
    to the others — so a new user knows what to open and what to type after their first run."""
    import shlex

    lines = [f"record:    {out / (rec['run_id'] + '.json')}"]
    if rec.get("log"):
        lines.append(f"log:       {out / rec['log']}")
    artifacts = rec.get("artifacts")
    if isinstance(artifacts, dict) and artifacts:
        lines.append(f"artifacts: {out / 'artifacts' / rec['run_id']} ({', '.join(sorted(artifacts))})")
    flags = f" --results {shlex.quote(str(results_option))}" if results_option else ""
    if rec.get("smoke"):
        flags += " --include-smoke"  # report hides smoke runs by default
    lines.append(f"next:      milbench report{flags}")
    return "\n".join(lines)


def check_data_root(data_root: str | None) -> None:
    """An explicit ``--data-root`` must exist (a typo must not silently fall back to the sample)."""
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise MilbenchError(f"data root {data_root} does not exist; pass an existing folder to --data-root "
                            f"(or omit it to use $MILBENCH_DATA_ROOT, ~/.cache/milbench, then the shipped sample)")


@click.command()
@click.option("--method", "-m", required=True, help="method name (see `milbench list`)")
@click.option("--dataset", "-d", required=True, help="dataset name (see `milbench list`)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for data splits, init and order")
@common_run_options
def run(method: str, dataset: str, seed: int, preset: str | None, overrides: tuple[str, ...], smoke: bool,
        max_memory: str | None, timeout: float | None, device: str, data_root: str | None, results: str | None) -> None:
    """Train and evaluate METHOD on DATASET in a fresh process; write one JSON record."""
    from milbench.devices import check_device
    from milbench.plugins import get_registry
    from milbench.records import ensure_writable, results_dir
    from milbench.runner import execute, parse_bytes, plan_run

    if seed < 0:
        raise MilbenchError(f"bad --seed {seed}: must be >= 0")
    if timeout is not None and timeout <= 0:
        raise MilbenchError(f"bad --timeout {timeout}: must be > 0 seconds")
    registry = get_registry()
    out = results_dir(results)
    plan = plan_run(registry, method, dataset, preset, overrides, seed, smoke, results=out)
    device = check_device(device)
    limit = parse_bytes(max_memory)
    ensure_writable(out)
    check_data_root(data_root)
    click.echo(f"milbench: {plan.method} on {plan.dataset}, preset {plan.preset}, seed {seed}"
               f"{' (smoke)' if smoke else ''}, config {plan.config_hash}", err=True)
    rec = execute(plan, out, device=device, data_root=data_root, timeout=timeout, max_memory=limit)
    if rec.get("error_kind") == "input":
        # bad data or config found inside the run: one line, like any bad input (the record is kept)
        raise MilbenchError(rec["error"])
    click.echo(summary_line(rec))
    for warning in rec.get("warnings") or []:
        click.echo(f"  warning: {warning}")
    click.echo(where_lines(rec, out, results))
    if rec["status"] != "ok":
        raise SystemExit(1)
