"""The machine and software that produced a record (asv-style provenance).

A time or memory figure means nothing without the CPU, GPU, driver, torch
and milbench version that produced it, and the commit of the code: every
record carries them, so results from two machines are compared knowingly.
The parent fills in what it knows without torch (:func:`host_environment`,
:func:`git_state`); the child adds torch, CUDA and the GPU
(:func:`torch_environment`).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import milbench


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_environment() -> dict[str, Any]:
    """Facts knowable without torch (filled in by the parent)."""
    import psutil

    return {
        "milbench": milbench.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": int(psutil.virtual_memory().total),
    }


def machine_load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none).

    Times measured on a shared machine are inflated by whatever else runs (two
    jobs on two cores inflate even CPU seconds several-fold, threads spin while
    they wait); the record keeps the load before and after the run so a reader
    can tell a quiet-machine figure from a loaded one."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def torch_environment(device: Any) -> dict[str, Any]:
    """torch, CUDA, GPU name and driver (filled in by the child)."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "torch_threads": torch.get_num_threads(), "device": str(device),
                           "gpu": None, "driver": None}
    if getattr(device, "type", None) == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        except Exception:
            pass
    return env


CODE_PATHS = ("milbench", "plugins", "pyproject.toml")
"""What a run executes, relative to the checkout: the harness, the built-in
plugins and the entry points that register them. ``git.dirty`` looks at these
only, because the results folder is tracked too and a tuning study's SQLite
file changes before every trial: counting it marked every tuned record dirty
although no code differed from the commit."""


def git_state(src: Path | None = None) -> dict[str, Any]:
    """Commit of the milbench checkout, and whether its code (:data:`CODE_PATHS`)
    differs from that commit; nulls when milbench is not run from a checkout.

    ``src`` is the checkout's root (default: the one milbench is imported from).
    """
    src = src or Path(milbench.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no",
                                "--", *CODE_PATHS], capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
