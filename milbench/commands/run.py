"""``milbench run``: one method on one dataset in a fresh process, one record."""

from __future__ import annotations

import click

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


def where_lines(rec: dict, out: "Path", results_option: str | None) -> str:
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
    from pathlib import Path

    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise MilbenchError(f"data root {data_root} does not exist; pass an existing folder to --data-root "
                            f"(or omit it to use $MILBENCH_DATA_ROOT, ~/.cache/milbench, then the shipped sample)")


def common_run_options(f):
    """Options shared by ``run`` and ``sweep``."""
    f = click.option("--results", "results", default=None, help="results directory [$MILBENCH_RESULTS or ./results/runs]")(f)
    f = click.option("--data-root", default=None, help="where datasets are looked for first [$MILBENCH_DATA_ROOT, then ~/.cache/milbench]")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(f)
    f = click.option("--timeout", type=float, default=None, help="stop a run after this many seconds (status: timeout)")(f)
    f = click.option("--max-memory", default=None, help="memory limit per run, e.g. 2GB (CPU: RSS watchdog; GPU: allocator fraction); crossing it is status oom")(f)
    f = click.option("--smoke", is_flag=True, help="tiny configuration that runs in seconds; the record is marked smoke")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)")(f)
    f = click.option("--preset", "-p", default=None, help="named preset: built in (default, paper, ...) or saved by `milbench tune` under RESULTS/presets")(f)
    return f


@click.command()
@click.option("--method", "-m", required=True, help="method name (see `milbench list`)")
@click.option("--dataset", "-d", required=True, help="dataset name (see `milbench list`)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for data splits, init and order")
@common_run_options
def run(method, dataset, seed, preset, overrides, smoke, max_memory, timeout, device, data_root, results):
    """Train and evaluate METHOD on DATASET in a fresh process; write one JSON record."""
    from milbench.plugins import get_registry
    from milbench.records import ensure_writable, results_dir
    from milbench.runner import check_device, execute, parse_bytes, plan_run

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
