"""Streaming convolution: exact CNN forward and backward over images too large
for memory, one tile at a time (Pinckaers et al., "Streaming convolutional
neural networks for end-to-end learning with multi-megapixel images", TPAMI
2020). Written for milbench from the paper's idea; no code is shared with the
authors' libraries.

Why it is exact. Every layer a streamable trunk may contain (convolutions,
max/avg pooling, point-wise activations, frozen or eval-mode batch norm, and
residual additions of such branches) maps output position ``o`` of the trunk
to a fixed input interval ``[o*S + lo, o*S + hi]`` per axis, with ``S`` the
total stride. The engine derives ``S``, ``lo`` and ``hi`` from the layers'
kernel sizes, strides, paddings and dilations (a torch.fx trace of the trunk,
so residual blocks are handled by taking the union over branches), then

* cuts the image into tiles whose origin is a multiple of ``S`` (so tile
  positions line up with whole-image positions at every layer) and which
  extend ``-lo`` pixels before and ``hi - S + 1`` after the outputs they are
  responsible for; a tile side that lies on the image border is the image
  border, so the tile sees exactly the zero padding the whole image sees;
* runs the *unchanged* trunk on each tile and keeps only the outputs whose
  input interval lies inside the tile (or runs past the image border on a side
  where the tile is at the border): those equal the whole-image outputs;
* for the backward pass, recomputes each tile with autograd and
  back-propagates the slice of ``dL/dF`` it is responsible for. Every output
  position is back-propagated exactly once, so the summed parameter (and
  input) gradients are the whole-image ones.

Peak memory is that of one tile (plus the stitched feature map and the
image), whatever the image size. The price is recomputation: tiles overlap by
the receptive field, and the backward needs a second forward. With a tile of
side ``T`` and a receptive field ``R`` the work is roughly
``(T / (T - R))**2 * 4/3`` times a plain forward+backward, so tiles should be
several receptive fields wide (the StreamingCLAM paper used 3200-px tiles for
ResNet-34, whose receptive field is 899 px). Under the same memory bound,
``tile_shape="area"`` lets a tile be any rectangle of at most ``T**2`` pixels
and picks the one that recomputes least -- typically strips as wide or as
tall as the image, which overlap on two sides instead of four (ResNet-34 at
2048 px with ``T`` = 1920: 1.45x the image's pixels instead of 2.1x).

All tiles of a plan share one shape where the image allows it: the last tile
of a row or column is shifted inward to end on the border (it recomputes a
few outputs its neighbour owns; nothing is padded), because each new tile
shape makes the backend set its kernels up again, which made the first epoch
of a streamed run several times slower than the next.

``split`` cuts a Sequential trunk into stages streamed one after the other,
with the (small, strided) map between them held whole: the early layers hold
most activations but have a small receptive field, the late layers have the
large field but little memory per image pixel, so each stage gets tiles many
of its own receptive fields wide. :func:`auto_stages` chooses the cut and the
tile sizes for a memory budget from a measured activation cost per pixel
(``tile_size="auto"`` in streamingclam). A training step also keeps the last
tile's graph from the forward instead of recomputing it.

Layers whose output depends on the whole feature map (group/layer/instance
norm, training-mode batch norm, adaptive or global pooling, linear layers) or
on chance (training-mode dropout) cannot be streamed; the engine refuses them
with a one-line :class:`~milbench.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from milbench.errors import ConfigError

__all__ = [
    "Geometry", "Tile", "StreamingTrunk", "geometry", "plan_tiles", "streamed_forward_backward",
    "register_pointwise", "describe", "activation_bytes_per_pixel", "auto_tile_size", "DEFAULT_TILE_BUDGET_BYTES",
    "StagePlan", "auto_stages", "kept_map_bytes", "stage_maps", "kept_maps_error",
]

# --------------------------------------------------------------------------------------------
# Which layers stream, and how
# --------------------------------------------------------------------------------------------

_POINTWISE_MODULES: list[type] = [
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
]
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Layers refused with a reason (checked before the generic "unknown layer" error).
_WHOLE_MAP = "its output depends on the whole feature map, so a tile cannot reproduce it"
_REFUSED: list[tuple[type, str]] = [
    (nn.GroupNorm, _WHOLE_MAP + "; use frozen batch norm or no norm in a streamed trunk"),
    (nn.LayerNorm, _WHOLE_MAP + "; use frozen batch norm or no norm in a streamed trunk"),
    (nn.modules.instancenorm._InstanceNorm, _WHOLE_MAP + "; use frozen batch norm or no norm in a streamed trunk"),
    (nn.AdaptiveAvgPool2d, _WHOLE_MAP + " (adaptive pooling); end the trunk before it"),
    (nn.AdaptiveMaxPool2d, _WHOLE_MAP + " (adaptive pooling); end the trunk before it"),
    (nn.Linear, "a linear layer mixes all positions; end the trunk before it"),
    (nn.Flatten, "flattening mixes all positions; end the trunk before it"),
    (nn.Upsample, "upsampling is not supported by the streaming engine"),
    (nn.modules.conv._ConvTransposeNd, "transposed convolutions are not supported by the streaming engine"),
]


def _frozen_norm_types() -> tuple[type, ...]:
    """Frozen batch norms known to be point-wise: ours, and torchvision's when
    it is loaded (a trunk cannot hold its layers otherwise, and importing a
    library just to look would cost seconds)."""
    from milbench.models.norms import FrozenBatchNorm2d

    types: list[type] = [FrozenBatchNorm2d]
    for module, attr in (("torchvision.ops.misc", "FrozenBatchNorm2d"),):
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


def register_pointwise(cls: type) -> type:
    """Declare a module class point-wise in space (each output pixel depends
    only on the same input pixel), so the engine streams it. Usable as a
    class decorator by third-party trunks."""
    if cls not in _POINTWISE_MODULES:
        _POINTWISE_MODULES.append(cls)
    return cls


# Element-wise functions and tensor methods: the output at a pixel depends only on
# the inputs at that pixel, so their geometry is the union of their operands'.
_POINTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.clip, torch.maximum, torch.minimum,
    torch.square,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.softsign, F.logsigmoid,
}
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "add", "add_", "sub", "sub_", "mul", "mul_",
    "div", "div_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "neg", "exp", "sqrt", "rsqrt",
    "abs", "square", "to", "type", "float", "double", "half", "bfloat16", "contiguous", "clone", "detach",
}


@dataclass(frozen=True)
class _Window:
    """One sliding-window layer along one axis (convolution or pooling)."""

    kernel: int
    stride: int
    pad_lo: int
    pad_hi: int
    dilation: int = 1
    ceil_mode: bool = False

    def out_size(self, n: int) -> int:
        """Output length for input length ``n`` (PyTorch's conv/pool rule)."""
        span = self.dilation * (self.kernel - 1) + 1
        top = n + self.pad_lo + self.pad_hi - span  # floor division rounds down, as ATen's div_rtn
        out = (top + (self.stride - 1 if self.ceil_mode else 0)) // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.pad_lo:
            out -= 1
        return max(out, 0)


@dataclass(frozen=True)
class _Step:
    """One node of the traced trunk: how its geometry and size follow from its inputs."""

    name: str
    kind: str  # "input" | "const" | "window" | "merge"
    inputs: tuple[str, ...] = ()
    windows: tuple[_Window, _Window] | None = None  # (rows, cols) for kind == "window"


@dataclass(frozen=True)
class _Axis:
    """Output ``o`` of a node reads input ``[o*stride + lo, o*stride + hi]`` along one axis."""

    stride: int
    lo: int
    hi: int

    def then(self, w: _Window) -> "_Axis":
        """Geometry after applying window layer ``w`` to a node with this geometry."""
        w_lo = -w.pad_lo
        w_hi = -w.pad_lo + w.dilation * (w.kernel - 1)
        return _Axis(self.stride * w.stride, w_lo * self.stride + self.lo, w_hi * self.stride + self.hi)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _conv_windows(m: nn.Conv2d, name: str) -> tuple[_Window, _Window]:
    if type(m).forward is not nn.Conv2d.forward or type(m)._conv_forward is not nn.Conv2d._conv_forward:
        raise ConfigError(f"cannot stream layer '{name}' ({type(m).__name__}): a Conv2d subclass with its own "
                          f"forward may pad by input size; use a plain nn.Conv2d")
    if m.padding_mode != "zeros":
        raise ConfigError(f"cannot stream layer '{name}' (Conv2d, padding_mode='{m.padding_mode}'): only zero "
                          f"padding is streamed exactly; use padding_mode='zeros'")
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pads = [(0, 0), (0, 0)]
        else:  # 'same' (stride 1): PyTorch puts the odd extra pixel after
            pads = [(t // 2, t - t // 2) for t in (d[0] * (k[0] - 1), d[1] * (k[1] - 1))]
    else:
        p = _pair(m.padding)
        pads = [(p[0], p[0]), (p[1], p[1])]
    rows, cols = (_Window(k[i], s[i], pads[i][0], pads[i][1], d[i]) for i in range(2))
    return rows, cols


def _pool_windows(m: nn.Module, name: str) -> tuple[_Window, _Window]:
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise ConfigError(f"cannot stream layer '{name}' (MaxPool2d with return_indices=True); "
                          f"use return_indices=False")
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    p = _pair(m.padding)
    d = _pair(getattr(m, "dilation", 1))
    rows, cols = (_Window(k[i], s[i], p[i], p[i], d[i], bool(m.ceil_mode)) for i in range(2))
    return rows, cols


# --------------------------------------------------------------------------------------------
# Tracing the trunk into steps
# --------------------------------------------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps every layer the engine reasons about as one leaf."""

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _leaf_types() -> tuple[type, ...]:
    return (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, *_POINTWISE_MODULES, *_DROPOUTS, *_BATCH_NORMS,
            *_frozen_norm_types(), *(t for t, _ in _REFUSED))


@dataclass
class _Analysis:
    """The traced trunk as plain data: steps in topological order, the output
    step, and the names of modules whose mode must be checked at every call."""

    steps: list[_Step]
    output: str
    mode_checked: list[str]

    def axes(self) -> tuple[_Axis, _Axis]:
        geo: dict[str, tuple[_Axis, _Axis] | None] = {}
        for st in self.steps:
            if st.kind == "input":
                geo[st.name] = (_Axis(1, 0, 0), _Axis(1, 0, 0))
            elif st.kind == "const":
                geo[st.name] = None
            elif st.kind == "window":
                g = geo[st.inputs[0]]
                assert g is not None and st.windows is not None
                geo[st.name] = (g[0].then(st.windows[0]), g[1].then(st.windows[1]))
            else:  # merge: union of the operands' input intervals
                gs = [geo[i] for i in st.inputs if geo[i] is not None]
                out = []
                for ax in range(2):
                    strides = {g[ax].stride for g in gs}  # type: ignore[index]
                    if len(strides) != 1:
                        raise ConfigError(f"cannot stream node '{st.name}': it combines feature maps of different "
                                          f"strides {sorted(strides)}")
                    lo = min(g[ax].lo for g in gs)  # type: ignore[index]
                    hi = max(g[ax].hi for g in gs)  # type: ignore[index]
                    out.append(_Axis(strides.pop(), lo, hi))
                geo[st.name] = (out[0], out[1])
        g = geo[self.output]
        assert g is not None
        return g

    def sizes(self, h: int, w: int) -> tuple[int, int]:
        """Output (rows, cols) of the trunk for an (h, w) input, or (0, 0) if too small."""
        size: dict[str, tuple[int, int] | None] = {}
        for st in self.steps:
            if st.kind == "input":
                size[st.name] = (h, w)
            elif st.kind == "const":
                size[st.name] = None
            elif st.kind == "window":
                src = size[st.inputs[0]]
                assert src is not None and st.windows is not None
                size[st.name] = (st.windows[0].out_size(src[0]), st.windows[1].out_size(src[1]))
            else:
                shapes = {size[i] for i in st.inputs if size[i] is not None}
                if len(shapes) != 1:
                    raise ConfigError(f"cannot stream node '{st.name}' for a {h}x{w} input: it combines feature "
                                      f"maps of sizes {sorted(shapes)}")  # type: ignore[type-var]
                size[st.name] = shapes.pop()
            s = size[st.name]
            if s is not None and min(s) < 1:
                return (0, 0)
        out = size[self.output]
        assert out is not None
        return out


def _analyse(trunk: nn.Module) -> _Analysis:
    """Trace ``trunk`` and translate every node into a :class:`_Step`, refusing
    anything whose output at a pixel is not a function of a fixed window."""
    root = trunk
    leaves = _leaf_types()
    if isinstance(trunk, leaves):  # a single layer: trace it as a one-layer sequence
        root = nn.Sequential(trunk)
    try:
        graph = _Tracer(leaves).trace(root)
    except Exception as exc:  # fx raises many types for untraceable Python
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot stream {type(trunk).__name__}: torch.fx could not trace it ({msg}); "
                          f"streamed trunks must be traceable (no data-dependent Python control flow)") from None
    steps: list[_Step] = []
    spatial: set[str] = set()
    mode_checked: list[str] = []
    output = None
    seen_input = False
    frozen = _frozen_norm_types()

    def spatial_args(args: Any) -> list[str]:
        found: list[str] = []
        torch.fx.node.map_arg(args, lambda n: found.append(n.name) if n.name in spatial else None)
        return found

    for node in graph.nodes:
        if node.op == "output":
            outs = spatial_args(node.args)
            if len(outs) != 1 or not isinstance(node.args[0], torch.fx.Node):
                raise ConfigError(f"cannot stream {type(trunk).__name__}: it must return one feature map tensor")
            output = node.args[0].name
            continue
        if node.op == "placeholder":
            if not seen_input:
                seen_input = True
                steps.append(_Step(node.name, "input"))
                spatial.add(node.name)
            else:
                steps.append(_Step(node.name, "const"))
            continue
        if node.op == "get_attr":
            value = _fetch_attr(root, node.target)
            if isinstance(value, torch.Tensor) and value.dim() >= 3 and tuple(value.shape[-2:]) != (1, 1):
                raise ConfigError(f"cannot stream {type(trunk).__name__}: tensor '{node.target}' of shape "
                                  f"{tuple(value.shape)} has a spatial extent and would not tile")
            steps.append(_Step(node.name, "const"))
            continue
        sp = spatial_args((node.args, node.kwargs))
        if not sp:  # depends on parameters/constants only (e.g. a frozen norm's scale)
            steps.append(_Step(node.name, "const"))
            continue
        spatial.add(node.name)
        if node.op == "call_module":
            mod = root.get_submodule(node.target)
            label = f"'{node.target}' ({type(mod).__name__})"
            if len(sp) != 1:
                raise ConfigError(f"cannot stream layer {label}: it takes several feature maps")
            if isinstance(mod, nn.Conv2d):
                steps.append(_Step(node.name, "window", tuple(sp), _conv_windows(mod, node.target)))
            elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
                steps.append(_Step(node.name, "window", tuple(sp), _pool_windows(mod, node.target)))
            elif isinstance(mod, _BATCH_NORMS):
                if not mod.track_running_stats:
                    raise ConfigError(f"cannot stream layer {label}: batch norm without running statistics uses "
                                      f"batch statistics; freeze it (milbench.models.norms.freeze_batch_norms)")
                mode_checked.append(node.target)
                steps.append(_Step(node.name, "merge", tuple(sp)))
            elif isinstance(mod, _DROPOUTS):
                mode_checked.append(node.target)
                steps.append(_Step(node.name, "merge", tuple(sp)))
            elif isinstance(mod, frozen) or isinstance(mod, tuple(_POINTWISE_MODULES)):
                steps.append(_Step(node.name, "merge", tuple(sp)))
            else:
                for cls, why in _REFUSED:
                    if isinstance(mod, cls):
                        raise ConfigError(f"cannot stream layer {label}: {why}")
                raise ConfigError(
                    f"cannot stream layer {label}: not a layer the streaming engine knows; streamable layers are "
                    f"Conv2d, MaxPool2d, AvgPool2d, frozen/eval batch norm and point-wise activations "
                    f"(declare others with milbench.models.streaming.register_pointwise)")
        elif node.op == "call_function":
            if node.target is torch.cat or node.target is torch.concat:
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                if dim in (2, 3, -1, -2):
                    raise ConfigError(f"cannot stream node '{node.name}': it concatenates along a spatial axis")
                steps.append(_Step(node.name, "merge", tuple(sp)))
            elif node.target in _POINTWISE_FUNCTIONS:
                steps.append(_Step(node.name, "merge", tuple(sp)))
            else:
                fname = getattr(node.target, "__name__", str(node.target))
                raise ConfigError(f"cannot stream node '{node.name}': function '{fname}' on a feature map is not "
                                  f"known to be point-wise in space (use nn.Module layers the engine knows)")
        elif node.op == "call_method":
            if node.target not in _POINTWISE_METHODS:
                raise ConfigError(f"cannot stream node '{node.name}': tensor method '.{node.target}()' on a feature "
                                  f"map is not known to be point-wise in space")
            steps.append(_Step(node.name, "merge", tuple(sp)))
        else:  # pragma: no cover - fx has no other ops
            raise ConfigError(f"cannot stream node '{node.name}' (op {node.op})")
    if output is None or not seen_input:
        raise ConfigError(f"cannot stream {type(trunk).__name__}: it takes no input or returns nothing")
    if root is not trunk:  # names traced inside the wrapping Sequential: '0' is the trunk itself
        mode_checked = ["" if n == "0" else n[2:] for n in mode_checked]
    return _Analysis(steps, output, mode_checked)


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# Geometry and tiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where a trunk's outputs come from, per axis (rows, cols).

    Output position ``o`` reads input pixels ``[o*stride + lo, o*stride + hi]``
    (``lo`` is usually negative: padding). ``receptive_field = hi - lo + 1``;
    ``margin_before = -lo`` and ``margin_after = hi - stride + 1`` are the
    context a tile needs around the ``stride``-px cell it is responsible for;
    ``min_tile_size`` is the smallest tile side that still makes progress in
    the image interior.
    """

    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]
    _analysis: _Analysis = field(repr=False, compare=False)

    @property
    def receptive_field(self) -> tuple[int, int]:
        return (self.hi[0] - self.lo[0] + 1, self.hi[1] - self.lo[1] + 1)

    @property
    def margin_before(self) -> tuple[int, int]:
        return (-self.lo[0], -self.lo[1])

    @property
    def margin_after(self) -> tuple[int, int]:
        return (self.hi[0] - self.stride[0] + 1, self.hi[1] - self.stride[1] + 1)

    @property
    def min_tile_size(self) -> int:
        return max(_min_tile(self.stride[i], self.lo[i], self.hi[i]) for i in range(2))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Feature-map (rows, cols) for an (h, w) image; ConfigError if too small."""
        out = self._analysis.sizes(h, w)
        if min(out) < 1:
            raise ConfigError(f"image {h}x{w} is too small for this trunk (stride {self.stride}, receptive field "
                              f"{self.receptive_field}); it yields no feature-map position")
        return out


def _min_tile(s: int, lo: int, hi: int) -> int:
    return s * (-(-(hi + 1) // s)) - s * (lo // s)


def geometry(trunk: nn.Module) -> Geometry:
    """Stride, receptive field and tile margins of a trunk, computed from its
    layers (not measured), plus its output size for any input size."""
    analysis = _analyse(trunk)
    rows, cols = analysis.axes()
    return Geometry((rows.stride, cols.stride), (rows.lo, cols.lo), (rows.hi, cols.hi), analysis)


@dataclass(frozen=True)
class Tile:
    """One tile: the input pixels it reads and the outputs it is responsible for.

    ``rows``/``cols`` slice the image; ``out_rows``/``out_cols`` slice the
    stitched feature map; ``local_rows``/``local_cols`` slice the tile's own
    output to the same positions.
    """

    rows: slice
    cols: slice
    out_rows: slice
    out_cols: slice
    local_rows: slice
    local_cols: slice


def _plan_axis_greedy(n: int, n_out: int, s: int, lo: int, hi: int, tile: int,
                      axis: str) -> list[tuple[int, int, int, int]]:
    """Cut one axis into (x0, x1, o0, o1): input [x0, x1) gives exact outputs [o0, o1).

    Greedy from the start. ``x0`` is a multiple of the stride (tile positions
    line up with whole-image positions); each tile extends far enough past its
    last output for that output's input interval, rounded up to a multiple of
    the stride, and is at most ``tile`` pixels long unless it can end on the
    image border. Tiles may differ in length (the last one usually does): the
    fallback of :func:`_plan_axis` where no single length fits.
    """
    if n <= tile:
        return [(0, n, 0, n_out)]
    cap = (tile // s) * s
    parts = []
    o0 = 0
    while o0 < n_out:
        x0 = max(0, ((o0 * s + lo) // s) * s)
        if n - x0 <= tile:
            parts.append((x0, n, o0, n_out))
            break
        o1 = min(n_out, (x0 + cap - hi - 1) // s + 1)
        if o1 <= o0:
            raise ConfigError(
                f"tile_size {tile} is too small for this trunk along the {axis}: a tile must be at least "
                f"{_min_tile(s, lo, hi)} px (receptive field {hi - lo + 1} px, stride {s}), and several times "
                f"the receptive field to be efficient")
        need = (o1 - 1) * s + hi + 1
        x1 = min(n, x0 + -(-(need - x0) // s) * s)
        parts.append((x0, x1, o0, o1))
        o0 = o1
    return parts


def _walk_axis(n: int, n_out: int, s: int, lo: int, hi: int, length: int) -> list[tuple[int, int, int, int]] | None:
    """Tiles of exactly ``length`` pixels (``length`` = ``n`` mod ``s``), or None
    where such tiles make no progress.

    Each tile starts at a multiple of the stride, as far on as the outputs not
    yet covered allow; the last one is shifted inward to end on the image
    border (its start ``n - length`` is then a multiple of the stride too), so
    it reads real pixels only and recomputes some outputs its neighbour
    already owns rather than padding.
    """
    parts: list[tuple[int, int, int, int]] = []
    o0, x0 = 0, 0
    while True:
        if x0 + length >= n:  # the last tile: shifted inward to end on the border
            parts.append((n - length, n, o0, n_out))
            return parts
        o1 = min(n_out, (x0 + length - hi - 1) // s + 1)  # outputs whose whole input interval is inside
        if o1 <= o0:
            return None
        parts.append((x0, x0 + length, o0, o1))
        if o1 >= n_out:
            return parts
        o0 = o1
        x0 = max(0, ((o0 * s + lo) // s) * s)


def _plan_axis(n: int, n_out: int, s: int, lo: int, hi: int, tile: int, axis: str) -> list[tuple[int, int, int, int]]:
    """Cut one axis into (x0, x1, o0, o1): input [x0, x1) gives exact outputs [o0, o1).

    Why one length: every new tile shape makes the backend set its kernels up
    again (oneDNN primitives on a CPU, cuDNN's autotuner on a GPU), which made
    the first epoch of a streamed run many times slower than the next. So all
    tiles of an axis get one length ``L`` <= ``tile``: the longest with
    ``L`` = ``n`` (mod stride), which lets the last tile start on a multiple
    of the stride when it is shifted inward to end on the border; then the
    shortest length that needs no more tiles (less recomputation, same count).
    Only where no such length makes progress does the greedy plan of mixed
    lengths (:func:`_plan_axis_greedy`) stand in; it also raises the clear
    error for a tile too small for the trunk.
    """
    if n <= tile:
        return [(0, n, 0, n_out)]
    longest = tile - ((tile - n) % s)
    best = _walk_axis(n, n_out, s, lo, hi, longest) if longest > 0 else None
    if best is None:
        return _plan_axis_greedy(n, n_out, s, lo, hi, tile, axis)
    # the shortest length (in strides below the longest) with as few tiles: binary search, as a
    # longer tile never needs more tiles
    good, bad = 0, (longest - 1) // s + 1  # steps: `good` keeps the count, `bad` does not (or stalls)
    while bad - good > 1:
        mid = (good + bad) // 2
        parts = _walk_axis(n, n_out, s, lo, hi, longest - mid * s)
        if parts is not None and len(parts) <= len(best):
            good, best = mid, parts
        else:
            bad = mid
    return best


TILE_SHAPES = ("square", "area")


def _axis_read(parts: list[tuple[int, int, int, int]]) -> int:
    return sum(x1 - x0 for x0, x1, _, _ in parts)


@functools.lru_cache(maxsize=256)
def _area_caps(geo: Geometry, h: int, w: int, tile_size: int) -> tuple[int, int]:
    """Row and column caps ``(th, tw)`` with ``th * tw <= tile_size**2`` that read
    the fewest input pixels in total (ties: fewer tiles).

    Why: the recomputation cost of streaming is the overlap between tiles, and
    a square tile overlaps its neighbours on all four sides. Under the same
    memory bound (the tile's pixel count), a strip as wide as the image
    overlaps only above and below: a 2048-px square image with 1920^2-px tiles
    reads 2.1x its pixels through 2x2 square tiles (ResNet-34, 899-px
    receptive field) but 1.45x through two full-width strips.
    """
    budget = tile_size * tile_size
    sy, sx = geo.stride
    candidates = {tile_size, w} | set(range(sx * max(1, geo.min_tile_size // sx), w + 1, sx))
    ho, wo = geo.output_size(h, w)
    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    for tw in sorted(c for c in candidates if 0 < c <= w):
        th = min(h, budget // tw)
        if th < 1:
            continue
        try:
            xs = _plan_axis(w, wo, sx, geo.lo[1], geo.hi[1], tw, "columns")
            ys = _plan_axis(h, ho, sy, geo.lo[0], geo.hi[0], th, "rows")
        except ConfigError:
            continue
        key = (_axis_read(ys) * _axis_read(xs), len(ys) * len(xs))
        if best is None or key < best[0]:
            best = (key, (th, tw))
    if best is None:  # no rectangle makes progress: the square plan raises the clear error
        return tile_size, tile_size
    return best[1]


def _check_tiling(tile_size: int, shape: str) -> None:
    if int(tile_size) < 1:
        raise ConfigError(f"bad tile_size {tile_size}: must be a positive number of pixels")
    if shape not in TILE_SHAPES:
        raise ConfigError(f"bad tile shape {shape!r}; valid: {', '.join(TILE_SHAPES)}")


def plan_tiles(geo: Geometry, h: int, w: int, tile_size: int, shape: str = "square") -> list[Tile]:
    """The tiles that stream an (h, w) image: a row-major list covering the
    whole feature map exactly once. One tile when the image fits in one.

    ``shape="square"``: every tile side is at most ``tile_size``.
    ``shape="area"``: every tile holds at most ``tile_size**2`` pixels, in the
    rectangle that recomputes least (see :func:`_area_caps`) -- the same memory
    bound with less overlap, e.g. full-width strips.
    """
    _check_tiling(tile_size, shape)
    ho, wo = geo.output_size(h, w)
    return list(_plan_tiles(geo, h, w, ho, wo, int(tile_size), shape))


@functools.lru_cache(maxsize=256)
def _plan_tiles(geo: Geometry, h: int, w: int, ho: int, wo: int, tile_size: int, shape: str) -> tuple[Tile, ...]:
    """:func:`plan_tiles`, cached: every pass over an image of one size asks for the same
    plan. The output size is part of the key: geometries compare by stride and margins
    only, and two trunks alike in those may still differ in output size."""
    th, tw = tile_size, tile_size
    if shape == "area" and h * w > tile_size * tile_size:
        th, tw = _area_caps(geo, h, w, tile_size)
    elif shape == "area":
        th, tw = h, w
    ys = _plan_axis(h, ho, geo.stride[0], geo.lo[0], geo.hi[0], th, "rows")
    xs = _plan_axis(w, wo, geo.stride[1], geo.lo[1], geo.hi[1], tw, "columns")
    tiles = []
    for y0, y1, oy0, oy1 in ys:
        for x0, x1, ox0, ox1 in xs:
            ly, lx = oy0 - y0 // geo.stride[0], ox0 - x0 // geo.stride[1]
            tiles.append(Tile(slice(y0, y1), slice(x0, x1), slice(oy0, oy1), slice(ox0, ox1),
                              slice(ly, ly + oy1 - oy0), slice(lx, lx + ox1 - ox0)))
    return tuple(tiles)


# --------------------------------------------------------------------------------------------
# Choosing the tile size from a memory budget
# --------------------------------------------------------------------------------------------

#: Tile activation budget of ``tile_size="auto"`` when the run states no memory limit: 2 GiB,
#: what a laptop or a small GPU spares beside the model (ResNet-34: ~1,600-px tiles in float32).
DEFAULT_TILE_BUDGET_BYTES = 2 * 2**30

#: Counted saved activations times this is a tile's peak: the backward also holds the gradients
#: of the layer it is in, and the allocator does not pack perfectly. Measured for ResNet-34 at
#: 2048 px (results/streaming-memory-cpu/): working memory 743 B/px of tile against 642 counted.
ACTIVATION_HEADROOM = 1.25


def _in_channels(trunk: nn.Module) -> int:
    conv = next((m for m in trunk.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ConfigError(f"cannot size tiles for {type(trunk).__name__}: it has no Conv2d to read the input "
                          f"channels from; give tile_size in pixels")
    return int(conv.in_channels)


def saved_tensor_bytes(run: Callable[[], torch.Tensor], module: nn.Module,
                       exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward of ``run()``,
    leaving out ``module``'s parameters and buffers and the ``exclude`` tensors (e.g. an
    input counted elsewhere): what a forward of that size holds until its backward."""
    skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers(), *exclude]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def _saved_bytes(trunk: nn.Module, side: int, channels: int, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes of distinct tensors autograd saves for the backward of one (side x side)
    input: the activation memory a tile of that size holds (parameters excluded)."""
    x = torch.zeros(1, channels, side, side, device=device, dtype=dtype, requires_grad=True)
    return saved_tensor_bytes(lambda: trunk(x), trunk)


def activation_bytes_per_pixel(trunk: nn.Module, geo: Geometry | None = None) -> float:
    """Activation memory of the streamed backward per tile pixel, measured on the
    trunk's own device and dtype.

    Why measured and not derived from the layers: what autograd keeps depends
    on the layers' implementations (in-place activations share storage, frozen
    norms save nothing for their constants). The trunk runs once at two small
    sizes (8 and 16 strides, grown where the trunk needs more), the distinct
    saved tensors are counted, and the slope between the two is the cost of
    one more pixel -- the parameters and other constant costs cancel. Times
    :data:`ACTIVATION_HEADROOM`.
    """
    geo = geo or geometry(trunk)
    device, dtype, a, b, channels = _probe_setup(trunk, geo)
    slope = (_saved_bytes(trunk, b, channels, device, dtype) - _saved_bytes(trunk, a, channels, device, dtype)) \
        / float(b * b - a * a)
    return max(slope, 1.0) * ACTIVATION_HEADROOM


def _probe_setup(trunk: nn.Module, geo: Geometry) -> tuple[torch.device, torch.dtype, int, int, int]:
    """Where and at which two sides to probe a trunk's saved-activation bytes:
    its own device and dtype, sides ``a`` (8 strides, grown until every layer
    has an output) and ``b = 2a``, and its input channels."""
    p = next(trunk.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()
    a = 8 * max(geo.stride)
    while min(geo._analysis.sizes(a, a)) < 1:
        a *= 2
    return device, dtype, a, 2 * a, _in_channels(trunk)


def auto_tile_size(geo: Geometry, bytes_per_pixel: float, budget_bytes: float) -> int:
    """The largest tile side (a multiple of the stride) whose ``side**2`` pixels of
    activations fit ``budget_bytes``: what ``tile_size="auto"`` streams with.

    Both tile shapes bound a tile by ``side**2`` pixels, so one side serves
    both. A budget too small for the trunk's smallest tile is a ConfigError
    that says how much is needed.
    """
    s = max(geo.stride)
    side = int(math.isqrt(max(int(budget_bytes / bytes_per_pixel), 0)) // s * s)
    need = geo.min_tile_size
    if side < need:
        raise ConfigError(
            f"tile_size=auto: a tile budget of {budget_bytes / 2**20:.0f} MiB fits {side}-px tiles at "
            f"{bytes_per_pixel:.0f} bytes per pixel, but this trunk needs tiles of at least {need} px "
            f"(about {need * need * bytes_per_pixel / 2**20:.0f} MiB); raise --max-memory or give tile_size in pixels")
    return side


def _child_saved_bytes(trunk: nn.Sequential, side: int, channels: int, device: torch.device,
                       dtype: torch.dtype, out_sizes: list[int] | None = None) -> list[int]:
    """Like :func:`_saved_bytes`, per child of a Sequential trunk (a storage counts
    for the child that saved it first); ``out_sizes`` receives each child's output channels."""
    params = {p.untyped_storage().data_ptr() for p in trunk.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in trunk.buffers()}
    seen: dict[int, int] = {}
    per_child = [0] * len(trunk)
    current = [0]
    hooks = [m.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i)) for i, m in enumerate(trunk)]

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
            per_child[current[0]] += st.nbytes()
        return t

    out_channels = [0] * len(trunk)
    hooks += [m.register_forward_hook(lambda _m, _a, y, i=i: out_channels.__setitem__(i, int(y.shape[1])))
              for i, m in enumerate(trunk)]
    try:
        x = torch.zeros(1, channels, side, side, device=device, dtype=dtype, requires_grad=True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = trunk(x)
        del out
    finally:
        for h in hooks:
            h.remove()
    if out_sizes is not None:
        out_sizes[:] = out_channels
    return per_child


@dataclass(frozen=True)
class StagePlan:
    """How ``tile_size="auto"`` streams a trunk: cuts before these children, one
    tile side per stage (in pixels of the stage's input), each stage's activation
    cost per pixel of its input, and the budget they were sized for.

    Sized for an image shape (``image_shape``), it also says what a training
    step of that image keeps whole beside the tiles (``kept_map_bytes``, see
    :func:`kept_map_bytes`); the tile budget is then what is left of the
    memory after those maps, times the tile share."""

    split: tuple[int, ...]
    tile_sizes: tuple[int, ...]
    bytes_per_pixel: tuple[float, ...]
    budget_bytes: float
    out_channels: tuple[int, ...] = ()
    image_shape: tuple[int, int] | None = None
    kept_map_bytes: int = 0


def kept_map_bytes(maps: Sequence[tuple[int, int, int]], element_size: int,
                   head_bytes_per_position: float = 0.0, head_streamed: bool = False) -> int:
    """Bytes a streamed training step holds whole, whatever the tile size: the
    maps between stages and the trunk's output (``maps``: (channels, rows,
    cols) of each stage's output, last = the trunk's), each with its gradient
    (the backward of a stage builds dL/d its input map whole; dL/dF is whole),
    plus ``head_bytes_per_position`` times the output positions (what the head
    after the trunk keeps for its backward). All of them grow with the image's
    area, which is why :func:`auto_stages` subtracts them from the budget
    before it sizes tiles.

    ``head_streamed``: the head runs tile by tile too (:meth:`StreamingTrunk.visit_tiles`),
    so the trunk's output and its gradient are never whole; only the maps
    between stages and ``head_bytes_per_position`` per position remain."""
    total = sum(2 * c * h * w * element_size for c, h, w in (maps[:-1] if head_streamed else maps))
    _, ho, wo = maps[-1]
    return int(total + head_bytes_per_position * ho * wo)


def stage_maps(trunk: nn.Module, split: Sequence[int], out_channels: Sequence[int],
               h: int, w: int) -> list[tuple[int, int, int]]:
    """(channels, rows, cols) of each stage's output for an (h, w) image: the
    maps :func:`kept_map_bytes` counts (``out_channels``: one per stage)."""
    bounds = [*split, len(trunk) if split else None]  # type: ignore[arg-type]
    maps = []
    for k, c in zip(bounds, out_channels):
        g = geometry(trunk if k is None else trunk[:k])  # type: ignore[index]
        maps.append((int(c), *g.output_size(h, w)))
    return maps


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def kept_maps_error(h: int, w: int, kept: float, budget_note: str) -> ConfigError:
    """The one-line refusal of an image whose kept maps (:func:`kept_map_bytes`) exceed the memory."""
    return ConfigError(
        f"a {h}x{w} image needs {_mib(kept)} for the feature maps a streamed step keeps whole (maps between "
        f"stages, the trunk's output, their gradients and the head's activations), more than {budget_note}; "
        f"raise --max-memory, or make the image smaller (a coarser level/mpp, a smaller instance_size) or the "
        f"trunk's output coarser (head_pool, trunk_depth)")


def auto_stages(trunk: nn.Module, budget_bytes: float, max_stages: int = 2,
                image_shape: tuple[int, int] | None = None, head_bytes_per_position: float = 0.0,
                tile_share: float = 1.0, budget_note: str = "", head_streamed: bool = False) -> StagePlan:
    """Cut a Sequential trunk into at most ``max_stages`` stages and size each
    stage's tile to the budget (see :class:`StreamingTrunk` for why).

    The trunk runs once at two small sizes with each child's saved activations
    counted (as :func:`activation_bytes_per_pixel`, per child); a stage's cost
    per pixel of its input is the sum over its children, scaled by the stride
    in front of it, plus its input tile. Among the cuts whose every stage fits
    the budget, the one whose narrowest stage is the most receptive fields
    wide wins (recomputation falls with that ratio); ties go to fewer stages.
    A trunk that is not an ``nn.Sequential`` streams as one stage.

    The tile budget of a cut is ``tile_share * budget_bytes - kept``, where
    ``kept`` is what a training step of an ``image_shape`` image holds whole
    with that cut (:func:`kept_map_bytes`: the maps between stages, the
    trunk's output, their gradients, and ``head_bytes_per_position`` per output
    position; ``head_streamed``: without the trunk's output and its gradient);
    without ``image_shape``, nothing. The kept maps and the tiles
    share the ``tile_share`` of the budget, and the rest stays headroom for
    what is not modelled (prediction maps, allocator slack): measured on a
    6496² slide at --max-memory 2 GiB with ``head_pool=4``, kept maps that
    fitted the whole free memory but left 70 MB for tiles ran out of memory.
    When the kept maps alone exceed ``tile_share * budget_bytes`` for every
    cut, a one-line ConfigError says so (``budget_note`` names that budget).
    """
    geo = geometry(trunk)
    sequential = isinstance(trunk, nn.Sequential) and len(trunk) >= 2 and max_stages >= 2
    device, dtype, a, b, channels = _probe_setup(trunk, geo)
    elem = torch.tensor([], dtype=dtype).element_size()
    out_ch: list[int] = []
    if sequential:
        lo_, hi_ = (_child_saved_bytes(trunk, n, channels, device, dtype, out_ch if n == b else None)  # type: ignore[arg-type]
                    for n in (a, b))
        child = [max(h - l, 0) / float(b * b - a * a) for l, h in zip(lo_, hi_)]  # bytes per image pixel
    else:
        with torch.no_grad():
            out_ch = [int(trunk(torch.zeros(1, channels, a, a, device=device, dtype=dtype)).shape[1])]
        child = []
    n = len(trunk) if sequential else 1

    def kept_for(cuts: tuple[int, ...]) -> int:
        if image_shape is None:
            return 0
        chans = [out_ch[k - 1] for k in cuts] + [out_ch[-1]]
        return kept_map_bytes(stage_maps(trunk, cuts, chans, *image_shape), elem, head_bytes_per_position,
                              head_streamed)

    def plan_of(cuts: tuple[int, ...], tiles: list[int], costs: list[float], kept: int) -> StagePlan:
        chans = tuple([out_ch[k - 1] for k in cuts] + [out_ch[-1]])
        return StagePlan(cuts, tuple(tiles), tuple(costs), tile_share * budget_bytes - kept, chans,
                         tuple(image_shape) if image_shape is not None else None, kept)  # type: ignore[arg-type]

    def too_big(kept: int) -> ConfigError:
        return kept_maps_error(*image_shape, kept, budget_note or "the budget of " + _mib(budget_bytes))  # type: ignore[misc]

    best: tuple[tuple[float, int], StagePlan] | None = None
    least_kept = math.inf
    for k in ([None, *range(1, n)] if sequential else [None]):
        cuts = () if k is None else (k,)
        kept = kept_for(cuts)
        least_kept = min(least_kept, kept)
        budget = tile_share * budget_bytes - kept
        if budget <= 0:
            continue
        bounds = [0, *cuts, n]
        try:
            tiles, costs, score = [], [], math.inf
            for i in range(len(bounds) - 1):
                if not sequential:
                    mod, g = trunk, geo
                    cost = activation_bytes_per_pixel(trunk, geo)
                else:
                    mod = trunk[bounds[i]:bounds[i + 1]]  # type: ignore[index]
                    g = geometry(mod)
                    if not any(isinstance(m, nn.Conv2d) for m in mod.modules()):
                        raise ConfigError("a stage without a convolution")
                    front = geometry(trunk[:bounds[i]]).stride if bounds[i] else (1, 1)  # type: ignore[index]
                    c_in = _in_channels(mod)
                    cost = sum(child[bounds[i]:bounds[i + 1]]) * front[0] * front[1] + (c_in * elem if bounds[i] else 0)
                    cost = max(cost, 1.0) * ACTIVATION_HEADROOM
                t = auto_tile_size(g, cost, budget)
                tiles.append(t)
                costs.append(round(cost, 1) if sequential else cost)
                score = min(score, t / max(g.receptive_field))
        except ConfigError:
            continue
        key = (score, -len(cuts))
        if best is None or key > best[0]:
            best = (key, plan_of(cuts, tiles, costs, kept))
    if best is None:
        if image_shape is not None and least_kept >= tile_share * budget_bytes:
            raise too_big(int(least_kept))
        # no cut fits: the single-stage sizing raises the clear error
        kept = kept_for(())
        bpp = activation_bytes_per_pixel(trunk, geo)
        return plan_of((), [auto_tile_size(geo, bpp, tile_share * budget_bytes - kept)], [bpp], kept)
    return best[1]


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    """One streamed segment of a trunk (the whole trunk unless it is split):
    its layers, their geometry, and the tile that streams them."""

    module: nn.Module
    geometry: Geometry
    tile_size: int
    tile_shape: str

    def tiles(self, h: int, w: int) -> list[Tile]:
        return plan_tiles(self.geometry, h, w, self.tile_size, self.tile_shape)


@dataclass
class _Kept:
    """The last tile of the last stage, computed with autograd during a training
    forward and back-propagated first: one tile recomputation saved, at no extra
    peak (the backward holds one tile's graph anyway)."""

    index: int
    tile: Tile
    x: torch.Tensor
    y: torch.Tensor


class StreamingTrunk(nn.Module):
    """A CNN trunk that can run tile by tile with exact results.

    ``forward`` is the plain whole-image pass with autograd (the reference);
    :meth:`forward_streamed` computes the same feature map tile by tile without
    autograd; :meth:`backward_streamed` takes ``dL/dF`` for that map and adds
    the exact parameter gradients to ``.grad`` (and returns ``dL/dimage`` when
    asked), recomputing one tile at a time. ``tile_size`` is the tile side in
    pixels; a tile at least as large as the image is one plain pass.
    ``tile_shape="area"`` keeps the memory bound (``tile_size**2`` pixels per
    tile) but lets tiles be rectangles, e.g. full-width strips, which overlap
    less and so recompute less (see :func:`plan_tiles`).

    ``split`` cuts an ``nn.Sequential`` trunk before the given children into
    stages streamed one after the other, each with its own tile size (then
    ``tile_size`` is one side per stage, in pixels of that stage's input).
    Why: a deep trunk keeps most of its activations in the early,
    high-resolution layers, whose receptive field is small, while the late
    layers that make the receptive field large cost little memory per image
    pixel. Streamed as one, every tile pays the whole receptive field in
    overlap at the early layers' memory price; streamed in stages, the early
    stage overlaps by its own small field and the late stage takes tiles
    many times larger (often the whole map). The feature map between stages
    (and its gradient) is held whole -- small, being strided -- so the
    result stays exact: each stage is exact, and the chain rule composes
    them. :func:`auto_stages` chooses the cut and the tiles for a budget.
    """

    def __init__(self, trunk: nn.Module, tile_size: int | Sequence[int], tile_shape: str = "square",
                 split: Sequence[int] = (), bytes_per_pixel: Sequence[float] | None = None,
                 budget_bytes: float | None = None):
        super().__init__()
        sizes = [int(t) for t in tile_size] if isinstance(tile_size, (list, tuple)) else [int(tile_size)]
        cuts = sorted({int(k) for k in split})
        if cuts and not isinstance(trunk, nn.Sequential):
            raise ConfigError(f"cannot split {type(trunk).__name__} into stages: only an nn.Sequential trunk splits")
        if cuts and not all(0 < k < len(trunk) for k in cuts):  # type: ignore[arg-type]
            raise ConfigError(f"bad split {list(split)}: cuts must lie between the trunk's {len(trunk)} children")  # type: ignore[arg-type]
        if len(sizes) == 1:
            sizes = sizes * (len(cuts) + 1)
        if len(sizes) != len(cuts) + 1:
            raise ConfigError(f"{len(cuts) + 1} stages need {len(cuts) + 1} tile sizes, got {len(sizes)}")
        for t in sizes:
            _check_tiling(t, tile_shape)
        self.trunk = trunk
        self.tile_sizes = sizes
        self.tile_size = sizes[0]
        self.tile_shape = tile_shape
        self.split = cuts
        self.geometry = geometry(trunk)
        bounds = [0, *cuts, len(trunk) if cuts else 0]  # type: ignore[arg-type]
        mods = [trunk[bounds[i]:bounds[i + 1]] for i in range(len(cuts) + 1)] if cuts else [trunk]  # type: ignore[index]
        # a plain list: the stages share the trunk's modules and must not register them twice
        self._stages = [_Stage(m, self.geometry if m is trunk else geometry(m), t, tile_shape)
                        for m, t in zip(mods, sizes)]
        if bytes_per_pixel is not None and len(bytes_per_pixel) != len(self._stages):
            raise ConfigError(f"{len(self._stages)} stages need {len(self._stages)} costs per pixel, "
                              f"got {len(bytes_per_pixel)}")
        self.bytes_per_pixel = list(bytes_per_pixel) if bytes_per_pixel is not None else None
        self.budget_bytes = budget_bytes
        self._saved: tuple[Any, list[torch.Tensor], list[_Kept | None]] | None = None
        self.check_modes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain, non-streamed pass (autograd as usual)."""
        return self.trunk(x)

    def replan(self, tile_size: int | Sequence[int], split: Sequence[int] = (),
               bytes_per_pixel: Sequence[float] | None = None, budget_bytes: float | None = None) -> None:
        """Stream with other stages and tiles from now on (e.g. a :class:`StagePlan`
        sized for the image at hand); the trunk and its parameters are unchanged."""
        other = StreamingTrunk(self.trunk, tile_size, self.tile_shape, split, bytes_per_pixel, budget_bytes)
        self.tile_sizes, self.tile_size, self.split = other.tile_sizes, other.tile_size, other.split
        self._stages, self.bytes_per_pixel, self.budget_bytes = other._stages, other.bytes_per_pixel, other.budget_bytes
        self._saved = None

    @property
    def stages(self) -> list[_Stage]:
        return list(self._stages)

    def check_modes(self) -> None:
        """Refuse a trunk whose norms/dropout are in a batch- or chance-dependent mode now."""
        for name in self.geometry._analysis.mode_checked:
            m = self.trunk.get_submodule(name) if name else self.trunk
            label = f"'{name}' ({type(m).__name__})" if name else f"({type(m).__name__})"
            if isinstance(m, _BATCH_NORMS) and m.training:
                raise ConfigError(
                    f"cannot stream layer {label}: batch norm in training mode normalises by the statistics of "
                    f"each tile, not the image; freeze it (milbench.models.norms.freeze_batch_norms) or call eval()")
            if isinstance(m, _DROPOUTS) and m.training and m.p > 0:
                raise ConfigError(f"cannot stream layer {label}: dropout in training mode draws a different mask per "
                                  f"tile and pass; set p=0 or call eval() on the trunk")

    def tiles(self, h: int, w: int) -> list[Tile]:
        """The tile plan for an (h, w) image (of the first stage when the trunk is split)."""
        return self._stages[0].tiles(h, w)

    @staticmethod
    def _batched(image: torch.Tensor) -> torch.Tensor:
        if image.dim() == 3:
            return image.unsqueeze(0)
        if image.dim() != 4:
            raise ValueError(f"expected an image (C, H, W) or a batch (N, C, H, W), got shape {tuple(image.shape)}")
        return image

    def _device(self, x: torch.Tensor) -> torch.device:
        """Where the tiles are computed: the trunk's device (the image may stay on
        the CPU while a GPU trunk streams it), or the image's for a parameter-free trunk."""
        p = next(self.trunk.parameters(), None)
        return p.device if p is not None else x.device

    def _iter(self, st: _Stage, x: torch.Tensor) -> Iterator[tuple[int, Tile, torch.Tensor]]:
        dev = self._device(x)
        for i, t in enumerate(st.tiles(x.shape[-2], x.shape[-1])):
            yield i, t, x[..., t.rows, t.cols].to(dev, non_blocking=True)

    @staticmethod
    def _local(t: Tile, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 4 or out.shape[-2] < t.local_rows.stop or out.shape[-1] < t.local_cols.stop:
            raise RuntimeError(f"streaming engine: tile output {tuple(out.shape)} does not hold the positions "
                               f"{t.local_rows}, {t.local_cols} its geometry promises (a bug, please report it)")
        return out[..., t.local_rows, t.local_cols]

    def _stage_forward(self, st: _Stage, x: torch.Tensor, keep: bool, input_grad: bool) -> tuple[torch.Tensor, _Kept | None]:
        """One stage's output map, tile by tile; with ``keep`` the last tile keeps its graph."""
        ho, wo = st.geometry.output_size(x.shape[-2], x.shape[-1])
        n = len(st.tiles(x.shape[-2], x.shape[-1]))
        out: torch.Tensor | None = None
        kept = None
        for i, t, xt in self._iter(st, x):
            if keep and i == n - 1:
                with torch.enable_grad():
                    xt = xt.detach().requires_grad_(input_grad)
                    y = self._local(t, st.module(xt))
                kept = _Kept(i, t, xt, y)
                y = y.detach()
            else:
                with torch.no_grad():
                    y = self._local(t, st.module(xt))
            if out is None:
                out = y.new_empty((y.shape[0], y.shape[1], ho, wo))
            out[..., t.out_rows, t.out_cols] = y
        assert out is not None
        return out, kept

    def _stage_backward(self, st: _Stage, x: torch.Tensor, g: torch.Tensor, input_grad: bool,
                        kept: _Kept | None) -> torch.Tensor | None:
        """Back-propagate ``g`` (dL/d stage output) through one stage; dL/d stage input if asked."""
        grad_in = torch.zeros_like(x) if input_grad else None

        def back(t: Tile, xt: torch.Tensor, y: torch.Tensor) -> None:
            torch.autograd.backward(y, g[..., t.out_rows, t.out_cols].to(y.device, y.dtype))
            if grad_in is not None:
                assert xt.grad is not None
                grad_in[..., t.rows, t.cols] += xt.grad.to(grad_in.device)

        if kept is not None and input_grad and not kept.x.requires_grad:
            kept = None  # kept without an input gradient: recompute that tile like the others
        with torch.enable_grad():
            if kept is not None:
                back(kept.tile, kept.x, kept.y)
            for i, t, xt in self._iter(st, x):
                if kept is not None and i == kept.index:
                    continue
                if input_grad:
                    xt = xt.detach().requires_grad_(True)
                y = self._local(t, st.module(xt))
                back(t, xt, y)
                del y
        return grad_in

    def forward_streamed(self, image: torch.Tensor, keep_for_backward: bool = False) -> torch.Tensor:
        """The trunk's feature map of ``image`` computed tile by tile, without
        autograd; equal to ``trunk(image)`` to float rounding. A (C, H, W)
        image gives (C', H', W'), a batch (N, C, H, W) gives (N, C', H', W').
        The image may live on the CPU while the trunk is on a GPU: each tile is
        moved there, and the feature map is returned on the trunk's device.

        ``keep_for_backward`` (a training step, followed by
        :meth:`backward_streamed` of the same image): the maps between stages
        and the last tile's graph are kept so the backward need not compute
        them again; :meth:`release` drops them if no backward follows.
        """
        self.check_modes()
        self._saved = None
        x = self._batched(image)
        maps = [x]
        keep = self._keep_plan(x.shape[-2], x.shape[-1]) if keep_for_backward else [False] * len(self._stages)
        kept: list[_Kept | None] = []
        for i, st in enumerate(self._stages):
            y, k = self._stage_forward(st, maps[-1], keep[i], input_grad=i > 0)
            kept.append(k)
            maps.append(y)
        if keep_for_backward:
            self._saved = (image, maps[:-1], kept)
        out = maps[-1]
        return out[0] if image.dim() == 3 else out

    def _keep_plan(self, h: int, w: int) -> list[bool]:
        """Which stages keep their last tile's graph from a training forward.

        The last stage always does (the backward would hold that graph anyway).
        With the stages' costs per pixel and the budget known, earlier stages
        do too while every kept graph, plus one tile of the later stages, fits
        the budget: an image that fits whole then trains at the plain speed.
        """
        keep = [False] * len(self._stages)
        keep[-1] = True
        if self.bytes_per_pixel is None or self.budget_bytes is None:
            return keep
        sizes, size = [], (h, w)
        for st in self._stages:
            sizes.append(size)
            size = st.geometry.output_size(*size)
        used = 0.0
        for i in range(len(self._stages) - 1, -1, -1):
            t = self._stages[i].tiles(*sizes[i])[-1]
            used += (t.rows.stop - t.rows.start) * (t.cols.stop - t.cols.start) * self.bytes_per_pixel[i]
            if used > self.budget_bytes:
                break
            keep[i] = True
        return keep

    def release(self) -> None:
        """Drop what a ``keep_for_backward`` forward kept (no backward followed)."""
        self._saved = None

    def backward_streamed(self, image: torch.Tensor, grad_features: torch.Tensor,
                          input_grad: bool = False) -> torch.Tensor | None:
        """Back-propagate ``grad_features`` (dL/dF for the streamed feature map)
        through the trunk one tile at a time (stage by stage, last first).

        Adds the parameter gradients to ``.grad`` of every trunk parameter that
        requires grad (exactly what ``trunk(image).backward(grad_features)``
        would add) and returns dL/dimage when ``input_grad`` is true, else None.
        With no trainable trunk parameter and no input gradient asked it does
        nothing (a frozen trunk costs no backward).
        """
        self.check_modes()
        saved, self._saved = self._saved, None
        x = self._batched(image).detach()
        g = self._batched(grad_features) if image.dim() == 4 else grad_features.unsqueeze(0)
        ho, wo = self.geometry.output_size(x.shape[-2], x.shape[-1])
        if g.shape[0] != x.shape[0] or tuple(g.shape[-2:]) != (ho, wo):
            raise ValueError(f"grad_features has shape {tuple(grad_features.shape)}; the streamed feature map of "
                             f"this image has {ho}x{wo} positions")
        trainable = any(p.requires_grad for p in self.trunk.parameters())
        if not trainable and not input_grad:
            return None
        if saved is not None and saved[0] is image:
            maps, kept = [x, *saved[1][1:]], saved[2]
        else:  # no kept forward of this image: the maps between stages are computed again
            maps, kept = [x], [None] * len(self._stages)
            for st in self._stages[:-1]:
                maps.append(self._stage_forward(st, maps[-1], False, False)[0])
        last = len(self._stages) - 1
        grad: torch.Tensor | None = g
        for i in range(last, -1, -1):
            assert grad is not None
            grad = self._stage_backward(self._stages[i], maps[i], grad, input_grad or i > 0, kept[i])
            kept[i] = None
            maps[i] = None  # type: ignore[call-overload]  # free the map as soon as its stage is done
        if grad is None:
            return None
        return grad[0] if image.dim() == 3 else grad

    def visit_tiles(self, image: torch.Tensor, visit: Callable[[Tile, torch.Tensor], torch.Tensor | None],
                    backward: bool = False, train_trunk: bool = True,
                    maps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Hand each tile of the trunk's output to ``visit(tile, y)`` instead of
        assembling the feature map: ``y`` is (1, C', th, tw), the positions
        ``tile.out_rows, tile.out_cols`` of the map, computed as
        :meth:`forward_streamed` computes them.

        Why: a head that reduces the positions (attention pooling) can then
        run tile by tile too, and nothing that grows with the image's area is
        held but what the head keeps per position (see
        :mod:`milbench.models.streamed_attention`). With ``backward`` the tile
        is computed with autograd and ``visit`` returns a scalar whose gradient
        is back-propagated through the tile at once (into the trunk's
        parameters when ``train_trunk``, and for a trunk cut into stages on
        through the earlier stages, whose maps are kept whole as
        :meth:`backward_streamed` keeps them). One image at a time.

        Returns the maps the stages before the last read (the image first):
        a second pass over the same image passes them back as ``maps``
        instead of computing them again. Without ``backward`` they are
        returned as computed; a backward pass frees them as it goes (in the
        list passed in, too).
        """
        self.check_modes()
        x = self._batched(image).detach()
        if x.shape[0] != 1:
            raise ValueError(f"visit_tiles takes one image, got a batch of {x.shape[0]}")
        if maps is None or len(maps) != len(self._stages):
            maps = [x]
            for st in self._stages[:-1]:
                maps.append(self._stage_forward(st, maps[-1], False, False)[0])
        else:  # in place, so that the entries this pass frees are freed for the caller too
            maps[0] = x
        last = self._stages[-1]
        trunk_grad = backward and train_trunk and any(p.requires_grad for p in self.trunk.parameters())
        grad_in = torch.zeros_like(maps[-1]) if trunk_grad and len(self._stages) > 1 else None
        for _, t, xt in self._iter(last, maps[-1]):
            with torch.set_grad_enabled(trunk_grad):
                if grad_in is not None:
                    xt = xt.detach().requires_grad_(True)
                y = self._local(t, last.module(xt))
            with torch.set_grad_enabled(backward):
                out = visit(t, y)
                if backward and out is not None and out.requires_grad:
                    out.backward()
            if grad_in is not None and xt.grad is not None:
                grad_in[..., t.rows, t.cols] += xt.grad.to(grad_in.device)
            del y, out
        if grad_in is not None:
            g: torch.Tensor | None = grad_in
            maps[-1] = None  # type: ignore[call-overload]  # the last stage is done with its input
            for i in range(len(self._stages) - 2, -1, -1):
                assert g is not None
                g = self._stage_backward(self._stages[i], maps[i], g, i > 0, None)
                maps[i] = None  # type: ignore[call-overload]
        return maps

    def tile_count(self, h: int, w: int) -> int:
        """Tiles of the most finely tiled stage for an (h, w) image: 1 when every stage runs in one pass."""
        n, size = 1, (h, w)
        for st in self._stages:
            n = max(n, len(st.tiles(*size)))
            size = st.geometry.output_size(*size)
        return n


def streamed_forward_backward(stream: StreamingTrunk, image: torch.Tensor,
                              head_fn: Callable[[torch.Tensor], torch.Tensor],
                              train_trunk: bool = True) -> torch.Tensor:
    """One streamed training step for a trunk followed by a head.

    Streams the forward pass (keeping, when the trunk trains, what the
    backward would otherwise recompute: the maps between stages and the last
    tile's graph), makes the feature map a leaf that requires grad, calls
    ``head_fn(features)`` for a scalar loss and back-propagates it (head
    gradients land in ``.grad``), then streams dL/dF back through the trunk
    (skipped when ``train_trunk`` is false, e.g. while the trunk is frozen).
    Returns the detached loss.
    """
    trains = train_trunk and any(p.requires_grad for p in stream.trunk.parameters())
    try:
        feats = stream.forward_streamed(image, keep_for_backward=trains).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = head_fn(feats)
            if loss.dim() != 0:
                raise ValueError(f"head_fn must return a scalar loss, got shape {tuple(loss.shape)}")
            loss.backward()
        if trains and feats.grad is not None:
            stream.backward_streamed(image, feats.grad)
    finally:
        stream.release()
    return loss.detach()


def describe(geo: Geometry, h: int, w: int, tile_size: int, shape: str = "square") -> dict[str, Any]:
    """A small summary of how an (h, w) image streams: tile count and the
    recomputation factor (input pixels read per image pixel), for logs and records."""
    tiles = plan_tiles(geo, h, w, tile_size, shape)
    sizes = [(t.rows.stop - t.rows.start, t.cols.stop - t.cols.start) for t in tiles]
    largest = max(sizes, key=lambda rc: rc[0] * rc[1])  # by pixel count: what bounds a tile's memory
    return {"tiles": len(tiles), "tile_shape": shape, "largest_tile": list(largest),
            "distinct_tile_shapes": len(set(sizes)), "stride": list(geo.stride),
            "receptive_field": list(geo.receptive_field), "min_tile_size": geo.min_tile_size,
            "overlap_factor": round(sum(r * c for r, c in sizes) / float(h * w), 4)}

