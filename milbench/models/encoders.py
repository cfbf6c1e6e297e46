"""Instance encoders for the attention-MIL methods, built by name.

Every encoder maps (N, C, p, p) to (N, feat_dim) with each instance processed
independently of the others (norms are ``none``, ``group`` or ``frozen``), so
encoding a bag in chunks gives the same features as encoding it whole. A
``batch`` norm is offered for the baseline only; methods that chunk refuse it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from milbench.errors import ConfigError
from milbench.models.attention_mil import ENCODERS, NORMS
from milbench.models.norms import FrozenBatchNorm2d


def norm2d(kind: str, channels: int) -> nn.Module:
    """A 2-D norm layer of the given kind (``none`` gives Identity)."""
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        groups = max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "frozen":
        return FrozenBatchNorm2d(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ConfigError(f"unknown norm '{kind}'; valid: {', '.join(NORMS)}")


class LeNetEncoder(nn.Module):
    """The LeNet-5-like encoder of Ilse et al. for digit bags:
    conv(20,5)-pool-conv(50,5)-pool-fc(feat_dim)."""

    def __init__(self, in_channels: int, size: int, feat_dim: int = 500, norm: str = "none"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), norm2d(norm, 20), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), norm2d(norm, 50), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, size, size)).numel()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, feat_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ConvEncoder(nn.Module):
    """A small VGG-style CNN for photos (Imagenette, tissue tiles): four
    conv-norm-ReLU-pool stages, global average pool, linear to feat_dim."""

    def __init__(self, in_channels: int, size: int, feat_dim: int = 128, norm: str = "group", width: int = 32):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), norm2d(norm, cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], feat_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ResNetEncoder(nn.Module):
    """ResNet-18 trunk (torchvision, random init) with per-instance norms and a
    linear projection to feat_dim (the paper's 2048-d features)."""

    def __init__(self, in_channels: int, size: int, feat_dim: int = 2048, norm: str = "frozen"):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, norm_layer=lambda c: norm2d(norm, c))
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Linear(512, feat_dim)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x))


_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNetEncoder,
    "cnn": ConvEncoder,
    "resnet18": ResNetEncoder,
}
assert tuple(_ENCODERS) == ENCODERS, "keep attention_mil.ENCODERS in step with the registry"


def create_encoder(name: str, in_channels: int, size: int, feat_dim: int, norm: str) -> nn.Module:
    """Build an instance encoder by name (one registry, as timm's ``create_model``)."""
    try:
        cls = _ENCODERS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder '{name}'; valid: {', '.join(ENCODERS)}") from None
    return cls(in_channels, size, feat_dim=feat_dim, norm=norm)
