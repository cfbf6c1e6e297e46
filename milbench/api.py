"""The public API for plugin authors: everything a method or dataset touches.

A plugin -- a third party's or a built-in one -- imports milbench from here and
nowhere else (a test holds the built-ins to it)::

    from milbench.api import hookimpl, Method, Param

This module is a face: it defines nothing. The data model (a :class:`Bag` is a
grid of patches, with an instance view for set-based MIL methods and an image
view for streaming CNNs, so every method runs on every dataset) lives in
:mod:`milbench.bag`; the base classes and the types passed between a plugin and
the harness in :mod:`milbench.contract`; the shared code a plugin may build on
(bag sampling, attention MIL, chunked encoding, encoders, the streaming engine)
in :mod:`milbench.data` and :mod:`milbench.models`, re-exported here on first
use so that importing this module (as every plugin does at registration time)
never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from milbench.bag import Bag, ImageSource, InstanceSource, LazyBag, LazyImage, LazyInstances  # the data model
from milbench.config import AutoParam, Param, resolve  # declaring and resolving config keys
from milbench.contract import (  # what a plugin subclasses, returns and receives
    Dataset, DataSpec, DataStatus, Method, Metric, Prediction, RunContext, Splits, hookimpl)
from milbench.data.augment import color_jitter, random_flips, random_shift  # augmentation building blocks
from milbench.data.keys import bag_params  # the keys every bag dataset declares, in one call
from milbench.data.roots import (  # where data lives, where derived files go
    ENV_DATA_ROOT, cache_dir, candidate_roots, derived_cache_dir, find_in_roots)
from milbench.errors import (  # one-line errors
    ConfigError, DataError, MilbenchError, PluginError, did_you_mean, first_line)

if TYPE_CHECKING:  # pragma: no cover
    from milbench.data.bags import (
        BagPlan, LazyBags, PooledBags, bag_sizes, grid_shape, ids_hash, plan_bags, row_major_grid, split_pool)
    from milbench.data.download import fetch
    from milbench.models.attention import AttentionMIL, attention_scores, bag_loss
    from milbench.models.attention_mil import (
        ATTENTION_MIL_PARAMS, PAPER_MODEL, build_attention_mil, check_geometry, encoder_name)
    from milbench.models.chunked import chunk_slices, chunked_backward, encode_chunks, random_layers
    from milbench.models.encoders import create_encoder, min_instance_size, norm2d
    from milbench.models.norms import FrozenBatchNorm2d, freeze_batch_norms, require_batch_independent
    from milbench.models.streaming import (
        ACTIVATION_HEADROOM, DEFAULT_TILE_BUDGET_BYTES, StagePlan, StreamingTrunk, auto_stages, describe, geometry,
        kept_map_bytes, kept_maps_error, saved_tensor_bytes, stage_maps, streamed_forward_backward)
    from milbench.models.streamed_attention import PooledMap, attention_pool, attention_pool_step
    from milbench.protocol import PROTOCOL_PARAMS
    from milbench.segmentation_metrics import dense_class_metrics, metric_key

#: Shared code a plugin may build on, imported on first use (``from milbench.api import
#: encode_chunks`` inside a method's ``build``), so that registering a plugin never imports
#: torch. Name -> the module that holds it. Everything here is used by two or more plugins
#: (or is the engine a third party's method would reuse); code one plugin owns lives in it.
_LAZY: dict[str, str] = {
    # bags drawn from a pool of labelled images, laid on a grid (milbench.data.bags)
    **dict.fromkeys(("BagPlan", "PooledBags", "LazyBags", "plan_bags", "split_pool", "ids_hash", "grid_shape",
                     "row_major_grid", "bag_sizes"), "milbench.data.bags"),
    "fetch": "milbench.data.download",
    # attention MIL (Ilse et al.): heads, losses, the shared model builder and its keys
    **dict.fromkeys(("AttentionMIL", "bag_loss", "attention_scores"), "milbench.models.attention"),
    **dict.fromkeys(("ATTENTION_MIL_PARAMS", "PAPER_MODEL", "build_attention_mil", "check_geometry",
                     "encoder_name"), "milbench.models.attention_mil"),
    # instance encoders by name (one registry, as timm's create_model)
    **dict.fromkeys(("create_encoder", "min_instance_size", "norm2d"), "milbench.models.encoders"),
    # chunked encoding with exact gradients (gradient accumulation over instances)
    **dict.fromkeys(("chunk_slices", "encode_chunks", "chunked_backward", "random_layers"), "milbench.models.chunked"),
    # norms that keep instances independent of each other
    **dict.fromkeys(("FrozenBatchNorm2d", "freeze_batch_norms", "require_batch_independent"), "milbench.models.norms"),
    # the streaming engine: exact gradients of a CNN on an image larger than memory, tile by tile
    **dict.fromkeys(("StreamingTrunk", "streamed_forward_backward", "geometry", "auto_stages", "StagePlan",
                     "describe", "DEFAULT_TILE_BUDGET_BYTES", "ACTIVATION_HEADROOM", "kept_map_bytes", "kept_maps_error",
                     "stage_maps", "saved_tensor_bytes"), "milbench.models.streaming"),
    # attention pooling streamed with the trunk (nothing area-sized kept but one score per position)
    **dict.fromkeys(("PooledMap", "attention_pool", "attention_pool_step"), "milbench.models.streamed_attention"),
    # dense (pixel) class metrics for methods that predict class maps
    **dict.fromkeys(("dense_class_metrics", "metric_key"), "milbench.segmentation_metrics"),
    # the training protocol's keys (a dataset may set their defaults, a method may not)
    "PROTOCOL_PARAMS": "milbench.protocol",
}


def __getattr__(name: str) -> Any:
    """Import a :data:`_LAZY` name from its module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'milbench.api' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "hookimpl", "Param", "AutoParam", "Bag", "Prediction", "DataSpec", "Splits", "Method", "Dataset",
    "DataStatus", "Metric", "RunContext", "random_flips", "color_jitter", "random_shift",
    "InstanceSource", "LazyInstances", "ImageSource", "LazyImage", "LazyBag",
    "resolve", "bag_params", "ENV_DATA_ROOT", "cache_dir", "derived_cache_dir", "candidate_roots", "find_in_roots",
    "MilbenchError", "ConfigError", "DataError", "PluginError", "did_you_mean", "first_line",
    *_LAZY,
]
