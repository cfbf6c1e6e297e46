"""Opening a slide: OpenSlide first, then tifffile, then PIL for plain images.

One small interface (:class:`SlideReader`) hides the backends so tiling and
bags never care what the file was:

* **OpenSlide** (``openslide-python`` with the ``openslide-bin`` wheel, so no
  system library is needed) reads Aperio SVS, Hamamatsu NDPI, generic tiled
  TIFF, Philips, Ventana, MIRAX, ... and gives levels, downsamples and mpp.
* **tifffile** reads TIFF/OME-TIFF pyramids OpenSlide refuses or misreads:
  OpenSlide's ``generic-tiff`` reader accepts a tiled OME-TIFF but sees only
  its first directory (no SubIFD levels, no OME mpp), so an OME-TIFF it
  claims goes to tifffile instead. It has no random-access region reader without zarr, so a
  level is decoded whole the first time it is read and kept; fine for the
  modest files that end up here, and documented as the fallback it is.
* **PIL** reads PNG/JPEG (any size: the decompression-bomb guard is lifted for
  files the user named) as a one-level slide.

Every failure to open is a one-line :class:`~milbench.api.DataError` that
names the slide, because a manifest can list hundreds of files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from milbench.api import DataError, first_line

PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg")


class SlideReader:
    """A pyramidal image: level sizes, downsamples, mpp, and RGB region reads.

    Coordinates follow OpenSlide: ``read(level, x, y, w, h)`` takes the top-left
    corner ``(x, y)`` in level-0 pixels and a size in pixels *of that level*,
    and returns uint8 (h, w, 3). Areas outside the slide read as white.
    """

    backend = "none"

    def __init__(self, path: Path, slide_id: str):
        self.path = path
        self.slide_id = slide_id
        self.format = "unknown"
        self.level_dimensions: list[tuple[int, int]] = []  # (w, h)
        self.level_downsamples: list[float] = []
        self.mpp: float | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def thumbnail_level(self, max_side: int = 2048) -> int:
        """The finest level whose longer side is at most ``max_side`` (else the coarsest)."""
        for lv, (w, h) in enumerate(self.level_dimensions):
            if max(w, h) <= max_side:
                return lv
        return self.level_count - 1

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB overview of the whole slide and its downsample from level 0.

        Read from the finest level that fits ``max_side``; if even the
        coarsest level is larger, it is subsampled (a plain image has one level)."""
        lv = self.thumbnail_level(max_side)
        w, h = self.level_dimensions[lv]
        img = self.read(lv, 0, 0, w, h)
        ds = self.level_downsamples[lv]
        step = int(np.ceil(max(w, h) / max_side))
        if step > 1:
            img = img[::step, ::step]
            ds *= step
        return img, ds

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "backend": self.backend, "levels": self.level_count,
                "dimensions": list(self.dimensions), "downsamples": [round(d, 3) for d in self.level_downsamples],
                "mpp": self.mpp}


class _OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: Path, slide_id: str, fmt: str):
        import openslide

        super().__init__(path, slide_id)
        try:
            self._s = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise DataError(f"slide '{slide_id}': OpenSlide cannot read {path}: {exc}") from None
        self.format = fmt
        self.level_dimensions = [tuple(map(int, d)) for d in self._s.level_dimensions]
        self.level_downsamples = [float(d) for d in self._s.level_downsamples]
        mpp = self._s.properties.get("openslide.mpp-x")
        try:
            self.mpp = float(mpp) if mpp not in (None, "") and float(mpp) > 0 else None
        except ValueError:
            self.mpp = None

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        try:
            rgba = np.asarray(self._s.read_region((int(x), int(y)), int(level), (int(w), int(h))))
        except openslide.OpenSlideError as exc:
            raise DataError(f"slide '{self.slide_id}': reading {self.path} failed at level {level} "
                            f"({x}, {y}, {w}x{h}): {exc}") from None
        rgb = rgba[..., :3].copy()
        # OpenSlide returns transparent (0,0,0,0) outside the scanned area: paint it white (glass).
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def close(self) -> None:
        self._s.close()


