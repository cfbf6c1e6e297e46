"""The bags: spot-centred training patches and their bag plans, and the lazy bag sequences.

Why a module of its own: this is where the plugin meets the harness's data
model -- it turns positions on a section (:mod:`.regions`) into
:class:`milbench.api.Bag` objects, built lazily on access so large presets
never hold every bag in memory.

**Training patches** are cut as in the seed paper: centred on spots (a patch
of ``instance_size`` working pixels whose pixel index ``p // 2`` holds the
spot) -- gene A spots give ``gene_a`` patches, gene B spots ``gene_b``, any
other gene's spots ``tissue`` -- and centred on background pixels
(``background``). With ``patch_labels = "map"`` a spot patch is instead
labelled by the class map at its centre.

**Region bags** (validation, test, and training with ``train_bags =
"regions"``) are rectangles of a section cut into ``p x p`` tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from milbench.api import Bag, BagPlan, ConfigError, LazyBags, grid_shape, ids_hash, row_major_grid

from .class_maps import BACKGROUND, CLASS_NAMES, KEY_CLASS, SectionMaps
from .regions import Area, RegionSet, fits_intervals


# --------------------------------------------------------------------------- training patches


@dataclass(frozen=True)
class PatchPool:
    """Training patches: top-left corners (n, 2) as (y, x), class, id and kind."""

    origins: np.ndarray
    classes: np.ndarray
    ids: np.ndarray


def patch_pool(maps: SectionMaps, p: int, intervals: Sequence[tuple[int, int]], labels: str,
               rng: np.random.Generator) -> PatchPool:
    """Spot-centred and background patches of side ``p`` lying wholly in ``intervals``.

    ``labels``: ``"spot"`` (by the spot's gene, as the seed paper) or ``"map"``
    (by the class map at the spot). Background patches are centred on
    background pixels, drawn uniformly; as many as the largest spot class
    (at least 500, at most what exists) so the pool can balance classes.
    """
    h, w = maps.shape
    x0 = np.floor(maps.spot_x).astype(np.int64) - p // 2
    y0 = np.floor(maps.spot_y).astype(np.int64) - p // 2
    ok = (y0 >= 0) & (y0 + p <= h) & fits_intervals(x0, p, intervals)
    idx = np.flatnonzero(ok)
    if labels == "spot":
        cls = maps.spot_class[idx].astype(np.int64)
    elif labels == "map":
        cls = maps.classes[y0[idx] + p // 2, x0[idx] + p // 2].astype(np.int64)
    else:
        raise ConfigError(f"bad value for 'patch_labels': {labels!r}; valid: spot, map")
    ids = np.array([f"{maps.name}:spot{i}" for i in idx], dtype=object)
    # Background centres: every background pixel whose patch fits.
    cy, cx = np.nonzero(maps.classes == BACKGROUND)
    by, bx = cy - p // 2, cx - p // 2
    fit = (by >= 0) & (by + p <= h) & fits_intervals(bx, p, intervals)
    by, bx = by[fit], bx[fit]
    n_bg = min(len(by), max(500, int(np.bincount(cls, minlength=4).max()) if len(cls) else 500))
    pick = np.sort(rng.choice(len(by), n_bg, replace=False)) if n_bg else np.zeros(0, np.int64)
    origins = np.concatenate([np.stack([y0[idx], x0[idx]], 1), np.stack([by[pick], bx[pick]], 1)]).astype(np.int64)
    classes = np.concatenate([cls, np.full(n_bg, BACKGROUND, np.int64)])
    bg_ids = np.array([f"{maps.name}:bg{y}_{x}" for y, x in zip(by[pick], bx[pick])], dtype=object)
    return PatchPool(origins.reshape(-1, 2), classes, np.concatenate([ids, bg_ids]))


def plan_patch_bags(pool_classes: np.ndarray, n_bags: int, bag_size: int, key_fraction: float,
                    rng: np.random.Generator, prefix: str, key_class: int = KEY_CLASS) -> list[BagPlan]:
    """Balanced bags of pool patches; non-key patches drawn evenly from the other classes.

    A positive bag holds ``max(1, round(key_fraction * bag_size))`` key
    patches (as in the qmnist bags); every other slot first picks a non-key
    class uniformly, then a patch of it, so tissue spots (most of the pool)
    do not crowd out gene B and background. Patches are distinct within a bag.
    """
    by_class = {int(c): np.flatnonzero(pool_classes == c) for c in np.unique(pool_classes)}
    keys = by_class.pop(key_class, np.zeros(0, np.int64))
    others = sorted(c for c, v in by_class.items() if len(v))
    if not others:
        raise ConfigError(f"{prefix}: the training area holds no non-{CLASS_NAMES[key_class]} patch")
    labels = np.array([1] * ((n_bags + 1) // 2) + [0] * (n_bags // 2))
    rng.shuffle(labels)
    plans = []
    for i, label in enumerate(labels):
        n_key = min(bag_size, max(1, int(round(key_fraction * bag_size)))) if label else 0
        if n_key > len(keys):
            raise ConfigError(f"{prefix}: {len(keys)} {CLASS_NAMES[key_class]} patches in the training area, "
                              f"a positive bag needs {n_key}; lower key_fraction or bag_size")
        slot_class = np.array(others)[rng.integers(0, len(others), bag_size - n_key)]
        parts = [rng.choice(keys, n_key, replace=False)]
        for c in others:
            k = int((slot_class == c).sum())
            if k > len(by_class[c]):
                raise ConfigError(f"{prefix}: only {len(by_class[c])} {CLASS_NAMES[c]} patches in the training "
                                  f"area; lower bag_size")
            parts.append(rng.choice(by_class[c], k, replace=False))
        chosen = np.concatenate(parts).astype(np.int64)
        rng.shuffle(chosen)
        plans.append(BagPlan(chosen, int(label), f"{prefix}-{i:05d}"))
    return plans


# --------------------------------------------------------------------------- lazy bag sequences


def _crop(a: np.ndarray, y: int, x: int, hh: int, ww: int) -> np.ndarray:
    return a[y:y + hh, x:x + ww]


def tile_majority(mask: np.ndarray, rows: int, cols: int, p: int, n_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Majority class of each ``p x p`` tile of ``mask`` (ties -> lowest class), row-major."""
    tiles = mask.reshape(rows, p, cols, p).transpose(0, 2, 1, 3).reshape(rows * cols, p * p)
    counts = (tiles[:, :, None] == np.arange(n_classes)).sum(axis=1)
    return counts.argmax(axis=1)


class RegionBags(LazyBags):
    """Bags that are rectangular regions of a section; instances are its ``p x p`` tiles.

    ``mask`` is the region's class map, ``instance_labels`` each tile's
    majority class, ``grid`` the tile positions (row-major). ``area`` (when
    set) is the whole evaluation area the regions were drawn from -- methods
    may use it to draw a contiguous prediction (see transcriptome-cnn).
    """

    def __init__(self, maps: SectionMaps, regions: RegionSet, rows: int, cols: int, p: int, prefix: str,
                 area: Area | None = None):
        self.maps, self.regions, self.rows, self.cols, self.p, self.prefix = maps, regions, rows, cols, p, prefix
        self.area = area

    def __len__(self) -> int:
        return len(self.regions.labels)

    def _bag(self, i: int) -> Bag:
        import torch

        y, x = (int(v) for v in self.regions.origins[i])
        r, c, p = self.rows, self.cols, self.p
        img = _crop(self.maps.image, y, x, r * p, c * p)
        mask = _crop(self.maps.classes, y, x, r * p, c * p).astype(np.int64)
        inst = img.reshape(r, p, c, p).transpose(0, 2, 1, 3).reshape(r * c, 1, p, p)
        grid = row_major_grid(r * c, c)
        return Bag(torch.from_numpy(np.ascontiguousarray(inst)), int(self.regions.labels[i]), grid, (r, c),
                   torch.from_numpy(tile_majority(mask, r, c, p)), self._tile_ids(y, x),
                   torch.from_numpy(mask), KEY_CLASS, f"{self.prefix}-{i:05d}@y{y}x{x}")

    def _tile_ids(self, y: int, x: int) -> list[str]:
        p = self.p
        return [f"{self.maps.name}:tile{y + a * p}_{x + b * p}" for a in range(self.rows) for b in range(self.cols)]

    def instance_ids(self) -> list[str]:
        return [t for y, x in self.regions.origins for t in self._tile_ids(int(y), int(x))]

    def pixel_boxes(self) -> list[tuple[int, int, int, int]]:
        """(y0, x0, y1, x1) of every region in working pixels."""
        hh, ww = self.rows * self.p, self.cols * self.p
        return [(int(y), int(x), int(y) + hh, int(x) + ww) for y, x in self.regions.origins]


class PatchBags(LazyBags):
    """Bags of training patches (spot-centred or background) laid on a grid.

    ``instance_labels`` are the patches' classes (by spot gene, or by the
    class map with ``patch_labels = "map"``); ``mask`` is the mosaic of each
    patch's class-map crop. The bag label says whether a gene-A patch is in it.
    """

    def __init__(self, maps: SectionMaps, pool: PatchPool, plans: list[BagPlan], p: int):
        self.maps, self.pool, self.plans, self.p = maps, pool, plans, p

    def __len__(self) -> int:
        return len(self.plans)

    def _bag(self, i: int) -> Bag:
        import torch

        plan = self.plans[i]
        p = self.p
        n = len(plan.indices)
        rows, cols = grid_shape(n)
        inst = np.empty((n, 1, p, p), np.float32)
        mask = np.zeros((rows * p, cols * p), np.int64)
        for k, j in enumerate(plan.indices):
            y, x = (int(v) for v in self.pool.origins[j])
            inst[k, 0] = _crop(self.maps.image, y, x, p, p)
            r, c = divmod(k, cols)
            mask[r * p:(r + 1) * p, c * p:(c + 1) * p] = _crop(self.maps.classes, y, x, p, p)
        grid = row_major_grid(n, cols)
        labels = torch.as_tensor(self.pool.classes[plan.indices].astype(np.int64))
        return Bag(torch.from_numpy(inst), plan.label, grid, (rows, cols), labels,
                   [str(self.pool.ids[j]) for j in plan.indices], torch.from_numpy(mask), KEY_CLASS, plan.bag_id)

    def instance_ids(self) -> list[str]:
        return [str(self.pool.ids[j]) for plan in self.plans for j in plan.indices]

    def pixel_boxes(self) -> list[tuple[int, int, int, int]]:
        """(y0, x0, y1, x1) of every patch used by some bag, in working pixels."""
        used = sorted({int(j) for plan in self.plans for j in plan.indices})
        return [(int(self.pool.origins[j][0]), int(self.pool.origins[j][1]),
                 int(self.pool.origins[j][0]) + self.p, int(self.pool.origins[j][1]) + self.p) for j in used]


def split_hash(bags: Any) -> str:
    """:func:`ids_hash` of a bag sequence's instance ids (without building tensors)."""
    return ids_hash(bags.instance_ids())
