"""Two things side by side: method A against method B on the same records, or
one results directory against another (another machine, version or preset).

Quality metrics (AUC, accuracy, Dice) are compared as differences B − A with
their spread over seeds; cost metrics (time per bag, peak memory) as ratios
B / A, because "half the memory at twice the time" is how people choose.
Where both sides ran the same seeds (≥ 2), the difference is *paired*: the
same seed gives both sides the same data split and bag order, so the spread
of per-seed differences is the honest uncertainty. Otherwise the spread is
``sqrt(sd_A² + sd_B²)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from milbench.errors import MilbenchError
from milbench.report import DEFAULT_METRICS, _fmt, _status_text, metric_column, varying_keys
#: Metrics compared as a ratio B / A (costs); everything else as a difference B − A.
RATIO_METRICS = frozenset({"train_s_per_bag", "train_s", "total_s", "wall_s", "peak_mib", "gpu_peak_mib",
                           "cpu_peak_rss_mib", "torch_peak_mib"})
_MEMORY = frozenset({"peak_mib", "gpu_peak_mib", "cpu_peak_rss_mib", "torch_peak_mib"})


def _swept(df: pd.DataFrame) -> list[str]:
    return varying_keys(df) if not df.empty else []


def _side(df: pd.DataFrame, keys: list[str], metric: str) -> dict[tuple, dict[str, Any]]:
    """Per key: ok values by seed, all values (memory of failed runs still counts), statuses."""
    col = metric_column(df, metric)
    out: dict[tuple, dict[str, Any]] = {}
    for key, g in df.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        ok = g[g["status"] == "ok"]
        vals = pd.to_numeric(ok[col], errors="coerce")
        by_seed = vals.groupby(ok["seed"]).mean().dropna()
        if metric in _MEMORY and by_seed.empty:
            allv = pd.to_numeric(g[col], errors="coerce")
            by_seed = allv.groupby(g["seed"]).mean().dropna()
        out[key] = {"by_seed": by_seed, "runs": _status_text(g["status"]), "statuses": sorted(set(g["status"]))}
    return out


def _stats(s: pd.Series) -> tuple[float, float, int]:
    n = int(len(s))
    mean = float(s.mean()) if n else math.nan
    std = float(s.std(ddof=1)) if n > 1 else math.nan
    return mean, std, n


def _any_smoke(df: pd.DataFrame) -> bool:
    return "smoke" in df and bool(df["smoke"].fillna(False).astype(bool).any())


def _mark_smoke(df: pd.DataFrame) -> pd.DataFrame:
    """``smoke`` as the text a table shows: ``yes`` for a --smoke run, ``no`` for a real one."""
    return df.assign(smoke=df["smoke"].fillna(False).astype(bool).map({True: "yes", False: "no"})) \
        if "smoke" in df else df.assign(smoke="no")


def _smoke_hint(df: pd.DataFrame, fallback: str = "") -> str:
    """``; N smoke record(s) hidden: add --include-smoke`` when load_frame left smoke records out."""
    n = int(df.attrs.get("hidden_smoke", 0) or 0)
    if n:
        return f"; {n} smoke record(s) are hidden: add --include-smoke to compare them"
    return f" {fallback}" if fallback else ""


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, base: Sequence[str],
                   metrics: Sequence[str] = DEFAULT_METRICS, strict: bool = False) -> pd.DataFrame:
    """Long table: one row per matched configuration × metric.

    ``base`` are the columns both sides must agree on (``dataset``, ``preset``
    and, comparing directories, ``method``). Config keys swept on both sides
    are matched too; a key swept on one side only (a method's own knob) stays
    in that side's label and is compared against the other side's single
    configuration. Metrics neither side measured are left out, unless
    ``strict`` (the user named them), which makes them an error.
    """
    if a.empty or b.empty:
        side = a if a.empty else b
        raise MilbenchError(f"nothing to compare: side {'A' if a.empty else 'B'} has no records"
                            + _smoke_hint(side, "(smoke runs are hidden unless --include-smoke)"))
    if _any_smoke(a) or _any_smoke(b):
        # smoke rows are matched with smoke rows only and carry a visible 'smoke' key column
        a, b = (_mark_smoke(d) for d in (a, b))
        base = list(base) + ["smoke"]
    sa, sb = _swept(a), _swept(b)

    def present(df: pd.DataFrame, k: str) -> bool:
        return k in df.columns and bool(df[k].notna().any())

    # a key swept on either side that both sides have is matched on (A at bag_size=50 meets B at bag_size=50)
    shared = [k for k in dict.fromkeys(sa + sb) if present(a, k) and present(b, k)]
    a_only = [k for k in sa if k not in shared]
    b_only = [k for k in sb if k not in shared]
    ka, kb = list(base) + shared + a_only, list(base) + shared + b_only
    rows = []
    for metric in metrics:
        try:
            side_a, side_b = _side(a, ka, metric), _side(b, kb, metric)
        except MilbenchError:
            if strict:
                raise
            continue  # a default metric these records do not have (e.g. dice)
        for key_a, va in side_a.items():
            match = key_a[: len(base) + len(shared)]
            for key_b, vb in side_b.items():
                if key_b[: len(base) + len(shared)] != match:
                    continue
                ma, sda, na = _stats(va["by_seed"])
                mb, sdb, nb = _stats(vb["by_seed"])
                common = sorted(set(va["by_seed"].index) & set(vb["by_seed"].index))
                if len(common) >= 2:
                    diff = vb["by_seed"].loc[common] - va["by_seed"].loc[common]
                    delta, spread, pairing = float(diff.mean()), float(diff.std(ddof=1)), f"paired ({len(common)} seeds)"
                else:
                    delta = mb - ma
                    parts = [s for s in (sda, sdb) if not math.isnan(s)]
                    spread = math.sqrt(sum(s * s for s in parts)) if parts else math.nan
                    pairing = "unpaired"
                ratio = mb / ma if ma and not math.isnan(ma) and not math.isnan(mb) else math.nan
                row: dict[str, Any] = dict(zip(list(base) + shared, match))
                row.update({f"A.{k.split('.', 1)[1]}": v for k, v in zip(a_only, key_a[len(match):])})
                row.update({f"B.{k.split('.', 1)[1]}": v for k, v in zip(b_only, key_b[len(match):])})
                row.update({"metric": metric, "kind": "ratio" if metric in RATIO_METRICS else "delta",
                            "a_mean": ma, "a_std": sda, "a_n": na, "b_mean": mb, "b_std": sdb, "b_n": nb,
                            "delta": delta, "delta_std": spread, "ratio": ratio, "pairing": pairing,
                            "a_runs": va["runs"], "b_runs": vb["runs"],
                            "a_status": ",".join(va["statuses"]), "b_status": ",".join(vb["statuses"])})
                rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        raise MilbenchError("no configuration appears on both sides (datasets, presets and swept values must match)")
    keys = [c for c in out.columns if c not in _FIXED]
    order = {m: i for i, m in enumerate(metrics)}
    out["_m"] = out["metric"].map(order)
    out = out.sort_values(keys + ["_m"], kind="stable").drop(columns="_m").reset_index(drop=True)
    return out.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith("config.") else c)


def compare_methods(df: pd.DataFrame, a: str, b: str, metrics: Sequence[str] = DEFAULT_METRICS,
                    strict: bool = False) -> pd.DataFrame:
    """Method ``a`` against method ``b`` on every dataset/preset/swept value both ran."""
    present = sorted(df["method"].dropna().unique()) if not df.empty else []
    for m in (a, b):
        if m not in present:
            raise MilbenchError(f"no records of method '{m}'; methods with records: {', '.join(present) or '(none)'}"
                                + (_smoke_hint(df) or ("; run it first: milbench run -m " + m + " -d DATASET"
                                                       if not present else "")))
    if a == b:
        raise MilbenchError(f"compare needs two different methods (got '{a}' twice)")
    return compare_frames(df[df["method"] == a], df[df["method"] == b], ["dataset", "preset"], metrics, strict)


def compare_dirs(a: pd.DataFrame, b: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS,
                 strict: bool = False) -> pd.DataFrame:
    """The same methods in two result directories (two machines, versions or settings)."""
    return compare_frames(a, b, ["method", "dataset", "preset"], metrics, strict)


def _cell(mean: float, std: float, n: int, status: str) -> str:
    if n == 0:
        return status or "—"
    return _fmt(mean, std, n)


def _seeds(row: Any) -> str:
    """``3 paired`` when the difference is over common seeds, else ``n_A / n_B``."""
    if str(row["pairing"]).startswith("paired"):
        return f"{str(row['pairing']).split('(')[1].split()[0]} paired"
    return f"{row['a_n']} / {row['b_n']}"


def verdict(row: Any) -> str:
    """``+0.012 ± 0.020`` for a difference, ``×0.45`` for a ratio, the missing side's status otherwise."""
    if row["a_n"] == 0 or row["b_n"] == 0:
        return "—"
    if row["kind"] == "ratio":
        return "—" if math.isnan(row["ratio"]) else f"×{row['ratio']:.2f}"
    d, s = row["delta"], row["delta_std"]
    digits = 3 if abs(d) < 10 else 1
    text = f"{d:+.{digits}f}"
    if not math.isnan(s):
        text += f" ± {s:.{digits}f}"
    return text


_FIXED = frozenset({"metric", "kind", "a_mean", "a_std", "a_n", "b_mean", "b_std", "b_n", "delta", "delta_std",
                    "ratio", "pairing", "a_runs", "b_runs", "a_status", "b_status"})


def key_columns(table: pd.DataFrame) -> list[str]:
    """The columns that identify a configuration (dataset, preset, swept values, ...)."""
    return [c for c in table.columns if c not in _FIXED]


def display_rows(table: pd.DataFrame, keys: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and text rows for the rich and markdown renderings."""
    keys = key_columns(table) if keys is None else list(keys)
    head = keys + ["metric", "A", "B", "B vs A", "seeds", "runs A", "runs B"]
    rows = []
    for _, r in table.iterrows():
        rows.append([str(r[k]) for k in keys] + [
            r["metric"], _cell(r["a_mean"], r["a_std"], r["a_n"], r["a_status"]),
            _cell(r["b_mean"], r["b_std"], r["b_n"], r["b_status"]), verdict(r), _seeds(r), r["a_runs"], r["b_runs"]])
    return head, rows


def to_markdown(table: pd.DataFrame, a: str, b: str) -> str:
    head, rows = display_rows(table)
    head = [h.replace("A", a) if h in ("A", "runs A") else h.replace("B", b) if h in ("B", "runs B") else h
            for h in head]
    head = [f"{b} vs {a}" if h == "B vs A" else h for h in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\n{b} vs {a}: quality metrics as {b} − {a} (± spread over seeds), time and memory as the ratio "
            f"{b} / {a}.\n")
    return "\n".join(lines) + "\n" + note


def to_rich(table: pd.DataFrame, a: str, b: str) -> Any:
    """A compact terminal table: key columns with one value move into the title,
    A and B keep short headers (named in the caption), configurations are sectioned."""
    from rich.table import Table

    keys = key_columns(table)
    constant = [k for k in keys if table[k].astype(str).nunique() == 1]
    varying = [k for k in keys if k not in constant]
    head, rows = display_rows(table, varying)
    where = ", ".join(f"{k} {table[k].iloc[0]}" for k in constant)
    t = Table(title=f"B vs A{' — ' + where if where else ''}",
              caption=f"A = {a}, B = {b}; quality: B − A ± spread over seeds; time and memory: B / A")
    for h in head:
        t.add_column(h, justify="right" if h in ("A", "B", "B vs A") else "left")
    last = None
    for r, (_, src) in zip(rows, table.iterrows()):
        key = tuple(str(src[k]) for k in varying)
        if last is not None and key != last:
            t.add_section()
        last = key
        t.add_row(*r)
    return t