class _ArrayLevelsReader(SlideReader):
    """Levels held as decoded arrays (tifffile fallback, PIL): read by slicing."""

    def __init__(self, path: Path, slide_id: str):
        super().__init__(path, slide_id)
        self._levels: list[Any] = []

    def _level(self, level: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        arr = self._level(level)
        ds = self.level_downsamples[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        out = np.full((int(h), int(w), 3), 255, np.uint8)
        H, W = arr.shape[:2]
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = arr[y0:y1, x0:x1, :3]
        return out


def _rgb(arr: np.ndarray, slide_id: str, path: Path) -> np.ndarray:
    """uint8 (h, w, 3) from grayscale/RGB/RGBA arrays of 8 or 16 bits."""
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "ui":
            raise DataError(f"slide '{slide_id}': {path} holds {arr.dtype} pixels; expected 8- or 16-bit RGB")
        arr = (arr.astype(np.float32) * (255.0 / max(1, int(np.iinfo(arr.dtype).max)))).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"slide '{slide_id}': {path} has pixel shape {arr.shape}; expected an RGB image")
    return arr[..., :3]


class _TiffReader(_ArrayLevelsReader):
    backend = "tifffile"

    def __init__(self, path: Path, slide_id: str):
        import tifffile

        super().__init__(path, slide_id)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as exc:  # tifffile raises many types for a bad file
            raise DataError(f"slide '{slide_id}': {path} is not a slide OpenSlide or tifffile can read "
                            f"({first_line(exc)[:160]})") from None
        self._series = levels
        self.format = "ome-tiff" if self._tif.is_ome else "tiff"
        dims = []
        for lv in levels:
            shape = lv.shape
            axes = lv.axes
            h, w = shape[axes.index("Y")], shape[axes.index("X")]
            dims.append((int(w), int(h)))
        self.level_dimensions = dims
        self.level_downsamples = [dims[0][0] / d[0] for d in dims]
        self.mpp = _tiff_mpp(self._tif)
        self._levels = [None] * len(levels)

    def _level(self, level: int) -> np.ndarray:
        if self._levels[level] is None:
            try:
                arr = self._series[level].asarray()
            except Exception as exc:
                raise DataError(f"slide '{self.slide_id}': decoding level {level} of {self.path} failed "
                                f"({first_line(exc)[:160]})") from None
            axes = self._series[level].axes
            if axes.startswith("S") or (arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4)):
                arr = np.moveaxis(arr, 0, -1)
            self._levels[level] = _rgb(np.squeeze(arr) if arr.ndim > 3 else arr, self.slide_id, self.path)
        return self._levels[level]

    def close(self) -> None:
        self._tif.close()


#: OME ``PhysicalSizeXUnit`` values -> micrometres per unit (OME's default unit is µm).
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


def _tiff_mpp(tif: Any) -> float | None:
    """mpp from OME PhysicalSizeX (in its PhysicalSizeXUnit, µm by default) or from
    XResolution with a cm/inch unit. An OME unit we do not know gives no mpp rather
    than a wrong one."""
    try:
        if tif.is_ome and tif.ome_metadata:
            import re

            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            if m:
                u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
                scale = _OME_UNIT_UM.get(u.group(1) if u else "µm")
                return float(m.group(1)) * scale if scale is not None else None
        page = tif.pages[0]
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            px_per_unit = num / den if den else 0
            if px_per_unit > 0 and unit in (2, 3):
                return (2.54e4 if unit == 2 else 1e4) / px_per_unit
    except Exception:
        return None
    return None


class _PlainReader(_ArrayLevelsReader):
    backend = "pil"

    def __init__(self, path: Path, slide_id: str):
        from PIL import Image

        super().__init__(path, slide_id)
        Image.MAX_IMAGE_PIXELS = None  # the user named this file: a large image is the point
        try:
            with Image.open(path) as im:
                self.format = (im.format or path.suffix.lstrip(".")).lower()
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise DataError(f"slide '{slide_id}': {path} is not an image PIL can read "
                            f"({first_line(exc)[:160]})") from None
        self._arr = arr
        self.level_dimensions = [(int(arr.shape[1]), int(arr.shape[0]))]
        self.level_downsamples = [1.0]
        self.mpp = None

    def _level(self, level: int) -> np.ndarray:
        return self._arr


def open_slide(path: Path, slide_id: str) -> SlideReader:
    """Open ``path`` with the first backend that can read it, or raise a one-line DataError."""
    if not path.exists():
        raise DataError(f"slide '{slide_id}': file {path} does not exist")
    if not path.is_file():
        raise DataError(f"slide '{slide_id}': {path} is not a file")
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return _PlainReader(path, slide_id)
    try:
        import openslide

        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if fmt and not (fmt == "generic-tiff" and _is_ome_tiff(path)):
        return _OpenSlideReader(path, slide_id, fmt)
    return _TiffReader(path, slide_id)


def _is_ome_tiff(path: Path) -> bool:
    """Whether the first directory carries OME-XML (reads the header and first IFD only)."""
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            return bool(tif.is_ome)
    except Exception:
        return False


def slide_checksum(path: Path, sample: int = 1 << 20) -> str:
    """A content checksum that is cheap for multi-gigabyte slides: sha256 over the file
    size, its first and last MiB and 16 evenly spaced 64 KiB blocks (the whole file when
    it is under 32 MiB). Keys the tile-coordinate cache, so an edited or replaced
    slide is re-tiled while a copied or renamed one is not."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 32 * sample:
            for chunk in iter(lambda: f.read(sample), b""):
                h.update(chunk)
        else:
            offsets = [0, size - sample] + [int(size * k / 17) for k in range(1, 17)]
            for off in offsets:
                f.seek(off)
                h.update(f.read(sample if off in (0, size - sample) else 1 << 16))
    return h.hexdigest()[:20]


def file_sha256(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
