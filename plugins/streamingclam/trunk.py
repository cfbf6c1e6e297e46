"""The CNN trunks ``streamingclam`` streams over a bag image, by name.

Why this module exists: the trunk is the part of StreamingCLAM that milbench's
streaming engine runs tile by tile, so it may hold only layers the engine can
stream (convolutions, pooling, point-wise activations, frozen batch norms and
residual additions; a ``Sequential`` so ``tile_size=auto`` can cut it into
stages). The method checks a tile size against a trunk's geometry before any
data is loaded, and ``benchmarks/streaming_memory.py`` streams bare trunks:
keeping the trunks apart from the CLAM head (:mod:`.clam`) lets both build one
without the head. It imports torch at module level, so the plugin imports it
inside functions only, never at registration.

Every batch norm is frozen (``FrozenBatchNorm2d`` from :mod:`milbench.api`): a
training-mode batch norm would normalise each tile by its own statistics, and
the streamed result would no longer equal the whole image's.

The from-scratch trunks (``small``, ``lenet``) standardise their convolution
weights instead (:class:`WeightStandardization`, Qiao et al. 2019; the
normaliser-free networks of Brock et al. 2021 build on it): no activation
statistics are involved, so a tile computes exactly what the whole image
would, yet a layer cannot shrink its output by shrinking its weights. Without
it, attention MIL on qmnist's bag images sits on the 0.693 plateau while the
features collapse (mean activation 1.5 -> 0.02 in four epochs, 85 % of the
last stage's units dead) and leaves it only after ~30 epochs; with it the
feature scale holds and the plateau ends sooner
(``results/streamingclam-qmnist-diagnostics``).
"""

from __future__ import annotations

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from milbench.api import ConfigError, FrozenBatchNorm2d, first_line, freeze_batch_norms

__all__ = ["build_trunk", "TRUNKS", "WeightStandardization", "standardise_weights", "standardises"]

TRUNKS = ("small", "lenet", "resnet18", "resnet34", "resnet50")
_RESNET_CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
                    "resnet50": (256, 512, 1024, 2048)}
_SMALL_WIDTHS = (16, 32, 64, 128)


class WeightStandardization(nn.Module):
    """A weight parametrization: each output filter standardised to mean 0 and
    variance ``gain**2 / fan_in`` (He scale for ReLU at the default gain).

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization`,
    so the layer stays a plain ``nn.Conv2d`` whose forward the streaming engine
    knows; the standardisation depends on the weights only, never on the input,
    so streamed and whole-image results stay equal."""

    def __init__(self, gain: float = 2 ** 0.5, eps: float = 1e-4) -> None:
        super().__init__()
        self.gain, self.eps = gain, eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        fan_in = weight[0].numel()
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (weight - mean) * (self.gain / torch.sqrt(var * fan_in + self.eps))


def standardise_weights(trunk: nn.Module) -> nn.Module:
    """Put :class:`WeightStandardization` on every convolution of ``trunk`` (in place)."""
    for module in list(trunk.modules()):
        if isinstance(module, nn.Conv2d) and not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", WeightStandardization())
    return trunk


def _small_trunk(in_channels: int, depth: int) -> tuple[nn.Sequential, int]:
    """conv3x3-frozenBN-ReLU stages, 2x2 max-pool between them: stride 2**(depth-1),
    receptive field 38 px at depth 4 (a 28-px digit fits in one position's view)."""
    layers: list[nn.Module] = []
    c = in_channels
    for i in range(depth):
        w = _SMALL_WIDTHS[i]
        conv = nn.Conv2d(c, w, 3, padding=1)
        # He init: with PyTorch's default (3x smaller weights per layer) the features start tiny, weight
        # decay shrinks them further while attention MIL sits on its 0.693 plateau, and qmnist bags never
        # learn; with He init they leave the plateau after ~20-25 epochs (measured, seeds 0 and 1). Under
        # weight_standardization (the default for this trunk) the scale is the standardisation's, and
        # the init sets only the filters' initial directions.
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, FrozenBatchNorm2d(w), nn.ReLU(inplace=True)]
        if i < depth - 1:
            layers.append(nn.MaxPool2d(2))
        c = w
    return nn.Sequential(*layers), c


