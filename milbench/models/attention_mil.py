"""Building the attention-MIL model shared by abmil, grad-accum and sampled.

The three methods declare the same model keys (``ATTENTION_MIL_PARAMS``) and
build the same :class:`~milbench.models.attention.AttentionMIL`, so a
comparison between them is a comparison of gradient strategies only.
"""

from __future__ import annotations

from typing import Any, Mapping

from milbench.config import Param
from milbench.contract import DataSpec
from milbench.models.names import ENCODERS, NORMS  # names only: this module is imported at plugin registration

ATTENTION_MIL_PARAMS: dict[str, Param] = {
    "encoder": Param("auto", str, "instance encoder ('auto': lenet for 1 channel, cnn for 3)",
                     choices=("auto",) + ENCODERS),
    "feat_dim": Param(None, int, "encoder feature size (none: the encoder's default)", low=1, nullable=True),
    "attn_dim": Param(128, int, "hidden size of the gated attention", low=1),
    "norm": Param("auto", str, "encoder norm layers ('auto': none for lenet as Ilse et al. and for cnn, "
                  "frozen for resnet18; batch cannot be chunked exactly)", choices=("auto",) + NORMS),
    "dropout": Param(0.0, float, "dropout on the attention hidden layer", low=0, high=1, high_open=True),
}

#: The model of Andersson et al. 2022 (ResNet-18-style encoder, 2048-d features,
#: attention 2048 -> 524 -> 1), shared by the ABMIL-family methods' ``paper`` preset.
PAPER_MODEL: dict[str, Any] = {"encoder": "resnet18", "feat_dim": 2048, "attn_dim": 524, "norm": "frozen"}

_FEAT_DEFAULT = {"lenet": 500, "cnn": 128, "resnet18": 2048}
# cnn: no norm. GroupNorm + global average pooling made every image's feature vector nearly the
# same at init (per-instance normalisation removes what differs between images), and attention
# MIL then learned nothing on Imagenette in 10 epochs; He init without a norm learns (encoders.py).
_NORM_DEFAULT = {"lenet": "none", "cnn": "none", "resnet18": "frozen"}


def encoder_name(config: Mapping[str, Any], spec: DataSpec) -> str:
    """Resolve ``encoder='auto'`` from the data: LeNet for grey images, a small CNN otherwise."""
    name = config["encoder"]
    if name == "auto":
        return "lenet" if spec.channels == 1 else "cnn"
    return name


def check_geometry(config: Mapping[str, Any], method: str) -> None:
    """Refuse, in the parent and before any child starts, an ``instance_size`` the
    encoder cannot take (LeNet's conv/pool stack shrinks an instance under 16 px
    to nothing and torch would fail mid-run).

    ``check`` has no DataSpec, so ``encoder='auto'`` (LeNet for one channel, the
    CNN for three) must fit either; the minimum comes from the layers
    (:func:`milbench.models.encoders.min_instance_size`), not a constant.
    """
    size = config.get("instance_size")
    if size is None:  # a third-party dataset without the shared key: build() still checks
        return
    from milbench.errors import ConfigError
    from milbench.models.encoders import min_instance_size

    names = ("lenet", "cnn") if config["encoder"] == "auto" else (config["encoder"],)
    need, name = max((min_instance_size(n), n) for n in names)
    if int(size) < need:
        which = ("encoder=auto (lenet for one channel, cnn for three)" if config["encoder"] == "auto"
                 else f"encoder '{name}'")
        raise ConfigError(f"bad value for 'instance_size': {method} with {which} needs instances of at least "
                          f"{need} px (its conv and pool layers shrink a smaller one to nothing), got {size}; "
                          f"raise instance_size" + "".join(f" or use --set encoder={n}" for n in ENCODERS
                                                           if min_instance_size(n) <= int(size)))


def build_attention_mil(spec: DataSpec, config: Mapping[str, Any]) -> Any:
    """The ABMIL model for this data and config (random init, seeded by the harness)."""
    from milbench.models.attention import AttentionMIL
    from milbench.models.encoders import create_encoder

    name = encoder_name(config, spec)
    feat_dim = config["feat_dim"] or _FEAT_DEFAULT[name]
    norm = _NORM_DEFAULT[name] if config["norm"] == "auto" else config["norm"]
    enc = create_encoder(name, spec.channels, spec.instance_size, feat_dim, norm)
    return AttentionMIL(enc, feat_dim, config["attn_dim"], config["dropout"])
