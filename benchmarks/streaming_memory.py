"""Peak memory and time of one forward+backward pass through a CNN trunk,
streamed (milbench.models.streaming) against plain autograd, as the image grows.

Each point (trunk, image side, mode) runs in a fresh Python process so that
peak counters start from zero and one out-of-memory point cannot disturb the
next. A point writes one JSON file; the driver prints a table at the end.

    # the CPU record set (1 thread, 8 GiB data limit per point, ~15 min on 2 cores):
    python benchmarks/streaming_memory.py --out results/streaming-memory-cpu --trunks small \\
        --sides 512 1024 2048 4096 8192 --tile small=512 --repeats 2 --mem-limit-gb 8
    python benchmarks/streaming_memory.py --out results/streaming-memory-cpu --trunks resnet34 \\
        --sides 512 1024 2048 --tile resnet34=1920 --repeats 1 --mem-limit-gb 8
    # the same memory bound with rectangular tiles (less overlap, less recomputation):
    python benchmarks/streaming_memory.py --out results/streaming-memory-cpu/area --trunks resnet34 \\
        --sides 2048 3072 --tile resnet34=1920 --tile-shape area --repeats 1 --mem-limit-gb 16
    # tile_size=auto (what streamingclam uses): stages and tiles sized to a 2 GiB tile budget, one shape,
    # the training step's kept last tile; two passes per point (the first pays kernel set-up):
    python benchmarks/streaming_memory.py --out results/streaming-memory-cpu/auto --trunks resnet34 \\
        --sides 1024 2048 3072 --tile resnet34=auto --tile-shape area --repeats 2 --mem-limit-gb 16
    # on a GPU (NVML and torch peaks; no data limit):
    python benchmarks/streaming_memory.py --out results/streaming-memory-gpu --device cuda \\
        --sides 1024 2048 4096 8192 16384 --tile small=2048 resnet34=3200

What is measured, per point:

* ``seconds``: wall time of forward + backward (streamed: the no-grad tiled
  forward, then the tiled recompute-and-backward; plain: ``trunk(x)`` and
  ``out.backward(g)``), with ``g`` a fixed random dL/dF; ``forward_seconds``
  the forward part alone.
* CPU: ``peak_rss_bytes`` (``ru_maxrss`` of the worker), ``rss_before_bytes``
  (after imports, model build and a small warm-up, before the image exists),
  and ``working_bytes = peak - before - image - feature map - dL/dF``: the
  memory the pass itself needed, which streaming keeps flat.
  glibc's dynamic mmap threshold lets freed tile buffers fragment the heap,
  which adds tens of MiB that grow with the number of tiles; with
  ``--mmap-threshold 65536`` the streamed working memory is flat to 0.5 MiB
  from 1024 to 4096 px (small trunk, 512-px tiles).
* CUDA (``--device cuda``): torch's peak allocated/reserved bytes, and the
  NVML-reported memory of this process (or device used-memory minus a
  baseline where the pid is not visible), with the device's name.

A data-segment limit (``--mem-limit-gb``, RLIMIT_DATA) turns a plain pass
that would need more memory than that into a recorded ``oom`` point instead
of exhausting the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse_tiles(items: list[str]) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value or not (value == "auto" or value.isdigit()):
            raise SystemExit(f"bad --tile {item!r}: expected TRUNK=PIXELS or TRUNK=auto, e.g. resnet34=1920")
        out[name] = value if value == "auto" else int(value)
    return out


def _nvml_process_bytes(pid: int) -> tuple[int | None, str | None, str | None]:
    """(bytes used by ``pid`` on GPU 0, method, device name) from NVML, where available."""
    try:
        import pynvml
    except ImportError:
        return None, None, None
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory), "nvml-process", name
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used), "nvml-device-used", name
    except Exception:  # NVML missing or not permitted: report nothing rather than a wrong number
        return None, None, None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _NvmlSampler:
    """Polls NVML every ~10 ms in a thread and keeps the peak (GPU runs only)."""

    def __init__(self):
        import threading

        self.peak: int | None = None
        self.method: str | None = None
        self.device: str | None = None
        used, method, _ = _nvml_process_bytes(os.getpid())
        self._baseline = used if method == "nvml-device-used" else 0  # device-wide figure: subtract what was there
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            used, method, name = _nvml_process_bytes(os.getpid())
            if used is not None and method == "nvml-device-used":
                used -= self._baseline or 0
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
                self.method, self.device = method, name
            self._stop.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(args: argparse.Namespace) -> dict:
    """Measure one point in this process and return its record."""
    import resource

    if args.mem_limit_gb:
        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    from milbench.models.streaming import StreamingTrunk, auto_stages, describe
    from milbench_plugins.streamingclam.trunk import build_trunk

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    trunk = build_trunk(args.trunk, 3).to(device)
    auto = None
    if args.tile == "auto":  # what streamingclam's tile_size=auto does: cut into stages, size tiles to the budget
        t0 = time.perf_counter()
        auto = auto_stages(trunk, args.budget_mib * 2**20)
        sizing_s = time.perf_counter() - t0
        stream = StreamingTrunk(trunk, list(auto.tile_sizes), args.tile_shape, auto.split, auto.bytes_per_pixel,
                                auto.budget_bytes)
    else:
        stream = StreamingTrunk(trunk, int(args.tile), args.tile_shape)
    geo = stream.geometry
    record = {
        "trunk": args.trunk, "side": args.side, "mode": args.mode,
        "tile_size": stream.tile_size if args.mode == "streamed" else None,
        "tile_shape": args.tile_shape if args.mode == "streamed" else None,
        "device": str(device), "threads": args.threads, "mem_limit_gb": args.mem_limit_gb,
        "torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_name(),
        "host_image": bool(args.host_image and args.mode == "streamed"),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "stride": list(geo.stride),
        "receptive_field": list(geo.receptive_field), "status": "ok", "error": None,
    }
    if args.mode == "streamed":
        size, stages = (args.side, args.side), []
        for st in stream.stages:
            d = describe(st.geometry, *size, st.tile_size, args.tile_shape)
            stages.append({"children": len(st.module) if isinstance(st.module, torch.nn.Sequential) else None,
                           "input": list(size), "tile_size": st.tile_size, **d})
            size = st.geometry.output_size(*size)
        plan = stages[0]
        record.update({"tiles": plan["tiles"], "overlap_factor": plan["overlap_factor"],
                       "largest_tile": plan["largest_tile"], "distinct_tile_shapes": plan["distinct_tile_shapes"],
                       "stages": stages, "keep_for_backward": True})
        record["kept_stages"] = stream._keep_plan(args.side, args.side)
        if auto is not None:
            record.update({"tile_auto": True, "budget_bytes": int(auto.budget_bytes), "split": list(auto.split),
                           "stage_bytes_per_pixel": list(auto.bytes_per_pixel), "sizing_seconds": sizing_s,
                           "predicted_tile_bytes": max(int(s_["largest_tile"][0] * s_["largest_tile"][1] * c)
                                                       for s_, c in zip(stages, auto.bytes_per_pixel))})
            if len(stages) > 1:
                record["tile_label"] = "auto " + " / ".join(str(s_["tile_size"]) for s_ in stages)
                record["tiles_label"] = " + ".join(str(s_["tiles"]) for s_ in stages)
    # warm-up on a small image so that one-time allocations are in the baseline, not the measurement
    warm = torch.randn(1, 3, 64, 64, device=device)
    trunk(warm).sum().backward()
    trunk.zero_grad(set_to_none=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    proc = psutil.Process()
    record["rss_before_bytes"] = proc.memory_info().rss
    ho, wo = geo.output_size(args.side, args.side)
    c = trunk.out_channels
    elem = 4
    record["image_bytes"] = 3 * args.side * args.side * elem
    record["feature_bytes"] = c * ho * wo * elem
    record["grad_bytes"] = sum(p.numel() * elem for p in trunk.parameters())
    sampler = _NvmlSampler() if device.type == "cuda" else None
    try:
        if sampler:
            sampler.__enter__()
        # --host-image: the image stays in host memory and tiles travel to the GPU one by one
        x = torch.randn(1, 3, args.side, args.side,
                        device="cpu" if args.host_image and args.mode == "streamed" else device)
        g = torch.randn(1, c, ho, wo, device=device)
        runs = []
        for _ in range(args.repeats):  # the first run also pays first-touch page faults
            trunk.zero_grad(set_to_none=False)
            t0 = time.perf_counter()
            if args.mode == "streamed":  # the training step: the last tile's graph kept for the backward
                feats = stream.forward_streamed(x, keep_for_backward=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                stream.backward_streamed(x, g)
            else:
                feats = trunk(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                feats.backward(g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            runs.append((t2 - t0, t1 - t0, t2 - t1))
            del feats
        best = min(runs)
        record.update({"seconds": best[0], "forward_seconds": best[1], "backward_seconds": best[2],
                       "all_seconds": [r[0] for r in runs]})
    except (RuntimeError, MemoryError) as exc:
        msg = str(exc)
        oom = isinstance(exc, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg
        record["status"] = "oom" if oom else "failed"
        record["error"] = msg.splitlines()[0][:300]
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["peak_rss_bytes"] = peak
    if record["status"] == "ok":
        record["working_bytes"] = (peak - record["rss_before_bytes"] - record["image_bytes"]
                                   - 2 * record["feature_bytes"])
    if device.type == "cuda":
        record["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        record["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        record["gpu_name"] = torch.cuda.get_device_name(device)
        if sampler is not None:
            record["nvml_peak_bytes"] = sampler.peak
            record["nvml_method"] = sampler.method
    return record


def driver(args: argparse.Namespace) -> None:
    tiles = _parse_tiles(args.tile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for trunk in args.trunks:
        tile = tiles.get(trunk, args.default_tile)
        for side in args.sides:
            for mode in args.modes:
                if mode == "plain" and args.plain_max_side.get(trunk) and side > args.plain_max_side[trunk]:
                    continue
                if mode == "streamed" and args.streamed_max_side.get(trunk) and side > args.streamed_max_side[trunk]:
                    continue
                path = out / f"{trunk}-{args.device.replace(':', '')}-{mode}-{side}.json"
                if path.exists() and not args.force:
                    rows.append(json.loads(path.read_text()))
                    continue
                cmd = [sys.executable, __file__, "--worker", "--trunk", trunk, "--side", str(side), "--mode", mode,
                       "--tile-px", str(tile), "--tile-shape", args.tile_shape, "--device", args.device, "--threads", str(args.threads),
                       "--mem-limit-gb", str(args.mem_limit_gb), "--repeats", str(args.repeats), "--json", str(path),
                       "--budget-mib", str(args.budget_mib)]
                if args.host_image:
                    cmd.append("--host-image")
                t0 = time.perf_counter()
                env = dict(os.environ)
                if args.mmap_threshold:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout, env=env)
                if res.returncode != 0 or not path.exists():
                    rec = {"trunk": trunk, "side": side, "mode": mode, "tile_size": tile, "device": args.device,
                           "status": "oom" if res.returncode in (-9, 137) else "failed",
                           "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:300]}
                    path.write_text(json.dumps(rec, indent=1))
                rec = json.loads(path.read_text())
                rec["process_seconds"] = time.perf_counter() - t0
                path.write_text(json.dumps(rec, indent=1))
                rows.append(rec)
                print(_row(rec), flush=True)
    print("\n" + table(rows))


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f}"


def _row(r: dict) -> str:
    return (f"{r['trunk']:>9} {r['mode']:>8} {r['side']:>6} tile={r.get('tile_size')} {r['status']:>6} "
            f"t={r.get('seconds', float('nan')):.2f}s peakRSS={_mib(r.get('peak_rss_bytes'))}MiB "
            f"working={_mib(r.get('working_bytes'))}MiB")


def table(rows: list[dict]) -> str:
    """Markdown table: per trunk and side, streamed vs plain time and memory."""
    by = {(r["trunk"], r["side"], r["mode"]): r for r in rows}
    lines = ["| trunk | side | tile | tiles | overlap | plain s | streamed s | ratio | plain peak RSS MiB "
             "| streamed peak RSS MiB | plain working MiB | streamed working MiB |", "|" + "---|" * 12]
    for trunk, side in sorted({(r["trunk"], r["side"]) for r in rows}):
        p, s = by.get((trunk, side, "plain"), {}), by.get((trunk, side, "streamed"), {})

        def t(r):
            return f"{r['seconds']:.2f}" if r.get("status") == "ok" else (r.get("status") or "-")

        ratio = f"{s['seconds'] / p['seconds']:.2f}" if p.get("status") == s.get("status") == "ok" else "-"
        tile = s.get("tile_label") or s.get("tile_size", "-")
        lines.append(f"| {trunk} | {side} | {tile} | {s.get('tiles_label') or s.get('tiles', '-')} "
                     f"| {s.get('overlap_factor', '-')} | {t(p)} | {t(s)} "
                     f"| {ratio} "
                     f"| {_mib(p.get('peak_rss_bytes')) if p else '-'} | {_mib(s.get('peak_rss_bytes')) if s else '-'} "
                     f"| {_mib(p.get('working_bytes'))} | {_mib(s.get('working_bytes'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/streaming-memory", help="folder for one JSON per point")
    ap.add_argument("--trunks", nargs="+", default=["small", "resnet34"])
    ap.add_argument("--sides", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--modes", nargs="+", default=["plain", "streamed"], choices=["plain", "streamed"])
    ap.add_argument("--tile", nargs="*", default=[], help="TRUNK=PIXELS tile sizes (e.g. small=512 resnet34=1920), "
                    "or TRUNK=auto: stages and tiles sized to --budget-mib as streamingclam's tile_size=auto")
    ap.add_argument("--budget-mib", type=float, default=2048, help="tile activation budget of TRUNK=auto "
                    "(default 2048: streamingclam's default without --max-memory)")
    ap.add_argument("--default-tile", type=int, default=512)
    ap.add_argument("--tile-shape", default="square", choices=["square", "area"],
                    help="square: tile sides <= the tile size; area: rectangles of <= tile size**2 pixels that "
                         "recompute least (e.g. full-width strips)")
    ap.add_argument("--plain-max-side", nargs="*", default=[], help="TRUNK=SIDE: skip plain points above")
    ap.add_argument("--streamed-max-side", nargs="*", default=[], help="TRUNK=SIDE: skip streamed points above")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem-limit-gb", type=float, default=0.0, help="RLIMIT_DATA per point, CPU runs (0: none)")
    ap.add_argument("--repeats", type=int, default=1, help="passes per point; the fastest is reported")
    ap.add_argument("--host-image", action="store_true", help="streamed points keep the image in host memory")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="glibc MALLOC_MMAP_THRESHOLD_ for the workers (e.g. 65536): large blocks go straight back "
                         "to the OS, so peak RSS shows the algorithm rather than heap fragmentation (0: glibc default)")
    ap.add_argument("--point-timeout", type=float, default=1800)
    ap.add_argument("--force", action="store_true", help="re-run points that already have a JSON file")
    # worker mode (one point, in a fresh process)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trunk", help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--tile-px", dest="tile_px", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.tile = args.tile_px
        rec = worker(args)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(args.json)
        return
    args.streamed_max_side = _parse_tiles(args.streamed_max_side)
    args.plain_max_side = _parse_tiles(args.plain_max_side)
    driver(args)


if __name__ == "__main__":
    main()
