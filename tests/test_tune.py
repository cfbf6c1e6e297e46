"""``milbench tune``: trials are normal runs with records, the study survives a
SIGKILL without losing finished trials, and the winner round-trips through
``milbench run --preset``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import records_in, run_cli

ENV = {"MILBENCH_PLUGINS": "abmil,qmnist"}
TUNE = ["tune", "-m", "abmil", "-d", "qmnist", "--smoke", "--set", "weight_decay=0.001"]


def _study(out, name="tune-abmil-qmnist-default-smoke"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'tune' / (name + '.db')}")


def _complete(study):
    import optuna

    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_tune_resumes_after_sigkill_without_losing_finished_trials(tmp_path, data_root, capsys):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "milbench", *TUNE, "--trials", "3", "--results", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    first = []
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "tune" / "tune-abmil-qmnist-default-smoke.db").exists():
                try:
                    first = _complete(_study(out))
                except Exception:  # the database is being created
                    first = []
                if first:
                    break
            time.sleep(0.5)
        assert first, "no trial finished before the deadline"
        os.killpg(proc.pid, signal.SIGKILL)  # the tune and its running trial die without a word
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = {t.number: t.params for t in first}
    res = run_cli(*TUNE, "--trials", "3", "--results", str(out), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    study = _study(out)
    done = _complete(study)
    assert len(done) == 3, [(t.number, t.state) for t in study.trials]
    for number, params in kept.items():  # finished trials survived, unchanged
        assert study.trials[number].params == params
        assert study.trials[number].state.name == "COMPLETE"
    # the resumed session drew new candidates, not the first session's again (a freshly seeded sampler would)
    assert len({tuple(sorted(t.params.items())) for t in done}) == 3
    # every completed trial is a normal run with its record; only the searched keys vary
    recs = {r["run_id"]: r for r in records_in(out)}
    for t in done:
        rec = recs[t.user_attrs["run_id"]]
        assert rec["status"] == "ok" and rec["tune"]["trial"] == t.number
        assert rec["config"]["lr"] == pytest.approx(t.params["lr"])
        assert rec["config"]["weight_decay"] == 0.001  # fixed by --set: not searched
        assert "weight_decay" not in t.params
    # the objective is validation only: the value is the selected epoch's validation AUC
    best = max(done, key=lambda t: t.value)
    rec = recs[best.user_attrs["run_id"]]
    selected = [h for h in rec["history"] if h["selected"]][-1]
    assert best.value == pytest.approx(selected["val_bag_auc"], abs=1e-4)
    # the tuned preset round-trips through `run --preset`
    preset = json.loads((out / "presets" / "tuned-abmil-qmnist-smoke.json").read_text())
    assert preset["method"] == "abmil" and preset["tuned"]["trials"] == 3
    assert preset["kind"] == "preset"  # so reading the results folder does not take it for a broken record
    from milbench.records import iter_records

    capsys.readouterr()
    assert len(list(iter_records(out, warn=True))) == len(records_in(out))
    assert "not a milbench record" not in capsys.readouterr().err
    assert preset["values"] == best.params
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--preset", "tuned-abmil-qmnist-smoke",
                  "--seed", "5", "--results", str(out), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    (after,) = [r for r in records_in(out) if r["seed"] == 5]
    assert after["preset"] == "tuned-abmil-qmnist-smoke"
    assert after["config"]["lr"] == pytest.approx(best.params["lr"])
    # ... and from another results folder, by the preset file's path
    path = out / "presets" / "tuned-abmil-qmnist-smoke.json"
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--preset", str(path),
                  "--results", str(out / "elsewhere"), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    (moved,) = records_in(out / "elsewhere")
    assert moved["config"]["lr"] == pytest.approx(best.params["lr"])


def test_a_tuned_preset_refuses_another_method(tmp_path):
    from milbench.presets import save_preset

    save_preset(tmp_path, "mine", "abmil", "qmnist", {"lr": 0.002})
    res = run_cli("run", "-m", "grad-accum", "-d", "qmnist", "--smoke", "--preset", "mine",
                  "--results", str(tmp_path), env={"MILBENCH_PLUGINS": "abmil,grad-accum,qmnist"})
    assert res.returncode == 2
    assert "tuned for method 'abmil', not 'grad-accum'" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--preset", "nope", "--results", str(tmp_path), env=ENV)
    assert res.returncode == 2 and "mine" in res.stderr  # the valid names include saved presets


def test_parallel_trials_need_an_executor_that_runs_them_side_by_side(tmp_path):
    """The local executor runs one trial at a time: --parallel 2 there would ask two
    candidates at once and run them one after the other, which is no faster and draws
    worse than asking one by one. Refused before a study is opened."""
    res = run_cli("tune", "-m", "abmil", "-d", "qmnist", "--smoke", "--trials", "2", "--parallel", "2",
                  "--results", str(tmp_path), env=ENV)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--executor ray" in res.stderr and "local runs one at a time" in res.stderr
    assert not (tmp_path / "tune").exists()


def test_search_space_holds_protocol_learning_keys_minus_fixed_ones():
    from milbench.protocol import PROTOCOL_PARAMS
    from milbench.tuning import search_space

    space = search_space(PROTOCOL_PARAMS)
    assert {"lr", "weight_decay"} <= set(space)
    assert "epochs" not in space  # the budget is not a learning key: equal for every method
    assert "lr" not in search_space(PROTOCOL_PARAMS, fixed=["lr"])


def _fake_batch(kill_at=None):
    """A ``run_batch`` that scores each trial without a run (val AUC falls with distance from lr 1e-3);
    with ``kill_at``, the process "dies" (KeyboardInterrupt) when that trial number is asked."""
    import math

    def run_batch(batch):
        out = []
        for number, params in batch:
            if number == kill_at:
                raise KeyboardInterrupt
            auc = 1.0 - abs(math.log10(params["lr"]) + 3.0) / 10
            out.append({"status": "ok", "run_id": f"r{number}", "history": [{"selected": True, "val_bag_auc": auc,
                                                                           "val_loss": 1.0 - auc}]})
        return out

    return run_batch


# killed during the random start-up trials; during TPE's own trials; killed, then its retry (trial 3) killed too
@pytest.mark.parametrize("kills", [[2], [6], [2, 3]])
def test_a_resumed_study_draws_the_candidates_an_uninterrupted_one_draws(tmp_path, kills):
    """A seeded sampler restarts its random stream in every process: a resume must not draw the first
    session's candidates again, and must retry the killed trial's candidate."""
    import optuna

    from milbench import tuning

    space = {"lr": ("log", 1e-5, 1e-2), "weight_decay": ("log", 1e-5, 1e-1)}
    whole = tuning.open_study(tmp_path / "whole", "s", seed=0)
    tuning.run_tune(tuning.Candidates(whole, space, 0), 8, 1, _fake_batch())
    expected = [t.params for t in _complete(whole)]

    for kill_at in kills:  # every session is a new process: a freshly seeded sampler
        cut = tuning.open_study(tmp_path / "cut", "s", seed=0)
        with pytest.raises(KeyboardInterrupt):
            tuning.run_tune(tuning.Candidates(cut, space, 0), 8, 1, _fake_batch(kill_at=kill_at))
    again = tuning.open_study(tmp_path / "cut", "s", seed=0)
    resumed = tuning.Candidates(again, space, 0)
    assert resumed.stale == 1
    tuning.run_tune(resumed, 8, 1, _fake_batch())
    got = [t.params for t in _complete(again)]
    assert len(got) == 8 and tuning.budget_used(again) == 8
    assert got == expected
    assert len({tuple(sorted(p.items())) for p in got}) == 8  # no candidate drawn twice
    killed = again.trials[kills[0]]
    assert killed.state == optuna.trial.TrialState.FAIL and killed.params == expected[kills[0]]
