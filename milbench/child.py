"""The child process of one run: ``python -m milbench.child SPEC RESULT``.

Each run gets a fresh interpreter so peak-memory counters start at zero and an
out-of-memory error or a crash ends only that run. The child writes its
result file atomically at start, after every epoch and at the end, so even a
run killed part way leaves its history; the parent turns it into the record.

SPEC is a :class:`milbench.handoff.ChildSpec`; the result starts from
:func:`milbench.handoff.null_fields`. A run goes through :func:`setup` (result
file, memory sampler), :func:`run` (device, data, model, training,
evaluation), :func:`record_failure` when it raised, and :func:`finalise`
(final memory and time figures), which always runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from milbench.data.roots import ENV_DERIVED_CACHE
from milbench.devices import DeviceRequest, parse_device
from milbench.errors import first_line
from milbench.handoff import ChildSpec, null_fields

T_START = time.perf_counter()

OOM_EXIT_CODE = 86  # the memory watchdog's exit status (the result file says oom)


class Interrupted(BaseException):
    """SIGTERM/SIGINT from the parent (interrupt or timeout)."""


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child if the parent dies (no orphan runs)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except OSError:
        pass


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch; make CPU kernels deterministic."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class _ProgressFile:
    """Where the child says how far the current epoch is, for the parent's progress bar.

    A tiny JSON file rewritten atomically at most every 0.2 s (and at an
    epoch's last bag), so the display costs nothing measurable."""

    def __init__(self, path: str | None, every_s: float = 0.2) -> None:
        self.path = Path(path) if path else None
        self.every_s = every_s
        self._last = 0.0
        self._t_epoch = time.perf_counter()
        self._epoch = 0

    def update(self, epoch: int, done: int, total: int, loss: float) -> None:
        if self.path is None:
            return
        now = time.perf_counter()
        if epoch != self._epoch:
            self._epoch, self._t_epoch = epoch, now
        if done < total and now - self._last < self.every_s:
            return
        self._last = now
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"epoch": epoch, "done": done, "total": total, "loss": loss,
                                       "elapsed_s": now - self._t_epoch}))
            os.replace(tmp, self.path)
        except OSError:
            pass  # progress is a display, never a reason to fail a run


class ChildRun:
    """One run inside the child: its spec, the result being written, and what measures it."""

    def __init__(self, spec: ChildSpec, out: Path) -> None:
        from milbench.measure import ResourceSampler

        self.spec = spec
        self.out = out
        self.result: dict[str, Any] = {"status": "running", "traceback": None, **null_fields()}
        self.request: DeviceRequest = parse_device(spec.device)
        #: The GPU measured: the one asked for, or (``auto``) the one torch picks in :func:`run`.
        self.gpu_index: int | None = self.request.index
        self.device: Any = None
        self.timer: Any = None
        self.sampler = ResourceSampler(self.gpu_index, limit_bytes=spec.max_memory_bytes, on_limit=self._on_limit)

    def save(self) -> None:
        from milbench.records import write_json_atomic

        write_json_atomic(self.out, self.result)

    def _on_limit(self, rss: int) -> None:
        """The ``--max-memory`` watchdog (sampler thread): record ``oom`` and exit at once,
        because a real out-of-memory kill would leave nothing."""
        result, s = self.result, self.sampler
        result["status"] = "oom"
        result["error"] = (f"MemoryLimitExceeded: resident memory {rss / 2**20:.0f} MiB crossed "
                           f"--max-memory {self.spec.max_memory_bytes / 2**20:.0f} MiB")
        result["memory"].update({"cpu_peak_rss_bytes": int(max(s.rss_peak, rss)),
                                 "cpu_baseline_rss_bytes": int(s.rss_baseline)})
        result["timing"]["total_s"] = time.perf_counter() - T_START
        self.save()
        os._exit(OOM_EXIT_CODE)


def setup(spec: ChildSpec, out: Path) -> ChildRun:
    """Write the first result file and start measuring memory (the watchdog is armed from here)."""
    child = ChildRun(spec, out)
    child.save()
    child.sampler.start()
    return child


def _start_device(child: ChildRun) -> Any:
    """Choose the run's torch device (``child.device``), measure its GPU and cap it as asked."""
    import torch

    from milbench.devices import torch_device

    child.device = device = torch_device(child.request)
    if device.type == "cuda" and child.gpu_index is None:  # auto chose a GPU: measure that one
        child.gpu_index = device.index or 0
        child.sampler.attach_gpu(child.gpu_index)
    if device.type == "cpu" and child.spec.max_memory_bytes:
        from milbench.measure import release_freed_memory_promptly

        # the limit is enforced on resident memory: freed tensors must leave it (see the function)
        child.result["memory"]["cpu_malloc_release_bytes"] = release_freed_memory_promptly()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        if child.spec.max_memory_bytes:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, child.spec.max_memory_bytes / total), device)
    return device


