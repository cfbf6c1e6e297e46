"""Tissue detection and the tile grid of one slide, with an on-disk cache.

Why this shape:

* **Resolution.** Tiles are cut at a requested ``mpp`` (µm per pixel) when set
  -- the only unit that means the same thing across scanners -- else at a
  pyramid ``level``. The slide is read from the finest level at or below the
  wanted downsample and resized only when no level matches (within 2 %), so
  the common case (mpp = a level's mpp) costs no resampling. A slide that
  cannot give the mpp (it would need upsampling, or it has no mpp) is a
  one-line error naming it.
* **Tissue.** Otsu's threshold on the saturation of a low-resolution overview
  (at most ``thumbnail_size`` px a side): stained tissue is coloured, glass
  and background are grey/white whatever their brightness. The threshold never
  drops below ``min_saturation``, so a blank slide is "no tissue", not noise.
* **Grid.** Tiles are the cells of a regular grid over the slide (step = the
  tile's footprint in level-0 pixels, origin at the slide's corner); a cell is
  kept when at least ``tissue_fraction`` of it is tissue. Cells (not free
  coordinates) are what lets a bag be both a set of tiles and one image: the
  tissue bounding box is exactly ``rows x cols`` cells.
* **Cache.** The kept cells are stored in ``<tile_cache>/<slide_id>-<key>.npz``,
  the key hashing the slide's checksum and every tiling key, so a second run
  (another method, seed or sweep point) reads the coordinates instead of
  rescanning, and a changed slide or setting is re-tiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milbench.api import DataError

from .reader import SlideReader, slide_checksum

#: Bumped when the tiling rule changes, so old cache files are not reused.
TILING_VERSION = 1


@dataclass(frozen=True)
class Resolution:
    """How tiles are read: pyramid ``level``, ``read_size`` px there, resized to ``tile_size``.

    ``step0``: a tile's footprint in level-0 pixels (also the grid step);
    ``downsample``: from level 0 to the tile resolution; ``mpp``: of the tiles (None if unknown).
    """

    level: int
    read_size: int
    tile_size: int
    step0: int
    downsample: float
    mpp: float | None


@dataclass(frozen=True)
class TilingKeys:
    """Every setting that changes which tiles a slide has (they all enter the cache key)."""

    tile_size: int
    mpp: float | None
    level: int
    tissue_fraction: float
    min_saturation: float
    thumbnail_size: int
    downsample: float | None = None


def resolve_resolution(reader: SlideReader, keys: TilingKeys) -> Resolution:
    """The level and read size that give tiles at the requested mpp or level."""
    sid = reader.slide_id
    if keys.mpp is not None:
        if reader.mpp is None:
            raise DataError(f"slide '{sid}': {reader.path.name} has no mpp in its metadata, so mpp={keys.mpp:g} "
                            "cannot be honoured; use --set mpp=none --set level=N")
        d = keys.mpp / reader.mpp
        if d < 0.98:
            raise DataError(f"slide '{sid}': its finest level is {reader.mpp:.4g} µm/px; requested mpp={keys.mpp:g} "
                            "would need upsampling; ask for mpp >= the slide's")
        d = max(d, 1.0)
    elif keys.downsample is not None:
        d = float(keys.downsample)  # any pyramid, plain images too: read the nearest finer level, resize
    else:
        if keys.level >= reader.level_count:
            raise DataError(f"slide '{sid}' has {reader.level_count} level(s) (0..{reader.level_count - 1}); "
                            f"level={keys.level} does not exist")
        d = reader.level_downsamples[keys.level]
    lv = max(i for i, ds in enumerate(reader.level_downsamples) if ds <= d * 1.02)
    step0 = max(1, int(round(keys.tile_size * d)))
    read = max(1, int(round(step0 / reader.level_downsamples[lv])))
    mpp = reader.mpp * d if reader.mpp is not None else None
    return Resolution(lv, read, keys.tile_size, step0, float(d), mpp)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 1.0
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 RGB array."""
    x = rgb.astype(np.float32)
    mx, mn = x.max(axis=-1), x.min(axis=-1)
    return (mx - mn) / np.maximum(mx, 1.0)


def tissue_mask(rgb: np.ndarray, min_saturation: float) -> tuple[np.ndarray, float]:
    """Tissue pixels of an overview (bool) and the saturation threshold used."""
    sat = saturation(rgb)
    thr = max(otsu(sat), float(min_saturation))
    return sat > thr, thr


