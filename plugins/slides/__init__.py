"""``slides``: your own whole-slide images, one slide = one bag, its tissue tiles the instances.

A CSV manifest (``slide_id,path,label[,split][,annotation]``; see
:mod:`.manifest`) names the slides -- Aperio SVS, Hamamatsu NDPI, generic
tiled TIFF and everything else OpenSlide reads, TIFF/OME-TIFF through tifffile
where OpenSlide cannot, plain PNG/JPEG as one-level slides (:mod:`.reader`).
Each slide is tiled once per setting (tissue by Otsu on saturation, a regular
grid at the requested mpp or level; :mod:`.tiling`) and the tile coordinates
are cached beside the results; tiles are read lazily (:mod:`.bags`): grad-accum reads a chunk at a
time, sampled the drawn tiles, streamingclam the tissue bounding box as a
uint8 image converted per streamed tile, abmil the whole bag because it asks.
Optional GeoJSON annotations (QuPath) give tile labels, hence Dice and the
instance-supervised transcriptome-cnn (:mod:`.annotations`).
``python -m milbench_plugins.slides.generator`` writes small real pyramidal
slides to try it on (:mod:`.generator`).

The record's ``data`` block says ``source: slides`` with the manifest's path
and sha256, the split of every slide, and per slide its format, levels, mpp,
the level read and the tile count.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from milbench.api import (DataSpec, Dataset, DataStatus, MilbenchError, Param, Splits, derived_cache_dir, hookimpl,
                          resolve)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .tiling import TilingKeys

PARAMS: dict[str, Param] = {
    "manifest": Param(None, str, "slide manifest CSV (slide_id,path,label[,split][,annotation]); none: "
                      "manifest.csv or slides.csv in a data root", nullable=True),
    "instance_size": Param(64, int, "tile side in pixels at the tile resolution", low=8, high=4096),
    "bag_size": Param(None, int, "cap on tiles per bag, drawn at random (seeded by run seed and slide); none: "
                      "every tissue tile", low=1, nullable=True),
    "mpp": Param(None, float, "tile resolution in µm per pixel (needs mpp in the slide); none: use 'level'",
                 low=0, low_open=True, nullable=True),
    "level": Param(0, int, "pyramid level to tile when mpp and downsample are none (0: full resolution)", low=0),
    "downsample": Param(None, float, "tile at this downsample from level 0 when mpp is none (works for one-level "
                        "PNG/JPEG too; read from the nearest finer level and resized)", low=1, nullable=True),
    "tissue_fraction": Param(0.25, float, "keep a tile when at least this share of it is tissue", low=0, high=1,
                             low_open=True),
    "min_saturation": Param(0.05, float, "floor of the Otsu saturation threshold (a blank slide has no tissue)",
                            low=0, high=1),
    "thumbnail_size": Param(2048, int, "longer side of the overview tissue is detected on", low=64),
    "annotation_class": Param("Tumor", str, "GeoJSON class whose regions are key (case-insensitive; *: any class)"),
    "annotation_overlap": Param(0.5, float, "a tile is key when this share of it lies in a key region", low=0,
                                high=1, low_open=True),
    "val_fraction": Param(0.2, float, "share of slides (per label) for validation when the manifest has no split",
                          low=0, high=0.8),
    "test_fraction": Param(0.3, float, "share of slides (per label) for test when the manifest has no split",
                           low=0, high=0.8),
    "tile_cache": Param(None, str, "folder for cached tile coordinates; none: <results>/cache/slide-tiles in a "
                        "run (beside its records), <user cache>/milbench/slide-tiles for 'milbench data'",
                        nullable=True),
}


def _cache_dir(value: str | None) -> Path:
    """``tile_cache``, else the harness's cache beside the results (:func:`derived_cache_dir`)."""
    return Path(value).expanduser() if value else derived_cache_dir() / "slide-tiles"


def _tiling_keys(cfg: Mapping[str, Any]) -> TilingKeys:
    from .tiling import TilingKeys

    return TilingKeys(int(cfg["instance_size"]), cfg["mpp"], int(cfg["level"]), float(cfg["tissue_fraction"]),
                      float(cfg["min_saturation"]), int(cfg["thumbnail_size"]), cfg["downsample"])


