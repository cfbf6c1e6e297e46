"""Comparison tables from run records (pandas underneath).

Rows are methods (with the preset and any config key that varies between runs
of one method × dataset × preset, e.g. a swept ``bag_size``), columns are
datasets × chosen metrics; each cell is mean ± std over the seeds of the ``ok``
runs. Runs that failed, ran out of memory or timed out are counted in a
``runs`` column and fill a cell's place when no run succeeded — never dropped.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import pandas as pd

from milbench.records import iter_records

#: What a table cell says for a method × dataset with no record at all.
NOT_RUN = "not run"

#: The metrics a table shows (and ``milbench compare`` compares) when none is named.
DEFAULT_METRICS = ("bag_auc", "bag_accuracy", "dice", "train_s_per_bag", "peak_mib")

#: Derived columns: name -> (record path, scale, help)
DERIVED = {
    "train_s_per_bag": ("timing.train_s_per_bag", 1.0, "training seconds per bag (forward+backward+step)"),
    "train_s": ("timing.train_s", 1.0, "training seconds, all epochs"),
    "train_cpu_s_per_bag": ("timing.train_cpu_s_per_bag", 1.0, "process CPU seconds per training bag (load-independent)"),
    "total_s": ("timing.total_s", 1.0, "child wall seconds"),
    "wall_s": ("timing.wall_s", 1.0, "wall seconds including process start"),
    "gpu_peak_mib": ("memory.gpu_peak_bytes", 2**-20, "NVML peak GPU memory of the run's process, MiB"),
    "torch_peak_mib": ("memory.torch_peak_allocated_bytes", 2**-20, "torch peak allocated, MiB"),
    "cpu_peak_rss_mib": ("memory.cpu_peak_rss_bytes", 2**-20, "peak resident CPU memory, MiB"),
}


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = obj


class _MethodDefaults:
    """Declared defaults of method keys that a record lacks.

    Why: a record stores its whole resolved config, so a key is missing only
    when the method declared it after the record was written. A key is added
    with a default that keeps the old behaviour, so the older run ran with that
    default; without filling it in, the older and newer seeds of one cell
    would land on two table rows (``bag_score=nan`` and ``bag_score=max``).
    Methods that are not installed are left as they are.
    """

    def __init__(self) -> None:
        self._params: dict[str, dict[str, Any]] | None = None

    def missing(self, rec: dict) -> dict[str, Any]:
        config = rec.get("config")
        if not isinstance(config, dict) or not config:
            return {}
        if self._params is None:
            try:
                from milbench.plugins import load_registry

                self._params = {n: {k: p.default for k, p in m.params.items()}
                                for n, m in load_registry().methods.items()}
            except Exception:  # a report must not depend on every plugin loading
                self._params = {}
        declared = self._params.get(rec.get("method"), {})
        return {k: v for k, v in declared.items() if k not in config}


def load_frame(results: str, include_smoke: bool = False, records: Iterable[dict] | None = None) -> pd.DataFrame:
    """One row per record, nested keys flattened (``metrics.bag_auc`` ...).

    ``df.attrs["hidden_smoke"]`` counts the smoke records left out, so a command
    can say that they exist and how to show them. ``did_not_learn`` comes from the
    record's ``warnings``, or is derived from its history for records written
    before that field existed (:mod:`milbench.diagnostics`).
    """
    from milbench.diagnostics import did_not_learn, learning_warnings

    rows = []
    hidden_smoke = 0
    defaults = _MethodDefaults()
    for rec in records if records is not None else iter_records(results):
        if rec.get("smoke") and not include_smoke:
            hidden_smoke += 1
            continue
        row: dict[str, Any] = {}
        for key in ("run_id", "status", "method", "dataset", "preset", "seed", "smoke", "supervision",
                    "config_hash", "error", "created"):
            row[key] = rec.get(key)
        for key in ("metrics", "timing", "memory", "config"):
            _flatten(key, rec.get(key) or {}, row)
        for key, value in defaults.missing(rec).items():
            row[f"config.{key}"] = value
        row["protocol"] = (rec.get("protocol") or {}).get("hash") or "none"
        row["data.source"] = (rec.get("data") or {}).get("source") if isinstance(rec.get("data"), dict) else None
        row["environment.gpu"] = (rec.get("environment") or {}).get("gpu")
        row["environment.cpu"] = (rec.get("environment") or {}).get("cpu")
        row["did_not_learn"] = did_not_learn(rec["warnings"] if "warnings" in rec else learning_warnings(rec))
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["hidden_smoke"] = hidden_smoke
    if df.empty:
        return df
    for name, (path, scale, _) in DERIVED.items():
        df[name] = pd.to_numeric(df[path], errors="coerce") * scale if path in df else float("nan")
    # the headline memory figure: NVML where measured, else CPU RSS
    df["peak_mib"] = df["gpu_peak_mib"].where(df["gpu_peak_mib"].notna(), df["cpu_peak_rss_mib"])
    df["peak_kind"] = ["gpu" if not pd.isna(g) else "cpu" for g in df["gpu_peak_mib"]]
    return df


def metric_column(df: pd.DataFrame, metric: str) -> str:
    """The column of ``metric``: a derived name, ``metrics.<name>``, or a full path."""
    for cand in (metric, f"metrics.{metric}"):
        if cand in df.columns:
            return cand
    from milbench.errors import MilbenchError

    known = sorted({c.split(".", 1)[1] for c in df.columns if c.startswith("metrics.")} | set(DERIVED) | {"peak_mib"})
    raise MilbenchError(f"unknown metric '{metric}'; valid: {', '.join(known)}")


def varying_keys(df: pd.DataFrame) -> list[str]:
    """Config keys that differ between runs of one method × dataset × preset (swept parameters)."""
    cfg = [c for c in df.columns if c.startswith("config.")]
    out = []
    # smoke runs are their own rows (see summarize), so their shrunken config is not a "swept" key
    by = ["method", "dataset", "preset"] + (["smoke"] if "smoke" in df and df["smoke"].fillna(False).astype(bool).any() else [])
    for c in cfg:
        per_group = df.groupby(by, dropna=False)[c].nunique(dropna=False)
        if (per_group > 1).any():
            out.append(c)
    return out


def _value_text(v: Any) -> str:
    """A config value in a row label: 32, not the 32.0 that pandas makes of an int
    column holding a missing value."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _fmt(mean: float, std: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    digits = 3 if abs(mean) < 10 else (1 if abs(mean) < 1000 else 0)
    s = f"{mean:.{digits}f}"
    if n > 1 and std is not None and not math.isnan(std):
        s += f" ± {std:.{digits}f}"
    return s


