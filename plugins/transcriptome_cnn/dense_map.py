"""Dense class maps by a sliding window of the patch classifier over an image.

Why a module of its own: turning a patch classifier into a per-pixel class map
(for Dice against a ground-truth mask, and for the whole held-out test area)
is a separate step from training it, with its own geometry: windows are
centred on each output cell exactly as a spot-centred training patch is
centred on its spot (:mod:`.classifier`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .classifier import PatchClassifier, predict_batched


def sliding_window_probs(model: PatchClassifier, image: torch.Tensor, stride: int, batch: int) -> torch.Tensor:
    """Class probabilities per ``stride x stride`` cell of a (C, H, W) image: (K, ceil(H/s), ceil(W/s)).

    The window of cell (i, j) is ``model.field`` pixels wide with the cell's
    centre pixel ``(i*s + s//2, j*s + s//2)`` at index ``field // 2`` (as the
    spot in a training patch). The image is reflect-padded (replicate where
    it is too small to reflect), since a region's surroundings look more
    like its edge than like empty background. Windows are views of the padded
    image until a batch is taken, so memory stays bounded for any stride.
    """
    c, h, w = image.shape
    f, s = model.field, int(stride)
    ny, nx = math.ceil(h / s), math.ceil(w / s)
    pad = f + s
    mode = "reflect" if pad < h and pad < w else "replicate"
    padded = F.pad(image[None], (pad, pad, pad, pad), mode=mode)[0]
    off = pad + s // 2 - f // 2
    win = padded[:, off:, off:].unfold(1, f, s).unfold(2, f, s)[:, :ny, :nx]  # (C, ny, nx, f, f)
    rows_per_batch = max(1, batch // max(1, nx))
    probs = []
    for r0 in range(0, ny, rows_per_batch):
        chunk = win[:, r0:r0 + rows_per_batch].permute(1, 2, 0, 3, 4).reshape(-1, c, f, f)
        probs.append(predict_batched(model, chunk, batch))
    return torch.cat(probs).reshape(ny, nx, -1).permute(2, 0, 1)


def cells_to_pixels(cells: torch.Tensor, stride: int, shape: tuple[int, int]) -> torch.Tensor:
    """Expand a (..., ny, nx) cell map to (..., H, W) pixels (each cell covers stride x stride)."""
    out = cells.repeat_interleave(stride, dim=-2).repeat_interleave(stride, dim=-1)
    return out[..., :shape[0], :shape[1]]


def dense_class_map(model: PatchClassifier, image: torch.Tensor, stride: int, batch: int,
                    key_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (H, W) long, P(key class) (H, W) float) of an image by a sliding window."""
    probs = sliding_window_probs(model, image, stride, batch)
    h, w = image.shape[-2:]
    return (cells_to_pixels(probs.argmax(0), stride, (h, w)).long(),
            cells_to_pixels(probs[key_class], stride, (h, w)))
