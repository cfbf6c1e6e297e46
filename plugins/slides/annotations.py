"""Region annotations: GeoJSON polygons (as QuPath exports them) -> instance labels.

QuPath's "Export objects as GeoJSON" writes a FeatureCollection (or, from older
versions, a bare list of Features) whose geometries are Polygons or
MultiPolygons in level-0 pixel coordinates, with the class in
``properties.classification.name`` (older: ``properties.classification`` as a
string, or ``properties.name``). A tile's label is the key class when at least
``annotation_overlap`` of it lies inside a polygon of the key class (holes
excluded); the share is estimated on an 8 x 8 lattice of points per tile --
exact to 1/64 of a tile, which is far finer than any overlap threshold a user
would pick, and vectorised over all tiles at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milbench.api import DataError, first_line


@dataclass
class Region:
    """One polygon: the outer ring and its holes, (k, 2) arrays of level-0 (x, y)."""

    cls: str
    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)


def _class_name(props: Any) -> str:
    if not isinstance(props, dict):
        return ""
    c = props.get("classification")
    if isinstance(c, dict):
        return str(c.get("name", ""))
    if isinstance(c, str):
        return c
    return str(props.get("name", "") or props.get("class", ""))


def _ring(coords: Any, where: str) -> np.ndarray:
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 3:
        raise DataError(f"{where}: a polygon ring needs at least 3 [x, y] points")
    return arr[:, :2]


def read_geojson(path: Path, slide_id: str) -> list[Region]:
    """All polygons of a GeoJSON file with their class names; one-line DataError if it does not parse."""
    where = f"slide '{slide_id}': annotation {path.name}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where} does not parse as GeoJSON: {' '.join(str(exc).split())}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise DataError(f"{where} is not a GeoJSON FeatureCollection, Feature or list of Features")
    if not isinstance(features, list):
        raise DataError(f"{where}: 'features' is not a list")
    regions: list[Region] = []
    try:
        for k, feat in enumerate(features):
            geom = feat.get("geometry") if isinstance(feat, dict) else None
            if not isinstance(geom, dict):
                raise DataError(f"{where}: feature {k} has no geometry")
            cls = _class_name(feat.get("properties"))
            kind = geom.get("type")
            if kind == "Polygon":
                polys = [geom["coordinates"]]
            elif kind == "MultiPolygon":
                polys = geom["coordinates"]
            else:
                continue  # points, lines: not regions
            for poly in polys:
                rings = [_ring(r, where) for r in poly]
                regions.append(Region(cls, rings[0], rings[1:]))
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: malformed geometry ({first_line(exc)})") from None
    return regions


def key_overlap(regions: list[Region], key_class: str, xy0: np.ndarray, step0: int, k: int = 8) -> np.ndarray:
    """Share (0..1) of each tile (level-0 corner ``xy0`` (n, 2), side ``step0``) inside
    a key-class polygon (class names compared case-insensitively; ``*``: every class)."""
    from matplotlib.path import Path as MplPath

    n = len(xy0)
    want = key_class.strip().lower()
    keyed = [r for r in regions if want == "*" or r.cls.strip().lower() == want]
    if n == 0 or not keyed:
        return np.zeros(n)
    offs = (np.arange(k) + 0.5) / k * step0
    ox, oy = np.meshgrid(offs, offs)
    pts = (xy0[:, None, :].astype(np.float64) + np.stack([ox.ravel(), oy.ravel()], axis=1)[None]).reshape(-1, 2)
    inside = np.zeros(len(pts), bool)
    for r in keyed:
        lo, hi = r.outer.min(axis=0), r.outer.max(axis=0)
        cand = np.flatnonzero((pts[:, 0] >= lo[0]) & (pts[:, 0] <= hi[0]) & (pts[:, 1] >= lo[1]) & (pts[:, 1] <= hi[1]))
        if not len(cand):
            continue
        hit = MplPath(r.outer).contains_points(pts[cand])
        for hole in r.holes:
            hit &= ~MplPath(hole).contains_points(pts[cand])
        inside[cand[hit]] = True
    return inside.reshape(n, k * k).mean(axis=1)


def class_names(regions: list[Region]) -> list[str]:
    return sorted({r.cls for r in regions})
