"""Attention-based MIL pooling (Ilse et al., ICML 2018) and the ABMIL model.

One home for the model that abmil, grad-accum and sampled share: the
memory-saving methods differ only in how they compute its gradient, so they
must use exactly the same module to be comparable (and testably equal).
"""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """Gated attention: a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ).

    Returns the pooled vector z = sum_i a_i h_i (L,) and the weights a (N,).
    Computed over the instance axis only, so it is independent of how the
    instances were encoded (whole bag or chunks).
    """

    def __init__(self, in_dim: int, attn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.v = nn.Linear(in_dim, attn_dim)
        self.u = nn.Linear(in_dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))
        logits = self.w(self.drop(gate)).squeeze(-1)
        a = torch.softmax(logits, dim=0)
        return a @ h, a


class ABMILHead(nn.Module):
    """Gated attention pooling followed by a one-logit bag classifier."""

    def __init__(self, in_dim: int, attn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attention = GatedAttention(in_dim, attn_dim, dropout)
        self.classifier = nn.Linear(in_dim, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, a = self.attention(h)
        return self.classifier(z).squeeze(-1), a


class AttentionMIL(nn.Module):
    """Encoder over instances, then :class:`ABMILHead`. ``forward`` encodes the
    whole bag at once (memory grows with N); the memory-saving methods call
    ``encoder`` and ``head`` separately."""

    def __init__(self, encoder: nn.Module, feat_dim: int, attn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.head = ABMILHead(feat_dim, attn_dim, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(x))


def bag_loss(logit: torch.Tensor, label: int) -> torch.Tensor:
    """Binary cross-entropy of one bag's logit against its 0/1 label."""
    target = torch.tensor(float(label), dtype=logit.dtype, device=logit.device)
    return nn.functional.binary_cross_entropy_with_logits(logit, target)


def attention_scores(a: torch.Tensor, bag_prob: float) -> torch.Tensor:
    """Key-instance scores from attention: ``a / max(a) * bag_prob``.

    Attention sums to one, so its scale depends on N; normalising by the max
    makes the most attended instance 1, and multiplying by the bag
    probability means a bag predicted negative marks no instance as key.
    """
    a = a.detach().float().cpu()
    return a / a.max().clamp_min(1e-12) * float(bag_prob)
