"""Finding and reading a section folder: the nuclei image and its in situ sequencing spots.

Why a module of its own: everything else in the plugin starts from a
:class:`Section`, and the two file layouts, their checks and their one-line
errors are the part a user with their own section meets first.

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

A section folder is looked for by :func:`locate_section`: under the data roots
(``--data-root``, ``$MILBENCH_DATA_ROOT``, the user cache), as a path, and for
the default section finally the complete CA1 section shipped in the package
(:data:`EMBEDDED`; :data:`CA1_SHA256` are its files' checksums).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milbench.api import DataError, find_in_roots, first_line

#: The complete pciSeq CA1 section, shipped in the package (``milbench_plugins/data``).
EMBEDDED = Path(__file__).resolve().parent.parent / "data" / "mouse-brain-ca1"
#: The default section's folder name under a data root.
DEFAULT_FOLDER = "mouse-brain-ca1"

#: sha256 of the pciSeq CA1 files as published (the copy shipped in plugins/data/mouse-brain-ca1).
CA1_SHA256 = {
    "spots.csv": "bdc2b11d9cf3ead8bf1a941564267d263b7dfcaa5eddc39cae28dd3cb67b7da5",
    "label_image.coo.npz": "8d53ebd39c0d49540b6e73ccac5165242f4d5c65f7eaf8e3e2e582f0a3e948fd",
}

#: Spots this many pixels outside the image are clipped onto it; farther is an error.
SPOT_EDGE_TOLERANCE = 2.0

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_IMAGE_NAME = "label_image.coo.npz"
SPOTS_NAME = "spots.csv"
#: Interior / boundary grey values of a rendered nuclei image.
RENDER_INTERIOR, RENDER_BOUNDARY = 1.0, 0.5


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
        raise DataError(f"cannot read spots table {path}: {first_line(e)}") from None
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
        raise DataError(f"cannot read label image {path}: {first_line(e)}") from None


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
        raise DataError(f"cannot read image {path}: {first_line(e)}") from None
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



# --------------------------------------------------------------------------- finding a section


def locate_section(name: str | None, data_root: str | None) -> tuple[Path, str, list[str]]:
    """Find a section folder: (path, source, looked_in). Source: data-root, path or embedded."""
    if name is None:
        found, tried = find_in_roots(data_root, [DEFAULT_FOLDER])
        if found is not None:
            return found, "data-root", tried
        return EMBEDDED, "embedded", tried + [str(EMBEDDED)]
    p = Path(name).expanduser()
    if p.is_absolute():
        if p.is_dir():
            return p, "path", [str(p)]
        raise DataError(f"section folder {p} does not exist")
    found, tried = find_in_roots(data_root, [name])
    if found is not None:
        return found, "data-root", tried
    if p.is_dir():
        return p.resolve(), "path", tried + [str(p.resolve())]
    raise DataError(f"section '{name}' not found; looked in: {', '.join(tried + [str(p.resolve())])}")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (to check the CA1 files against :data:`CA1_SHA256`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
