"""Write small but real pyramidal slides (and their manifest and GeoJSON) to try ``slides`` on.

No public whole-slide image can be downloaded on every machine, so the tests
and the README's example make their own. The files are real formats, not
mock-ups: tiled, JPEG-compressed, several pyramid levels (each half the size
of the one above), mpp in the metadata, written with tifffile as

* ``svs``: Aperio-style SVS (the ``Aperio Image Library`` description with
  ``MPP`` and ``AppMag``; OpenSlide's ``aperio`` reader opens it),
* ``tiff``: generic tiled TIFF, levels as successive directories, mpp as
  X/YResolution in centimetres (OpenSlide's ``generic-tiff`` reader),
* ``ome-tiff``: an OME-TIFF pyramid laid out as bfconvert and tifffile write
  them (BigTIFF, one OME image, the reduced levels as SubIFDs of level 0 with
  ``NewSubfileType`` 1, mpp only as the OME ``PhysicalSizeX``/``Y`` in µm);
  OpenSlide cannot read its levels, so the reader's tifffile path opens it,
* ``png`` / ``jpg``: a plain image (one level, no mpp) -- the PIL path.

Content the label depends on: MNIST digits (from ``MNIST/raw`` under a data
root, else the 10,000 test digits shipped with milbench) drawn in a dark
"haematoxylin" purple on pink "tissue" blobs on a light grey glass
background. In a positive slide the digits inside one irregular region are
the key digit (9) and that region is written to the slide's GeoJSON as a
QuPath-style ``Tumor`` annotation; everywhere else, and in negative slides,
digits are 0-8 (negative slides carry a ``Stroma`` region, which the default
``annotation_class`` ignores). A tile of ``digit_px`` at level 0 holds about
one digit, so "is there a 9" is learnable from a tile.

Usage::

    python -m milbench_plugins.slides.generator OUT_DIR [--n 12] [--size 1536x1024]
        [--formats svs,tiff] [--levels 3] [--mpp 0.5] [--digit-px 32] [--seed 0] [--data-root DIR]

writes ``OUT_DIR/manifest.csv`` (``slide_id,path,label,annotation``) beside the
slides; ``milbench run -m grad-accum -d slides --set manifest=OUT_DIR/manifest.csv``
then trains on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

BACKGROUND = np.array([236, 233, 238], np.float32)  # glass: light and nearly grey
TISSUE = np.array([232, 165, 200], np.float32)  # eosin pink
INK = np.array([80, 30, 120], np.float32)  # haematoxylin purple
KEY_DIGIT = 9
FORMATS = ("svs", "tiff", "ome-tiff", "png", "jpg")
#: File suffix per format where it is not ``"." + format``.
SUFFIXES = {"ome-tiff": ".ome.tiff"}


def load_digits(data_root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits (n, 28, 28) uint8 and labels: a data root's ``MNIST/raw`` test file, else the
    copy shipped inside milbench."""
    from milbench.api import candidate_roots
    from milbench_plugins.qmnist.idx import find_file, read_idx

    folders = [Path(r) / "MNIST" / "raw" for r in candidate_roots(data_root)]
    folders.append(Path(__file__).resolve().parent.parent / "data" / "mnist")
    for folder in folders:
        img, lab = find_file(folder, "t10k-images-idx3-ubyte"), find_file(folder, "t10k-labels-idx1-ubyte")
        if img is not None and lab is not None:
            return read_idx(img), read_idx(lab)
    from milbench.api import DataError

    raise DataError(f"no MNIST digits found for the slide generator (looked in {', '.join(map(str, folders))})")


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float, k: int = 14) -> np.ndarray:
    """An irregular closed polygon around (cx, cy) (a tumour-like blob outline), (k+1, 2) x/y."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * rng.uniform(0.7, 1.15, k)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
    return np.vstack([pts, pts[:1]])


def _resize_digit(d: np.ndarray, px: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(d).resize((px, px), Image.BILINEAR), np.float32) / 255.0


def render_slide(rng: np.random.Generator, width: int, height: int, positive: bool, digits: np.ndarray,
                 labels: np.ndarray, digit_px: int = 32) -> tuple[np.ndarray, list[dict]]:
    """One slide's level-0 RGB pixels and its annotation features (level-0 coordinates)."""
    from matplotlib.path import Path as MplPath

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue = np.zeros((height, width), bool)
    n_blobs = int(rng.integers(1, 3)) + 1
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        ax, ay = rng.uniform(0.2, 0.33) * width, rng.uniform(0.2, 0.33) * height
        tissue |= ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
    del xx, yy
    noise = rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    img = np.where(tissue[..., None], TISSUE, BACKGROUND) + noise
    # the region: a key (Tumor) region in a positive slide, a Stroma region in a negative one
    ys, xs = np.nonzero(tissue[::8, ::8])
    k = int(rng.integers(len(ys)))
    cy, cx = ys[k] * 8.0, xs[k] * 8.0
    poly = _polygon(rng, cx, cy, 0.12 * min(width, height) + 2 * digit_px)
    region = MplPath(poly)
    key_pool = np.flatnonzero(labels == KEY_DIGIT)
    other_pool = np.flatnonzero(labels != KEY_DIGIT)
    for r in range(0, height - digit_px + 1, digit_px):
        for c in range(0, width - digit_px + 1, digit_px):
            cyc, cxc = r + digit_px / 2, c + digit_px / 2
            if not tissue[int(cyc), int(cxc)] or rng.random() < 0.15:
                continue
            in_key = positive and region.contains_point((cxc, cyc))
            d = digits[rng.choice(key_pool if in_key else other_pool)]
            a = _resize_digit(d, digit_px)[..., None]
            cell = img[r:r + digit_px, c:c + digit_px]
            img[r:r + digit_px, c:c + digit_px] = cell * (1 - a) + INK * a
    cls = "Tumor" if positive else "Stroma"
    features = [{"type": "Feature", "id": f"region-{cls.lower()}",
                 "geometry": {"type": "Polygon", "coordinates": [poly.round(1).tolist()]},
                 "properties": {"objectType": "annotation", "classification": {"name": cls, "color": [200, 0, 0]}}}]
    return np.clip(img, 0, 255).astype(np.uint8), features


