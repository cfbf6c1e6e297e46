"""Tissue sections with in situ sequencing spots: reading, rendering, class maps, bags.

A *section* is a nuclei image (H, W) plus a spots table (gene, x, y), x being
the image column and y the row, in image pixels. Two layouts are read:

* **segmentation layout** (the pciSeq CA1 section): ``spots.csv`` and
  ``label_image.coo.npz``, a ``scipy.sparse`` COO label image (0 = background,
  1..n = nuclei). There is no intensity image, so one is *rendered*: nucleus
  interior 1.0, the nucleus' own outermost pixel ring 0.5 (so touching nuclei
  stay separable), background 0. Records say ``image_rendered: true``.
* **image layout** (what users of the method have): one DAPI image
  (``.tif``/``.tiff`` via tifffile, ``.png``/``.jpg`` via Pillow; 8- or 16-bit,
  grey or RGB -- RGB is reduced by the channel maximum so a blue-only DAPI
  picture keeps its signal) and one ``.csv`` spots table. Intensities are
  mapped to [0, 1] by the 0.1th and 99.9th percentiles (a rendered image
  saved as TIFF therefore loads back unchanged). Spot column names and a
  ``pixel_scale`` (table units x scale = image pixels) are configurable.

Spots up to :data:`SPOT_EDGE_TOLERANCE` pixels outside the image are clipped
onto its edge (the CA1 table has six spots at x = -1); spots farther out mean a
wrong ``pixel_scale`` or swapped columns and raise :class:`DataError`.

Everything below runs at a *working scale* (``image_scale``; the image is
area-averaged, spot coordinates scaled with it), while the labelling rule's
lengths are given in section pixels so the ground truth does not change when
the working scale does.

**Classes** (the order is fixed): 0 ``background``, 1 ``gene_a``,
2 ``gene_b``, 3 ``tissue``; ``gene_a`` is the key class of a bag.

**Ground-truth class map** (the rule the README quotes). At every working pixel:

1. *Nuclei* are the segmentation's labelled pixels (segmentation layout) or the
   pixels above the image's Otsu threshold (image layout).
2. *Tissue* = pixels within ``tissue_radius`` section pixels of a nucleus or
   a spot, with enclosed holes filled. Outside it: ``background``.
3. The *density* of a gene at a pixel is the Gaussian-weighted number of its
   spots nearby: ``D_g(p) = sum over spots s of g of exp(-|p - s|^2 / (2 sigma^2))``
   with ``sigma = density_sigma`` section pixels -- about the number of that
   gene's spots within one sigma.
4. A tissue pixel is ``gene_a`` if ``D_A >= min_density`` and ``D_A > D_B``;
   else ``gene_b`` if ``D_B >= min_density`` and ``D_B >= D_A``; else ``tissue``.

**Training patches** are cut as in the seed paper: centred on spots (a patch
of ``instance_size`` working pixels whose pixel index ``p // 2`` holds the
spot) -- gene A spots give ``gene_a`` patches, gene B spots ``gene_b``, any
other gene's spots ``tissue`` -- and centred on background pixels
(``background``). With ``patch_labels = "map"`` a spot patch is instead
labelled by the class map at its centre.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milbench.data.bags import BagPlan, LazyBags, grid_shape, ids_hash, row_major_grid
from milbench.errors import ConfigError, DataError

CLASS_NAMES: tuple[str, ...] = ("background", "gene_a", "gene_b", "tissue")
BACKGROUND, GENE_A, GENE_B, TISSUE = 0, 1, 2, 3
KEY_CLASS = GENE_A

#: Spots this many pixels outside the image are clipped onto it; farther is an error.
SPOT_EDGE_TOLERANCE = 2.0

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_IMAGE_NAME = "label_image.coo.npz"
SPOTS_NAME = "spots.csv"
#: Interior / boundary grey values of a rendered nuclei image.
RENDER_INTERIOR, RENDER_BOUNDARY = 1.0, 0.5


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


# --------------------------------------------------------------------------- reading


@dataclass
class Section:
    """One section at full resolution: image, nuclei mask, spots (x = column, y = row)."""

    image: np.ndarray  # (H, W) float32 in [0, 1]
    nuclei: np.ndarray  # (H, W) bool
    genes: np.ndarray  # (n,) str
    x: np.ndarray  # (n,) float64, image pixels
    y: np.ndarray
    name: str
    files: list[str]
    image_rendered: bool
    n_clipped: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass(frozen=True)
class SpotColumns:
    """How to read a spots table: column names and table-units-to-pixels scale."""

    gene: str = "Gene"
    x: str = "x"
    y: str = "y"
    pixel_scale: float = 1.0


def read_spots(path: str | os.PathLike, cols: SpotColumns = SpotColumns()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (genes, x, y) from a CSV; coordinates multiplied by ``cols.pixel_scale``.

    Raises a one-line :class:`DataError` for an unreadable or empty table, a
    missing column (listing the columns present) or non-numeric coordinates.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types (EmptyDataError, ParserError, OSError)
        raise DataError(f"cannot read spots table {path}: {_one_line(e)}") from None
    missing = [c for c in (cols.gene, cols.x, cols.y) if c not in df.columns]
    if missing:
        raise DataError(
            f"spots table {path} has no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))}); "
            f"set spots_gene_col / spots_x_col / spots_y_col")
    if len(df) == 0:
        raise DataError(f"spots table {path} has no rows; a section needs in situ sequencing spots")
    xy = df[[cols.x, cols.y]].apply(pd.to_numeric, errors="coerce")
    bad = xy.isna().any(axis=1) | df[cols.gene].isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"spots table {path}: {int(bad.sum())} rows lack a gene or numeric x/y (first: row {i + 2})")
    genes = df[cols.gene].astype(str).to_numpy()
    return genes, xy[cols.x].to_numpy(np.float64) * cols.pixel_scale, xy[cols.y].to_numpy(np.float64) * cols.pixel_scale


def render_nuclei(label_image: Any, stripe: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Render a nuclei picture from a label image: (image float32, nuclei bool).

    Interior pixels of a nucleus are ``RENDER_INTERIOR``, its pixels next to a
    different label (another nucleus or background) ``RENDER_BOUNDARY``,
    background 0 -- so a CNN sees nuclear shape, size, packing and contact, the
    morphology a DAPI image shows. Works stripe by stripe on a sparse matrix
    so the full-size integer array never exists at once.
    """
    import scipy.sparse as sp

    csr = sp.csr_matrix(label_image) if sp.issparse(label_image) else None
    dense = None if csr is not None else np.asarray(label_image)
    h, w = (csr.shape if csr is not None else dense.shape)
    image = np.zeros((h, w), np.float32)
    nuclei = np.zeros((h, w), bool)
    for r0 in range(0, h, stripe):
        r1 = min(h, r0 + stripe)
        a, b = max(0, r0 - 1), min(h, r1 + 1)
        lab = csr[a:b].toarray() if csr is not None else dense[a:b]
        edge = np.zeros(lab.shape, bool)
        dv = lab[:-1] != lab[1:]
        edge[:-1] |= dv
        edge[1:] |= dv
        dh = lab[:, :-1] != lab[:, 1:]
        edge[:, :-1] |= dh
        edge[:, 1:] |= dh
        fg = lab > 0
        block = np.where(fg, np.where(edge, RENDER_BOUNDARY, RENDER_INTERIOR), 0.0).astype(np.float32)
        image[r0:r1] = block[r0 - a:r0 - a + (r1 - r0)]
        nuclei[r0:r1] = fg[r0 - a:r0 - a + (r1 - r0)]
    return image, nuclei


