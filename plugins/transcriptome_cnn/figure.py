"""The test-area figure: nuclei image, ground truth and prediction side by side, with a legend.

Why a module of its own: drawing is the one part of the method that needs
matplotlib; it is imported only when a run writes its artifacts.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Class colours of the figure: background, gene A, gene B, tissue (then extra classes).
CLASS_COLOURS = ("#000000", "#e6194b", "#3cb4e6", "#9a9a9a", "#ffe119", "#3cb44b", "#f58231", "#911eb4")


def draw_area_figure(path: str, image: Any, truth: Any, pred: Any, names: list[str], genes: Mapping[str, Any],
                     scores: Mapping[str, Any], title: str = "") -> None:
    """Nuclei image | ground truth | prediction with a class legend, saved as PNG (Agg backend)."""
    # The object API (no pyplot) draws with Agg and never touches the global backend.
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from milbench.api import metric_key

    k = len(names)
    cmap = ListedColormap(list(CLASS_COLOURS[:k]))
    label = {"gene_a": f"gene A ({genes.get('gene_a', '?')})", "gene_b": f"gene B ({genes.get('gene_b', '?')})"}
    h, w = image.shape
    fig_h = 9.0
    fig_w = min(18.0, max(6.0, 3 * fig_h * w / max(h, 1) + 1.5))
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("nuclei image")
    axes[1].imshow(truth, cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
    axes[1].set_title("ground truth (spots)")
    axes[2].imshow(pred, cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
    md = scores.get("mean_dice")
    axes[2].set_title("prediction" + (f" (mean Dice {md:.2f})" if md is not None else ""))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = []
    for i, n in enumerate(names):
        d = scores.get(f"dice_{metric_key(n)}")
        handles.append(Patch(facecolor=CLASS_COLOURS[i], edgecolor="white",
                             label=label.get(n, n) + (f": Dice {d:.2f}" if d is not None else "")))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, k), frameon=False)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=80)