def pyramid(level0: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level 0 and ``levels - 1`` halvings (2 x 2 box filter), stopping before a side drops under 64."""
    out = [level0]
    while len(out) < levels and min(out[-1].shape[:2]) >= 128:
        a = out[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].astype(np.uint16)
        out.append(((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8))
    return out


def write_slide(path: Path, level0: np.ndarray, fmt: str, levels: int = 3, mpp: float = 0.5, tile: int = 256,
                quality: int = 85, compression: str = "jpeg") -> Path:
    """Write ``level0`` (H, W, 3) uint8 as a tiled pyramid in ``fmt`` (svs, tiff, ome-tiff) or a plain png/jpg.

    ``compression``: tifffile's name for the tiles' codec (``jpeg``, the scanners' choice; ``zlib``
    (deflate) for lossless tiles, so a read-back equals ``level0`` exactly)."""
    import tifffile
    from PIL import Image

    path = path.with_suffix(SUFFIXES.get(fmt, "." + fmt))
    if fmt in ("png", "jpg"):
        Image.fromarray(level0).save(path, quality=quality) if fmt == "jpg" else Image.fromarray(level0).save(path)
        return path
    pyr = pyramid(level0, levels)
    h0, w0 = level0.shape[:2]
    ome = fmt == "ome-tiff"
    big = ome or level0.nbytes > 2**31  # BigTIFF, as tifffile's OME pyramid example writes it
    with tifffile.TiffWriter(path, bigtiff=big, ome=ome) as tw:
        for i, lv in enumerate(pyr):
            h, w = lv.shape[:2]
            ds = w0 / w
            opts = dict(tile=(tile, tile), compression=compression, photometric="rgb", metadata=None,
                        compressionargs={"level": quality} if compression == "jpeg" else None)
            if fmt == "svs":
                if i == 0:
                    desc = (f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) "
                            f"JPEG/RGB Q={quality}|AppMag = {round(10 / mpp)}|MPP = {mpp}|Filename = {path.stem}")
                else:
                    desc = f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} -> {w}x{h} - |MPP = {mpp * ds:g}"
                tw.write(lv, description=desc, **opts)
            elif fmt == "tiff":
                px_per_cm = 1e4 / (mpp * ds)
                tw.write(lv, resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                         subfiletype=0 if i == 0 else 1, **opts)
            elif ome:
                if i == 0:  # the OME image; the next len(pyr) - 1 writes become its SubIFDs
                    opts["metadata"] = {"axes": "YXS", "Name": path.name.split(".")[0],
                                        "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                                        "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
                    tw.write(lv, subifds=len(pyr) - 1, **opts)
                else:
                    del opts["metadata"]
                    tw.write(lv, subfiletype=1, **opts)
            else:
                raise ValueError(f"unknown slide format {fmt!r}; valid: {', '.join(FORMATS)}")
    return path


def generate(out_dir: Path, n: int = 12, size: tuple[int, int] = (1536, 1024), formats: Sequence[str] = ("svs", "tiff"),
             levels: int = 3, mpp: float = 0.5, digit_px: int = 32, seed: int = 0, data_root: str | None = None,
             splits: bool = False) -> Path:
    """Write ``n`` slides (half positive, formats alternating) with GeoJSON and a manifest; return its path.

    ``splits`` also fills the manifest's split column (60/20/20 by slide, balanced)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits, labels = load_digits(data_root)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        fmt = formats[(i // 2) % len(formats)]
        sid = f"slide-{i:03d}"
        img, features = render_slide(rng, size[0], size[1], positive, digits, labels, digit_px)
        path = write_slide(out_dir / sid, img, fmt, levels, mpp)
        ann = out_dir / f"{sid}.geojson"
        ann.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        split = ""
        if splits:
            k = i // 2
            split = "test" if k % 5 == 4 else "val" if k % 5 == 3 else "train"
        rows.append((sid, path.name, int(positive), split, ann.name))
    manifest = out_dir / "manifest.csv"
    header = "slide_id,path,label,split,annotation" if splits else "slide_id,path,label,annotation"
    lines = [header] + [",".join(str(v) for v in (r if splits else (r[0], r[1], r[2], r[4]))) for r in rows]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m milbench_plugins.slides.generator",
                                 description="write small pyramidal test slides, GeoJSON annotations and a manifest")
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=12, help="slides (half positive)")
    ap.add_argument("--size", default="1536x1024", help="level-0 WIDTHxHEIGHT")
    ap.add_argument("--formats", default="svs,tiff", help=f"comma-separated, cycled: {', '.join(FORMATS)}")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel written to the metadata")
    ap.add_argument("--digit-px", type=int, default=32, help="side of one digit at level 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", action="store_true", help="fill the manifest's split column")
    ap.add_argument("--data-root", default=None, help="where MNIST/raw is looked for first")
    a = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        ap.error(f"bad --size {a.size!r}; expected WIDTHxHEIGHT, e.g. 1536x1024")
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {', '.join(bad)}; valid: {', '.join(FORMATS)}")
    path = generate(Path(a.out_dir), a.n, (w, h), formats, a.levels, a.mpp, a.digit_px, a.seed, a.data_root, a.splits)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
