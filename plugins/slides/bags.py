"""Slides as lazy bags: one slide = one bag, its tissue tiles the instances.

Nothing here holds a slide's pixels longer than a read needs:

* :class:`SlideInstances` reads the asked tiles (a chunk for grad-accum, a
  sample for sampled, everything for abmil when it asks for
  ``bag.instances``) straight from the slide and converts only those to float.
* :class:`SlideImage` is the bag image the streaming method sees: the tissue
  bounding box at the tile resolution. It is read from the slide in blocks
  into one **uint8** array (3 bytes a pixel, a quarter of float32) the first
  time a crop is asked, and each streamed tile is converted to float on its
  own -- so the float copy of the image never exists.

Open slide handles are kept in a small per-process cache, so reading chunk
after chunk does not reopen the file.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from milbench.api import ImageSource, InstanceSource, LazyBags

from .reader import SlideReader, open_slide
from .tiling import Resolution, read_block, read_tile

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

_OPEN: "OrderedDict[tuple[str, str], SlideReader]" = OrderedDict()
_MAX_OPEN = 16


def reader_for(path: Path, slide_id: str) -> SlideReader:
    """An open reader for ``path`` from the per-process cache (least recently used closed first)."""
    key = (str(path), slide_id)
    r = _OPEN.pop(key, None)
    if r is None:
        r = open_slide(path, slide_id)
        while len(_OPEN) >= _MAX_OPEN:
            _, old = _OPEN.popitem(last=False)
            old.close()
    _OPEN[key] = r
    return r


def to_float(rgb: np.ndarray) -> "Any":
    """uint8 (..., H, W, 3) -> normalised float tensor (..., 3, H, W) (ImageNet mean/std)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255)
    x = x.movedim(-1, -3)
    shape = (3, 1, 1)
    return (x - torch.from_numpy(MEAN).view(shape)) / torch.from_numpy(STD).view(shape)


class SlideInstances(InstanceSource):
    """The kept tiles of one slide, read on demand (level-0 corners ``xy0``)."""

    def __init__(self, path: Path, slide_id: str, res: Resolution, xy0: np.ndarray):
        self.path = path
        self.slide_id = slide_id
        self.res = res
        self.xy0 = xy0

    def __len__(self) -> int:
        return len(self.xy0)

    @property
    def instance_shape(self) -> tuple[int, int, int]:
        return (3, self.res.tile_size, self.res.tile_size)

    def read(self, index: Any) -> "Any":
        reader = reader_for(self.path, self.slide_id)
        p = self.res.tile_size
        out = np.empty((len(index), p, p, 3), np.uint8)
        for k, i in enumerate(np.asarray(index, dtype=np.int64)):
            x, y = self.xy0[i]
            out[k] = read_tile(reader, self.res, int(x), int(y))
        return to_float(out)


class SlideImage(ImageSource):
    """The tissue bounding box of a slide at tile resolution: uint8 in memory, float per crop."""

    def __init__(self, path: Path, slide_id: str, res: Resolution, bbox: tuple[int, int, int, int],
                 block_px: int = 2048):
        self.path = path
        self.slide_id = slide_id
        self.res = res
        self.bbox = bbox  # (r0, r1, c0, c1) cells, end-exclusive
        self.block_cells = max(1, block_px // res.tile_size)
        self._pixels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        r0, r1, c0, c1 = self.bbox
        p = self.res.tile_size
        return (3, (r1 - r0) * p, (c1 - c0) * p)

    @property
    def resident_bytes(self) -> int:
        """The uint8 box this source keeps once a crop is read (3 bytes a pixel)."""
        _, h, w = self.shape
        return 3 * h * w

    def pixels(self) -> np.ndarray:
        """The whole box as uint8 (H, W, 3), read block by block on first use."""
        if self._pixels is None:
            reader = reader_for(self.path, self.slide_id)
            r0, r1, c0, c1 = self.bbox
            p, s, b = self.res.tile_size, self.res.step0, self.block_cells
            _, h, w = self.shape
            img = np.empty((h, w, 3), np.uint8)
            for br in range(r0, r1, b):
                for bc in range(c0, c1, b):
                    nr, nc = min(b, r1 - br), min(b, c1 - bc)
                    block = read_block(reader, self.res, bc * s, br * s, nc, nr)
                    img[(br - r0) * p:(br - r0 + nr) * p, (bc - c0) * p:(bc - c0 + nc) * p] = block
            self._pixels = img
        return self._pixels

    def read(self, r0: int, r1: int, c0: int, c1: int) -> "Any":
        return to_float(self.pixels()[r0:r1, c0:c1])


class SlideBags(LazyBags):
    """One split's slides as :class:`~milbench.api.LazyBag` objects built on access."""

    def __init__(self, items: Sequence[dict[str, Any]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def _bag(self, i: int):
        import torch

        from milbench.api import LazyBag

        it = self.items[i]
        cells = it["cells"]
        r0, r1, c0, c1 = it["bbox"]
        grid = torch.as_tensor(np.stack([cells[:, 0] - r0, cells[:, 1] - c0], axis=1), dtype=torch.long)
        source = SlideInstances(it["path"], it["slide_id"], it["res"], it["xy0"])
        image = SlideImage(it["path"], it["slide_id"], it["res"], it["bbox"])
        return LazyBag(source, int(it["label"]), grid, (r1 - r0, c1 - c0),
                       torch.as_tensor(it["instance_labels"], dtype=torch.long), it["ids"], None, 1,
                       it["slide_id"], image_source=image, instance_labels_known=it["annotated"])

    def instance_ids(self) -> list[str]:
        return [i for it in self.items for i in it["ids"]]
