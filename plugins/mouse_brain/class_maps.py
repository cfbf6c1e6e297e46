"""The ground truth: the four classes and the rule that turns gene spots into a class map.

Why a module of its own: the class-map rule *is* the dataset's definition of
the truth every method is scored against (the README quotes it); keeping it
apart from file reading and bag drawing keeps it readable and testable alone.

Everything here runs at a *working scale* (``image_scale``; the image is
area-averaged, spot coordinates scaled with it), while the labelling rule's
lengths are given in section pixels so the ground truth does not change when
the working scale does.

**Classes** (the order is fixed): 0 ``background``, 1 ``gene_a``,
2 ``gene_b``, 3 ``tissue``; ``gene_a`` is the key class of a bag.

**Ground-truth class map** (the rule the README quotes). At every working pixel:

1. *Nuclei* are the segmentation's labelled pixels (segmentation layout) or the
   pixels above the image's Otsu threshold (image layout; see :mod:`.section`).
2. *Tissue* = pixels within ``tissue_radius`` section pixels of a nucleus or
   a spot, with enclosed holes filled. Outside it: ``background``.
3. The *density* of a gene at a pixel is the Gaussian-weighted number of its
   spots nearby: ``D_g(p) = sum over spots s of g of exp(-|p - s|^2 / (2 sigma^2))``
   with ``sigma = density_sigma`` section pixels -- about the number of that
   gene's spots within one sigma.
4. A tissue pixel is ``gene_a`` if ``D_A >= min_density`` and ``D_A > D_B``;
   else ``gene_b`` if ``D_B >= min_density`` and ``D_B >= D_A``; else ``tissue``.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from milbench.api import ConfigError

from .section import Section, SpotColumns, read_section, section_layout

CLASS_NAMES: tuple[str, ...] = ("background", "gene_a", "gene_b", "tissue")
BACKGROUND, GENE_A, GENE_B, TISSUE = 0, 1, 2, 3
KEY_CLASS = GENE_A


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