def run(child: ChildRun) -> None:
    """Load the data, build the model, train, evaluate and collect artifacts; status ``ok`` at the end."""
    import torch

    from milbench.contract import Dataset, RunContext
    from milbench.environment import torch_environment
    from milbench.measure import PhaseTimer
    from milbench.plugins import get_registry
    from milbench.training import fit, state_bytes, test_metrics

    spec, result = child.spec, child.result
    device = _start_device(child)
    result["environment"] = torch_environment(device)
    child.timer = timer = PhaseTimer(device)
    seed = int(spec.seed)
    seed_everything(seed)
    registry = get_registry(warn=False)
    method = registry.method(spec.method)
    dataset = registry.dataset(spec.dataset)
    config = spec.config
    ctx = RunContext(device=device, seed=seed, artifact_dir=spec.artifact_dir, data_root=spec.data_root,
                     max_memory_bytes=spec.max_memory_bytes)
    result["timing"]["startup_s"] = time.perf_counter() - T_START
    if spec.cache_dir:
        os.environ[ENV_DERIVED_CACHE] = spec.cache_dir
    with timer.phase("setup"):
        splits = dataset.load(config, seed, spec.data_root)
        result["data"] = splits.info
        child.save()
        torch.manual_seed(seed)  # model init independent of how much randomness loading used
        model = method.build(splits.spec, config, ctx).to(device)
    result["memory"].update(state_bytes(model))
    result["memory"]["cpu_setup_rss_bytes"] = int(child.sampler.rss_peak)
    if device.type == "cuda":
        result["memory"]["torch_setup_allocated_bytes"] = int(torch.cuda.memory_allocated(device))

    def on_epoch(entry: dict[str, Any]) -> None:
        result["history"].append(entry)
        result["timing"].update({k + "_s": v for k, v in timer.seconds.items()})
        child.save()
        print(f"[milbench] epoch {entry['epoch']}: train_loss {entry['train_loss']:.4f} "
              f"val_loss {entry['val_loss']:.4f} val_auc "
              f"{'-' if entry['val_bag_auc'] is None else format(entry['val_bag_auc'], '.3f')} "
              f"({entry['seconds']:.1f}s)", file=sys.stderr, flush=True)

    progress = _ProgressFile(spec.progress_path)
    # a dataset that does not override augment() has nothing to apply: skip it (and never read a
    # lazy bag's every tile just to hand it back unchanged)
    overrides_augment = type(dataset).augment is not Dataset.augment
    augment = dataset.augment if config.get("augment") and overrides_augment else None
    summary = fit(method, model, splits, config, ctx, timer, on_epoch, augment=augment, on_bag=progress.update)
    with timer.phase("eval"):
        metrics, _ = test_metrics(method, model, splits, config, ctx, registry.metrics)
    with timer.phase("artifacts"):
        extra = method.artifacts(model, splits, config, ctx) or {}
    for k, v in extra.items():
        if isinstance(v, str):
            result.setdefault("artifacts", {})[k] = v
        else:
            metrics[k] = v
    result["metrics"] = metrics
    result["best_epoch"] = summary["best_epoch"]
    result["stopped_early"] = summary["stopped_early"]
    result["timing"]["epochs"] = len(summary["history"])
    result["timing"]["bags_trained"] = summary["bags_trained"]
    result["status"] = "ok"


def record_failure(child: ChildRun, exc: BaseException) -> int:
    """Put why the run stopped into the result; return the child's exit status.

    A signal from the parent is ``interrupted``; running out of memory (CPU or
    CUDA) is ``oom``; anything else ``failed``. A :class:`MilbenchError` (bad
    data or config found inside the run) keeps its own message and is marked
    ``input``; any other exception is a ``crash`` with its traceback.
    """
    result = child.result
    if isinstance(exc, Interrupted):
        result["status"], result["error"] = "interrupted", f"interrupted by {exc}"
        return 130
    if isinstance(exc, MemoryError):
        result["status"], result["error"] = "oom", first_line(exc) or "MemoryError"
        return 1
    import torch

    from milbench.errors import MilbenchError

    oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    result["status"] = "oom" if oom else "failed"
    mine = isinstance(exc, MilbenchError)
    result["error"] = str(exc) if mine else first_line(exc)
    result["error_kind"] = "input" if mine else "crash"
    result["traceback"] = None if mine else traceback.format_exc(limit=20)
    return 1


def finalise(child: ChildRun) -> None:
    """Stop measuring and write the final memory and time figures (whatever happened)."""
    from milbench.measure import torch_peaks

    result, sampler, device = child.result, child.sampler, child.device
    sampler.stop()
    result["memory"].update({
        "device": str(device) if device is not None else child.spec.device,
        "gpu_peak_bytes": sampler.gpu_peak,
        "gpu_peak_method": sampler.gpu_method,
        "cpu_peak_rss_bytes": int(sampler.cpu_peak_rss()),
        "cpu_baseline_rss_bytes": int(sampler.rss_baseline),
    })
    if device is not None:
        try:
            result["memory"].update(torch_peaks(device))
        except Exception:
            pass
    else:
        result["memory"].update({"torch_peak_allocated_bytes": None, "torch_peak_reserved_bytes": None})
    timing = result["timing"]
    if child.timer is not None:
        timing.update({k + "_s": v for k, v in child.timer.seconds.items()})
    bags = timing.get("bags_trained")
    if bags:
        timing["train_s_per_bag"] = timing.get("train_s", 0.0) / bags
        timing["train_cpu_s_per_bag"] = timing.get("train_cpu_s", 0.0) / bags
    timing["total_s"] = time.perf_counter() - T_START
    child.save()


def main(spec_path: str, result_path: str) -> int:
    """Run the spec'd point; the result file says how it ended, the exit status too (0 ok, 130 interrupted)."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    child = setup(ChildSpec.from_json(Path(spec_path).read_text()), Path(result_path))
    code = 0
    try:
        run(child)
    except (Interrupted, Exception) as exc:  # MemoryError and every plugin error included
        code = record_failure(child, exc)
    finally:
        finalise(child)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
