"""Plots from run records: how memory and time scale with a swept parameter,
and the metric-versus-memory trade-off a user is choosing on.

Built on :func:`milbench.report.load_frame`, so the numbers are the report's:
``peak_mib`` is NVML's peak GPU memory of the run's process where a GPU was
used, else the run's peak CPU resident memory. Points where no seed ended
``ok`` are not dropped: an out-of-memory point is a red ✕ and a failed or
timed-out one a black ▼, at the top edge of the panel (the plot says *where*
a method stopped scaling, which is the answer a memory sweep is run for).
Every drawn artist carries a ``gid`` (``line:<label>``, ``oom:<label>``,
``failed:<label>``, ``limit``, and ``smoke:<label>`` for smoke runs — hollow
points never joined by a line, so seconds-long smoke configs never read as a
trend) so tests and scripts can find the series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from milbench.errors import MilbenchError
from milbench.report import SMOKE_MARK, _with_smoke_flag, metric_column, varying_keys

FORMATS = (".png", ".svg", ".pdf")
SCALING_Y = ("peak_mib", "train_s_per_bag")

_Y_LABELS = {
    "peak_mib": "peak memory (MiB)",
    "gpu_peak_mib": "peak GPU memory, NVML (MiB)",
    "cpu_peak_rss_mib": "peak CPU RSS (MiB)",
    "torch_peak_mib": "torch peak allocated (MiB)",
    "train_s_per_bag": "training time per bag (s)",
    "train_s": "training time (s)",
    "wall_s": "wall time per run (s)",
}


def _memory_label(df: pd.DataFrame) -> str:
    kinds = set(df.get("peak_kind", pd.Series(dtype=str)).dropna())
    if kinds == {"gpu"}:
        return "peak GPU memory, NVML (MiB)"
    if kinds == {"cpu"}:
        return "peak CPU resident memory (MiB)"
    return "peak memory (MiB; GPU where measured, else CPU RSS)"


def y_label(df: pd.DataFrame, metric: str) -> str:
    if metric == "peak_mib":
        return _memory_label(df)
    return _Y_LABELS.get(metric, metric.replace("metrics.", ""))


def x_column(df: pd.DataFrame, x: str) -> str:
    """The frame column of a swept config key (``bag_size`` → ``config.bag_size``); one-line error otherwise."""
    for cand in (f"config.{x}", x):
        if cand in df.columns and cand.startswith("config."):
            return cand
    swept = [c.split(".", 1)[1] for c in varying_keys(df)] if not df.empty else []
    known = sorted(c.split(".", 1)[1] for c in df.columns if c.startswith("config."))
    raise MilbenchError(f"no config key '{x}' in these records; swept: {', '.join(swept) or '(none)'}; "
                        f"all keys: {', '.join(known) or '(no records)'}")


def line_groups(df: pd.DataFrame, x_col: str) -> tuple[list[str], dict[Any, str]]:
    """Which columns tell lines apart (method, plus dataset/preset/other swept keys
    where they vary) and a readable label for each group."""
    cols = ["method"]
    for c in ("dataset", "preset"):
        if df[c].nunique(dropna=False) > 1:
            cols.append(c)
    cols += [c for c in varying_keys(df) if c != x_col]
    if "_smoke" in df and df["_smoke"].any():
        cols.append("_smoke")  # smoke runs are their own, marked series (never joined to real runs)
    labels = {}
    for key, _ in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        parts = [str(key[0])] + [f"{c.split('.', 1)[-1]}={v}" if c.startswith("config.") else str(v)
                                 for c, v in zip(cols[1:], key[1:]) if c != "_smoke"]
        labels[key] = parts[0] + (f" [{', '.join(parts[1:])}]" if len(parts) > 1 else "")
        if "_smoke" in cols and key[cols.index("_smoke")]:
            labels[key] += f" {SMOKE_MARK}"
    return cols, labels


def _edge_marker(ax: Any, xs: Sequence[float], status: str, label: str, color: Any) -> None:
    """Non-ok points at the top edge of the panel (x in data units, y in axes units),
    in the colour of their method's line so it is clear whose they are."""
    if not len(xs):
        return
    oom = status == "oom"
    art = ax.plot(list(xs), [0.97] * len(xs), linestyle="none", marker="x" if oom else "v", color=color,
                  markersize=10 if oom else 8, markeredgewidth=2.5 if oom else 1, clip_on=False,
                  transform=ax.get_xaxis_transform(),
                  label=f"{label}: {'out of memory' if oom else 'failed / timeout'}")[0]
    art.set_gid(f"{'oom' if oom else 'failed'}:{label}")


