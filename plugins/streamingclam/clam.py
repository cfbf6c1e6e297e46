"""CLAM-SB head (Lu et al., "Data-efficient and weakly supervised computational
pathology on whole-slide images", Nature BME 2021) over the positions of a
feature map, and the StreamingCLAM model that puts it behind a streamed trunk.

Why this module exists: the head, its loss and the model object are what
``streamingclam`` builds and trains; no other plugin uses them, so they live
in the plugin. It imports torch at module level and is therefore imported only
inside the method's ``build``/``backward``/``predict``, never at registration.

StreamingCLAM (Dooper et al.) treats every position of the streamed trunk's
feature map as an instance: the head flattens (C, h, w) into h*w vectors,
attends over them with gated attention, and classifies the attention-pooled
vector. The optional instance-clustering loss is CLAM's: the k most and k
least attended positions are pseudo-labelled in-class / out-of-class for the
true class's instance classifier (smooth top-1 SVM or cross-entropy). The
trunks themselves are in :mod:`.trunk`; the streaming engine is milbench's
(``StreamingTrunk``, through :mod:`milbench.api`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from milbench.api import ConfigError, StreamingTrunk

__all__ = ["CLAMHead", "CLAMOutput", "StreamingCLAMModel", "bag_ce", "clam_loss", "smooth_top1_svm", "INSTANCE_LOSSES"]

INSTANCE_LOSSES = ("none", "svm", "ce")


@dataclass
class CLAMOutput:
    """What the head computes for one bag.

    ``logits`` (n_classes,); ``attention`` (h*w,) softmax weights over the
    positions; ``attention_map`` the same as an (h, w) map; ``inst_loss`` the
    instance-clustering loss (None when off or no label was given).
    """

    logits: torch.Tensor
    attention: torch.Tensor
    attention_map: torch.Tensor
    inst_loss: torch.Tensor | None


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada et al., ICLR 2018), CLAM's default
    instance loss: ``tau * logsumexp((alpha*[j != y] + s_j) / tau) - s_y``, averaged.

    A margin-based loss that stays smooth, so a few pseudo-labelled positions
    do not dominate the way they can with cross-entropy.
    """
    margin = torch.full_like(logits, alpha)
    margin.scatter_(1, target.view(-1, 1), 0.0)
    s_y = logits.gather(1, target.view(-1, 1)).squeeze(1)
    return (tau * torch.logsumexp((logits + margin) / tau, dim=1) - s_y).mean()


class _GatedAttention(nn.Module):
    """CLAM's Attn_Net_Gated with one attention branch: w^T (tanh(V h) * sigmoid(U h))."""

    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.v(h) * self.u(h)).squeeze(-1)


