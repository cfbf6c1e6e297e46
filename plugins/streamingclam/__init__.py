"""``streamingclam``: a CNN trunk streamed over the whole bag image, then a
CLAM-SB head (Dooper et al., "Gigapixel end-to-end training using streaming
and attention", Medical Image Analysis 2023).

The method reads the image view of a bag (``bag.image()``, the instances
tiled on their grid). Its trunk runs tile by tile with milbench's streaming
engine (``StreamingTrunk`` in :mod:`milbench.api`): a no-grad forward gives
the exact feature map F, the CLAM head and the bag loss give dL/dF, and each
tile is recomputed with autograd to back-propagate its slice. Memory is
bounded by ``tile_size``, not by the image; the gradient equals the
non-streamed network's.

The head streams too (``stream_head=auto``, on an image of more than one
tile): the whole-map step above still holds the trunk's output map F, dL/dF
and the head's activations over every position, about 41 bytes per image
pixel with the small trunk, which grows with the slide until nothing fits.
:func:`milbench.api.attention_pool_step` instead runs the CLAM head (fc,
gated attention, softmax-weighted sum) tile by tile in two passes with an
online softmax and keeps one attention score per position; the gradients are
the same (tested to 1e-9 in float64). It needs a head whose positions meet
only in that sum: ``head_pool`` <= 1, ``inst_loss=none``, no dropout
(:func:`head_not_streamable`); otherwise ``auto`` falls back to the whole map.

``tile_size=auto`` (the default) sizes the tiles to a memory budget: half of
what ``--max-memory`` leaves free after setup, or 2 GiB without it. The
trunk's activation cost per pixel is measured at build time, a ResNet trunk
is cut into two stages streamed one after the other (see
:class:`milbench.api.StreamingTrunk`), and each stage gets the largest tile
that fits; the choice goes into the record's metrics
(``stream_*``). ``tile_shape=area`` (the default) lets a tile be any
rectangle of at most ``tile_size**2`` pixels, e.g. a full-width strip, which
overlaps its neighbours less than a square.

The from-scratch trunks (``small``, the default, and ``lenet``) standardise
their convolution weights (``weight_standardization=auto``; :mod:`.trunk`):
the normalisation that streams exactly, since it never looks at activations.
Without it their features collapsed on qmnist while attention MIL sat on its
0.693 plateau, and the method needed about 30 epochs to leave it (11-19 with
it; ``results/streamingclam-qmnist-diagnostics``).

Scores for Dice: the head's attention over feature-map positions, divided by
its maximum and multiplied by the bag probability (the convention of
:func:`milbench.api.attention_scores`, so a bag predicted negative marks
nothing), is interpolated onto the image with each position
centred on its receptive field. An instance's score is the maximum of that
map over its patch: attention concentrates on a few positions inside a key
instance, so the patch mean stays far below 0.5 even for a perfectly
attended digit (measured on qmnist, two trained seeds: Dice of the key
instances 0.73 and 0.82 with the maximum, 0.0 with the mean). With
``score_level = "pixel"`` the map itself is also returned as
``pixel_scores``, and the harness computes a pixel-level Dice from it (0.13
and 0.14 there: the map's blobs are much smaller than the 28-px squares the
qmnist ground truth marks).

The package: this module holds the method (its keys, tile sizing and scores)
and registers it; it imports nothing heavy, so registering the plugin never
imports torch. :mod:`.clam` holds the CLAM head, its loss and the model,
:mod:`.trunk` the streamable CNN trunks; both import torch and are imported
inside the method's functions. milbench itself is reached only through
:mod:`milbench.api` (the streaming engine is milbench's, shared with other
streaming methods).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from milbench.api import AutoParam, Bag, ConfigError, DataSpec, Method, Param, Prediction, RunContext, Splits, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from milbench.api import StagePlan

    from .clam import StreamingCLAMModel

# Names only: .trunk and .clam (torch) check them again when they build.
_TRUNKS = ("small", "lenet", "resnet18", "resnet34", "resnet50")
_INST_LOSSES = ("none", "svm", "ce")
_TILE_SHAPES = ("square", "area")  # the streaming engine's TILE_SHAPES, without importing torch
_STREAM_HEAD = ("auto", "always", "never")

#: Share of what ``--max-memory`` leaves free when the model is built that ``tile_size=auto`` gives
#: one tile's activations; the rest holds the image, the feature map, dL/dF and allocator slack.
TILE_BUDGET_SHARE = 0.5

#: What a streamed head (``stream_head``) keeps per position of the trunk's output: one float32
#: attention logit (the pooled vector and the online-softmax sums do not grow with the image).
STREAMED_HEAD_BYTES_PER_POSITION = 4.0


class StreamingCLAM(Method):
    name = "streamingclam"
    supervision = "bag"
    description = "streaming CNN over the bag image (exact tiled forward/backward) + CLAM-SB attention head"
    params = {
        "tile_size": AutoParam("auto", int, "streaming tile side in pixels (>= the image: one plain pass), or "
                               "auto: the largest tile whose activations fit half of what --max-memory leaves "
                               "free (2 GiB without --max-memory)", low=8),
        "tile_shape": Param("area", str, "square: tile sides <= tile_size; area: rectangles of <= tile_size**2 px "
                            "that recompute least (same memory bound)", choices=_TILE_SHAPES),
        "trunk": Param("small", str, "CNN trunk streamed over the image", choices=_TRUNKS),
        "trunk_depth": Param(None, int, "trunk stages kept (none: 4; resnets: layer1..layerN)", low=1, high=4,
                             nullable=True),
        "pretrained": Param(False, bool, "ImageNet weights for a resnet trunk (needs them downloaded)"),
        "weight_standardization": Param("auto", str, "standardise the trunk's conv weights (streams exactly, "
                                        "unlike an activation norm); auto: for the from-scratch small and lenet "
                                        "trunks, not the resnets", choices=("auto", "on", "off")),
        "freeze_trunk_epochs": Param(0, int, "epochs (from the first) in which only the head trains", low=0),
        "head_pool": Param(0, int, "max-pool kernel on the feature map before the head (0/1: none)", low=0),
        "hidden_dim": Param(128, int, "CLAM fc width (the paper's 512)", low=1),
        "attn_dim": Param(64, int, "CLAM gated-attention width (the paper's 256)", low=1),
        "dropout": Param(0.0, float, "dropout in the CLAM head", low=0, high=1, high_open=True),
        "inst_loss": Param("none", str, "CLAM instance-clustering loss", choices=_INST_LOSSES),
        "inst_k": Param(8, int, "positions pseudo-labelled per side by the instance loss", low=1),
        "inst_weight": Param(0.3, float, "weight of the instance loss (CLAM: 1 - bag_weight)", low=0, high=1),
        "stream_head": Param("auto", str, "run the CLAM head tile by tile with the trunk (two passes, online "
                             "softmax): only one attention score per feature-map position is kept, not the map, its "
                             "gradient and the head's activations. auto: when the image needs more than one tile and "
                             "the head allows it (head_pool <= 1, inst_loss none, dropout 0); always; never",
                             choices=_STREAM_HEAD),
        "score_level": Param("instance", str, "Dice from instance scores (attention max per patch) or also from "
                             "the pixel attention map", choices=("instance", "pixel")),
    }
    # No private epoch budget or weight decay (the protocol is the same for every method). The
    # earlier recipe (40 epochs, weight decay 0 under Adam's L2) hid a slow start: from scratch the
    # fully convolutional trunk sits on the attention-MIL plateau longer than abmil's per-instance
    # encoder; the learning curves in results/README.md show it instead.
    presets = {
        # Dooper et al.: ResNet-34 (ImageNet weights: set pretrained=true where they can be downloaded),
        # 3200-px tiles, CLAM-SB [512, 512, 256], trunk frozen for the first 25 epochs.
        "paper": {"trunk": "resnet34", "tile_size": 3200, "hidden_dim": 512, "attn_dim": 256,
                  "freeze_trunk_epochs": 25},
    }
    # tiny, and valid under any preset: the small trunk, a tile that really streams a smoke bag image
    smoke = {"trunk": "small", "trunk_depth": None, "tile_size": 64, "hidden_dim": 16, "attn_dim": 8}

    def check(self, config: Mapping[str, Any]) -> None:
        """Refuse weight standardisation of pretrained weights, a head that cannot be
        streamed under ``stream_head=always``, and a tile smaller than the trunk's
        minimum, before any work starts (the
        geometry does not depend on the input channels: 3 stands in)."""
        from milbench.api import geometry

        from .trunk import build_trunk, standardises

        standardises(config["trunk"], config["weight_standardization"], config["pretrained"])  # refuses a conflict
        why = head_not_streamable(config, training=True)
        if config["stream_head"] == "always" and why:
            raise ConfigError(f"stream_head=always cannot stream this head: {why}; set stream_head=auto or never")
        if config["tile_size"] == "auto":  # sized in build(), where the budget is known
            return
        trunk = build_trunk(config["trunk"], 3, config["trunk_depth"], pretrained=False)
        need = geometry(trunk).min_tile_size
        if config["tile_size"] < need:
            raise ConfigError(f"bad value for 'tile_size': {config['tile_size']} is smaller than the {need} px "
                              f"the '{config['trunk']}' trunk needs (its receptive field, rounded up to whole strides)")

    def build(self, spec: DataSpec, config: Mapping[str, Any], ctx: RunContext) -> StreamingCLAMModel:
        from .clam import CLAMHead, StreamingCLAMModel
        from .trunk import build_trunk

        trunk = build_trunk(config["trunk"], spec.channels, config["trunk_depth"], config["pretrained"],
                            config["weight_standardization"])
        # Bag labels are 0/1 on every dataset (spec.n_classes counts instance classes on mouse-brain),
        # so the bag classifier is CLAM's two-class one.
        head = CLAMHead(trunk.out_channels, config["hidden_dim"], config["attn_dim"], 2,
                        config["dropout"], config["inst_loss"], config["inst_k"], config["head_pool"])
        trunk = trunk.to(ctx.device)
        head = head.to(ctx.device)
        plan, sizing, free = resolve_tiles(trunk, config["tile_size"], ctx, with_free=True)
        model = StreamingCLAMModel(trunk, head, list(plan.tile_sizes), config["tile_shape"], plan.split,
                                   plan.bytes_per_pixel if config["tile_size"] == "auto" else None,
                                   plan.budget_bytes if config["tile_size"] == "auto" else None)
        model.trunk_frozen = config["freeze_trunk_epochs"] > 0
        model.tile_sizing = sizing
        model.memory_free = free  # what --max-memory leaves free after setup (None without it)
        model.max_memory = getattr(ctx, "max_memory_bytes", None)
        model.image_plans = {}
        return model.to(ctx.device)

    def artifacts(self, model: StreamingCLAMModel, splits: Splits, config: Mapping[str, Any],
                  ctx: RunContext) -> dict[str, Any]:
        """The tiles the run streamed with (numbers go into the record's ``metrics``): what
        ``tile_size=auto`` chose -- stages, tile sides, budget, cost per pixel."""
        return dict(getattr(model, "tile_sizing", {}))

    def on_epoch_start(self, model: StreamingCLAMModel, epoch: int, config: Mapping[str, Any]) -> None:
        # The harness counts epochs from 1: epochs 1..k train the head only.
        model.trunk_frozen = epoch <= config["freeze_trunk_epochs"]

    def backward(self, model: StreamingCLAMModel, bag: Bag, config: Mapping[str, Any]) -> float:
        from milbench.api import streamed_forward_backward

        from .clam import clam_loss

        def head_loss(features: torch.Tensor) -> torch.Tensor:
            return clam_loss(model.head(features, bag.label), bag.label, config["inst_weight"])

        streamed = fit_image(model, bag.lazy_image.shape, config, training=True,
                             resident_bytes=getattr(bag.lazy_image, "resident_bytes", 0))
        if streamed:  # the head runs tile by tile: no whole feature map, no whole dL/dF
            from milbench.api import attention_pool_step

            from .clam import bag_ce

            head = model.head
            loss, _ = attention_pool_step(model.stream, bag.lazy_image, head.fc, head.attention,
                                          lambda z: bag_ce(head.classifier(z), bag.label),
                                          train_trunk=not model.trunk_frozen)
            return float(loss)
        loss = streamed_forward_backward(model.stream, bag.lazy_image, head_loss, train_trunk=not model.trunk_frozen)
        return float(loss)

    def predict(self, model: StreamingCLAMModel, bag: Bag, config: Mapping[str, Any]) -> Prediction:
        import torch

        from .clam import clam_loss

        if fit_image(model, bag.lazy_image.shape, config, training=False,
                     resident_bytes=getattr(bag.lazy_image, "resident_bytes", 0)):
            from milbench.api import attention_pool

            from .clam import CLAMOutput

            pooled = attention_pool(model.stream, bag.lazy_image, model.head.fc, model.head.attention)
            amap = pooled.attention()
            out = CLAMOutput(model.head.classifier(pooled.z), amap.flatten(), amap, None)
        else:
            out = model.head(model.stream.forward_streamed(bag.lazy_image))
        probs = torch.softmax(out.logits.double(), dim=0)
        bag_prob = float(probs[1])
        if config["score_level"] == "pixel":
            pixel = attention_pixels(model, out.attention_map, bag) * bag_prob
            scores = instance_maxima(pixel, bag)
        else:  # the full-resolution map is never built: per-instance maxima band by band
            pixel, scores = None, instance_attention(model, out.attention_map, bag) * bag_prob
        return Prediction(
            bag_prob=bag_prob,
            instance_scores=scores,
            pixel_scores=pixel,
            loss=float(clam_loss(out, bag.label)),
            extra={"feature_map": list(out.attention_map.shape)},
        )


def head_not_streamable(config: Mapping[str, Any], training: bool) -> str:
    """Why the CLAM head cannot run tile by tile (empty when it can).

    Streaming the head (:func:`milbench.api.attention_pool_step`) needs a head
    whose positions meet only in the softmax-weighted sum: ``head_pool`` max-pools
    across tile borders, the instance loss picks the top-k positions of the whole
    map, and training-mode dropout would draw different masks in the two passes.
    """
    if config.get("head_pool", 0) > 1:
        return f"head_pool={config['head_pool']} pools across tile borders (use head_pool 0 or 1)"
    if training and config.get("inst_loss", "none") != "none":
        return f"inst_loss={config['inst_loss']} ranks the positions of the whole map (use inst_loss=none)"
    if training and config.get("dropout", 0.0) > 0:
        return f"dropout={config['dropout']} would draw different masks in the two passes (use dropout=0)"
    return ""


def fit_image(model: StreamingCLAMModel, shape: Any, config: Mapping[str, Any], training: bool = True,
              resident_bytes: int = 0) -> bool:
    """Make the streamed step of an image of this shape fit the memory, before any of it runs,
    and say whether the head runs tile by tile for it (``stream_head``).

    ``stream_head=auto`` streams the head when the head allows it
    (:func:`head_not_streamable`) and the image needs more than one tile: an
    image that fits one tile gains nothing from a second pass.

    Why here: the feature maps a streamed step holds whole (the maps between
    stages, the trunk's output unless the head streams, their gradients and
    the head's activations, or one score per position when it streams)
    grow with the image's area, and the image's shape is first known when the
    method sees a bag (slides differ). With ``--max-memory`` they are
    subtracted from what it left free after setup: ``tile_size=auto`` re-cuts
    the trunk and re-sizes the tiles for this shape (cached per shape, the
    largest image's choice goes into the record), and when the kept maps
    alone do not fit -- auto or not -- the run stops with a one-line
    ConfigError instead of being killed for memory halfway through.
    ``resident_bytes``: what the image itself will hold once read, which the
    memory measured after setup does not include yet (a slide's uint8 box,
    :attr:`milbench.api.ImageSource.resident_bytes`); it counts like a kept map.
    On a 6048 x 5216 slide box (95 MB of it) the tiles were otherwise
    planned that much too large.
    """
    from milbench.api import auto_stages

    from .clam import head_bytes_per_position

    h, w = int(shape[-2]), int(shape[-1])
    mode = config.get("stream_head", "never")
    streamed = mode != "never" and not head_not_streamable(config, training) and (
        mode == "always" or model.stream.tile_count(h, w) > 1)
    plans = getattr(model, "image_plans", None)
    if plans is None:  # a model built by hand: nothing to fit against
        return streamed
    key = (h, w, streamed, resident_bytes)
    if key in plans:
        plan = plans[key]
    else:
        stream = model.stream
        free, limit = getattr(model, "memory_free", None), getattr(model, "max_memory", None)
        if free is not None and getattr(model, "head_bpp", None) is None:  # only a limit needs the estimate
            model.head_bpp = head_bytes_per_position(model.head, model.head.fc[0].in_features,
                                                     config.get("inst_weight", 0.3))
        # a streamed head keeps one float32 score per position (and the trunk's map never whole)
        head_bpp = STREAMED_HEAD_BYTES_PER_POSITION if streamed else getattr(model, "head_bpp", 0.0)
        auto = config.get("tile_size") == "auto"
        note = (f"the {TILE_BUDGET_SHARE * free / 2**20:.0f} MiB it may use ({TILE_BUDGET_SHARE:g} of the "
                f"{free / 2**20:.0f} MiB that --max-memory {limit / 2**20:.0f} MiB leaves free after setup; the rest "
                "is headroom)" if free is not None and limit else "")
        if auto and free is not None:
            # the image's resident bytes come off the tiles' share whole: budget = share * free - resident - kept
            plan = auto_stages(stream.trunk, free - resident_bytes / TILE_BUDGET_SHARE, image_shape=(h, w),
                               head_bytes_per_position=head_bpp, tile_share=TILE_BUDGET_SHARE, budget_note=note,
                               head_streamed=streamed)
        else:  # fixed tiles (or no limit): the given tiles, only checked against the limit
            plan = None
            if free is not None:
                from milbench.api import kept_map_bytes, kept_maps_error, stage_maps

                trunk = stream.trunk
                elem = next(trunk.parameters()).element_size()
                maps = stage_maps(trunk, stream.split, _stage_channels(stream), h, w)
                kept = kept_map_bytes(maps, elem, head_bpp, head_streamed=streamed) + resident_bytes
                model.tile_sizing["stream_kept_map_bytes"] = max(kept, model.tile_sizing.get("stream_kept_map_bytes", 0))
                if kept >= TILE_BUDGET_SHARE * free:
                    raise kept_maps_error(h, w, kept, note)
        plans[key] = plan
        if streamed:
            model.tile_sizing["stream_head_streamed"] = 1
        if resident_bytes:
            model.tile_sizing["stream_image_resident_bytes"] = max(
                resident_bytes, model.tile_sizing.get("stream_image_resident_bytes", 0))
        if plan is not None:
            sizing = model.tile_sizing
            if plan.kept_map_bytes >= sizing.get("stream_kept_map_bytes", -1):
                from_limit = sizing.get("stream_tile_budget_from_max_memory", 0)
                for key in [k for k in sizing if k.startswith("stream_stage")]:  # the previous plan's stages
                    del sizing[key]
                sizing.update(_plan_record(plan, from_limit))
                sizing["stream_image_pixels"] = h * w
    if plan is not None and (tuple(plan.split) != tuple(model.stream.split)
                             or tuple(plan.tile_sizes) != tuple(model.stream.tile_sizes)):
        model.stream.replan(list(plan.tile_sizes), plan.split, plan.bytes_per_pixel, plan.budget_bytes)
    return streamed


def _stage_channels(stream: Any) -> list[int]:
    """Channels of each stage's output map (one small no-grad pass, cached on the stream)."""
    import torch

    if getattr(stream, "_out_channels", None) is None:
        p = next(stream.trunk.parameters())
        side = 8 * max(stream.geometry.stride)
        while True:
            try:
                stream.geometry.output_size(side, side)
                break
            except ConfigError:
                side *= 2
        x = torch.zeros(1, stream.trunk[0].in_channels if isinstance(stream.trunk[0], torch.nn.Conv2d) else 3,
                        side, side, dtype=p.dtype, device=p.device)
        chans = []
        with torch.no_grad():
            for st in stream.stages:
                x = st.module(x)
                chans.append(int(x.shape[1]))
        stream._out_channels = chans
    return stream._out_channels


def _plan_record(plan: StagePlan, from_limit: int) -> dict[str, float]:
    record: dict[str, float] = {"stream_tile_size": plan.tile_sizes[0], "stream_stages": len(plan.tile_sizes),
                                "stream_tile_budget_bytes": int(plan.budget_bytes),
                                "stream_tile_budget_from_max_memory": from_limit,
                                "stream_tile_bytes_per_pixel": plan.bytes_per_pixel[0]}
    for i, (t, c) in enumerate(zip(plan.tile_sizes[1:], plan.bytes_per_pixel[1:]), start=2):
        record.update({f"stream_stage{i}_cut": plan.split[i - 2], f"stream_stage{i}_tile_size": t,
                       f"stream_stage{i}_bytes_per_pixel": c})
    if plan.image_shape is not None:
        record["stream_kept_map_bytes"] = int(plan.kept_map_bytes)
    return record


def resolve_tiles(trunk: nn.Module, tile_size: int | str, ctx: RunContext,
                  with_free: bool = False) -> Any:
    """The :class:`~milbench.api.StagePlan` to stream with, and what the
    record says about it.

    A side in pixels streams the trunk as one. ``auto`` cuts the trunk where
    that recomputes least and gives each stage the largest tile whose
    activations fit the budget (:func:`milbench.api.auto_stages`,
    which measures the activation cost per pixel): with ``--max-memory``,
    :data:`TILE_BUDGET_SHARE` of what is left once the data is loaded and the
    model built (resident memory on a CPU, torch's allocation on a GPU) and
    the trunk's gradients and two optimizer moments are set aside; without
    it, :data:`~milbench.api.DEFAULT_TILE_BUDGET_BYTES`.
    """
    from milbench.api import DEFAULT_TILE_BUDGET_BYTES, StagePlan, auto_stages

    limit = getattr(ctx, "max_memory_bytes", None)
    free = None
    if tile_size != "auto":
        if limit:
            free = _free_after_setup(trunk, ctx, limit)
        out = StagePlan((), (int(tile_size),), (), 0.0), {"stream_tile_size": int(tile_size), "stream_stages": 1}
        return (*out, free) if with_free else out
    if limit:
        free = _free_after_setup(trunk, ctx, limit)
        budget = TILE_BUDGET_SHARE * free
        if budget <= 0:
            raise ConfigError(f"tile_size=auto: --max-memory {limit / 2**20:.0f} MiB leaves no room for tiles "
                              f"({(limit - free) / 2**20:.0f} MiB in use after setup, with the trunk's gradients "
                              "and optimizer state); raise it or give tile_size in pixels")
    else:
        budget = float(DEFAULT_TILE_BUDGET_BYTES)
    plan = auto_stages(trunk, budget)
    record = _plan_record(plan, int(bool(limit)))
    return (plan, record, free) if with_free else (plan, record)


def _free_after_setup(trunk: nn.Module, ctx: RunContext, limit: int) -> float:
    """What ``limit`` leaves free now: less the memory in use (resident on a CPU,
    torch's allocation on a GPU) and the trunk's gradients and optimizer moments."""
    import torch

    device = torch.device(ctx.device)
    if device.type == "cuda":
        in_use = torch.cuda.memory_allocated(device)
    else:
        import psutil

        in_use = psutil.Process().memory_info().rss
    state = sum(p.numel() * p.element_size() for p in trunk.parameters()) * 3  # grads + two moments
    return float(limit - in_use - state)


def _normalised(attention_map: torch.Tensor) -> torch.Tensor:
    a = attention_map.detach().float().cpu()
    return a / a.max().clamp_min(1e-12)


def attention_pixels(model: StreamingCLAMModel, attention_map: torch.Tensor, bag: Bag,
                     rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The (h, w) attention map divided by its maximum and painted onto the
    bag image (rows*p, cols*p), each position centred where the trunk looked
    (:meth:`.clam.StreamingCLAMModel.upsample`); CPU float in [0, 1]. ``rows``:
    only those pixel rows."""
    n_rows, n_cols = bag.grid_shape
    size = (n_rows * bag.patch_size, n_cols * bag.patch_size)
    return model.upsample(_normalised(attention_map), size, rows).clamp_(0, 1)


#: Grid rows of the attention map painted at a time when only per-instance maxima are needed:
#: a slide's full-resolution map (rows*p x cols*p floats) is never held for them.
CELL_ROWS_PER_BLOCK = 16


def instance_attention(model: StreamingCLAMModel, attention_map: torch.Tensor, bag: Bag) -> torch.Tensor:
    """:func:`instance_maxima` of :func:`attention_pixels`, painted a band of grid rows at a time
    (memory: one band, not the image)."""
    import torch

    n_rows, n_cols = bag.grid_shape
    p = bag.patch_size
    a = _normalised(attention_map)
    cells = torch.empty(n_rows, n_cols)
    for r in range(0, n_rows, CELL_ROWS_PER_BLOCK):
        r1 = min(n_rows, r + CELL_ROWS_PER_BLOCK)
        band = model.upsample(a, (n_rows * p, n_cols * p), (r * p, r1 * p)).clamp_(0, 1)
        cells[r:r1] = band.view(r1 - r, p, n_cols, p).amax(dim=(1, 3))
    return cells[bag.grid[:, 0].cpu(), bag.grid[:, 1].cpu()]


def instance_maxima(pixel: torch.Tensor, bag: Bag) -> torch.Tensor:
    """Maximum of a pixel map over each instance's patch, in the order of ``bag.instances``: (N,)."""
    rows, cols = bag.grid_shape
    p = bag.patch_size
    cells = pixel.view(rows, p, cols, p).amax(dim=(1, 3))
    return cells[bag.grid[:, 0].cpu(), bag.grid[:, 1].cpu()]


@hookimpl
def milbench_register_methods(register: Callable[[Method], None]) -> None:
    register(StreamingCLAM())