def _status_text(statuses: Sequence[str]) -> str:
    counts = pd.Series(list(statuses)).value_counts()
    from milbench.records import STATUSES

    order = list(STATUSES)
    return ", ".join(f"{counts[s]} {s}" for s in order if s in counts)


#: Marks a row of smoke runs (only shown with --include-smoke).
SMOKE_MARK = "(smoke)"
#: Marks a quality cell that averages a run which did not learn (see milbench.diagnostics).
DID_NOT_LEARN_MARK = "†"


def _with_smoke_flag(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a boolean ``_smoke`` column (records may hold null or lack the key)."""
    flag = df["smoke"].fillna(False).astype(bool) if "smoke" in df else pd.Series(False, index=df.index)
    return df.assign(_smoke=flag)


def summarize(df: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS) -> pd.DataFrame:
    """Long table: one row per (row key, dataset, metric) with mean, std, n and run statuses."""
    if df.empty:
        return pd.DataFrame(columns=["row", "dataset", "metric", "mean", "std", "n", "runs", "cell"])
    keys = varying_keys(df)
    presets = df["preset"].nunique() > 1
    out = []
    df = _with_smoke_flag(df)
    # smoke runs (shrunken configs, seconds long) are never averaged with real runs: their own, marked rows
    smoke_rows = bool(df["_smoke"].any())
    group_cols = ["method", "preset", "dataset"] + keys + (["_smoke"] if smoke_rows else [])
    for gkey, g in df.groupby(group_cols, dropna=False, sort=True):
        gd = dict(zip(group_cols, gkey))
        label = gd["method"]
        extras = ([str(gd["preset"])] if presets else []) + [
            f"{k.split('.', 1)[1]}={_value_text(gd[k])}" for k in keys if not pd.isna(gd[k])]
        if extras:
            label += " [" + ", ".join(extras) + "]"
        if gd.get("_smoke"):
            label += f" {SMOKE_MARK}"
        ok = g[g["status"] == "ok"]
        runs = _status_text(g["status"])
        flat = int(ok["did_not_learn"].fillna(False).astype(bool).sum()) if "did_not_learn" in ok else 0
        if flat:
            runs += f", {flat} {DID_NOT_LEARN_MARK} did not learn"
        sources = sorted({s for s in g["data.source"].dropna()})
        for m in metrics:
            col = metric_column(df, m)
            vals = pd.to_numeric(ok[col], errors="coerce").dropna() if col in ok else pd.Series(dtype=float)
            if m in ("peak_mib", "cpu_peak_rss_mib", "gpu_peak_mib"):
                # memory of failed/oom runs is still a measurement worth showing
                vals_all = pd.to_numeric(g[col], errors="coerce").dropna()
                vals = vals if len(vals) else vals_all
            mean = float(vals.mean()) if len(vals) else float("nan")
            std = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
            if len(ok) == 0 and not len(vals):
                cell = ", ".join(s for s in sorted(set(g["status"])))
            else:
                cell = _fmt(mean, std, len(vals))
                if flat and col.startswith("metrics.") and cell != "—":
                    cell += f" {DID_NOT_LEARN_MARK}"  # averaged over a run that never left chance
            out.append({"row": label, "method": gd["method"], "preset": gd["preset"], "dataset": gd["dataset"],
                        "smoke": bool(gd.get("_smoke", False)), "did_not_learn": flat,
                        **{k.split(".", 1)[1]: gd[k] for k in keys}, "metric": m, "mean": mean, "std": std,
                        "n": int(len(vals)), "runs": runs, "data_source": ",".join(sources) or None,
                        "peak_kind": ",".join(sorted(set(g["peak_kind"]))), "cell": cell})
    return pd.DataFrame(out)


def wide(summary: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]], dict[tuple[str, str, str], str]]:
    """(row labels, (dataset, column) pairs, cell text) for the rendered tables."""
    rows = list(dict.fromkeys(summary["row"]))
    datasets = list(dict.fromkeys(summary.sort_values("dataset")["dataset"]))
    metrics = list(dict.fromkeys(summary["metric"]))
    cols = [(d, m) for d in datasets for m in metrics] + [(d, "runs") for d in datasets]
    cols = sorted(cols, key=lambda c: (datasets.index(c[0]), 0 if c[1] != "runs" else 1))
    cells: dict[tuple[str, str, str], str] = {}
    for r in summary.itertuples():
        cells[(r.row, r.dataset, r.metric)] = r.cell
        cells[(r.row, r.dataset, "runs")] = r.runs
    return rows, cols, cells


def dataset_titles(summary: pd.DataFrame) -> dict[str, str]:
    """Dataset column-group titles, flagged when any run read the shipped sample."""
    titles = {}
    for d, g in summary.groupby("dataset"):
        src = {s for v in g["data_source"].dropna() for s in str(v).split(",")}
        titles[d] = f"{d} (sample data)" if "sample" in src else d
    return titles


def to_markdown(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "_no records_\n"
    rows, cols, cells = wide(summary)
    titles = dataset_titles(summary)
    # the dataset once per column group (the header row), the metric names in a bold row under it:
    # markdown has no column spans, and repeating "imagenette (sample data): " in every header made
    # one dataset's table ~180 characters wide
    head = ["method"] + [titles[d] if i == 0 or cols[i - 1][0] != d else "" for i, (d, _) in enumerate(cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join([""] + [f"**{m}**" for _, m in cols]) + " |"]
    for r in rows:
        lines.append("| " + " | ".join([r] + [cells.get((r, d, m), NOT_RUN) for d, m in cols]) + " |")
    return "\n".join(lines) + "\n"


def to_rich(summary: pd.DataFrame, title: str = "milbench") -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), show_lines=False)
    if summary.empty:
        table.add_column("no records")
        return table
    rows, cols, cells = wide(summary)
    titles = dataset_titles(summary)
    table.add_column("method", style="bold")
    for i, (d, m) in enumerate(cols):
        # the dataset once, over the first column of its group (rich has no column spans)
        first = i == 0 or cols[i - 1][0] != d
        table.add_column(f"{escape(titles[d]) if first else ''}\n{m}", justify="right")
    for r in rows:
        vals = []
        for d, m in cols:
            v = cells.get((r, d, m), NOT_RUN)
            v = escape(v)
            if m != "runs" and v and v[0].isalpha() and v != "—":
                v = f"[red]{v}[/red]"
            vals.append(v)
        table.add_row(escape(r), *vals)
    return table


# --- sweep support (additive): one outcome per point, and why a cell has no number ---------------


def latest_per_point(df: pd.DataFrame) -> pd.DataFrame:
    """One record per sweep point (:func:`milbench.sweep.grid.point_key`: config hash ×
    seed × smoke, as resume sees it): the latest ``ok`` one if any, else the latest record.

    A resumed sweep leaves the ``interrupted`` (or ``preempted``, ``failed``)
    record of a point beside the ``ok`` record of its rerun; the history stays
    on disk, but a table of results wants each point's outcome once.
    """
    if df.empty or "config_hash" not in df:
        return df
    from milbench.sweep.grid import POINT_FIELDS, point_key

    fields = [f for f in POINT_FIELDS if f in df]
    keys = [point_key(dict(zip(fields, row))) for row in df[fields].itertuples(index=False, name=None)]
    d = df.assign(_ok=(df["status"] == "ok").astype(int), _created=df["created"].astype(str),
                  _point=pd.Series(keys, index=df.index, dtype=object))
    d = d.sort_values(["_ok", "_created", "run_id"], kind="stable")
    keep = d.drop_duplicates("_point", keep="last")
    return df.loc[sorted(keep.index)]


def failure_notes(df: pd.DataFrame) -> list[str]:
    """Why a table cell is a status instead of a number: one line per method/config × dataset
    with no ``ok`` run, naming its statuses and its most frequent first error line."""
    if df.empty:
        return []
    keys = varying_keys(df)
    presets = df["preset"].nunique() > 1
    notes = []
    group_cols = ["method", "preset", "dataset"] + keys
    for gkey, g in df.groupby(group_cols, dropna=False, sort=True):
        if (g["status"] == "ok").any():
            continue
        gd = dict(zip(group_cols, gkey))
        extras = ([str(gd["preset"])] if presets else []) + [
            f"{k.split('.', 1)[1]}={_value_text(gd[k])}" for k in keys if not pd.isna(gd[k])]
        label = gd["method"] + (" [" + ", ".join(extras) + "]" if extras else "")
        parts = []
        for status, gs in sorted(g.groupby("status"), key=lambda x: _NOTE_ORDER.get(x[0], 99)):
            errors = [str(e).strip().splitlines()[0] for e in gs["error"].dropna() if str(e).strip()]
            why = pd.Series(errors).value_counts(sort=True).index[0] if errors else "no error recorded"
            parts.append(f"{len(gs)} {status} ({why})")
        notes.append(f"{label} on {gd['dataset']}: " + ", ".join(parts))
    return notes


_NOTE_ORDER = {"failed": 0, "oom": 1, "timeout": 2, "preempted": 3, "interrupted": 4}


def failure_notes_markdown(df: pd.DataFrame) -> str:
    """:func:`failure_notes` as a markdown list to print under a table (empty when every cell has a number)."""
    notes = failure_notes(df)
    if not notes:
        return ""
    return "\nCells without a number:\n\n" + "\n".join(f"- {n.replace('|', '/')}" for n in notes) + "\n"


def learning_notes(df: pd.DataFrame) -> list[str]:
    """One line per method/config × dataset with ``ok`` runs that did not learn (the † in the table):
    how many, and the first such run's warning, so a flat ln 2 loss is never read as a result."""
    if df.empty or "did_not_learn" not in df:
        return []
    flat = df[(df["status"] == "ok") & df["did_not_learn"].fillna(False).astype(bool)]
    notes = []
    for (method, dataset), g in flat.groupby(["method", "dataset"], sort=True):
        n_ok = int(((df["method"] == method) & (df["dataset"] == dataset) & (df["status"] == "ok")).sum())
        notes.append(f"{method} on {dataset}: {len(g)} of {n_ok} ok run(s) did not learn ({', '.join(g['run_id'])})")
    return notes


#: The definition printed under a table that has a † (kept short; milbench.diagnostics has the rest).
DID_NOT_LEARN_HELP = (f"{DID_NOT_LEARN_MARK} did not learn: validation loss within 0.01 of ln 2 (the loss of answering "
                      "0.5 for every bag) in every epoch; see the record's `warnings`")


def smoke_hint(df: pd.DataFrame) -> str | None:
    """The line saying smoke records were hidden and how to show them (None when none were)."""
    n = int(df.attrs.get("hidden_smoke", 0) or 0)
    if not n:
        return None
    return f"{n} smoke record(s) hidden (--smoke runs are tiny and not comparable); add --include-smoke to show them"


def notes_markdown(df: pd.DataFrame) -> str:
    """Notes under a markdown table: runs that did not learn, and hidden smoke records."""
    lines = []
    notes = learning_notes(df)
    if notes:
        lines += ["", f"Runs that did not learn ({DID_NOT_LEARN_HELP}):", ""] + [f"- {n}" for n in notes]
    hint = smoke_hint(df)
    if hint:
        lines += ["", f"_{hint}_"]
    return "\n".join(lines) + ("\n" if lines else "")


def check_one_protocol(df: pd.DataFrame) -> None:
    """Refuse a table whose records on one dataset were trained under different
    protocols (:mod:`milbench.protocol`): their numbers are not comparable.
    Records written before protocol blocks existed count as protocol ``none``."""
    from milbench.errors import MilbenchError

    if df.empty or "protocol" not in df:
        return
    for dataset, group in df.groupby("dataset"):
        counts = group["protocol"].value_counts()
        if len(counts) > 1:
            listed = ", ".join(f"{h} ({n} runs)" for h, n in counts.items())
            raise MilbenchError(f"records on {dataset} mix training protocols {listed}; pick one with "
                                f"--protocol HASH (a run's protocol is its record's protocol.hash)")
