"""``milbench sweep``: methods × datasets × grid × seeds, one fresh process per point, resumable."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from milbench.commands.options import common_run_options
from milbench.commands.run import summary_line
from milbench.errors import MilbenchError


class RichReporter:
    """A rich progress bar: the point running now, done/total, ETA, and per-status counts.

    Points skipped as already done are not counted in the bar, so the ETA is
    the time per point actually run times the points left.
    """

    def __init__(self, executor: str, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.executor = executor
        self.console = console
        self.progress = Progress(TextColumn("[bold]{task.fields[head]}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[tail]}"), console=console, transient=False)
        self.task_id: Any = None

    def _fields(self, state: Any) -> dict[str, str]:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(state.counts.items())) or "none finished"
        if self.executor == "local":
            head = state.current[0] if state.current else ("done" if state.done >= state.to_run else "starting")
            tail = f"[{counts}]"
        else:
            head = f"{self.executor}: {state.queued} queued · {state.running} running"
            tail = f"[{counts}]"
        return {"head": head, "tail": tail}

    def start(self, state: Any) -> None:
        self.progress.start()
        self.task_id = self.progress.add_task("sweep", total=state.to_run, **self._fields(state))

    def update(self, state: Any) -> None:
        self.progress.update(self.task_id, completed=min(state.done, state.to_run) if state.to_run else 0,
                             total=max(state.to_run, state.done), **self._fields(state))

    def finished(self, state: Any, task: Any, record: dict) -> None:
        colour = {"ok": "green", "oom": "yellow"}.get(record["status"], "red")
        self.progress.console.print(f"[{colour}]{record['status']:>11}[/{colour}] {task.label}: "
                                    + summary_line(record).split(": ", 1)[-1].replace("\n", " "), markup=True,
                                    highlight=False, soft_wrap=True)
        self.update(state)

    def stop(self) -> None:
        self.progress.stop()


@click.command()
@click.option("--method", "-m", "methods", required=True, help="methods, comma-separated, or 'all'")
@click.option("--dataset", "-d", "datasets", required=True, help="datasets, comma-separated, or 'all'")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="a swept config key and its values (repeatable; use ';' between values that contain commas)")
@click.option("--seeds", default="0", show_default=True, help="seeds, e.g. 0,1,2 or 0-4")
@click.option("--skip-failed", is_flag=True,
              help="also skip points that already have a failed/oom/timeout record (default: only ok points are skipped)")
@click.option("--dry-run", is_flag=True, help="list the points and which would be skipped; run nothing")
@click.option("--strict", is_flag=True, help="exit 1 when any point did not end ok (default: 0 once every point has a record)")
@click.option("--executor", type=click.Choice(["local", "slurm", "ray"]), default="local", show_default=True,
              help="where points run: here one after another, a SLURM job array (submitit), or Ray tasks")
@click.option("--cpus-per-point", type=float, default=None, help="CPUs per point (slurm: cpus_per_task; ray: num_cpus, default 1)")
@click.option("--gpus-per-point", type=float, default=0, show_default=True, help="GPUs per point (slurm: gpus_per_node; ray: num_gpus)")
@click.option("--mem-per-point", default=None, help="memory per point for the scheduler, e.g. 16GB (slurm: --mem; ray: memory)")
@click.option("--retry", is_flag=True, help="resubmit a point once when its job was preempted or hit the time limit")
@click.option("--slurm-partition", default=None, help="SLURM partition")
@click.option("--slurm-time", default="60", show_default=True, help="SLURM time limit per point: minutes, H:MM:SS or D-HH:MM:SS")
@click.option("--slurm-array-parallelism", type=int, default=None, help="at most this many array tasks at once (%N)")
@click.option("--slurm-param", "slurm_params", multiple=True, metavar="KEY=VALUE",
              help="extra sbatch parameter (repeatable), e.g. qos=high, constraint=a100, account=proj")
@click.option("--slurm-setup", "slurm_setup", multiple=True, metavar="LINE",
              help="shell line run before each job (repeatable), e.g. 'module load cuda'")
@click.option("--slurm-signal-delay", type=int, default=None,
              help="seconds before the time limit at which SLURM warns the job (USR2), so its record says timeout [90]")
@click.option("--slurm-cluster", type=click.Choice(["slurm", "local"]), default="slurm", show_default=True,
              help="submitit cluster: 'local' runs the same job array as local processes (to try a sweep before the cluster)")
@click.option("--slurm-folder", default=None, help="submitit job folder (pickles, logs) [RESULTS/.submitit/SWEEP_ID]")
@click.option("--ray-address", default=None, help="Ray cluster to connect to ('auto', 'ray://host:10001'); none: start a local one")
@common_run_options
def sweep(methods: str, datasets: str, grid: tuple[str, ...], seeds: str, skip_failed: bool, dry_run: bool,
          strict: bool, executor: str, cpus_per_point: float | None, gpus_per_point: float, mem_per_point: str | None,
          retry: bool, slurm_partition: str | None, slurm_time: str, slurm_array_parallelism: int | None,
          slurm_params: tuple[str, ...], slurm_setup: tuple[str, ...], slurm_signal_delay: int | None,
          slurm_cluster: str, slurm_folder: str | None, ray_address: str | None, preset: str | None,
          overrides: tuple[str, ...], smoke: bool, max_memory: str | None, timeout: float | None, device: str,
          data_root: str | None, results: str | None) -> None:
    """Run METHODS × DATASETS × GRID × SEEDS, each point a fresh process writing one record.

    \b
    Resume: points that already have an `ok` record with the same resolved
    config (hash) and seed in the results directory are skipped, so rerunning
    the same command after Ctrl-C, a crash or a lost job finishes the sweep —
    on any executor. Failed and out-of-memory points are recorded and the
    sweep carries on; it exits 0 once every point has a record (1 with
    --strict if any is not ok), 130 when interrupted (the running point is
    recorded as interrupted and reruns next time).

    \b
    Examples:
      milbench sweep -m abmil,grad-accum -d qmnist --grid bag_size=10,50,100,200 --seeds 0,1,2
      milbench sweep -m all -d all --seeds 0,1,2
      milbench sweep -m abmil -d qmnist --grid bag_size=50,100 --executor slurm \\
          --slurm-partition gpu --slurm-time 2:00:00 --gpus-per-point 1 --cpus-per-point 8 --mem-per-point 32GB
      milbench sweep -m abmil -d qmnist --seeds 0-4 --executor ray --ray-address auto --gpus-per-point 1
    """
    from rich.console import Console

    from milbench import sweep as sw
    from milbench.devices import check_device
    from milbench.plugins import get_registry
    from milbench.records import ensure_writable, now_iso, results_dir
    from milbench.runner import parse_bytes

    if timeout is not None and timeout <= 0:
        raise MilbenchError(f"bad --timeout {timeout}: must be > 0 seconds")
    registry = get_registry()
    spec = sw.SweepSpec(
        methods=sw.parse_names(methods, "method", registry.methods),
        datasets=sw.parse_names(datasets, "dataset", registry.datasets),
        grid=sw.parse_grid(grid), seeds=sw.parse_seeds(seeds), preset=preset, overrides=list(overrides), smoke=smoke)
    points = sw.expand(registry, spec)
    device = check_device(device, probe=executor == "local")  # a login node sees none of the workers' GPUs
    limit = parse_bytes(max_memory)
    mem_bytes = parse_bytes(mem_per_point)
    if cpus_per_point is not None and cpus_per_point <= 0:
        raise MilbenchError(f"bad --cpus-per-point {cpus_per_point}: must be > 0")
    if gpus_per_point < 0:
        raise MilbenchError(f"bad --gpus-per-point {gpus_per_point}: must be >= 0")
    out = results_dir(results)
    ensure_writable(out)
    console = Console(stderr=True)

    done = sw.finished(out, sw.RECORDED_STATUSES if skip_failed else ("ok",))
    todo = [p for p in points if p.key not in done]
    skipped = [done[p.key] for p in points if p.key in done]
    console.print(f"milbench sweep {spec.sweep_id}: {len(points)} points "
                  f"({len(spec.methods)} methods × {len(spec.datasets)} datasets"
                  + "".join(f" × {len(v)} {k}" for k, v in spec.grid.items())
                  + f" × {len(spec.seeds)} seeds{', smoke' if smoke else ''}); "
                  f"{len(skipped)} already recorded, {len(todo)} to run on {executor} → {out}", highlight=False,
                  soft_wrap=True)
    if dry_run:
        for p in points:
            tag = f"skip ({done[p.key]['status']})" if p.key in done else "run"
            click.echo(f"{tag:<12} {p.label}  config {p.plan.config_hash}")
        return

    if not todo:
        console.print(f"sweep: {len(points)} points — all already recorded; nothing to run", highlight=False)
        return
    slurm_opts = None
    if executor == "slurm":
        slurm_opts = {"cluster": slurm_cluster, "partition": slurm_partition,
                      "time_min": sw.parse_minutes(slurm_time), "array_parallelism": slurm_array_parallelism,
                      "sbatch": sw.parse_params(slurm_params), "setup": list(slurm_setup),
                      "signal_delay_s": slurm_signal_delay, "folder": slurm_folder}
    engine = sw.make_executor(executor, results=out, sweep_id=spec.sweep_id, cpus=cpus_per_point, gpus=gpus_per_point,
                           mem_bytes=mem_bytes, retry=retry, slurm=slurm_opts, ray_address=ray_address)
    meta = {"id": spec.sweep_id, "grid": spec.grid, "seeds": spec.seeds, "methods": spec.methods,
            "datasets": spec.datasets, "executor": executor}
    tasks = sw.make_tasks(todo, out, executor, device=device, data_root=data_root, timeout=timeout, max_memory=limit,
                          sweep=meta, command=sw.default_command())
    invocation = {"started": now_iso(), "finished": None, "executor": executor, "command": sw.default_command(),
                  "skipped": len(skipped), "to_run": len(todo)}
    sw.write_manifest(out, spec, len(points), invocation)
    t0 = time.perf_counter()
    reporter = RichReporter(executor, console) if todo else None
    try:
        result = sw.run_sweep(tasks, engine, reporter, skipped=skipped, retry=retry)
    finally:
        if reporter:
            reporter.stop()
    counts = result.counts()
    sw.write_manifest(out, spec, len(points), {**invocation, "finished": now_iso(),
                                               "seconds": round(time.perf_counter() - t0, 1), "counts": counts,
                                               "interrupted": result.interrupted})
    _summary(console, points, result, counts)
    if result.interrupted:
        console.print("milbench: sweep interrupted; rerun the same command to resume", highlight=False)
        sys.exit(130)
    if strict and any(r["status"] != "ok" for r in result.records):
        sys.exit(1)


def _summary(console: Any, points: list, result: Any, counts: dict[str, int]) -> None:
    parts = [f"{len(result.skipped)} skipped (already recorded)"] + [f"{n} {s}" for s, n in sorted(counts.items())]
    console.print(f"sweep: {len(points)} points — " + ", ".join(parts), highlight=False)
    bad = [r for r in result.records if r["status"] not in ("ok", "interrupted")]
    for r in bad:
        point = ", ".join(f"{k}={v}" for k, v in ((r.get("sweep") or {}).get("point") or {}).items())
        console.print(f"  {r['status']}: {r['method']} on {r['dataset']}{' ' + point if point else ''} "
                      f"seed {r['seed']}: {(r.get('error') or '').splitlines()[0] if r.get('error') else ''}",
                      highlight=False, markup=False, soft_wrap=True)
