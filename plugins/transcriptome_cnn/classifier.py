"""The patch classifier: a timm backbone with its patch geometry, class weighting and precise BN.

Why a module of its own: this is the model of the ``transcriptome-cnn``
method, imported (with torch) only when a run builds it, never when the
plugin registers.

One backbone classifies a patch into the dataset's instance classes. Two sizes
matter and are kept apart: the *field of view* (how many image pixels a patch
covers) and the *input size* (the side the backbone sees). ``fit = "crop"``
takes the centre ``patch_size`` pixels of each instance (field = input =
``patch_size``); ``fit = "resize"`` resamples the whole instance to
``patch_size`` (field = instance size). The centre crop keeps the instance's
pixel ``s // 2`` at ``patch_size // 2`` -- where a spot-centred patch holds its
spot -- and the sliding window (:mod:`.dense_map`) centres each output cell the
same way, so training patches and dense prediction agree on what "the patch at
a pixel" means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from milbench.api import ConfigError, did_you_mean

#: Backbones of five families benchmarked by default (all build with timm,
#: take 1-channel inputs and patches of 32 px or more).
DEFAULT_BACKBONES = ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "densenet121", "convnext_atto")


def build_backbone(name: str, in_chans: int, num_classes: int) -> nn.Module:
    """A timm model with random weights (``pretrained=False``: nothing is downloaded).

    Raises a one-line :class:`ConfigError` for a name timm does not know.
    """
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm backbone {name!r}{did_you_mean(name, timm.list_models())}; "
                          f"e.g. {', '.join(DEFAULT_BACKBONES)}")
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    except Exception as e:  # timm raises several types for unsupported arguments
        raise ConfigError(f"timm cannot build backbone {name!r} with in_chans={in_chans}: "
                          f"{' '.join(str(e).split())}") from None


_INPUT_OK: dict[tuple[str, int, int], tuple[str, str] | None] = {}


def check_backbone_input(name: str, size: int, min_batch: int = 2) -> None:
    """A one-line :class:`ConfigError` when timm backbone ``name`` cannot classify ``size`` px
    patches, or cannot *train* on a batch of ``min_batch`` of them (batch norm in training mode
    needs more than one value per channel: one patch whose last feature map is 1×1 crashes).

    Asked of the backbone itself (dummy forwards, cached per name, size and batch), so the
    parent refuses the config before a child starts instead of each backbone's own minimum
    being written down somewhere. Channels and class count do not change geometry.
    """
    key = (name, int(size), int(min_batch))
    if key not in _INPUT_OK:
        net = build_backbone(name, 3, 2)
        _INPUT_OK[key] = None
        for mode, batch in (("classify", 2), ("train on", max(1, int(min_batch)))):
            net.train(mode != "classify")
            try:
                with torch.no_grad():
                    net(torch.zeros(batch, 3, int(size), int(size)))
            except Exception as e:
                _INPUT_OK[key] = (mode, " ".join(str(e).split())[:160])
                break
    if _INPUT_OK[key] is not None:
        mode, why = _INPUT_OK[key]
        if mode == "classify":
            raise ConfigError(f"backbone {name!r} cannot classify {size} px patches ({why}); "
                              f"use a larger patch_size / instance_size or another backbone")
        raise ConfigError(f"backbone {name!r} cannot train on {min_batch} patch(es) of {size} px per bag ({why}): its "
                          f"batch norm needs more than one value per channel; raise bag_size or the patch size")


class PatchClassifier(nn.Module):
    """A backbone plus the patch geometry and running class counts.

    ``class_counts`` (a buffer, saved with checkpoints) counts the training
    labels seen so far; with ``class_weights = "balanced"`` the loss weights
    each class by ``total / (n_seen_classes * count)`` -- inverse frequency
    estimated online, because the method never sees the whole training split
    at build time.
    """

    def __init__(self, backbone: nn.Module, n_classes: int, in_chans: int, field: int, input_size: int,
                 key_class: int = 1, class_weights: str = "balanced", bn_recalibrate: int = 0):
        super().__init__()
        if class_weights not in ("balanced", "none"):
            raise ConfigError(f"bad value for 'class_weights': {class_weights!r}; valid: balanced, none")
        self.backbone = backbone
        self.n_classes, self.in_chans = int(n_classes), int(in_chans)
        self.field, self.input_size = int(field), int(input_size)
        self.key_class, self.class_weights = int(key_class), class_weights
        self.bn_recalibrate = int(bn_recalibrate)
        self.register_buffer("class_counts", torch.zeros(n_classes, dtype=torch.float64))
        self._recent: list[torch.Tensor] = []  # latest training instances (CPU), not part of the state dict
        self._bn_stale = False

    def fit_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Centre-crop (n, C, s, s) instances to the field of view, then resize to the input size."""
        s = x.shape[-1]
        if s < self.field:
            raise ConfigError(f"instances of {s} px are smaller than the classifier's {self.field} px field; "
                              f"lower patch_size or raise instance_size")
        if s > self.field:
            o = s // 2 - self.field // 2
            x = x[..., o:o + self.field, o:o + self.field]
        if self.field != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=self.input_size < self.field)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (n, n_classes) for a batch of instances of any side >= the field."""
        return self.backbone(self.fit_patches(x))

    def loss_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Update the running counts with ``labels``; return CE class weights (or None)."""
        self.class_counts += torch.bincount(labels.detach().cpu(), minlength=self.n_classes).to(torch.float64)
        if self.class_weights == "none":
            return None
        return balanced_weights(self.class_counts).to(device=labels.device, dtype=torch.float32)

    def batch_norms(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def remember(self, x: torch.Tensor) -> None:
        """Keep the latest ``bn_recalibrate`` training instances for :meth:`recalibrate_bn`."""
        if self.bn_recalibrate <= 0:
            return
        self._recent.append(x.detach().to("cpu", copy=True))
        while sum(len(t) for t in self._recent[1:]) >= self.bn_recalibrate:
            self._recent.pop(0)
        self._bn_stale = True

    def recalibrate_bn(self) -> bool:
        """Set every batch norm's running statistics to those of one batch of the latest
        training instances ("precise BN"); returns whether it did.

        Why: PyTorch's running averages of per-batch statistics (small, mixed
        batches of 1x1 feature maps on 32 px patches) can differ so much from
        the statistics the network learned with that MobileNetV3 and
        EfficientNet predict one class for everything in eval mode
        (measured: background recall 1.0 in train mode, 0.0 in eval mode);
        statistics of one batch of 256-512 training patches restore
        train-mode accuracy. Only training patches are used, only when the
        weights changed since the last call, and the model stays in eval mode
        otherwise (dropout off).
        """
        bns = self.batch_norms()
        if not (self._bn_stale and self._recent and bns):
            self._bn_stale = False
            return False
        x = torch.cat(self._recent)[-self.bn_recalibrate:]
        saved = [(m, m.momentum, m.training) for m in bns]
        device = next(self.parameters()).device
        try:
            for m in bns:
                m.momentum = 1.0  # running stats := this batch's statistics
                m.train()
            with torch.no_grad():
                self(x.to(device))
        finally:
            for m, mom, tr in saved:
                m.momentum = mom
                m.train(tr)
        self._bn_stale = False
        return True

    def check_input(self) -> None:
        """One dummy forward at the input size; a one-line ConfigError if the backbone cannot take it."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                p = next(self.parameters())
                self.backbone(torch.zeros(2, self.in_chans, self.input_size, self.input_size, device=p.device,
                                          dtype=p.dtype))
        except Exception as e:
            raise ConfigError(f"backbone {type(self.backbone).__name__} cannot classify {self.input_size} px "
                              f"patches ({' '.join(str(e).split())[:160]}); use patch_size >= 32") from None
        finally:
            self.train(was)


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights ``total / (k * count)`` over the k classes seen; 1 for unseen ones."""
    counts = counts.to(torch.float64)
    seen = counts > 0
    w = torch.ones_like(counts)
    if seen.any():
        w[seen] = counts[seen].sum() / (seen.sum() * counts[seen])
    return w


def predict_batched(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Softmax probabilities (n, K) for ``x`` in batches of ``batch``."""
    out = [torch.softmax(model(x[i:i + batch]), dim=1) for i in range(0, x.shape[0], batch)]
    return torch.cat(out) if out else x.new_zeros((0, getattr(model, "n_classes", 2)))
