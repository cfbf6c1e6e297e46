"""Attention pooling streamed with the trunk: no map that grows with the image
is held whole, except one attention score per position.

Why this module exists. :func:`~milbench.models.streaming.streamed_forward_backward`
streams the trunk but hands the head the whole feature map F, and back-propagates
a whole dL/dF: with a small trunk at stride 8 that is about 41 bytes per image
pixel (F, dL/dF and the head's activations over every position), 40 GiB for a
32k x 32k slide. An attention-MIL head needs F only through

    h_p = embed(F_p),   s_p = score(h_p),   a = softmax(s),   z = sum_p a_p h_p,
    loss = loss_fn(z),

and every term is per position except the softmax's normaliser and the sum,
which can be accumulated tile by tile (the online softmax of Milakov and
Gimelshein, 2018). So a training step makes two passes over the trunk's tiles:

1. **no grad**: each tile's F -> h, s; keep s (one float per position) and
   the running max m, sum S = sum exp(s - m) and Z = sum exp(s - m) h. Then
   z = Z / S; ``loss_fn(z)`` is back-propagated to its own parameters and to
   g = dL/dz.
2. **with grad**, tile by tile: recompute F, h, s and back-propagate the
   surrogate ``sum_p a_p (g . h_p) + sum_p c_p s_p`` with a and
   c_p = a_p (g . h_p - g . z) held constant. Its gradient with respect to
   h_p is a_p g + c_p ds_p/dh_p, which is dL/dh_p exactly (dL/ds_p = c_p is
   the softmax's Jacobian applied to g . h), so embed, score and the trunk
   receive the gradients the whole-map computation gives, to float rounding
   (tests/test_streamed_attention.py).

The price is a second forward of every tile of the last stage (the
whole-map step also recomputes every tile but the last for its backward, so
little), and the head's per-position work twice; the maps between a split
trunk's stages are computed once and reused. A head that needs all positions at once in a
way that is not a softmax-weighted sum (max pooling across tiles, top-k
instance losses, dropout that must draw the same mask twice) cannot use it;
the method decides (streamingclam's ``stream_head``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from milbench.models.streaming import StreamingTrunk, Tile

__all__ = ["PooledMap", "attention_pool", "attention_pool_step"]

Embed = Callable[[torch.Tensor], torch.Tensor]  # (P, C) feature vectors -> (P, D)
Score = Callable[[torch.Tensor], torch.Tensor]  # (P, D) -> (P,) attention logits


@dataclass
class PooledMap:
    """What pass 1 computes for one image: the pooled vector ``z`` (D,), the
    attention logits ``scores`` as an (h, w) map over the trunk's output
    positions (float32, on the CPU), and ``log_norm`` = log sum_p exp(s_p), so
    that ``attention()`` = exp(scores - log_norm) is the softmax."""

    z: torch.Tensor
    scores: torch.Tensor
    log_norm: float

    def attention(self) -> torch.Tensor:
        """The softmax weights as an (h, w) map."""
        return torch.exp(self.scores.double() - self.log_norm).to(torch.float32)


def _positions(y: torch.Tensor) -> torch.Tensor:
    """(1, C, th, tw) tile output -> (th*tw, C) position vectors, row-major like a whole map's flatten."""
    return y[0].flatten(1).t()


def attention_pool(stream: StreamingTrunk, image: torch.Tensor, embed: Embed, score: Score) -> PooledMap:
    """Pass 1 alone, without autograd: ``z`` and the attention logits of ``image``,
    equal (to float rounding) to the whole feature map's ``softmax(score(embed(F)))``-weighted sum."""
    return _pass1(stream, image, embed, score)[0]


def _pass1(stream: StreamingTrunk, image: torch.Tensor, embed: Embed,
           score: Score) -> tuple[PooledMap, list[torch.Tensor]]:
    """Pass 1, and the maps between the trunk's stages it computed (for pass 2 to reuse)."""
    h_out, w_out = stream.geometry.output_size(image.shape[-2], image.shape[-1])
    scores = torch.empty(h_out, w_out, dtype=torch.float32)
    acc: dict[str, object] = {"m": -math.inf, "s": None, "z": None}

    def visit(t: Tile, y: torch.Tensor) -> None:
        h = embed(_positions(y))
        s = score(h).reshape(-1)
        scores[t.out_rows, t.out_cols] = s.detach().to("cpu", torch.float32).reshape(
            t.out_rows.stop - t.out_rows.start, t.out_cols.stop - t.out_cols.start)
        m_old = acc["m"]
        m_new = max(float(m_old), float(s.max()))  # type: ignore[arg-type]
        e = torch.exp(s.double() - m_new)
        rescale = math.exp(float(m_old) - m_new) if acc["s"] is not None else 0.0  # type: ignore[arg-type]
        part_s, part_z = e.sum(), e @ h.double()
        acc["s"] = part_s if acc["s"] is None else acc["s"] * rescale + part_s  # type: ignore[operator]
        acc["z"] = part_z if acc["z"] is None else acc["z"] * rescale + part_z  # type: ignore[operator]
        acc["m"], acc["dtype"] = m_new, h.dtype

    with torch.no_grad():
        maps = stream.visit_tiles(image, visit)
    total, pooled = acc["s"], acc["z"]
    assert isinstance(total, torch.Tensor) and isinstance(pooled, torch.Tensor)
    z = (pooled / total).to(acc["dtype"])  # type: ignore[arg-type]  # accumulated in float64, returned as h's dtype
    return PooledMap(z, scores, float(acc["m"]) + math.log(float(total))), maps  # type: ignore[arg-type]


def attention_pool_step(stream: StreamingTrunk, image: torch.Tensor, embed: Embed, score: Score,
                        loss_fn: Callable[[torch.Tensor], torch.Tensor],
                        train_trunk: bool = True) -> tuple[torch.Tensor, PooledMap]:
    """One streamed training step of trunk + attention pooling + ``loss_fn(z)``.

    Adds to ``.grad`` exactly what ``loss_fn(z).backward()`` through the whole
    feature map would add (to float rounding): to ``loss_fn``'s parameters,
    to ``embed``'s and ``score``'s, and (``train_trunk``) to the trunk's.
    Returns the detached loss and pass 1's :class:`PooledMap`.
    """
    pooled, maps = _pass1(stream, image, embed, score)
    z = pooled.z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(z)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
        loss.backward()
    g = z.grad
    if g is None:  # the loss does not depend on z: nothing flows back to the positions
        return loss.detach(), pooled
    g = g.detach()
    gz = float(g.double() @ pooled.z.detach().double())
    log_norm = pooled.log_norm

    def visit(t: Tile, y: torch.Tensor) -> torch.Tensor:
        h = embed(_positions(y))
        s = score(h).reshape(-1)
        a = torch.exp(s.detach().double() - log_norm).to(h.dtype)
        hg = h @ g.to(h.dtype)
        coeff = a * (hg.detach() - gz)
        return (a * hg).sum() + (coeff * s).sum()

    # pass 2 reads pass 1's maps between stages instead of computing them again, and frees them as its
    # backward goes (a frozen trunk's are dropped when it returns)
    stream.visit_tiles(image, visit, backward=True, train_trunk=train_trunk, maps=maps)
    del maps
    return loss.detach(), pooled