def cell_fractions(mask: np.ndarray, thumb_ds: float, step0: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Share of tissue pixels of the overview ``mask`` inside each grid cell: (n_rows, n_cols)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    scale = step0 / thumb_ds
    ys = np.clip(np.round(np.arange(n_rows + 1) * scale).astype(int), 0, mask.shape[0])
    xs = np.clip(np.round(np.arange(n_cols + 1) * scale).astype(int), 0, mask.shape[1])
    y0, y1 = ys[:-1, None], ys[1:, None]
    x0, x1 = xs[None, :-1], xs[None, 1:]
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return s / area


@dataclass
class Tiling:
    """The kept tiles of one slide: grid cells, their tissue share, and how to read them."""

    slide_id: str
    checksum: str
    resolution: Resolution
    cells: np.ndarray  # (n, 2) int: (row, col) of each kept cell on the slide-wide grid
    tissue: np.ndarray  # (n,) float: tissue share of each kept cell
    grid_size: tuple[int, int]  # (rows, cols) of the slide-wide grid
    threshold: float
    from_cache: bool = False

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1), end-exclusive, of the kept cells."""
        return (int(self.cells[:, 0].min()), int(self.cells[:, 0].max()) + 1,
                int(self.cells[:, 1].min()), int(self.cells[:, 1].max()) + 1)

    def xy0(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Level-0 top-left corners (x, y) of the kept tiles (or of ``idx`` of them)."""
        c = self.cells if idx is None else self.cells[idx]
        return np.stack([c[:, 1], c[:, 0]], axis=1) * self.resolution.step0


def cache_key(checksum: str, keys: TilingKeys) -> str:
    blob = json.dumps({"v": TILING_VERSION, "slide": checksum, **asdict(keys)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]


def tile_slide(reader: SlideReader, keys: TilingKeys, cache_dir: Path | None) -> Tiling:
    """The slide's tiles, from the cache when the slide and the keys are unchanged."""
    checksum = slide_checksum(reader.path)
    res = resolve_resolution(reader, keys)
    key = cache_key(checksum, keys)
    path = cache_dir / f"{_safe(reader.slide_id)}-{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                return Tiling(reader.slide_id, checksum, res, z["cells"].astype(np.int64), z["tissue"],
                              tuple(int(v) for v in z["grid_size"]), float(z["threshold"]), from_cache=True)
        except Exception:  # a torn or foreign cache file is recomputed, never trusted
            pass
    w0, h0 = reader.dimensions
    n_rows, n_cols = h0 // res.step0, w0 // res.step0
    if n_rows == 0 or n_cols == 0:
        raise DataError(f"slide '{reader.slide_id}' ({w0}x{h0} px) is smaller than one tile "
                        f"({res.step0} px at level 0 for instance_size={keys.tile_size}); lower instance_size or mpp")
    thumb, ds = reader.thumbnail(keys.thumbnail_size)
    mask, thr = tissue_mask(thumb, keys.min_saturation)
    frac = cell_fractions(mask, ds, res.step0, n_rows, n_cols)
    keep = np.argwhere(frac >= keys.tissue_fraction)
    if len(keep) == 0:
        raise DataError(f"slide '{reader.slide_id}': no tissue found ({reader.path.name}: no tile is "
                        f">= {keys.tissue_fraction:g} tissue at saturation > {thr:.3f}); check the file or lower "
                        "tissue_fraction / min_saturation")
    tiling = Tiling(reader.slide_id, checksum, res, keep.astype(np.int64), frac[keep[:, 0], keep[:, 1]],
                    (n_rows, n_cols), thr)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, cells=tiling.cells, tissue=tiling.tissue, grid_size=np.array(tiling.grid_size),
                     threshold=np.array(thr))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs a rescan next time
    return tiling


def read_tile(reader: SlideReader, res: Resolution, x0: int, y0: int) -> np.ndarray:
    """One tile (tile_size, tile_size, 3) uint8 whose top-left level-0 corner is (x0, y0)."""
    img = reader.read(res.level, x0, y0, res.read_size, res.read_size)
    if res.read_size != res.tile_size:
        img = _resize(img, res.tile_size, res.tile_size)
    return img


def read_block(reader: SlideReader, res: Resolution, x0: int, y0: int, n_cols: int, n_rows: int) -> np.ndarray:
    """``n_rows x n_cols`` adjacent tiles as one uint8 array (n_rows*p, n_cols*p, 3), in one read."""
    p = res.tile_size
    if res.read_size == p:
        return reader.read(res.level, x0, y0, n_cols * p, n_rows * p)
    img = reader.read(res.level, x0, y0, n_cols * res.read_size, n_rows * res.read_size)
    return _resize(img, n_cols * p, n_rows * p)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR, reducing_gap=None))
