"""Peak memory against slide size from the records of run.sh: slide-size.png and table.md.

x: the level-0 side of the generated slides (and, in the table, the mean tissue tiles per
training slide); y: peak resident memory of the run's process (CPU-only machine). An `oom`
point (abmil crossing --max-memory) is drawn at the limit with a cross.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
rows = []
# whole-map-head/: streamingclam before its head was streamed (the trunk's map, dL/dF and the head's
# activations held whole), kept as its own series for comparison
# default-allocator/: grad-accum and abmil measured before --max-memory made a CPU child release freed blocks
# of >= 4 MiB to the OS (memory.cpu_malloc_release_bytes); in the table, not in the plot
SERIES = {"whole-map-head": " (whole-map head)", "default-allocator": " (default allocator)"}  # folder -> suffix
TABLE_ONLY = {"default-allocator"}
for f in sorted([*here.glob("*.json"), *(g for d in SERIES for g in here.glob(f"{d}/*.json"))]):
    r = json.loads(f.read_text())
    r["method"] += SERIES.get(f.parent.name, "")
    data = r.get("data") or {}
    per = data.get("per_slide") or []
    side = per[0]["dimensions"][0] if per else int(Path(r["config"]["manifest"]).parent.name)
    tiles = [p["tiles"] for p in per if p["split"] == "train"]
    mem = r["memory"]
    rows.append({"method": r["method"], "side": side, "status": r["status"], "plotted": f.parent.name not in TABLE_ONLY,
                 "tiles": sum(tiles) / len(tiles) if tiles else None,
                 "peak_mib": (mem.get("cpu_peak_rss_bytes") or 0) / 2**20,
                 "setup_mib": (mem.get("cpu_setup_rss_bytes") or 0) / 2**20,
                 "limit_mib": (mem.get("max_memory_bytes") or 0) / 2**20,
                 "s_per_bag": (r.get("timing") or {}).get("train_s_per_bag"), "error": r.get("error")})
fig, ax = plt.subplots(figsize=(6, 4))
for m in sorted({r["method"] for r in rows if r["plotted"]}):
    pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["side"])
    ok = [r for r in pts if r["status"] == "ok"]
    line, = ax.plot([r["side"] for r in ok], [r["peak_mib"] for r in ok], "o:" if "whole-map" in m else "o-", label=m)
    bad = [r for r in pts if r["status"] == "oom"]
    if bad:
        ax.plot([r["side"] for r in bad], [r["limit_mib"] for r in bad], "x", ms=12, mew=3, color=line.get_color(),
                label=f"{m}: oom at --max-memory")
limit = max((r["limit_mib"] for r in rows), default=0)
if limit:
    ax.axhline(limit, ls="--", color="grey", lw=1)
ax.set_xscale("log", base=2)
ax.set_xlabel("slide side at level 0 (px); tiles of 32 px")
ax.set_ylabel("peak RSS of the run (MiB)")
ax.set_title("slides: peak memory vs slide size (CPU, shared 2-core machine)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(here / "slide-size.png", dpi=110)
lines = ["| method | slide side (px) | tiles / train slide | status | peak RSS (MiB) | setup RSS (MiB) | train s / bag |",
         "|---|---|---|---|---|---|---|"]
for r in sorted(rows, key=lambda r: (r["method"], r["side"])):
    spb = f"{r['s_per_bag']:.1f}" if r["s_per_bag"] else "-"
    tiles = f"{r['tiles']:.0f}" if r["tiles"] else "-"
    lines.append(f"| {r['method']} | {r['side']} | {tiles} | {r['status']} | {r['peak_mib']:.0f} | "
                 f"{r['setup_mib']:.0f} | {spb} |")
(here / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