class CLAMHead(nn.Module):
    """CLAM-SB: fc -> gated attention over positions -> pooled vector -> bag classifier,
    plus one 2-way instance classifier per class for the clustering loss.

    ``pool`` > 1 max-pools the feature map by that factor first (StreamingCLAM's
    ``max_pool_kernel``); the attention map then has the pooled shape.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, attn_dim: int = 256, n_classes: int = 2,
                 dropout: float = 0.0, inst_loss: str = "none", inst_k: int = 8, pool: int = 0) -> None:
        super().__init__()
        if inst_loss not in INSTANCE_LOSSES:
            raise ConfigError(f"unknown inst_loss '{inst_loss}'; valid: {', '.join(INSTANCE_LOSSES)}")
        if n_classes < 2:
            raise ConfigError(f"bad n_classes {n_classes}: CLAM needs at least 2 classes")
        # StreamingCLAM's max_pool_kernel: fewer, stronger positions before attention.
        self.pool = nn.MaxPool2d(pool, ceil_mode=True) if pool > 1 else nn.Identity()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = _GatedAttention(hidden_dim, attn_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_classes))
        self.n_classes = n_classes
        self.inst_loss = inst_loss
        self.inst_k = inst_k

    def forward(self, features: torch.Tensor, label: int | None = None) -> CLAMOutput:
        """Attend over the positions of one bag's feature map (C, h, w) or (1, C, h, w).
        The instance loss is computed when a label is given and ``inst_loss`` is on."""
        if features.dim() == 4:
            if features.shape[0] != 1:
                raise ValueError(f"CLAMHead takes one bag at a time, got a batch of {features.shape[0]}")
            features = features[0]
        if features.dim() != 3:
            raise ValueError(f"expected a feature map (C, h, w), got shape {tuple(features.shape)}")
        features = self.pool(features)
        c, hh, ww = features.shape
        h = self.fc(features.reshape(c, hh * ww).t())  # (positions, hidden)
        a = torch.softmax(self.attention(h), dim=0)
        logits = self.classifier(a @ h)
        inst = None
        if label is not None and self.inst_loss != "none":
            inst = self._instance_loss(a, h, int(label))
        return CLAMOutput(logits, a, a.view(hh, ww), inst)

    def _instance_loss(self, a: torch.Tensor, h: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM-SB's in-class clustering loss (subtyping off): for the true class's
        instance classifier, the k most attended positions are positives and the
        k least attended negatives."""
        k = max(1, min(self.inst_k, h.shape[0] // 2))
        top = torch.topk(a, k).indices
        bottom = torch.topk(-a, k).indices
        x = torch.cat([h[top], h[bottom]])
        target = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(h.device)
        logits = self.instance_classifiers[label](x)
        if self.inst_loss == "svm":
            return smooth_top1_svm(logits, target)
        return F.cross_entropy(logits, target)


def bag_ce(logits: torch.Tensor, label: int) -> torch.Tensor:
    """Cross-entropy of one bag's class logits (n_classes,) against its label: the bag term of
    :func:`clam_loss`, and the whole loss of a head streamed with the trunk (no instance loss)."""
    return F.cross_entropy(logits.unsqueeze(0), torch.tensor([int(label)], device=logits.device))


def clam_loss(out: CLAMOutput, label: int, inst_weight: float = 0.3) -> torch.Tensor:
    """CLAM's total loss: ``(1 - w) * CE(bag) + w * instance loss`` (CLAM's
    bag_weight is ``1 - w``; 0.7 in the paper), or the bag CE alone when the
    instance loss is off."""
    bag = bag_ce(out.logits, label)
    if out.inst_loss is None:
        return bag
    return (1.0 - inst_weight) * bag + inst_weight * out.inst_loss


class StreamingCLAMModel(nn.Module):
    """A streamed trunk and a CLAM head: the StreamingCLAM model.

    ``forward(image)`` is the plain, non-streamed reference pass (autograd
    through the whole image); training and prediction go through
    ``stream.forward_streamed`` / ``stream.backward_streamed``.
    ``trunk_frozen`` is the freezing schedule's switch: while set, the trunk
    gets no gradient (and costs no backward).
    """

    def __init__(self, trunk: nn.Module, head: CLAMHead, tile_size: int | list[int], tile_shape: str = "square",
                 split: list[int] | tuple[int, ...] = (), bytes_per_pixel: list[float] | None = None,
                 budget_bytes: float | None = None) -> None:
        super().__init__()
        self.stream = StreamingTrunk(trunk, tile_size, tile_shape, split, bytes_per_pixel, budget_bytes)
        self.head = head
        self.trunk_frozen = False

    def forward(self, image: torch.Tensor, label: int | None = None) -> CLAMOutput:
        return self.head(self.stream(image.unsqueeze(0) if image.dim() == 3 else image), label)

    def upsample(self, attention_map: torch.Tensor, size: tuple[int, int],
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Paint an (h, w) map over the head's positions onto the (H, W) image
        (``rows=(y0, y1)``: only those image rows, for a map too large to hold whole).

        Position ``o`` of the trunk is centred on input pixel
        ``o*stride + (lo + hi)/2`` (the middle of its receptive field, from the
        streaming geometry; ``head_pool`` widens the stride and shifts the
        centre). Pixels between centres interpolate linearly, pixels beyond
        the outermost centres take the edge value: a separable linear
        interpolation that puts the map where the trunk looked, whatever its
        padding, unlike a plain resize. Each output pixel reads its two
        neighbouring centres per axis (a gather), so the work and memory are
        those of the output rows, float32, never an (H, h) matrix.
        """
        geo = self.stream.geometry
        pool = self.head.pool.kernel_size if isinstance(self.head.pool, nn.MaxPool2d) else 1
        m = attention_map.detach().to("cpu", torch.float32)
        y0, y1 = rows if rows is not None else (0, size[0])
        r0, r1, rw = _interp_weights(torch.arange(y0, y1), m.shape[0], geo.stride[0] * pool,
                                     (geo.lo[0] + geo.hi[0]) / 2 + (pool - 1) / 2 * geo.stride[0])
        c0, c1, cw = _interp_weights(torch.arange(size[1]), m.shape[1], geo.stride[1] * pool,
                                     (geo.lo[1] + geo.hi[1]) / 2 + (pool - 1) / 2 * geo.stride[1])
        by_rows = m[r0] * (1 - rw)[:, None] + m[r1] * rw[:, None]  # (y1-y0, w)
        return by_rows[:, c0] * (1 - cw) + by_rows[:, c1] * cw


def _interp_weights(pixels: torch.Tensor, n_positions: int, stride: float,
                    centre0: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each pixel, its two neighbouring position centres ``centre0 + o*stride`` (clamped
    at the ends) and the weight of the second: linear interpolation between them."""
    u = ((pixels.to(torch.float64) - centre0) / stride).clamp(0, n_positions - 1)
    i0 = u.floor().long()
    i1 = (i0 + 1).clamp(max=n_positions - 1)
    return i0, i1, (u - i0).to(torch.float32)


def head_bytes_per_position(head: CLAMHead, channels: int, inst_weight: float = 0.3) -> float:
    """Activation bytes the head and its loss keep for the backward per position of
    the trunk's output map, measured like the engine measures a trunk (distinct
    tensors autograd saves, at two map sizes; the slope), times the engine's
    headroom for the gradients the backward builds beside them.

    The feature map itself is not counted (the engine counts it and dL/dF):
    only what the head builds from it -- the fc output, the attention branches,
    the softmax -- all of which grow with the map, i.e. with the image's area.
    """
    from milbench.api import ACTIVATION_HEADROOM, saved_tensor_bytes

    p = next(head.parameters())

    def saved(side: int) -> int:
        feats = torch.zeros(1, channels, side, side, device=p.device, dtype=p.dtype, requires_grad=True)
        return saved_tensor_bytes(lambda: clam_loss(head(feats, 1), 1, inst_weight), head, exclude=[feats])

    a, b = 16, 32
    slope = (saved(b) - saved(a)) / float(b * b - a * a)
    return max(slope, 0.0) * ACTIVATION_HEADROOM
