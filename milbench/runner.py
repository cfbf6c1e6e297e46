"""Running one benchmark point: resolve its config, start a fresh child
process, and turn whatever the child left into exactly one record.

The parent never imports torch. It owns the outcome: ``ok``, ``failed``,
``oom`` (the child's own report, or the ``--max-memory`` watchdog),
``timeout`` (``--timeout`` seconds passed) and ``interrupted`` (SIGINT/SIGTERM
reached the parent, which stops the child and still writes the record).
What the parent tells the child and which fields the child hands back are
defined once, in :mod:`milbench.handoff`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from milbench.config import config_hash, resolve
from milbench.errors import ConfigError, MilbenchError, PluginError, first_line, unknown_name
from milbench.handoff import CHILD_FIELDS, NULL_MEMORY_KEYS, ChildSpec, null_fields
from milbench.plugins import Registry
from milbench.progress import RunProgress
from milbench.protocol import PROTOCOL_PARAMS, PROTOCOL_SMOKE, check_method_layers, protocol_block
from milbench.records import REQUIRED_KEYS, SCHEMA_VERSION, new_run_id, now_iso, write_record

DEFAULT_PRESET = "default"


@dataclass
class RunPlan:
    """A fully resolved benchmark point (what a sweep compares hashes of)."""

    method: str
    dataset: str
    preset: str
    seed: int
    smoke: bool
    config: dict[str, Any]
    config_hash: str
    supervision: str
    overrides: list[str] = field(default_factory=list)
    #: The protocol block of the record (:func:`milbench.protocol.protocol_block`).
    protocol: dict[str, Any] = field(default_factory=dict)


def presets_of(method: Any, dataset: Any, results: Path | None = None) -> list[str]:
    """Preset names valid for this method and dataset: built-in ones and those saved under ``results``."""
    from milbench.presets import saved_presets

    return sorted({DEFAULT_PRESET, *dataset.presets, *method.presets, *saved_presets(results)})


def plan_run(registry: Registry, method_name: str, dataset_name: str, preset: str | None = None,
             overrides: Sequence[str] | Mapping[str, Any] = (), seed: int = 0, smoke: bool = False,
             results: Path | None = None, check: bool = True) -> RunPlan:
    """Resolve a point's config: declared defaults (protocol, dataset, method),
    the dataset's then the method's overrides, the preset (built in, or saved
    under ``results/presets`` by ``milbench tune``), ``--smoke``, then
    ``--set``. Bad names and values are one-line errors. A method whose own
    layers set a protocol key is refused (the protocol is the same for all).
    ``check=False`` skips the method's :meth:`~milbench.api.Method.check` (a
    sweep worker re-plans only to compare config hashes with its driver, which
    already checked; a check may build a probe model, and a scheduler's signal
    must not land inside it)."""
    from milbench.presets import load_preset

    method = registry.method(method_name)
    dataset = registry.dataset(dataset_name)
    check_method_layers(method)
    preset = preset or DEFAULT_PRESET
    saved = None
    if preset not in dataset.presets and preset not in method.presets and preset != DEFAULT_PRESET:
        saved = load_preset(results, preset, method.name, dataset.name)
        if saved is None:
            raise unknown_name("preset", preset, presets_of(method, dataset, results))
    params = {**PROTOCOL_PARAMS}
    for owner in (dataset, method):
        for key, p in owner.params.items():
            if key in params and params[key] != p:
                raise ConfigError(f"{type(owner).__name__} redeclares config key '{key}'")
            params[key] = p
    layers = [(f"dataset '{dataset.name}' defaults", dataset.defaults),
              (f"method '{method.name}' defaults", method.defaults),
              (f"dataset '{dataset.name}' preset '{preset}'", dataset.presets.get(preset, {})),
              (f"method '{method.name}' preset '{preset}'", method.presets.get(preset, {}))]
    if saved is not None:
        layers.append((f"saved preset '{preset}'", saved))
    if smoke:
        layers += [("protocol smoke", PROTOCOL_SMOKE), (f"dataset '{dataset.name}' smoke", dataset.smoke),
                   (f"method '{method.name}' smoke", method.smoke)]
    config = resolve(params, layers, overrides)
    try:
        if check:
            method.check(config)
    except MilbenchError:
        raise
    except Exception as exc:  # a plugin bug must not surface as a traceback
        raise PluginError(f"method '{method.name}' check() raised {first_line(exc)}") from None
    return RunPlan(method.name, dataset.name, preset, int(seed), smoke, config,
                   config_hash(config, method.name, dataset.name), method.supervision,
                   list(overrides) if not isinstance(overrides, Mapping) else [f"{k}={v}" for k, v in overrides.items()],
                   protocol=protocol_block(config, dataset.augmentation or "none"))


def parse_bytes(text: str | None) -> int | None:
    """``2GB``, ``512MiB``, ``1.5G``, ``1000000`` → bytes (binary multiples)."""
    if text is None:
        return None
    t = text.strip().upper().replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "B": 1}
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            num = t[: -len(suffix)]
            break
    else:
        suffix, num = "B", t
    try:
        value = int(float(num) * units[suffix])
    except ValueError:
        raise MilbenchError(f"bad memory size {text!r}; valid: a number with an optional unit, e.g. 2GB or 512MiB") from None
    if value <= 0:
        raise MilbenchError(f"bad memory size {text!r}: must be positive")
    return value


class _Signals:
    """Turns SIGINT/SIGTERM into a flag while a child runs (restored after)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stop_child(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class RunInterrupted(KeyboardInterrupt):
    """The user interrupted a run; its record was written (``record`` holds it)."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("error"))
        self.record = record


def new_record(plan: RunPlan, device: str, data_root: str | None, max_memory: int | None,
               extra: Mapping[str, Any] | None = None, status: str = "failed", error: str | None = None) -> dict[str, Any]:
    """The skeleton of a point's record, before anything ran: every required key,
    measurements null (:func:`milbench.handoff.null_fields`). :func:`execute`
    fills it from the child; a sweep driver writes it as is when an engine lost
    a point without a record."""
    from milbench.environment import git_state

    nulls = null_fields()
    record: dict[str, Any] = {k: None for k in REQUIRED_KEYS}
    record.update({
        "schema_version": SCHEMA_VERSION, "run_id": new_run_id(plan.method, plan.dataset, plan.seed),
        "created": now_iso(), "status": status,
        "method": plan.method, "dataset": plan.dataset, "preset": plan.preset, "config": plan.config,
        "config_hash": plan.config_hash, "seed": plan.seed, "supervision": plan.supervision,
        "smoke": plan.smoke, "overrides": plan.overrides, "protocol": plan.protocol, "device_requested": device,
        "data_root": data_root, **nulls, "error": error, "memory": {**nulls["memory"], "max_memory_bytes": max_memory},
        "log": None, "git": git_state(), "command": sys.argv[1:] if sys.argv else None,
    })
    record.update(extra or {})
    return record


def execute(plan: RunPlan, results: Path, device: str = "auto", data_root: str | None = None,
            timeout: float | None = None, max_memory: int | None = None, quiet: bool = False,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one planned point in a fresh child and write its record; return it.

    Raises :class:`RunInterrupted` (after writing the record) if the user
    interrupted; every other outcome is a record, never an exception.
    """
    from milbench.environment import host_environment, machine_load

    record = new_record(plan, device, data_root, max_memory, extra)
    run_id = record["run_id"]
    artifact_dir = results / "artifacts" / run_id
    log_path = results / "logs" / f"{run_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    record["log"] = _relative_to(str(log_path), results)
    with tempfile.TemporaryDirectory(prefix="milbench-run-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        progress_path = Path(tmp) / "progress.json"
        spec_path.write_text(ChildSpec(plan.method, plan.dataset, plan.config, plan.seed, device, data_root,
                                       str(artifact_dir), max_memory, str(progress_path),
                                       str(results / "cache")).to_json())
        load_before = machine_load()
        t0 = time.perf_counter()
        outcome, error = None, None
        show = RunProgress(progress_path, plan.config.get("epochs"), enabled=False if quiet else None)
        with open(log_path, "w") as log, open(log_path) as tail, _Signals() as sigs, show:
            proc = subprocess.Popen(
                [sys.executable, "-m", "milbench.child", str(spec_path), str(result_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            while proc.poll() is None:
                if not quiet:
                    show.log(tail.read())
                    show.poll()
                if sigs.received:
                    _stop_child(proc)
                    outcome, error = "interrupted", f"interrupted by {sigs.received}; the run was stopped"
                    break
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    _stop_child(proc)
                    outcome, error = "timeout", f"run exceeded --timeout {timeout:g}s and was stopped"
                    break
                time.sleep(0.05)
            if not quiet:
                show.log(tail.read())
        wall = time.perf_counter() - t0
        child: dict[str, Any] = {}
        if result_path.exists():
            try:
                child = json.loads(result_path.read_text())
            except ValueError:
                child = {}
    for key in CHILD_FIELDS:
        if child.get(key) is not None:
            record[key] = child[key]
    record["environment"] = {**host_environment(), **(child.get("environment") or {}),
                             "load_avg_before": load_before, "load_avg_after": machine_load()}
    code = proc.returncode
    if outcome:
        record["status"], record["error"] = outcome, error
    elif child.get("status") in ("ok", "failed", "oom", "interrupted"):
        record["status"] = child["status"]
        if child["status"] == "ok" and code != 0:
            record["status"], record["error"] = "failed", f"child exited with status {code} after finishing"
    else:
        record["status"] = "failed"
        how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with status {code}"
        record["error"] = f"child process {how} before reporting a result" + (
            " (possibly out of memory)" if code == -signal.SIGKILL else "")
    record["timing"] = {**(record.get("timing") or {}), "wall_s": wall}
    record["exit_code"] = code
    record["memory"] = {**dict.fromkeys(NULL_MEMORY_KEYS), **(record.get("memory") or {}), "max_memory_bytes": max_memory}
    if not (artifact_dir.exists() and any(artifact_dir.iterdir())):
        record.pop("artifacts", None)
    elif isinstance(record.get("artifacts"), dict):
        # paths relative to the results directory, so that a committed or copied results folder stays readable
        record["artifacts"] = {k: _relative_to(v, results) for k, v in record["artifacts"].items()}
    from milbench.diagnostics import learning_warnings

    # judged here, in the parent, from the child's history: a flat ln 2 loss must not pass as a result
    record["warnings"] = learning_warnings(record)
    write_record(results, record)
    if record["status"] == "interrupted" and outcome == "interrupted":
        raise RunInterrupted(record)
    return record


def _relative_to(path: str, results: Path) -> str:
    """``path`` relative to ``results`` when it lies inside it, else unchanged."""
    try:
        return str(Path(path).resolve().relative_to(Path(results).resolve()))
    except (ValueError, OSError):
        return path
