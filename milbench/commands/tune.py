"""``milbench tune``: equal-budget Optuna search on the validation split, saved as a preset."""

from __future__ import annotations

import click

from milbench.commands.options import common_run_options
from milbench.errors import MilbenchError


@click.command()
@click.option("--method", "-m", required=True, help="method name (see `milbench list`)")
@click.option("--dataset", "-d", required=True, help="dataset name (see `milbench list`)")
@click.option("--trials", type=int, default=20, show_default=True,
              help="trials that count against the budget (use the same number for every method)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of every trial's run and of the sampler")
@click.option("--parallel", type=int, default=1, show_default=True,
              help="trials asked at once and run side by side (with --executor ray or slurm; "
                   "local runs one trial at a time)")
@click.option("--executor", type=click.Choice(["local", "slurm", "ray"]), default="local", show_default=True,
              help="where trials run (as `milbench sweep`)")
@click.option("--study", "study_name", default=None,
              help="study name [tune-METHOD-DATASET-PRESET]; the same name resumes the same study")
@click.option("--name", "preset_name", default=None, help="name of the saved preset [tuned-METHOD-DATASET]")
@click.option("--ray-address", default=None, help="Ray cluster to connect to (with --executor ray)")
@click.option("--slurm-partition", default=None, help="SLURM partition (with --executor slurm)")
@click.option("--slurm-time", default="60", show_default=True, help="SLURM time limit per trial (minutes or H:MM:SS)")
@common_run_options
def tune(method: str, dataset: str, trials: int, seed: int, parallel: int, executor: str, study_name: str | None,
         preset_name: str | None, ray_address: str | None, slurm_partition: str | None, slurm_time: str,
         preset: str | None, overrides: tuple[str, ...], smoke: bool, max_memory: str | None, timeout: float | None,
         device: str, data_root: str | None, results: str | None) -> None:
    """Tune METHOD on DATASET with Optuna: every trial a normal run (a record),
    scored on the validation split only; save the best as a preset.

    \b
    Searched: the protocol's learning keys (lr, weight_decay) and the method's
    own keys that declare a search range (`milbench list` marks them); keys
    given with --set stay fixed. The study is an Optuna SQLite file under
    RESULTS/tune/; rerunning the same command after a kill resumes it.
    Then: milbench run -m METHOD -d DATASET --preset tuned-METHOD-DATASET
    """
    from pathlib import Path

    from rich.console import Console

    from milbench import sweep as sw
    from milbench import tuning
    from milbench.plugins import get_registry
    from milbench.presets import save_preset
    from milbench.protocol import PROTOCOL_PARAMS
    from milbench.devices import check_device
    from milbench.records import ensure_writable, results_dir
    from milbench.runner import parse_bytes, plan_run

    try:
        import optuna  # noqa: F401
    except ImportError:
        raise MilbenchError("milbench tune needs optuna: pip install optuna") from None
    if trials < 1:
        raise MilbenchError(f"bad --trials {trials}: must be >= 1")
    if parallel < 1:
        raise MilbenchError(f"bad --parallel {parallel}: must be >= 1")
    if parallel > 1 and executor == "local":  # it would ask N candidates at once, then run them one by one
        raise MilbenchError(f"--parallel {parallel} needs an executor that runs trials side by side: "
                            "--executor ray (this machine's cores, or a cluster) or slurm; local runs one at a time")
    registry = get_registry()
    out = results_dir(results)
    ensure_writable(out)
    base = plan_run(registry, method, dataset, preset, overrides, seed, smoke, results=out)  # validates everything
    m, d = registry.method(base.method), registry.dataset(base.dataset)
    fixed = [t.split("=", 1)[0].strip() for t in overrides]
    space = tuning.search_space({**PROTOCOL_PARAMS, **d.params, **m.params}, fixed)
    if not space:
        raise MilbenchError("nothing to tune: every learning key is fixed by --set")
    device = check_device(device, probe=executor == "local")  # a login node sees none of the workers' GPUs
    limit = parse_bytes(max_memory)
    study_name = study_name or f"tune-{base.method}-{base.dataset}-{base.preset}{'-smoke' if smoke else ''}"
    preset_name = preset_name or f"tuned-{base.method}-{base.dataset}{'-smoke' if smoke else ''}"
    console = Console(stderr=True)
    study = tuning.open_study(out, study_name, seed)
    candidates = tuning.Candidates(study, space, seed)
    stale = candidates.stale
    used = tuning.budget_used(study)
    console.print(f"milbench tune {study_name}: {base.method} on {base.dataset}, {trials} trials "
                  f"({used} done{f', {stale} interrupted rerun' if stale else ''}), searching "
                  + ", ".join(f"{k} {v[0]} {list(v[1:])}" for k, v in space.items())
                  + f" on the validation split; storage {tuning.study_storage(out, study_name)}",
                  highlight=False, soft_wrap=True)

    slurm_opts = None
    if executor == "slurm":
        slurm_opts = {"cluster": "slurm", "partition": slurm_partition, "time_min": sw.parse_minutes(slurm_time),
                      "array_parallelism": parallel, "sbatch": {}, "setup": [], "signal_delay_s": 90, "folder": None}
    engine = sw.make_executor(executor, results=out, sweep_id=study_name, cpus=None, gpus=0, mem_bytes=None,
                           retry=False, slurm=slurm_opts, ray_address=ray_address)

    def run_batch(batch: list[tuple[int, dict]]) -> list[dict]:
        points = []
        for number, params in batch:
            sets = list(overrides) + [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items()]
            plan = plan_run(registry, base.method, base.dataset, preset, sets, seed, smoke, results=out)
            points.append(sw.Point(plan, {k: str(v) for k, v in params.items()}, number))
        meta = {"id": study_name, "executor": executor, "tune": {"study": study_name, "trials": trials}}
        tasks = sw.make_tasks(points, out, executor, device=device, data_root=data_root, timeout=timeout,
                              max_memory=limit, sweep=meta, command=sw.default_command())
        for task, (number, params) in zip(tasks, batch):
            task.extra["tune"] = {"study": study_name, "trial": number, "params": params}
        result = sw.run_sweep(tasks, engine, None)
        if result.interrupted:
            raise KeyboardInterrupt
        by_token = {(r.get("sweep") or {}).get("attempt"): r for r in result.records}
        return [by_token.get(t.token) or {"status": "failed"} for t in tasks]

    def on_trial(number: int, params: dict, rec: dict) -> None:
        score = tuning.objective(rec)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        console.print(f"  trial {number}: {shown} → "
                      + (f"val AUC {score[0]:.3f} (loss {score[1]:.3f})" if score else f"{rec.get('status')}")
                      + f"  [{tuning.budget_used(study)}/{trials}]", highlight=False, soft_wrap=True)

    try:
        tuning.run_tune(candidates, trials, parallel, run_batch, on_trial)
    except KeyboardInterrupt:
        console.print("milbench: tune interrupted; rerun the same command to resume", highlight=False)
        raise SystemExit(130)
    winner = tuning.best(study)
    if winner is None:
        raise MilbenchError(f"tune {study_name}: no trial finished ok; see the records in {out}")
    number, params, value = winner
    path = save_preset(out, preset_name, base.method, base.dataset, params,
                       {"study": study_name, "storage": str(Path(out) / tuning.TUNE_DIR / f"{study_name}.db"),
                        "trials": trials, "best_trial": number, "objective": "val_bag_auc",
                        "best_value": value, "base_preset": base.preset, "fixed": list(overrides), "seed": seed,
                        "smoke": smoke})
    click.echo(f"best trial {number}: val AUC {value:.3f} with "
               + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))
    click.echo(f"preset saved: {path}")
    click.echo(f"next: milbench run -m {base.method} -d {base.dataset} --preset {preset_name}"
               + (f" --results {results}" if results else ""))
