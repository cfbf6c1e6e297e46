"""Measuring a run from inside its child process: wall time per phase, peak
GPU memory from NVML, torch's own CUDA peaks, and peak CPU RSS.

NVML is the headline GPU figure because it sees everything the process holds
on the device (CUDA context, cuDNN workspaces, the caching allocator's
reserve), which is what decides whether a run fits. A sampler thread polls
every ~10 ms the memory of *this* process (``nvmlDeviceGetComputeRunningProcesses``);
where the pid is not visible (PID namespaces in containers) it falls back to
device used-memory minus a baseline taken before the run, and records which
method produced the number. Missing measurements are ``None``, never 0.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class ResourceSampler:
    """Polls process RSS (psutil) and GPU memory (NVML) in a daemon thread.

    ``limit_bytes`` arms a watchdog: when RSS crosses it, ``on_limit`` is
    called once from the sampler thread (the child uses it to write an
    ``oom`` result and exit, because a real out-of-memory kill leaves nothing).
    """

    def __init__(self, device_index: int | None = None, interval: float = 0.01,
                 limit_bytes: int | None = None, on_limit: Callable[[int], None] | None = None) -> None:
        import psutil

        self.interval = interval
        self.proc = psutil.Process(os.getpid())
        self.rss_peak = self.proc.memory_info().rss
        self.rss_baseline = self.rss_peak
        self.gpu_peak: int | None = None
        self.gpu_method: str | None = None
        self.gpu_baseline: int | None = None
        self.limit_bytes = limit_bytes
        self.on_limit = on_limit
        self._nvml_handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device_index is not None:
            self.attach_gpu(device_index)

    def attach_gpu(self, index: int) -> None:
        """Measure GPU ``index`` (torch's numbering, inside ``CUDA_VISIBLE_DEVICES``) from now on.

        The child calls it when the GPU is known only once torch has chosen it
        (``--device auto``). Its baseline is the device's used memory now. Without
        a driver or NVML the GPU figures simply stay None.
        """
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible and visible.split(",")[index].strip().isdigit():
                index = int(visible.split(",")[index])
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.gpu_baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
            self.gpu_peak = 0
        except Exception:  # no driver, no NVML: GPU memory stays None
            self._nvml_handle = None

    def _gpu_now(self) -> int | None:
        import pynvml

        h = self._nvml_handle
        try:
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    self.gpu_method = "nvml-process"
                    return int(p.usedGpuMemory)
            if self.gpu_method == "nvml-process":
                return 0  # our pid was seen before: it simply holds nothing now
            self.gpu_method = "nvml-device-delta"
            return max(0, int(pynvml.nvmlDeviceGetMemoryInfo(h).used) - int(self.gpu_baseline or 0))
        except Exception:
            return None

    def sample(self) -> None:
        try:
            rss = self.proc.memory_info().rss
        except Exception:
            return
        if rss > self.rss_peak:
            self.rss_peak = rss
        if self.limit_bytes and rss > self.limit_bytes and self.on_limit:
            cb, self.on_limit = self.on_limit, None
            cb(rss)
        if self._nvml_handle is not None:
            g = self._gpu_now()
            if g is not None and g > (self.gpu_peak or 0):
                self.gpu_peak = g

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "ResourceSampler":
        self._thread = threading.Thread(target=self._loop, name="milbench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=1)
        self.sample()

    def cpu_peak_rss(self) -> int:
        """Peak RSS: the sampled peak, or the kernel's ``ru_maxrss`` if larger."""
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return max(self.rss_peak, maxrss)


#: Blocks at least this large are mmapped by glibc, so freeing them returns them to the OS at once.
PROMPT_RELEASE_BYTES = 4 * 2**20


def release_freed_memory_promptly(threshold: int = PROMPT_RELEASE_BYTES) -> int | None:
    """Make glibc's malloc hand freed blocks of ``threshold`` bytes or more back to the OS at once;
    return the threshold set, or None where that cannot be done (not glibc).

    Why: on a CPU ``--max-memory`` is enforced against the process's resident memory. glibc
    raises its mmap threshold as large blocks are freed (up to 32 MiB), after which blocks of
    tensor size come from the heap and stay resident when freed, and a heap fragmented by
    tiles of varying sizes keeps growing. Measured on streamingclam over a 6048 x 5216 slide
    box: one training step peaked 1,243 MiB above setup with glibc's defaults and 848 MiB with
    a fixed 4 MiB threshold (the planner had budgeted 789 MiB), and after the step 518 MiB
    against 180 MiB stayed resident. The cost is an mmap/munmap and fresh zeroed pages per
    large tensor: a streamed 1536 x 1536 step took 4.2-5.7 CPU s with it against 2.8-3.9 s
    without (same process layout, back to back, loaded machine). The child sets it only when
    ``--max-memory`` limits a CPU run, where staying under the limit is the point.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if not mallopt(m_mmap_threshold, int(threshold)):
        return None
    mallopt(m_trim_threshold, int(threshold))
    return int(threshold)


def torch_peaks(device: Any) -> dict[str, int | None]:
    """torch's own CUDA allocator peaks for ``device`` (None on CPU)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return {"torch_peak_allocated_bytes": None, "torch_peak_reserved_bytes": None}
    return {
        "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "torch_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def synchronize(device: Any) -> None:
    """Wait for queued CUDA work so a phase's wall time includes it."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates wall seconds and process CPU seconds per named phase,
    synchronising CUDA at the edges.

    CPU seconds (all threads of the process) are kept beside wall time
    because on a shared machine wall time of one process varies with the
    load of others, while its CPU time does not: time *ratios* between
    methods are better taken from ``<phase>_cpu_s`` there.
    """

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            cpu = f"{name}_cpu"
            self.seconds[cpu] = self.seconds.get(cpu, 0.0) + time.process_time() - c0