def _lenet_trunk(in_channels: int, width: int = 128) -> tuple[nn.Sequential, int]:
    """The LeNet-5-like digit encoder of Ilse et al. (abmil's 'lenet') made fully
    convolutional: conv5(20)-pool-conv5(50)-pool, then its fully connected layer
    as a 4x4 convolution. Unpadded, stride 4, receptive field 28 px: on a bag
    image of 28-px digits every 7th position sees exactly one digit, as the
    instance encoder would."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 20, 5), FrozenBatchNorm2d(20), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), FrozenBatchNorm2d(50), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(50, width, 4), nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers), width


def _resnet_trunk(name: str, in_channels: int, depth: int, pretrained: bool) -> tuple[nn.Sequential, int]:
    import torchvision

    ctor = getattr(torchvision.models, name)
    try:
        net = ctor(weights="IMAGENET1K_V1" if pretrained else None)
    except Exception as exc:  # offline machines: torch.hub raises URLError, OSError, RuntimeError...
        raise ConfigError(f"could not load ImageNet weights for {name} ({first_line(exc)}); set pretrained=false "
                          "or put the weights in the torch hub cache") from None
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if pretrained:  # grey or multi-channel input: spread the RGB filters' mean over the channels
            with torch.no_grad():
                net.conv1.weight.copy_(old.weight.mean(1, keepdim=True).repeat(1, in_channels, 1, 1)
                                       * (3.0 / in_channels))
    stages = [net.layer1, net.layer2, net.layer3, net.layer4][:depth]
    trunk = freeze_batch_norms(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages))
    return trunk, _RESNET_CHANNELS[name][depth - 1]


def standardises(name: str, weight_standardization: str, pretrained: bool) -> bool:
    """Whether ``build_trunk`` standardises this trunk's weights: ``auto`` for the
    from-scratch trunks only, ``on``/``off`` as told; ``on`` with pretrained weights
    (which it would distort) or an unknown setting is a :class:`ConfigError`, which the
    method's ``check`` raises before anything is built or downloaded."""
    if weight_standardization not in ("auto", "on", "off"):
        raise ConfigError(f"bad weight_standardization {weight_standardization!r}; valid: auto, on, off")
    if weight_standardization == "on" and pretrained:
        raise ConfigError("weight_standardization=on would distort the pretrained weights; set it to auto or off")
    return weight_standardization == "on" or (weight_standardization == "auto" and name in ("small", "lenet"))


def build_trunk(name: str, in_channels: int, depth: int | None = None, pretrained: bool = False,
                weight_standardization: str = "auto") -> nn.Sequential:
    """A streamable CNN trunk by name, with every batch norm frozen.

    ``small``: a few conv-ReLU-maxpool stages for CPU runs (``depth`` stages,
    default 4, stride 8). ``resnet18/34/50``: torchvision's ResNet stem and the
    first ``depth`` residual stages (default 4: stride 32, as StreamingCLAM),
    random init unless ``pretrained`` (ImageNet weights; needs them downloaded).
    ``weight_standardization``: ``auto`` standardises the convolutions of the
    from-scratch trunks (small, lenet) and leaves the resnets' (their frozen
    batch norms expect the raw weights); ``on`` / ``off`` force it (``on`` is
    refused with pretrained weights, which it would distort).
    The returned module has ``out_channels`` set for the head.
    """
    if name not in TRUNKS:
        raise ConfigError(f"unknown trunk '{name}'; valid: {', '.join(TRUNKS)}")
    depth = 4 if depth is None else int(depth)
    if not 1 <= depth <= 4:
        raise ConfigError(f"bad trunk_depth {depth}: valid 1..4 (stages of the trunk)")
    if name in ("small", "lenet"):
        if pretrained:
            raise ConfigError(f"trunk '{name}' has no pretrained weights; set pretrained=false")
        trunk, out = _small_trunk(in_channels, depth) if name == "small" else _lenet_trunk(in_channels)
    else:
        trunk, out = _resnet_trunk(name, in_channels, depth, pretrained)
    if standardises(name, weight_standardization, pretrained):
        standardise_weights(trunk)
    trunk.out_channels = out
    return trunk
