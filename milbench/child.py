"""The child process of one run: ``python -m milbench.child SPEC RESULT``.

Each run gets a fresh interpreter so peak-memory counters start at zero and an
out-of-memory error or a crash ends only that run. The child writes its
result file atomically at start, after every epoch and at the end, so even a
run killed part way leaves its history; the parent turns it into the record.
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


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch; make CPU kernels deterministic."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class _ProgressFile:
    """Where the child says how far the current epoch is, for the parent's progress bar.

    A tiny JSON file rewritten atomically at most every 0.2 s (and at an
    epoch's last bag), so the display costs nothing measurable."""

    def __init__(self, path: str | None, every_s: float = 0.2):
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


def main(spec_path: str, result_path: str) -> int:
    _die_with_parent()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    spec = json.loads(Path(spec_path).read_text())
    out = Path(result_path)
    result: dict[str, Any] = {"status": "running", "error": None, "traceback": None, "metrics": {},
                              "timing": {}, "memory": {}, "environment": {}, "history": [], "data": None}

    from milbench.records import write_json_atomic

    def save() -> None:
        write_json_atomic(out, result)

    save()
    from milbench.measure import PhaseTimer, ResourceSampler, torch_peaks

    device_name = spec["device"]
    gpu_index = None
    if device_name.startswith("cuda"):
        gpu_index = int(device_name.split(":")[1]) if ":" in device_name else 0

    sampler_box: dict[str, Any] = {}

    def on_limit(rss: int) -> None:
        s = sampler_box["s"]
        result["status"] = "oom"
        result["error"] = (f"MemoryLimitExceeded: resident memory {rss / 2**20:.0f} MiB crossed "
                           f"--max-memory {spec['max_memory_bytes'] / 2**20:.0f} MiB")
        result["memory"].update({"cpu_peak_rss_bytes": int(max(s.rss_peak, rss)),
                                 "cpu_baseline_rss_bytes": int(s.rss_baseline)})
        result["timing"]["total_s"] = time.perf_counter() - T_START
        save()
        os._exit(OOM_EXIT_CODE)

    sampler = ResourceSampler(gpu_index if device_name != "auto" else None,
                              limit_bytes=spec.get("max_memory_bytes"), on_limit=on_limit)
    sampler_box["s"] = sampler
    sampler.start()
    timer = None
    device = None
    code = 0
    try:
        import torch

        from milbench.api import RunContext
        from milbench.environment import torch_environment
        from milbench.plugins import get_registry
        from milbench.training import fit, state_bytes, test_metrics

        device = resolve_device(device_name)
        if device.type == "cuda" and gpu_index is None:
            gpu_index = device.index or 0
            sampler._init_nvml(gpu_index)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
            if spec.get("max_memory_bytes"):
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, spec["max_memory_bytes"] / total), device)
        result["environment"] = torch_environment(device)
        timer = PhaseTimer(device)
        seed = int(spec["seed"])
        seed_everything(seed)
        registry = get_registry(warn=False)
        method = registry.method(spec["method"])
        dataset = registry.dataset(spec["dataset"])
        config = spec["config"]
        ctx = RunContext(device=device, seed=seed, artifact_dir=spec.get("artifact_dir"),
                         data_root=spec.get("data_root"), max_memory_bytes=spec.get("max_memory_bytes"))
        result["timing"]["startup_s"] = time.perf_counter() - T_START
        with timer.phase("setup"):
            splits = dataset.load(config, seed, spec.get("data_root"))
            result["data"] = splits.info
            save()
            torch.manual_seed(seed)  # model init independent of how much randomness loading used
            model = method.build(splits.spec, config, ctx).to(device)
        result["memory"].update(state_bytes(model))
        result["memory"]["cpu_setup_rss_bytes"] = int(sampler.rss_peak)
        if device.type == "cuda":
            result["memory"]["torch_setup_allocated_bytes"] = int(torch.cuda.memory_allocated(device))

        def on_epoch(entry: dict[str, Any]) -> None:
            result["history"].append(entry)
            result["timing"].update({k + "_s": v for k, v in timer.seconds.items()})
            save()
            print(f"[milbench] epoch {entry['epoch']}: train_loss {entry['train_loss']:.4f} "
                  f"val_loss {entry['val_loss']:.4f} val_auc "
                  f"{'-' if entry['val_bag_auc'] is None else format(entry['val_bag_auc'], '.3f')} "
                  f"({entry['seconds']:.1f}s)", file=sys.stderr, flush=True)

        progress = _ProgressFile(spec.get("progress_path"))
        # a dataset that does not override augment() has nothing to apply: skip it (and never read a
        # lazy bag's every tile just to hand it back unchanged)
        from milbench.api import Dataset as _Dataset

        overrides_augment = type(dataset).augment is not _Dataset.augment
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
    except Interrupted as exc:
        result["status"], result["error"] = "interrupted", f"interrupted by {exc}"
        code = 130
    except MemoryError as exc:
        result["status"], result["error"], code = "oom", _one_line(exc) or "MemoryError", 1
    except Exception as exc:
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        result["status"] = "oom" if oom else "failed"
        from milbench.errors import MilbenchError

        result["error"] = str(exc) if isinstance(exc, MilbenchError) else _one_line(exc)
        result["error_kind"] = "input" if isinstance(exc, MilbenchError) else "crash"
        result["traceback"] = None if isinstance(exc, MilbenchError) else traceback.format_exc(limit=20)
        code = 1
    finally:
        sampler.stop()
        result["memory"].update({
            "device": str(device) if device is not None else device_name,
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
        if timer is not None:
            result["timing"].update({k + "_s": v for k, v in timer.seconds.items()})
        bags = result["timing"].get("bags_trained")
        if bags:
            result["timing"]["train_s_per_bag"] = result["timing"].get("train_s", 0.0) / bags
            result["timing"]["train_cpu_s_per_bag"] = result["timing"].get("train_cpu_s", 0.0) / bags
        result["timing"]["total_s"] = time.perf_counter() - T_START
        save()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
