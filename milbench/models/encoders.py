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
from milbench.models.names import ENCODERS, NORMS
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

    def __init__(self, in_channels: int, size: int, feat_dim: int = 500, norm: str = "none") -> None:
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
    """A small CNN for photos (Imagenette, tissue tiles): four conv-norm-ReLU
    stages with stride 2, global average pool, linear to feat_dim.

    Stride-2 convolutions instead of conv + max-pool: each conv runs at the
    resolution it outputs (about 4x fewer multiply-adds at 64 px) and max-pool
    with indices, the slowest op of the old design on a CPU (a quarter of the
    training time in a profile of the README's main job), is gone. Any side
    >= 1 px is accepted (padding keeps at least one cell per stage).

    Default norm ``none`` (see ``attention_mil``): GroupNorm normalises every
    instance on its own, and after global average pooling the features of
    different images are then nearly the same vector at initialisation."""

    def __init__(self, in_channels: int, size: int, feat_dim: int = 128, norm: str = "group", width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), norm2d(norm, cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], feat_dim), nn.ReLU())
        # He init: PyTorch's default init is ~3x smaller per layer, so without a per-batch norm the
        # features start tiny and nearly equal for every image, and attention MIL sits on its 0.693
        # plateau (measured on the Imagenette sample: training logits of all bags within 0.05 of each
        # other after 10 epochs with the default init; spread over +-2 with He init).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ResNetEncoder(nn.Module):
    """ResNet-18 trunk (torchvision, random init) with per-instance norms and a
    linear projection to feat_dim (the paper's 2048-d features)."""

    def __init__(self, in_channels: int, size: int, feat_dim: int = 2048, norm: str = "frozen") -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, norm_layer=lambda c: norm2d(norm, c))
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Linear(512, feat_dim)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x))


#: The registry: one class per name of :data:`milbench.models.names.ENCODERS`.
_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNetEncoder,
    "cnn": ConvEncoder,
    "resnet18": ResNetEncoder,
}


def _side_after(layer: nn.Module, size: int) -> int:
    """Spatial side after one conv or pool layer (PyTorch's output-size formula; 0 = nothing left)."""
    def first(v: int | tuple[int, ...]) -> int:
        return v[0] if isinstance(v, tuple) else int(v)

    k, s = first(layer.kernel_size), first(layer.stride or layer.kernel_size)
    p = first(getattr(layer, "padding", 0)) if not isinstance(getattr(layer, "padding", 0), str) else None
    d = first(getattr(layer, "dilation", 1))
    if p is None:  # padding='same' keeps the side
        return size
    span = size + 2 * p - d * (k - 1) - 1
    return span // s + 1 if span >= 0 else 0


def min_input_size(module: nn.Module, limit: int = 4096) -> int:
    """Smallest square side a conv/pool stack can take without shrinking it to nothing.

    Derived from the layers themselves rather than a hard-coded number: every
    Conv2d / MaxPool2d / AvgPool2d is applied in registration order, which is
    execution order for sequential trunks; in a branching trunk (ResNet's
    downsample shortcut) a branch is counted as if in sequence, which can only
    overestimate the shrinkage, so the answer is never too small.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    for side in range(1, limit + 1):
        s = side
        for layer in layers:
            s = _side_after(layer, s)
            if s < 1:
                break
        else:
            return side
    return limit + 1


_MIN_SIZE_CACHE: dict[str, int] = {}


def min_instance_size(name: str) -> int:
    """The smallest ``instance_size`` encoder ``name`` accepts (geometry does not depend on
    channels, width or norm, so one probe model per name is built and the answer cached)."""
    if name not in _MIN_SIZE_CACHE:
        try:
            cls = _ENCODERS[name]
        except KeyError:
            raise ConfigError(f"unknown encoder '{name}'; valid: {', '.join(ENCODERS)}") from None
        # the probe is built at a side every encoder takes; its layers, not its size, decide
        _MIN_SIZE_CACHE[name] = min_input_size(cls(1, 64, feat_dim=8, norm="none"))
    return _MIN_SIZE_CACHE[name]


def create_encoder(name: str, in_channels: int, size: int, feat_dim: int, norm: str) -> nn.Module:
    """Build an instance encoder by name (one registry, as timm's ``create_model``)."""
    try:
        cls = _ENCODERS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder '{name}'; valid: {', '.join(ENCODERS)}") from None
    need = min_instance_size(name)
    if size < need:  # the layers would shrink the instance to nothing: a config error, not a RuntimeError
        raise ConfigError(f"bad value for 'instance_size': {size} px is smaller than the {need} px the "
                          f"'{name}' encoder needs (its conv and pool layers shrink a smaller instance to nothing)")
    return cls(in_channels, size, feat_dim=feat_dim, norm=norm)
