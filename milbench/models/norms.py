"""Norm layers and exactness.

Memory-saving methods recompute parts of a network on chunks or tiles. A norm
layer whose output depends on the batch (batch norm in training mode) makes
chunked and whole-bag computations differ, so these methods require norms that
are frozen (eval-mode batch norm with fixed statistics) or batch-independent
(GroupNorm / LayerNorm / none). The baseline uses the same rule so that its
gradient is the reference the memory-saving methods are tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from milbench.errors import ConfigError

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters as buffers-or-params.

    Unlike ``nn.BatchNorm2d`` it cannot be put into a batch-dependent mode by
    ``model.train()``, so chunking or tiling stays exact. ``affine_trainable``
    keeps weight and bias as trainable parameters (a per-channel affine map is
    batch-independent).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine_trainable: bool = True):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        w, b = torch.ones(num_features), torch.zeros(num_features)
        if affine_trainable:
            self.weight = nn.Parameter(w)
            self.bias = nn.Parameter(b)
        else:
            self.register_buffer("weight", w)
            self.register_buffer("bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def freeze_batch_norms(module: nn.Module, affine_trainable: bool = True) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` with a :class:`FrozenBatchNorm2d`
    carrying its statistics and affine parameters. Returns the module."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps, affine_trainable)
            with torch.no_grad():
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
            frozen.to(device=next(child.buffers(), torch.empty(0)).device)
            setattr(module, name, frozen)
        else:
            freeze_batch_norms(child, affine_trainable)
    return module


def batch_dependent_layers(module: nn.Module) -> list[str]:
    """Names of sub-modules whose output depends on the rest of the batch in
    training mode (batch norms that are not frozen)."""
    return [n for n, m in module.named_modules() if isinstance(m, _BATCH_NORMS)]


def require_batch_independent(module: nn.Module, what: str) -> None:
    """Raise a one-line :class:`ConfigError` if ``module`` holds a training-mode
    batch norm, which would silently break chunked/tiled exactness."""
    bad = batch_dependent_layers(module)
    if bad:
        raise ConfigError(
            f"{what}: layer '{bad[0]}' is a batch norm whose output depends on the batch; "
            f"chunked or streamed gradients would not equal the whole-bag ones. "
            f"Use norm='frozen', 'group' or 'none'"
        )
