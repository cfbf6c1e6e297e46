"""Equal-budget hyper-parameter tuning with Optuna, on the validation split only.

``milbench tune -m M -d D --trials N`` gives every method the same number of
trials over the same protocol learning keys (and the method's own declared
learning keys: every :class:`~milbench.config.Param` with a ``search`` range),
so a table of tuned methods compares methods, not tuning effort.

- Every trial is a normal ``milbench run`` point: a fresh child process and a
  record (``tune`` block: study, trial number, parameters) in the results
  folder, executed by the sweep executors (local, SLURM, Ray), so trials
  spread over a cluster like any sweep.
- The objective is the selected checkpoint's **validation** AUC (ties broken
  by validation loss); the test split is never read by the search. A failed
  or out-of-memory trial is told to Optuna as failed and uses its budget.
- The study lives in an Optuna SQLite storage,
  ``RESULTS/tune/<study>.db``. A tune killed at any moment (even SIGKILL)
  resumes with the same command: finished trials are kept, trials that were
  running when it died are marked failed without a record and do not
  count against the budget, so exactly N trials finish.
- The winner is saved as a named preset (:mod:`milbench.presets`) that
  ``milbench run --preset NAME`` accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from milbench.config import Param
from milbench.errors import ConfigError

TUNE_DIR = "tune"


def search_space(params: Mapping[str, Param], fixed: Sequence[str] = ()) -> dict[str, tuple[Any, ...]]:
    """The learning keys to search: every declared key with a ``search`` range,
    minus those the user fixed with ``--set`` (sorted, so the space is stable)."""
    return {k: p.search for k, p in sorted(params.items()) if p.search is not None and k not in fixed}


def suggest(trial: Any, space: Mapping[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Draw one value per key from an Optuna trial."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        kind, *args = spec
        if kind == "log":
            values[key] = trial.suggest_float(key, float(args[0]), float(args[1]), log=True)
        elif kind == "float":
            values[key] = trial.suggest_float(key, float(args[0]), float(args[1]))
        elif kind == "int":
            values[key] = trial.suggest_int(key, int(args[0]), int(args[1]))
        elif kind == "choice":
            values[key] = trial.suggest_categorical(key, list(args))
        else:
            raise ConfigError(f"key '{key}' declares an unknown search kind {kind!r}; valid: log, float, int, choice")
    return values


def objective(record: Mapping[str, Any]) -> tuple[float, float] | None:
    """The validation score of a finished trial's record: (AUC, loss) of the
    selected epoch; ``None`` when the run did not end ok or has no AUC."""
    if record.get("status") != "ok":
        return None
    history = record.get("history") or []
    chosen = [h for h in history if h.get("selected")] or history[-1:]
    if not chosen:
        return None
    auc, loss = chosen[-1].get("val_bag_auc"), chosen[-1].get("val_loss")
    if auc is None or (isinstance(auc, float) and math.isnan(auc)):
        return None
    return float(auc), float(loss) if loss is not None else float("nan")


def study_storage(results: Path, study: str) -> str:
    """The SQLite URL of a study, under ``RESULTS/tune/``."""
    folder = Path(results) / TUNE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / f'{study}.db').resolve()}"


@dataclass
class TuneResult:
    study: str
    trials_done: int
    best_params: dict[str, Any] | None
    best_value: float | None
    best_trial: int | None
    preset_path: Path | None


def open_study(results: Path, study: str, seed: int) -> Any:
    """Create or load a study (maximising validation AUC) with a seeded TPE sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    return optuna.create_study(study_name=study, storage=study_storage(results, study), direction="maximize",
                               sampler=sampler, load_if_exists=True)


def close_stale(study: Any) -> int:
    """Fail the trials a killed tune left RUNNING; return how many. They never
    got a ``status`` attribute (set only when a trial's record came back), which
    is how :func:`budget_used` tells them from genuine failures."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def budget_used(study: Any) -> int:
    """Trials that count against the budget: complete ones and failures that
    have a record (a run that failed or ran out of memory used its budget)."""
    import optuna

    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE:
            done += 1
        elif t.state == optuna.trial.TrialState.FAIL and "status" in t.user_attrs:
            done += 1
    return done


def run_tune(study: Any, trials: int, parallel: int, space: Mapping[str, tuple[Any, ...]],
             run_batch: Callable[[list[tuple[int, dict[str, Any]]]], list[dict[str, Any]]],
             on_trial: Callable[[int, dict[str, Any], dict[str, Any]], None] = lambda n, p, r: None) -> None:
    """Ask-and-tell until ``trials`` trials count against the budget.

    ``run_batch`` runs a list of (trial number, parameters) as points and
    returns their records in the same order (the sweep executors do that);
    ``parallel`` trials are asked at once, so an executor can run them
    side by side. Each record is told back before the next batch is asked."""
    import optuna

    while budget_used(study) < trials:
        n = min(parallel, trials - budget_used(study))
        asked = [study.ask() for _ in range(n)]
        batch = [(t.number, suggest(t, space)) for t in asked]
        records = run_batch(batch)
        for t, (number, params), rec in zip(asked, batch, records):
            t.set_user_attr("run_id", rec.get("run_id"))
            t.set_user_attr("status", rec.get("status"))
            score = objective(rec)
            if score is None:
                study.tell(t, state=optuna.trial.TrialState.FAIL)
            else:
                t.set_user_attr("val_loss", score[1])
                # ties on AUC are broken by validation loss: a tiny penalty that never reorders distinct AUCs
                loss = 0.0 if math.isnan(score[1]) else min(score[1], 10.0)
                study.tell(t, score[0] - 1e-6 * loss)
            on_trial(number, params, rec)


def best(study: Any) -> tuple[int, dict[str, Any], float] | None:
    """(trial number, params, value) of the best complete trial, or ``None``."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    t = max(complete, key=lambda t: (t.value, -t.number))
    return t.number, dict(t.params), float(t.value)
