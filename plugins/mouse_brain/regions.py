"""Where on a section bags may come from: held-out bands, training intervals, sampled regions.

Why a module of its own: the split of one section into training, validation
and test areas (vertical bands with a margin between them) is what keeps the
test split honest, and the balanced sampling of region bags decides what a
bag label means; both are geometry on the class map, apart from how a bag's
tensors are built (:mod:`.bags`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from milbench.api import ConfigError

from .class_maps import BACKGROUND, GENE_A, SectionMaps



@dataclass(frozen=True)
class Band:
    """A vertical band ``[x0, x1)`` of a section in working pixels."""

    x0: int
    x1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def band_from_fractions(start: float, width: float, section_width: int) -> Band:
    """A band from fractions of the section width (``start + width <= 1``)."""
    if start < 0 or width <= 0 or start + width > 1 + 1e-9:
        raise ConfigError(f"band start={start:g}, width={width:g} leaves the section; need 0 <= start, "
                          f"0 < width and start + width <= 1")
    return Band(int(round(start * section_width)), int(round((start + width) * section_width)))


def free_intervals(width: int, exclusions: Sequence[Band], margin: int) -> list[tuple[int, int]]:
    """X-intervals ``[lo, hi)`` of ``[0, width)`` at least ``margin`` px away from every band."""
    cuts = sorted((max(0, b.x0 - margin), min(width, b.x1 + margin)) for b in exclusions)
    out, lo = [], 0
    for a, b in cuts:
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
    if lo < width:
        out.append((lo, width))
    return out


def fits_intervals(x0: np.ndarray, size: int, intervals: Sequence[tuple[int, int]]) -> np.ndarray:
    """Whether each ``[x0, x0 + size)`` lies wholly inside one of ``intervals``."""
    ok = np.zeros(x0.shape, bool)
    for lo, hi in intervals:
        ok |= (x0 >= lo) & (x0 + size <= hi)
    return ok


def _box_fraction(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, hh: int, ww: int) -> np.ndarray:
    """Fraction of ``mask`` inside each ``hh x ww`` box with top-left (ys, xs) (integral image)."""
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    tot = s[ys + hh, xs + ww] - s[ys, xs + ww] - s[ys + hh, xs] + s[ys, xs]
    return tot / float(hh * ww)


@dataclass(frozen=True)
class RegionSet:
    """Sampled regions: top-left corners (n, 2) as (y, x), labels, and the candidate counts."""

    origins: np.ndarray
    labels: np.ndarray
    n_positive_candidates: int
    n_negative_candidates: int


def sample_regions(maps: SectionMaps, region_hw: tuple[int, int], intervals: Sequence[tuple[int, int]], n: int,
                   key_fraction: float, min_tissue: float, rng: np.random.Generator, what: str,
                   step: int, tile: int) -> RegionSet:
    """Draw ``n`` balanced region bags lying wholly in ``intervals``.

    Positive: at least ``key_fraction`` of the region's pixels are ``gene_a``.
    Negative: gene-A pixels add up to less than half a tile (of side
    ``tile``) and to less than ``key_fraction``, so no tile can be mostly
    gene_a. (Requiring none at all leaves almost no negative region: single
    oligodendrocytes make small gene-A patches all over the strata.) Both
    need ``min_tissue`` of non-background pixels. Regions between the two
    are never drawn, so a bag label is never a coin toss. Regions are
    distinct but may overlap (candidates lie on a ``step`` px grid).
    """
    h, w = maps.shape
    rh, rw = region_hw
    if rh > h or not any(hi - lo >= rw for lo, hi in intervals):
        widest = max((hi - lo for lo, hi in intervals), default=0)
        raise ConfigError(f"{what}: a bag region is {rh}x{rw} px but the area is {h}x{widest} px at this "
                          f"image_scale; lower bag_size or instance_size, or widen the band")
    ys = np.arange(0, h - rh + 1, step)
    xs = np.arange(0, w - rw + 1, step)
    xs = xs[fits_intervals(xs, rw, intervals)]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    a_frac = _box_fraction(maps.classes == GENE_A, yy, xx, rh, rw)
    t_frac = _box_fraction(maps.classes != BACKGROUND, yy, xx, rh, rw)
    pos = np.flatnonzero((a_frac >= key_fraction) & (a_frac > 0) & (t_frac >= min_tissue))
    n_tiles = max(1, (rh * rw) // (tile * tile))
    neg = np.flatnonzero((a_frac < min(key_fraction, 0.5 / n_tiles)) & (t_frac >= min_tissue))
    n_pos, n_neg = (n + 1) // 2, n // 2
    if n_pos > len(pos) or n_neg > len(neg):
        raise ConfigError(
            f"{what}: {n} bags need {n_pos} positive and {n_neg} negative regions but the area holds "
            f"{len(pos)} and {len(neg)} (positive: >= key_fraction={key_fraction:g} gene_a pixels); "
            f"lower n_*_bags, key_fraction or bag_size, or widen the band")
    chosen = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    labels = np.array([1] * n_pos + [0] * n_neg)
    order = rng.permutation(len(chosen))
    return RegionSet(np.stack([yy[chosen], xx[chosen]], 1)[order], labels[order], len(pos), len(neg))


@dataclass(frozen=True)
class Area:
    """A contiguous evaluation area (the held-out band or a whole test section)."""

    image: np.ndarray  # (h, w) float32
    classes: np.ndarray  # (h, w) uint8
    x0: int
    x1: int
    section: str