def read_label_image(path: str | os.PathLike) -> Any:
    """Load a ``scipy.sparse.save_npz`` label image (kept sparse)."""
    import scipy.sparse as sp

    try:
        return sp.load_npz(path)
    except Exception as e:
        raise DataError(f"cannot read label image {path}: {_one_line(e)}") from None


def read_intensity_image(path: str | os.PathLike) -> np.ndarray:
    """Read a DAPI image (TIFF, PNG, JPEG; 8/16-bit; grey or RGB) as float32 in [0, 1].

    Percentile scaling (0.1th -> 0, 99.9th -> 1) makes 12-bit data in 16-bit
    files and 8-bit files look alike without letting a few hot pixels set the range.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as e:
        raise DataError(f"cannot read image {path}: {_one_line(e)}") from None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].max(axis=-1)
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"image {path} has shape {arr.shape}; expected a 2-D grey (or RGB) nuclei image")
    arr = arr.astype(np.float32)
    sample = arr[:: max(1, arr.shape[0] // 1024), :: max(1, arr.shape[1] // 1024)]
    lo, hi = np.percentile(sample, [0.1, 99.9])
    if not hi > lo:
        hi = float(arr.max())
        lo = float(arr.min())
        if not hi > lo:
            raise DataError(f"image {path} is blank (every pixel is {lo:g}); expected a nuclei (DAPI) image")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a [0, 1] image (maximises between-class variance)."""
    hist, edges = np.histogram(image, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m = np.cumsum(p * centres)
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m[-1] * w0 - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def section_layout(folder: Path) -> dict[str, Path]:
    """Which files make up the section in ``folder``: ``spots`` plus ``labels`` or ``image``.

    Raises :class:`DataError` naming what is missing or ambiguous.
    """
    if not folder.is_dir():
        raise DataError(f"section folder {folder} does not exist")
    spots = folder / SPOTS_NAME
    if not spots.is_file():
        csvs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
        if len(csvs) != 1:
            raise DataError(f"section folder {folder} needs one spots table ({SPOTS_NAME} or a single .csv); "
                            f"found {len(csvs)}")
        spots = csvs[0]
    labels = folder / LABEL_IMAGE_NAME
    if labels.is_file():
        return {"spots": spots, "labels": labels}
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(images) != 1:
        raise DataError(f"section folder {folder} needs {LABEL_IMAGE_NAME} or exactly one nuclei image "
                        f"({'/'.join(IMAGE_SUFFIXES)}); found {len(images)}")
    return {"spots": spots, "image": images[0]}


def read_section(folder: str | os.PathLike, cols: SpotColumns = SpotColumns(), name: str | None = None) -> Section:
    """Read a section folder of either layout (see the module docstring)."""
    folder = Path(folder)
    files = section_layout(folder)
    genes, x, y = read_spots(files["spots"], cols)
    if "labels" in files:
        image, nuclei = render_nuclei(read_label_image(files["labels"]))
        rendered = True
    else:
        image = read_intensity_image(files["image"])
        nuclei = image > otsu_threshold(image)
        rendered = False
    h, w = image.shape
    n_clipped = check_spots_in_image(genes, x, y, (h, w), str(files["spots"]), cols)
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    return Section(image, nuclei, genes, x, y, name or folder.name, [str(p) for p in files.values()],
                   rendered, n_clipped)


def check_spots_in_image(genes: np.ndarray, x: np.ndarray, y: np.ndarray, shape: tuple[int, int], where: str,
                         cols: SpotColumns = SpotColumns()) -> int:
    """Raise :class:`DataError` if a spot lies more than :data:`SPOT_EDGE_TOLERANCE`
    pixels outside the image; return how many lie just outside (to be clipped)."""
    h, w = shape
    t = SPOT_EDGE_TOLERANCE
    far = (x < -t) | (x > w - 1 + t) | (y < -t) | (y > h - 1 + t)
    if far.any():
        i = int(np.flatnonzero(far)[0])
        raise DataError(
            f"{int(far.sum())} of {len(x)} spots in {where} lie outside the {h}x{w} image "
            f"(first: {genes[i]} at x={x[i] / cols.pixel_scale:g}, y={y[i] / cols.pixel_scale:g}; "
            f"x must be the column, y the row); check pixel_scale={cols.pixel_scale:g} and the x/y columns")
    return int(((x < 0) | (x > w - 1) | (y < 0) | (y > h - 1)).sum())


# --------------------------------------------------------------------------- class maps


@dataclass(frozen=True)
class LabelRule:
    """The ground-truth rule's parameters (lengths in section pixels)."""

    gene_a: str
    gene_b: str
    density_sigma: float = 50.0
    min_density: float = 2.0
    tissue_radius: float = 100.0


@dataclass
class SectionMaps:
    """A section at working scale with its class map and spot positions.

    ``spot_x``/``spot_y`` are continuous working coordinates (pixel ``i`` spans
    ``[i, i + 1)``); ``spot_class`` is each spot's class by gene (A, B or tissue).
    Arrays are read-only: the object is cached and shared between loads.
    """

    name: str
    files: list[str]
    image_rendered: bool
    section_shape: tuple[int, int]
    scale: tuple[float, float]  # (sy, sx): working px per section px
    image: np.ndarray
    classes: np.ndarray
    density_a: np.ndarray
    density_b: np.ndarray
    spot_x: np.ndarray
    spot_y: np.ndarray
    spot_class: np.ndarray
    rule: LabelRule
    gene_counts: dict[str, int] = field(default_factory=dict)
    n_clipped: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def resize_area(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average (box filter) resize of a float image to ``shape`` = (h, w)."""
    from PIL import Image

    if image.shape == shape:
        return image.astype(np.float32, copy=True)
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BOX), dtype=np.float32)


def working_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Working-scale size of a section (at least 1 x 1)."""
    return max(1, int(math.floor(shape[0] * scale + 0.5))), max(1, int(math.floor(shape[1] * scale + 0.5)))


def check_genes(genes: np.ndarray, rule: LabelRule, where: str) -> dict[str, int]:
    """Raise :class:`ConfigError` for an unknown or repeated gene; return spot counts per gene."""
    names, counts = np.unique(genes, return_counts=True)
    table = dict(zip(names.tolist(), counts.tolist()))
    for key, gene in (("gene_a", rule.gene_a), ("gene_b", rule.gene_b)):
        if gene not in table:
            close = difflib.get_close_matches(gene, list(table), n=3, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else \
                f"most frequent: {', '.join(sorted(table, key=lambda g: -table[g])[:5])}"
            raise ConfigError(f"{key} {gene!r} is not a gene of {where} ({len(table)} genes); {hint}")
    if rule.gene_a == rule.gene_b:
        raise ConfigError(f"gene_a and gene_b are both {rule.gene_a!r}; choose two different genes")
    return {str(k): int(v) for k, v in table.items()}


def classify(tissue: np.ndarray, density_a: np.ndarray, density_b: np.ndarray, min_density: float) -> np.ndarray:
    """Step 4 of the class-map rule (module docstring) as a uint8 map."""
    classes = np.where(tissue, TISSUE, BACKGROUND).astype(np.uint8)
    is_b = tissue & (density_b >= min_density) & (density_b >= density_a)
    is_a = tissue & (density_a >= min_density) & (density_a > density_b)
    classes[is_b] = GENE_B
    classes[is_a] = GENE_A
    return classes


def prepare_section(section: Section, scale: float, rule: LabelRule) -> SectionMaps:
    """Bring a section to working scale and derive its ground-truth class map."""
    from scipy import ndimage as ndi

    gene_counts = check_genes(section.genes, rule, f"section '{section.name}'")
    H, W = section.shape
    h, w = working_shape((H, W), scale)
    sy, sx = h / H, w / W
    image = resize_area(section.image, (h, w))
    if section.image_rendered:  # nuclei are exactly the non-zero pixels: skip a full-size float copy
        nuclei = image > 0
    else:
        nuclei = resize_area(section.nuclei.astype(np.float32), (h, w)) > 0
    spot_x = (section.x + 0.5) * sx
    spot_y = (section.y + 0.5) * sy
    xi = np.clip(np.floor(spot_x).astype(np.int64), 0, w - 1)
    yi = np.clip(np.floor(spot_y).astype(np.int64), 0, h - 1)
    spot_class = np.full(len(section.genes), TISSUE, np.int8)
    spot_class[section.genes == rule.gene_a] = GENE_A
    spot_class[section.genes == rule.gene_b] = GENE_B
    s_mean = (sx + sy) / 2
    sigma = rule.density_sigma * s_mean

    def density(cls: int) -> np.ndarray:
        counts = np.zeros((h, w), np.float32)
        sel = spot_class == cls
        np.add.at(counts, (yi[sel], xi[sel]), 1.0)
        return (ndi.gaussian_filter(counts, sigma, mode="constant") * (2 * np.pi * sigma ** 2)).astype(np.float32)

    density_a, density_b = density(GENE_A), density(GENE_B)
    occupied = nuclei.copy()
    occupied[yi, xi] = True
    tissue = ndi.binary_fill_holes(ndi.distance_transform_edt(~occupied) <= rule.tissue_radius * s_mean)
    classes = classify(tissue, density_a, density_b, rule.min_density)
    maps = SectionMaps(section.name, list(section.files), section.image_rendered, (H, W), (sy, sx), image,
                       classes, density_a, density_b, spot_x, spot_y, spot_class, rule, gene_counts,
                       section.n_clipped)
    for a in (maps.image, maps.classes, maps.density_a, maps.density_b, maps.spot_x, maps.spot_y, maps.spot_class):
        a.flags.writeable = False
    return maps


def _folder_key(folder: Path) -> tuple:
    """Cache key that changes when a file of the section changes."""
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))


@functools.lru_cache(maxsize=4)
def _load_maps_cached(folder: str, key: tuple, cols: SpotColumns, scale: float, rule: LabelRule, name: str) -> SectionMaps:
    return prepare_section(read_section(folder, cols, name), scale, rule)


def load_section_maps(folder: str | os.PathLike, cols: SpotColumns, scale: float, rule: LabelRule,
                      name: str | None = None) -> SectionMaps:
    """Read and prepare a section folder, cached per process (runs re-use it)."""
    folder = Path(folder).resolve()
    section_layout(folder)  # a clear error before the cache key touches the folder
    return _load_maps_cached(str(folder), _folder_key(folder), cols, float(scale), rule, name or folder.name)


# --------------------------------------------------------------------------- geometry


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


def _fits(x0: np.ndarray, size: int, intervals: Sequence[tuple[int, int]]) -> np.ndarray:
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
    xs = xs[_fits(xs, rw, intervals)]
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
    ok = (y0 >= 0) & (y0 + p <= h) & _fits(x0, p, intervals)
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
    fit = (by >= 0) & (by + p <= h) & _fits(bx, p, intervals)
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


# --------------------------------------------------------------------------- bags


@dataclass(frozen=True)
class Area:
    """A contiguous evaluation area (the held-out band or a whole test section)."""

    image: np.ndarray  # (h, w) float32
    classes: np.ndarray  # (h, w) uint8
    x0: int
    x1: int
    section: str


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

    def _bag(self, i: int):
        import torch

        from milbench.api import Bag

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

    def _bag(self, i: int):
        import torch

        from milbench.api import Bag

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