def scaling_figure(df: pd.DataFrame, x: str, ys: Sequence[str] = SCALING_Y, *, logx: bool = False,
                   logy: bool = False, title: str | None = None) -> Any:
    """One panel per ``ys`` metric against config key ``x``; one line per method (mean ± std over seeds).

    A group × x with no ``ok`` run becomes an edge marker instead of a point.
    Memory panels of out-of-memory runs also show the ``--max-memory`` limit
    when the records carry one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        raise MilbenchError("no records to plot (smoke runs are hidden unless --include-smoke)")
    xc = x_column(df, x)
    df = _with_smoke_flag(df[df[xc].notna()])
    df["_x"] = pd.to_numeric(df[xc], errors="coerce")
    if df["_x"].isna().any():
        raise MilbenchError(f"config key '{x}' is not numeric in these records; plot a numeric swept key")
    cols, labels = line_groups(df, xc)
    ycols = [metric_column(df, y) for y in ys]
    fig, axes = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4.2), squeeze=False)
    axes = axes[0]
    xs_all = sorted(set(df["_x"]))
    for ax, y, yc in zip(axes, ys, ycols):
        for i, (key, g) in enumerate(df.groupby(cols, dropna=False, sort=True)):
            key = key if isinstance(key, tuple) else (key,)
            label = labels[key]
            ok = g[g["status"] == "ok"].copy()
            ok["_y"] = pd.to_numeric(ok[yc], errors="coerce")
            stats = ok.dropna(subset=["_y"]).groupby("_x")["_y"].agg(["mean", "std", "count"]).sort_index()
            color = f"C{i % 10}"
            smoke = "_smoke" in cols and bool(key[cols.index("_smoke")])
            if len(stats) and smoke:
                # smoke configs are shrunken and seconds long: hollow points, no line, so they never read as a trend
                pts = ax.errorbar(stats.index.to_numpy(), stats["mean"].to_numpy(),
                                  yerr=stats["std"].fillna(0).to_numpy(), marker="s", markerfacecolor="none",
                                  linestyle="none", capsize=3, label=label, color=color)
                pts.lines[0].set_gid(f"smoke:{label}")
            elif len(stats):
                line = ax.errorbar(stats.index.to_numpy(), stats["mean"].to_numpy(),
                                   yerr=stats["std"].fillna(0).to_numpy(), marker="o", capsize=3, label=label,
                                   color=color)
                line.lines[0].set_gid(f"line:{label}")
            ok_x = set(stats.index)
            for status in ("oom", "failed"):
                bad = g[~g["_x"].isin(ok_x)]
                bad = bad[bad["status"].isin(["oom"] if status == "oom" else ["failed", "timeout", "preempted"])]
                _edge_marker(ax, sorted(set(bad["_x"])), status, label, color)
        if y in ("peak_mib", "cpu_peak_rss_mib", "gpu_peak_mib") and "memory.max_memory_bytes" in df:
            limits = pd.to_numeric(df.loc[df["status"] == "oom", "memory.max_memory_bytes"], errors="coerce").dropna()
            if len(limits) and limits.nunique() == 1:
                ax.axhline(limits.iloc[0] / 2**20, color="red", linestyle=":", linewidth=1,
                           label="--max-memory").set_gid("limit")
        ax.set_xlabel(x)
        ax.set_ylabel(y_label(df, y))
        if logx:
            ax.set_xscale("log")
        if len(xs_all) <= 12:  # ticks at the swept values, written plainly even on a log axis
            from matplotlib.ticker import NullFormatter, NullLocator

            ax.set_xticks(xs_all, [f"{v:g}" for v in xs_all])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    datasets = ", ".join(sorted(df["dataset"].unique()))
    fig.suptitle(title or f"{', '.join(y_label(df, y).split(' (')[0] for y in ys)} vs {x} — {datasets}")
    fig.tight_layout()
    return fig


def tradeoff_figure(df: pd.DataFrame, metric: str = "bag_auc", memory: str = "peak_mib", *, logx: bool = False,
                    title: str | None = None) -> Any:
    """Metric (y) against peak memory (x): one colour per method, one point per
    configuration (mean over seeds, std as error bars); points are annotated
    with the swept values that tell them apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        raise MilbenchError("no records to plot (smoke runs are hidden unless --include-smoke)")
    mc, xc = metric_column(df, metric), metric_column(df, memory)
    df = _with_smoke_flag(df)
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        raise MilbenchError("no ok runs to plot: the trade-off needs a metric and a memory figure")
    swept = varying_keys(df)
    cols = ["method", "dataset", "preset"] + swept
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    multi_ds = df["dataset"].nunique() > 1
    for (method, smoke), gm in ok.groupby(["method", "_smoke"], sort=True):
        xs, ys, yerr, xerr, notes = [], [], [], [], []
        for key, g in gm.groupby(cols, dropna=False, sort=True):
            gd = dict(zip(cols, key))
            y = pd.to_numeric(g[mc], errors="coerce").dropna()
            xv = pd.to_numeric(g[xc], errors="coerce").dropna()
            if not len(y) or not len(xv):
                continue
            xs.append(xv.mean())
            ys.append(y.mean())
            yerr.append(y.std(ddof=1) if len(y) > 1 else 0.0)
            xerr.append(xv.std(ddof=1) if len(xv) > 1 else 0.0)
            note = [str(gd["dataset"])] if multi_ds else []
            note += [f"{c.split('.', 1)[1]}={gd[c]}" for c in swept if not pd.isna(gd[c])]
            notes.append(", ".join(note))
        if not xs:
            continue
        name = f"{method} {SMOKE_MARK}" if smoke else str(method)
        cont = ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, marker="s" if smoke else "o", linestyle="none", capsize=3,
                           label=name, markerfacecolor="none" if smoke else None)
        cont.lines[0].set_gid(f"{'smoke' if smoke else 'line'}:{method}")
        for xv, yv, note in zip(xs, ys, notes):
            if note:
                ax.annotate(note, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(y_label(df, memory))
    ax.set_ylabel(metric)
    if logx:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs {y_label(df, memory).split(' (')[0]} — {', '.join(sorted(df['dataset'].unique()))}")
    fig.tight_layout()
    return fig


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG/SVG/PDF by the file's extension, creating the folder."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise MilbenchError(f"bad output file {str(path)!r}: extension must be one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path
