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
  running when it died are marked failed without a record, do not count
  against the budget and run again first with the same parameters, so
  exactly N trials finish -- and they are the N an uninterrupted tune would
  have run (:class:`Candidates`).
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


def _sampler(seed: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def open_study(results: Path, study: str, seed: int) -> Any:
    """Create or load a study (maximising validation AUC) in its SQLite storage. Its candidates are
    drawn by :class:`Candidates`, not by the study's own sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=study, storage=study_storage(results, study), direction="maximize",
                               sampler=_sampler(seed), load_if_exists=True)


#: user attribute of a trial that reruns a killed trial's parameters (the killed trial's number)
RETRY_OF = "retry_of"


class Candidates:
    """Where a study's next trials come from, so that a resumed tune runs the
    candidates an uninterrupted one would have.

    A seeded sampler restarts its random stream in every process: asked
    directly, a resumed study would draw the first session's candidates a
    second time (one point paid for twice, and a candidate set unlike the one
    every other method got from the same seed). So the draws are made by a
    *twin*: an in-memory study with a freshly seeded sampler that first
    replays the stored trials in order -- asks, draws from ``space`` and is
    told each trial's outcome -- which leaves its random state and history
    where the earlier sessions left theirs. Each drawn candidate is then
    enqueued in the real study and asked there.

    Trials a kill left running are failed (no record, no budget) and their
    parameters enqueued as a retry (``RETRY_OF``), which runs before any new
    draw; the twin's copy of the killed trial waits for the retry's outcome,
    as it would have waited for the trial's own. The replay is exact for
    trials run one at a time; a ``--parallel`` batch of the sampler's model-
    based (post start-up) trials was asked before its results were told,
    which the replay does not know, so after one the stream moves past every
    earlier draw but may not match an uninterrupted tune's.
    """

    def __init__(self, study: Any, space: Mapping[str, tuple[Any, ...]], seed: int):
        import optuna

        self.study, self.space = study, dict(space)
        self.stale = close_stale(study)
        self.twin = optuna.create_study(direction="maximize", sampler=_sampler(seed))
        self._pending: dict[int, Any] = {}  # real retry trial number -> the twin's trial waiting for it
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        # a killed trial's outcome is its last retry's (trials are in number order, so the last one wins)
        last_retry = {int(t.user_attrs[RETRY_OF]): t for t in trials if RETRY_OF in t.user_attrs}
        for t in trials:
            if RETRY_OF in t.user_attrs or t.state == optuna.trial.TrialState.WAITING:
                continue
            shadow = self.twin.ask()
            suggest(shadow, self.space)
            outcome = last_retry.get(t.number, t)
            if outcome.state == optuna.trial.TrialState.WAITING:
                self._pending[outcome.number] = shadow
            elif _killed(outcome):
                study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF: t.number})
                self._pending[self._waiting()[-1].number] = shadow
            else:
                _tell(self.twin, shadow, outcome.value if outcome.state == optuna.trial.TrialState.COMPLETE else None)

    def _waiting(self) -> list[Any]:
        import optuna

        return sorted(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)),
                      key=lambda t: t.number)

    def ask(self) -> tuple[Any, dict[str, Any]]:
        """The next trial of the real study and its parameters: a waiting retry first, else a new draw."""
        shadow = None
        if not self._waiting():
            shadow = self.twin.ask()
            self.study.enqueue_trial(suggest(shadow, self.space))
        trial = self.study.ask()  # pops the oldest waiting trial
        if shadow is not None:
            self._pending[trial.number] = shadow
        return trial, suggest(trial, self.space)

    def tell(self, trial: Any, value: float | None) -> None:
        """Tell the real study and the twin a trial's objective (``None``: failed)."""
        _tell(self.study, trial, value)
        shadow = self._pending.pop(trial.number, None)
        if shadow is not None:
            _tell(self.twin, shadow, value)


def _killed(trial: Any) -> bool:
    """A trial that a kill left behind: failed without a ``status`` (set only when its record came back)."""
    import optuna

    return trial.state == optuna.trial.TrialState.FAIL and "status" not in trial.user_attrs


def _tell(study: Any, trial: Any, value: float | None) -> None:
    """Tell ``study`` a trial's objective; ``None``: the trial failed."""
    import optuna

    if value is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)


def close_stale(study: Any) -> int:
    """Fail the trials a killed tune left RUNNING; return how many. They never
    got a ``status`` attribute (set only when a trial's record came back), which
    is how :func:`_killed` (and so :func:`budget_used`) tells them from genuine failures."""
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
        elif t.state == optuna.trial.TrialState.FAIL and not _killed(t):
            done += 1
    return done


def run_tune(candidates: Candidates, trials: int, parallel: int,
             run_batch: Callable[[list[tuple[int, dict[str, Any]]]], list[dict[str, Any]]],
             on_trial: Callable[[int, dict[str, Any], dict[str, Any]], None] = lambda n, p, r: None) -> None:
    """Ask-and-tell until ``trials`` trials of ``candidates.study`` count against the budget.

    ``run_batch`` runs a list of (trial number, parameters) as points and
    returns their records in the same order (the sweep executors do that);
    ``parallel`` trials are asked at once, so an executor can run them
    side by side. Each record is told back before the next batch is asked."""
    study = candidates.study
    while budget_used(study) < trials:
        n = min(parallel, trials - budget_used(study))
        asked = [candidates.ask() for _ in range(n)]
        batch = [(t.number, params) for t, params in asked]
        records = run_batch(batch)
        for (t, params), rec in zip(asked, records):
            t.set_user_attr("run_id", rec.get("run_id"))
            t.set_user_attr("status", rec.get("status"))
            score = objective(rec)
            if score is None:
                candidates.tell(t, None)
            else:
                t.set_user_attr("val_loss", score[1])
                # ties on AUC are broken by validation loss: a tiny penalty that never reorders distinct AUCs
                loss = 0.0 if math.isnan(score[1]) else min(score[1], 10.0)
                candidates.tell(t, score[0] - 1e-6 * loss)
            on_trial(t.number, params, rec)


def best(study: Any) -> tuple[int, dict[str, Any], float] | None:
    """(trial number, params, value) of the best complete trial, or ``None``."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    t = max(complete, key=lambda t: (t.value, -t.number))
    return t.number, dict(t.params), float(t.value)