class Slides(Dataset):
    name = "slides"
    description = "your whole-slide images from a CSV manifest (OpenSlide / tifffile / PNG-JPEG); one slide = one bag"
    params = PARAMS
    smoke = {"instance_size": 32, "bag_size": 16}
    augmentation = "per tile: dihedral flips (tissue has no up), contrast +-10%, brightness +-0.1 std"

    def augment(self, instances: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        """Orientation-free tissue: any of the 8 flips/rotations, and a mild stain/contrast shift.
        The harness applies it to a slide bag tile by tile as the tiles are read
        (``LazyBag.augmented``), never by reading the whole slide."""
        from milbench.api import color_jitter, random_flips

        return color_jitter(random_flips(instances, generator), generator, brightness=0.1, contrast=0.1)

    def _config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        cfg = {k: p.default for k, p in self.params.items()}
        cfg.update({k: v for k, v in config.items() if k in self.params})
        return {k: self.params[k].validate(k, v) for k, v in cfg.items()}

    def spec(self, cfg: Mapping[str, Any]) -> DataSpec:
        return DataSpec(channels=3, instance_size=int(cfg["instance_size"]), n_classes=2,
                        instance_classes=("other", str(cfg["annotation_class"])), key_class=1)

    # -- milbench data -------------------------------------------------------------------------
    def status(self, data_root: str | None, overrides: Sequence[str] = ()) -> DataStatus:
        """The manifest milbench would read and, per slide, what tiling finds at these settings."""
        from .manifest import MANIFEST_NAMES, find_manifest, read_manifest

        try:
            cfg = resolve(self.params, [], list(overrides or []))
        except MilbenchError as exc:
            return DataStatus(self.name, False, False, None, "error", str(exc), [])
        try:
            path, looked = find_manifest(cfg["manifest"], data_root)
        except MilbenchError as exc:
            return DataStatus(self.name, False, False, None, "missing", str(exc), [],
                              f"write a manifest ({'/'.join(MANIFEST_NAMES)}) or --set manifest=PATH")
        try:
            summary = self.describe(read_manifest(path), cfg, seed=0)
        except MilbenchError as exc:
            return DataStatus(self.name, True, False, str(path), "partial", str(exc), looked)
        return DataStatus(self.name, True, True, str(path), "full", summary, looked)

    def describe(self, manifest: Any, cfg: Mapping[str, Any], seed: int) -> str:
        """A few lines: slides per split and label, formats, levels, mpp, tiles per slide."""
        import numpy as np

        from .manifest import assign_splits
        from .reader import open_slide
        from .tiling import tile_slide

        splits = assign_splits(manifest, seed, cfg["val_fraction"], cfg["test_fraction"])
        keys = _tiling_keys(cfg)
        formats: dict[str, int] = {}
        levels, mpps, tiles = [], [], []
        for e in manifest.entries:
            r = open_slide(e.path, e.slide_id)
            try:
                formats[r.format] = formats.get(r.format, 0) + 1
                levels.append(r.level_count)
                mpps.append(r.mpp)
                tiles.append(len(tile_slide(r, keys, _cache_dir(cfg["tile_cache"])).cells))
            finally:
                r.close()
        split_txt = "; ".join(f"{s} {len(v)} ({sum(e.label for e in v)} pos / {sum(1 - e.label for e in v)} neg)"
                              for s, v in splits.items())
        known = [m for m in mpps if m]
        mpp_txt = (f"{min(known):.3g}-{max(known):.3g} µm/px" if known else "none") + \
                  (f" ({len(mpps) - len(known)} without)" if known and len(known) < len(mpps) else "")
        res = (f"mpp={cfg['mpp']:g}" if cfg["mpp"] else f"downsample={cfg['downsample']:g}" if cfg["downsample"]
               else f"level={cfg['level']}")
        annotated = sum(e.annotation is not None for e in manifest.entries)
        return (f"{len(manifest.entries)} slides, {'manifest' if manifest.has_splits else 'seeded'} splits: {split_txt}\n"
                f"formats: {', '.join(f'{k} x{v}' for k, v in sorted(formats.items()))}; levels "
                f"{min(levels)}-{max(levels)}; mpp {mpp_txt}; {annotated} annotated\n"
                f"tiles per slide at instance_size={cfg['instance_size']}, {res}: min {min(tiles)}, median "
                f"{int(np.median(tiles))}, max {max(tiles)}; manifest sha256 {manifest.sha256[:16]}")

    def verify(self, data_root: str | None, quick: bool = False) -> list[str]:
        """Open every slide and annotation the manifest lists; one line per problem."""
        from .annotations import read_geojson
        from .manifest import find_manifest, read_manifest
        from .reader import open_slide

        try:
            manifest = read_manifest(find_manifest(None, data_root)[0], check_files=False)
        except MilbenchError as exc:
            return [str(exc)]
        problems = []
        for e in manifest.entries:
            try:
                r = open_slide(e.path, e.slide_id)
                r.read(r.level_count - 1, 0, 0, 16, 16)
                r.close()
                if e.annotation is not None:
                    read_geojson(e.annotation, e.slide_id)
            except MilbenchError as exc:
                problems.append(str(exc))
        return problems

    # -- bags ----------------------------------------------------------------------------------
    def load(self, config: Mapping[str, Any], seed: int, data_root: str | None) -> Splits:
        """Read the manifest, split by slide, tile every slide (cached), plan lazy bags."""
        import hashlib
        import time

        import numpy as np

        from milbench.api import ids_hash

        from .annotations import class_names, key_overlap, read_geojson
        from .bags import SlideBags, reader_for
        from .manifest import assign_splits, find_manifest, read_manifest
        from .tiling import tile_slide

        cfg = self._config(config)
        t0 = time.perf_counter()
        mpath, _ = find_manifest(cfg["manifest"], data_root)
        manifest = read_manifest(mpath)
        splits = assign_splits(manifest, seed, cfg["val_fraction"], cfg["test_fraction"])
        keys = _tiling_keys(cfg)
        cache = _cache_dir(cfg["tile_cache"])
        items: dict[str, list[dict[str, Any]]] = {}
        per_slide: list[dict[str, Any]] = []
        for split, entries in splits.items():
            items[split] = []
            for e in entries:
                reader = reader_for(e.path, e.slide_id)
                tiling = tile_slide(reader, keys, cache)
                n_tissue = len(tiling.cells)
                bbox = tiling.bbox
                keep = np.arange(n_tissue)
                if cfg["bag_size"] is not None and n_tissue > cfg["bag_size"]:
                    digest = hashlib.sha256(f"{seed}:{e.slide_id}".encode()).digest()
                    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
                    keep = np.sort(rng.choice(n_tissue, cfg["bag_size"], replace=False))
                cells = tiling.cells[keep]
                xy0 = tiling.xy0(keep)
                annotated = e.annotation is not None
                labels = np.zeros(len(keep), np.int64)
                classes: list[str] = []
                if annotated:
                    regions = read_geojson(e.annotation, e.slide_id)
                    classes = class_names(regions)
                    overlap = key_overlap(regions, cfg["annotation_class"], xy0, tiling.resolution.step0)
                    labels = (overlap >= cfg["annotation_overlap"]).astype(np.int64)
                ids = [f"{e.slide_id}:{int(x)}:{int(y)}" for x, y in xy0]
                items[split].append({"path": e.path, "slide_id": e.slide_id, "label": e.label, "res": tiling.resolution,
                                     "cells": cells, "xy0": xy0, "bbox": bbox, "instance_labels": labels,
                                     "annotated": annotated, "ids": ids})
                r = tiling.resolution
                per_slide.append({"slide_id": e.slide_id, "split": split, "label": e.label, **reader.describe(),
                                  "read_level": r.level, "tile_mpp": r.mpp, "tile_downsample": round(r.downsample, 4),
                                  "tissue_tiles": n_tissue, "tiles": int(len(keep)),
                                  "bbox_px": [(bbox[1] - bbox[0]) * r.tile_size, (bbox[3] - bbox[2]) * r.tile_size],
                                  "tiles_from_cache": tiling.from_cache,
                                  "annotation": str(e.annotation) if annotated else None,
                                  "annotation_classes": classes, "key_tiles": int(labels.sum()) if annotated else None})
        bags = {s: SlideBags(v) for s, v in items.items()}
        info = {
            "source": "slides",
            "manifest": str(mpath),
            "manifest_sha256": manifest.sha256,
            "files": [str(e.path) for e in manifest.entries],
            "split_seed": int(seed),
            "split_rule": "manifest split column" if manifest.has_splits else
                          f"seeded, stratified by label, by slide (val {cfg['val_fraction']:g}, test {cfg['test_fraction']:g})",
            "slides": {s: [it["slide_id"] for it in v] for s, v in items.items()},
            "slides_per_split": {s: {"n": len(v), "positive": sum(it["label"] for it in v)} for s, v in items.items()},
            "tiling": {**{k: v for k, v in cfg.items() if k in ("instance_size", "mpp", "level", "downsample", "tissue_fraction",
                                                              "min_saturation", "thumbnail_size", "bag_size")},
                       "cache": str(cache)},
            "per_slide": per_slide,
            "annotated_slides": sum(1 for p in per_slide if p["annotation"]),
            "instance_id_hash": {s: ids_hash(b.instance_ids()) for s, b in bags.items()},
            "setup_tiling_s": round(time.perf_counter() - t0, 3),
        }
        return Splits(self.spec(cfg), bags["train"], bags["val"], bags["test"], info=info)


@hookimpl
def milbench_register_datasets(register: Callable[[Dataset], None]) -> None:
    register(Slides())
