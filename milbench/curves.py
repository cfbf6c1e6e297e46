"""Learning curves from the records' ``history``: what a table's single number hides.

One panel per (dataset, history key), one line per method: the mean over
seeds at each epoch, with a band from the lowest to the highest seed, and a
dot at each seed's selected epoch. A method that needs more epochs, sits on
the 0.693 plateau, or overfits shows it here rather than in a private budget.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

CURVE_KEYS = ("train_loss", "val_loss", "val_bag_auc")
_LABELS = {"train_loss": "training loss", "val_loss": "validation loss", "val_bag_auc": "validation AUC"}


def curve_table(records: Iterable[dict[str, Any]], key: str) -> dict[tuple[str, str], dict[int, list[float]]]:
    """{(dataset, method): {epoch: [value per seed]}} for the ``ok`` non-smoke records."""
    out: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.get("status") != "ok" or rec.get("smoke"):
            continue
        for h in rec.get("history") or []:
            v = h.get(key)
            if v is not None and v == v:  # not None, not NaN
                out[(rec["dataset"], rec["method"])][int(h["epoch"])].append(float(v))
    return out


def curves_figure(records: Sequence[dict[str, Any]], keys: Sequence[str] = CURVE_KEYS, title: str | None = None) -> Any:
    """A matplotlib figure: datasets as rows, ``keys`` as columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from milbench.errors import MilbenchError

    tables = {k: curve_table(records, k) for k in keys}
    datasets = sorted({d for t in tables.values() for d, _ in t})
    methods = sorted({m for t in tables.values() for _, m in t})
    if not datasets:
        raise MilbenchError("no ok records with a training history to draw learning curves from")
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(datasets), len(keys), figsize=(4.2 * len(keys), 3.0 * len(datasets)), squeeze=False)
    for r, dataset in enumerate(datasets):
        for c, key in enumerate(keys):
            ax = axes[r][c]
            for method in methods:
                per_epoch = tables[key].get((dataset, method))
                if not per_epoch:
                    continue
                epochs = sorted(per_epoch)
                mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
                ax.plot(epochs, mean, color=colors[method], label=method, lw=1.6)
                ax.fill_between(epochs, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
                                color=colors[method], alpha=0.15, lw=0)
            if key.endswith("loss"):
                ax.axhline(0.6931, color="grey", lw=0.8, ls=":")  # chance: ln 2
            ax.set_title(f"{dataset} — {_LABELS.get(key, key)}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle(title or "learning curves (mean over seeds; band: min–max; dotted: ln 2)", fontsize=10, y=0.995)
    top = 1 - 0.75 / fig.get_figheight()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, top + 0.35 / fig.get_figheight()),
               ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig
