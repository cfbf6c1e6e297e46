"""Per-instance training augmentations that datasets compose in :meth:`Dataset.augment`.

Each function maps a bag's instances (N, C, p, p) to a tensor of the same
shape, drawing every random choice from the given ``torch.Generator`` (so a
run is reproducible from its seed) and choosing independently per instance
(a bag is a set of unrelated patches; one flip for the whole bag would add
little variety). They run on the device the instances are on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def random_flips(x: "torch.Tensor", generator: "torch.Generator", vertical: bool = True,
                 rotate: bool = True) -> "torch.Tensor":
    """Random horizontal flips, and (``vertical``/``rotate``) vertical flips and
    90° rotations: the dihedral group for rotation-free content such as tissue
    or photos seen from above. Do not use ``rotate`` on digits (6 vs 9)."""
    import torch

    n = x.shape[0]
    if n == 0:
        return x
    draw = torch.rand(n, 3, generator=generator).to(x.device)
    out = torch.where((draw[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    if vertical:
        out = torch.where((draw[:, 1] < 0.5).view(-1, 1, 1, 1), out.flip(-2), out)
    if rotate and x.shape[-1] == x.shape[-2]:
        out = torch.where((draw[:, 2] < 0.5).view(-1, 1, 1, 1), out.transpose(-1, -2), out)
    return out


def color_jitter(x: "torch.Tensor", generator: "torch.Generator", brightness: float = 0.2,
                 contrast: float = 0.2) -> "torch.Tensor":
    """Scale contrast around each instance's mean by 1±``contrast`` and shift
    its brightness by ±``brightness`` of its own standard deviation. Written
    in terms of the instance's statistics, so it is the same augmentation on
    [0, 1] pixels and on mean/std-normalised ones (no clamping to a range
    the data may not have)."""
    import torch

    n = x.shape[0]
    if n == 0:
        return x
    u = (torch.rand(n, 2, generator=generator) * 2 - 1).to(x.device, x.dtype)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).nan_to_num(0.0)
    scale = (1 + contrast * u[:, 0]).view(-1, 1, 1, 1)
    return (x - mean) * scale + mean + brightness * u[:, 1].view(-1, 1, 1, 1) * std


def random_shift(x: "torch.Tensor", generator: "torch.Generator", max_shift: int) -> "torch.Tensor":
    """Translate each instance by up to ``max_shift`` pixels in x and y, filling
    with zeros (background): position jitter that keeps a digit's identity."""
    import torch

    n, _, h, w = x.shape
    if n == 0 or max_shift <= 0:
        return x
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    pad = torch.nn.functional.pad(x, (max_shift, max_shift, max_shift, max_shift))
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = pad[i, :, max_shift - dy:max_shift - dy + h, max_shift - dx:max_shift - dx + w]
    return out
