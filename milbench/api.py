"""The public API for plugin authors: everything a method or dataset touches.

A third-party plugin imports from here and nowhere else in milbench::

    from milbench.api import hookimpl, Method, Param

The data model: a :class:`Bag` is a grid of patches. It has two views: the
instances ``(N, C, p, p)`` for set-based MIL methods, and :meth:`Bag.image`, one
``(C, rows*p, cols*p)`` picture for image-based methods (streaming CNNs). Every
method can therefore run on every dataset.

Torch is imported lazily by the functions that need it so that importing this
module (as every plugin does at registration time) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import pluggy

from milbench.config import Param, resolve  # declaring and resolving config keys
from milbench.data.augment import color_jitter, random_flips, random_shift  # augmentation building blocks
from milbench.data.keys import bag_params  # the keys every bag dataset declares, in one call
from milbench.data.roots import ENV_DATA_ROOT, cache_dir, candidate_roots, find_in_roots  # where data lives
from milbench.errors import (  # one-line errors
    ConfigError, DataError, MilbenchError, PluginError, did_you_mean, first_line)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from milbench.data.bags import BagPlan, LazyBags, PooledBags, grid_shape, ids_hash, plan_bags, row_major_grid, split_pool
    from milbench.data.download import fetch
    from milbench.models.attention import AttentionMIL, bag_loss, attention_scores
    from milbench.models.attention_mil import (
        ATTENTION_MIL_PARAMS, PAPER_MODEL, build_attention_mil, check_geometry, encoder_name)
    from milbench.models.chunked import chunk_slices, chunked_backward, encode_chunks, random_layers
    from milbench.models.encoders import create_encoder, min_instance_size, norm2d
    from milbench.models.norms import FrozenBatchNorm2d, freeze_batch_norms, require_batch_independent
    from milbench.models.streaming import (
        DEFAULT_TILE_BUDGET_BYTES, StagePlan, StreamingTrunk, auto_stages, describe, geometry,
        streamed_forward_backward)
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
                     "describe", "DEFAULT_TILE_BUDGET_BYTES"), "milbench.models.streaming"),
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
    "hookimpl", "Param", "Bag", "Prediction", "DataSpec", "Splits", "Method", "Dataset",
    "DataStatus", "Metric", "RunContext", "random_flips", "color_jitter", "random_shift",
    "InstanceSource", "LazyInstances", "ImageSource", "LazyImage", "LazyBag",
    "resolve", "bag_params", "ENV_DATA_ROOT", "cache_dir", "candidate_roots", "find_in_roots",
    "MilbenchError", "ConfigError", "DataError", "PluginError", "did_you_mean", "first_line",
    *_LAZY,
]

#: Decorator marking a plugin's hook implementations (project name ``milbench``).
hookimpl = pluggy.HookimplMarker("milbench")


@dataclass
class Bag:
    """One bag: patches laid on a grid, a bag label, and evaluation-only labels.

    ``instances``: float tensor (N, C, p, p). ``grid``: long tensor (N, 2) of
    (row, col) cells on a ``grid_shape = (rows, cols)`` board; cells without an
    instance are background (zeros) in :meth:`image`. ``instance_labels`` (N,)
    and ``mask`` (rows*p, cols*p; an int class map) are for evaluation and for
    methods that declare ``supervision = "instance"`` only; a MIL method must
    read nothing but ``label`` while training. ``key_class`` is the value in
    ``instance_labels``/``mask`` that makes a bag positive (for Dice).
    ``instance_ids`` name the source images/tiles so splits can be proven
    disjoint.
    """

    instances: "torch.Tensor"
    label: int
    grid: "torch.Tensor"
    grid_shape: tuple[int, int]
    instance_labels: "torch.Tensor"
    instance_ids: Sequence[str] = ()
    mask: "torch.Tensor | None" = None
    key_class: int = 1
    bag_id: str = ""

    def __len__(self) -> int:
        return int(self.instances.shape[0])

    @property
    def patch_size(self) -> int:
        return int(self.instances.shape[-1])

    def image(self) -> "torch.Tensor":
        """Tile the instances into one (C, rows*p, cols*p) image (background 0)."""
        n, c, p, _ = self.instances.shape
        rows, cols = self.grid_shape
        img = self.instances.new_zeros((c, rows, p, cols, p))
        if n:
            # Advanced indices split by a slice put the index dim first: (N, C, p, p).
            img[:, self.grid[:, 0], :, self.grid[:, 1], :] = self.instances
        return img.reshape(c, rows * p, cols * p)

    def instance_map(self, values: "torch.Tensor", fill: float = 0.0) -> "torch.Tensor":
        """Paint one value per instance onto its patch: (rows*p, cols*p)."""
        rows, cols = self.grid_shape
        p = self.patch_size
        board = values.new_full((rows, cols), fill)
        board[self.grid[:, 0], self.grid[:, 1]] = values
        return board.repeat_interleave(p, 0).repeat_interleave(p, 1)

    def key_mask(self) -> "torch.Tensor":
        """Ground-truth key-class pixel map (bool), from ``mask`` or instance labels."""
        if self.mask is not None:
            return self.mask == self.key_class
        return self.instance_map((self.instance_labels == self.key_class).float()) > 0.5

    def to(self, device: Any) -> "Bag":
        """A copy with instances (and grid) on ``device``; labels stay on CPU."""
        return Bag(self.instances.to(device), self.label, self.grid, self.grid_shape, self.instance_labels,
                   self.instance_ids, self.mask, self.key_class, self.bag_id)

    #: False when the data has no instance-level truth for this bag (e.g. a slide without
    #: annotations): ``instance_labels`` are then placeholders, Dice skips the bag and an
    #: instance-supervised method must refuse it.
    instance_labels_known: ClassVar[bool] = True

    @property
    def lazy_instances(self) -> "torch.Tensor | LazyInstances":
        """The instances for a method that reads them in pieces (``x[a:b]``,
        ``x.index_select(0, idx)``, ``x.shape``, ``x.device``): the tensor itself
        here; a :class:`LazyInstances` for a :class:`LazyBag`, so a method that only
        ever touches chunks never holds the whole bag in memory."""
        return self.instances

    @property
    def lazy_image(self) -> "torch.Tensor | LazyImage":
        """The bag image for a method that reads it tile by tile (the streaming
        engine slices ``x[..., rows, cols]``): :meth:`image` here; a
        :class:`LazyImage` for a :class:`LazyBag` that has an image source."""
        return self.image()


class InstanceSource:
    """Where a :class:`LazyBag` reads its instances from (e.g. the tiles of a slide).

    Subclasses implement ``__len__``, :attr:`instance_shape` and :meth:`read`.
    Reading is on demand and in the order asked, so a method decides how many
    instances are in memory at once.
    """

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def instance_shape(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        """(C, p, p) of one instance."""
        raise NotImplementedError

    def read(self, index: Any) -> "torch.Tensor":  # pragma: no cover - abstract
        """Float instances (n, C, p, p) on the CPU for ``index`` (a 1-d integer array,
        in that order, repeats allowed)."""
        raise NotImplementedError


def _as_index(key: Any, n: int) -> Any:
    """An integer numpy index array for an int, slice, list, numpy array or tensor key."""
    import numpy as np

    if isinstance(key, slice):
        return np.arange(n)[key]
    if isinstance(key, (int, np.integer)):
        k = int(key) + (n if key < 0 else 0)
        if not 0 <= k < n:
            raise IndexError(f"instance {key} out of range for a bag of {n}")
        return np.array([k])
    idx = np.asarray(key.detach().cpu() if hasattr(key, "detach") else key)
    if idx.dtype == bool:
        return np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"instance index out of range for a bag of {n}")
    return idx


class LazyInstances:
    """A read-on-index stand-in for the (N, C, p, p) instance tensor of a :class:`LazyBag`.

    It supports what chunked methods use -- ``len``, ``shape``, ``size()``, ``dim()``,
    ``device``, ``dtype``, ``x[a:b]``, ``x[idx]``, ``x.index_select(0, idx)``,
    ``x.to(device)`` -- and each indexing reads only the asked instances from
    the :class:`InstanceSource` (each distinct instance once) and returns a real
    tensor on ``device``. :meth:`materialize` builds the whole tensor, which is
    what ``bag.instances`` does for a method that wants it all (abmil).
    """

    def __init__(self, source: InstanceSource, device: Any = None):
        import torch

        self.source = source
        self.device = torch.device(device if device is not None else "cpu")
        self.dtype = torch.float32

    @property
    def shape(self) -> "torch.Size":
        import torch

        return torch.Size((len(self.source), *self.source.instance_shape))

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, idx: Any) -> "torch.Tensor":
        import numpy as np
        import torch

        uniq, inverse = np.unique(idx, return_inverse=True)
        x = self.source.read(uniq)
        if len(uniq) != len(idx) or not np.array_equal(uniq, idx):
            x = x[torch.as_tensor(inverse.reshape(-1), dtype=torch.long)]
        return x.to(self.device)

    def __getitem__(self, key: Any) -> "torch.Tensor":
        x = self._read(_as_index(key, len(self)))
        return x[0] if isinstance(key, int) else x

    def index_select(self, dim: int, index: Any) -> "torch.Tensor":
        if dim != 0:
            raise ValueError("LazyInstances.index_select reads along the instance dimension (0) only")
        return self._read(_as_index(index, len(self)))

    def to(self, device: Any, *args: Any, **kwargs: Any) -> "LazyInstances":
        return LazyInstances(self.source, device)

    def materialize(self, chunk: int = 512) -> "torch.Tensor":
        """The whole (N, C, p, p) float tensor, read in chunks into one preallocated block."""
        import numpy as np
        import torch

        n = len(self)
        out = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        for a in range(0, n, chunk):
            out[a:a + chunk] = self.source.read(np.arange(a, min(n, a + chunk))).to(self.device)
        return out

    def __repr__(self) -> str:
        return f"LazyInstances(shape={tuple(self.shape)}, device={self.device}, source={type(self.source).__name__})"


class ImageSource:
    """Where a :class:`LazyBag` reads its bag image from, one crop at a time.

    ``shape`` is (C, H, W); :meth:`read` returns the float crop (C, r1-r0, c1-c0)
    on the CPU. A slide keeps its image as uint8 and converts only the crop.
    """

    @property
    def shape(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, r0: int, r1: int, c0: int, c1: int) -> "torch.Tensor":  # pragma: no cover - abstract
        raise NotImplementedError


class LazyImage:
    """A read-on-slice stand-in for a (C, H, W) (or batched (1, C, H, W)) image tensor.

    Supports what the streaming engine uses (``shape``, ``dim()``,
    ``unsqueeze(0)``, ``detach()``, ``x[..., rows, cols]`` with unit-step
    slices): each slice returns a real float tensor of only that crop, so a
    streamed tile is the only float copy of the image in memory.
    :meth:`materialize` returns the whole image as one float tensor.
    """

    def __init__(self, source: ImageSource, batched: bool = False):
        self.source = source
        self.batched = batched

    @property
    def shape(self) -> "torch.Size":
        import torch

        return torch.Size(((1,) if self.batched else ()) + tuple(self.source.shape))

    def dim(self) -> int:
        return 4 if self.batched else 3

    def unsqueeze(self, dim: int) -> "LazyImage":
        if dim != 0 or self.batched:
            raise ValueError("LazyImage can only gain a leading batch dimension of 1")
        return LazyImage(self.source, batched=True)

    def detach(self) -> "LazyImage":
        return self

    def __getitem__(self, key: Any) -> "torch.Tensor":
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            key = key[1:]
        if len(key) > 2:  # explicit leading (batch/channel) indices must be full slices
            if any(k != slice(None) for k in key[:-2]):
                raise IndexError("LazyImage supports x[..., rows, cols] only")
            key = key[-2:]
        rows, cols = (list(key) + [slice(None)] * 2)[:2]
        _, h, w = self.source.shape
        if not (isinstance(rows, slice) and isinstance(cols, slice)) or rows.step not in (None, 1) \
                or cols.step not in (None, 1):
            raise IndexError("LazyImage supports unit-step row and column slices only")
        r0, r1, _ = rows.indices(h)
        c0, c1, _ = cols.indices(w)
        crop = self.source.read(r0, max(r0, r1), c0, max(c0, c1))
        return crop.unsqueeze(0) if self.batched else crop

    def materialize(self) -> "torch.Tensor":
        _, h, w = self.source.shape
        x = self.source.read(0, h, 0, w)
        return x.unsqueeze(0) if self.batched else x

    def __repr__(self) -> str:
        return f"LazyImage(shape={tuple(self.shape)}, source={type(self.source).__name__})"


class LazyBag(Bag):
    """A :class:`Bag` whose instances (and image) are read on demand from a source.

    The bag is cheap to build and to move (:meth:`to` only records the device).
    ``bag.instances`` still returns the whole (N, C, p, p) tensor -- read when
    asked, not kept -- so every method works unchanged; a method that reads in
    pieces uses :attr:`lazy_instances` / :attr:`lazy_image` and never holds the
    whole bag. ``image()`` is the image source's full picture when there is one
    (e.g. a slide's tissue bounding box, with real background between tiles),
    else the instances tiled on the grid.
    """

    def __init__(self, source: InstanceSource, label: int, grid: "torch.Tensor", grid_shape: tuple[int, int],
                 instance_labels: "torch.Tensor", instance_ids: Sequence[str] = (), mask: "torch.Tensor | None" = None,
                 key_class: int = 1, bag_id: str = "", *, image_source: ImageSource | None = None,
                 device: Any = None, instance_labels_known: bool = True, meta: dict[str, Any] | None = None):
        self.source = source
        self.label = label
        self.grid = grid
        self.grid_shape = grid_shape
        self.instance_labels = instance_labels
        self.instance_ids = instance_ids
        self.mask = mask
        self.key_class = key_class
        self.bag_id = bag_id
        self.image_source = image_source
        self.device = device
        self.instance_labels_known = instance_labels_known  # type: ignore[misc]
        self.meta = meta or {}

    @property  # type: ignore[override]
    def instances(self) -> "torch.Tensor":
        """The whole bag as one tensor, read now (the method asked for it)."""
        return self.lazy_instances.materialize()

    @property
    def lazy_instances(self) -> LazyInstances:
        return LazyInstances(self.source, self.device)

    @property
    def lazy_image(self) -> "LazyImage | torch.Tensor":
        return LazyImage(self.image_source) if self.image_source is not None else self.image()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def patch_size(self) -> int:
        return int(self.source.instance_shape[-1])

    def image(self) -> "torch.Tensor":
        if self.image_source is not None:
            return LazyImage(self.image_source).materialize()
        return Bag.image(self)

    def to(self, device: Any) -> "LazyBag":
        return LazyBag(self.source, self.label, self.grid, self.grid_shape, self.instance_labels, self.instance_ids,
                       self.mask, self.key_class, self.bag_id, image_source=self.image_source, device=device,
                       instance_labels_known=self.instance_labels_known, meta=self.meta)

    def __repr__(self) -> str:
        return (f"LazyBag(bag_id={self.bag_id!r}, label={self.label}, n={len(self)}, grid_shape={self.grid_shape}, "
                f"source={type(self.source).__name__})")

    __eq__ = object.__eq__  # type: ignore[assignment]
    __hash__ = object.__hash__  # type: ignore[assignment]


@dataclass
class Prediction:
    """What a method says about one bag (computed without autograd).

    ``bag_prob``: probability that the bag is positive. ``instance_scores``
    (N,) in [0, 1]: how strongly each instance is a key instance (a
    classifier's probability, or attention normalised by its maximum times
    ``bag_prob`` so that a bag predicted negative has no key instance; see
    :func:`milbench.models.attention.attention_scores`); Dice of the key
    class is computed from ``instance_scores >= 0.5`` painted onto the patches,
    or from ``pixel_scores`` (rows*p, cols*p) when given. ``pixel_classes``
    (rows*p, cols*p) is a dense class map for multi-class Dice, compared with
    ``bag.mask``. ``loss`` is the bag loss if the method computed it.
    """

    bag_prob: float
    instance_scores: "torch.Tensor | None" = None
    pixel_scores: "torch.Tensor | None" = None
    pixel_classes: "torch.Tensor | None" = None
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    """What a model builder needs to know about the data."""

    channels: int
    instance_size: int
    n_classes: int = 2
    instance_classes: tuple[str, ...] = ("other", "key")
    key_class: int = 1


@dataclass
class Splits:
    """The three splits of one run and what the record should say about them.

    ``train``/``val``/``test`` are sequences of :class:`Bag` (they may build
    bags lazily). ``info`` goes into the record verbatim. Expected keys:

    - ``source``: ``"sample"`` when a reduced copy shipped in the package was
      read (the report flags it), ``"generated"`` for data the dataset made
      itself, otherwise a dataset-specific name of what was read (``"full"``,
      ``"slides"``, ...);
    - ``files``: what was read; ``split_seed``: the seed of the split;
    - ``instance_id_hash``: ``{"train": h, "val": h, "test": h}``, each
      :func:`ids_hash` of that split's instance ids (so two records can be
      checked for the same data, and disjoint splits shown as such).
    """

    spec: DataSpec
    train: Sequence[Bag]
    val: Sequence[Bag]
    test: Sequence[Bag]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataStatus:
    """What ``milbench data`` prints for a dataset: where it looked, what it found."""

    name: str
    found: bool
    complete: bool
    root: str | None
    #: "full" (every file found), "partial", "sample" (the copy shipped in the package),
    #: "generated" (data the dataset makes itself), "missing", or "error" (status() failed)
    source: str
    detail: str
    looked_in: list[str] = field(default_factory=list)
    fetch_hint: str = ""


@dataclass
class RunContext:
    """Per-run facts handed to plugins: where to write artifacts, the device, the seed,
    and the run's ``--max-memory`` (bytes, or None) so a method can size its work to it
    (streamingclam's ``tile_size=auto``)."""

    device: Any
    seed: int
    artifact_dir: str | None = None
    data_root: str | None = None
    max_memory_bytes: int | None = None


class Method:
    """Base class of a method plugin. Subclass it, set the class attributes,
    implement :meth:`build`, :meth:`backward` and :meth:`predict`.

    The harness owns the optimizer, schedule, epochs, accumulation over bags
    (``bags_per_step``), checkpoint selection, seeds, device, timing, memory
    and metrics; a method only decides how one bag's gradient is computed and
    how one bag is predicted. That is what makes the comparison fair.

    ``params`` declares the method's own config keys; ``defaults``, ``presets``
    (a preset name -> overrides) and ``smoke`` (the ``--smoke`` overlay) may set
    the method's own keys and the dataset's keys, never a protocol key (``lr``,
    ``epochs``, ...: see ``milbench list``), so every method on a dataset trains
    under the same protocol. ``supervision`` is
    ``"bag"`` (reads only ``bag.label`` while training) or ``"instance"``.
    """

    name: ClassVar[str] = ""
    supervision: ClassVar[str] = "bag"
    description: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Param]] = {}
    defaults: ClassVar[Mapping[str, Any]] = {}
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    smoke: ClassVar[Mapping[str, Any]] = {}

    def check(self, config: Mapping[str, Any]) -> None:
        """Raise :class:`milbench.errors.ConfigError` for a resolved config this
        method cannot honour. Called in the parent before any child starts, so
        a bad combination is a one-line error, not a failed run."""

    def build(self, spec: DataSpec, config: Mapping[str, Any], ctx: RunContext) -> "torch.nn.Module":
        """Return the model; its trainable parameters go to the harness optimizer."""
        raise NotImplementedError

    def backward(self, model: "torch.nn.Module", bag: Bag, config: Mapping[str, Any]) -> float:
        """Compute one bag's loss and add its gradient to ``.grad``; return the loss."""
        raise NotImplementedError

    def predict(self, model: "torch.nn.Module", bag: Bag, config: Mapping[str, Any]) -> Prediction:
        """Predict one bag. Called under ``torch.no_grad()`` with ``model.eval()``."""
        raise NotImplementedError

    def on_epoch_start(self, model: "torch.nn.Module", epoch: int, config: Mapping[str, Any]) -> None:
        """Optional: per-epoch schedule (e.g. unfreezing a trunk)."""

    def artifacts(self, model: "torch.nn.Module", splits: Splits, config: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
        """Optional: write files beside the record (``ctx.artifact_dir``) and
        return extra metrics/paths to merge into the record's ``metrics``."""
        return {}


class Dataset:
    """Base class of a dataset plugin: declares its keys and builds the splits.

    ``params`` declares every key the dataset reads -- the harness supplies
    none: a bag dataset declares the shared bag keys with :func:`bag_params`
    (``bag_size``, ``instance_size``, ``key_fraction``, ``n_train_bags`` ...)
    plus its own. ``defaults`` may override its own keys and the protocol's
    (e.g. ``lr``, ``epochs``: every method on this dataset then trains with
    them). ``presets`` maps a preset name to overrides; ``smoke`` is the
    ``--smoke`` overlay.

    ``load`` must hold out the test split at the level of source images
    (no test bag shares a source image/tile with a training bag) and be
    deterministic given ``config`` and ``seed``. ``status``, ``verify`` and
    ``download`` serve ``milbench data``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Param]] = {}
    defaults: ClassVar[Mapping[str, Any]] = {}
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    smoke: ClassVar[Mapping[str, Any]] = {}

    #: What :meth:`augment` does, in words; it enters the record's protocol block and
    #: its hash, so records trained under other augmentations are not mixed in a table.
    augmentation: ClassVar[str] = ""

    def augment(self, instances: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        """Training augmentation of one bag's instances (N, C, p, p), drawn from
        ``generator``; return a tensor of the same shape. The harness applies it
        to training bags only (protocol key ``augment``), before the method sees
        the bag, so a method that reads :meth:`Bag.image` gets the same
        per-instance augmentation as one that reads the instances. The default
        is no augmentation; declare what yours does in :attr:`augmentation`."""
        return instances

    #: The choices ``milbench data download NAME --variant V`` accepts (empty: no choice).
    variants: ClassVar[tuple[str, ...]] = ()

    def status(self, data_root: str | None, overrides: Sequence[str] = ()) -> DataStatus:
        """Where the data is looked for and what was found (no heavy loading).
        ``overrides`` are the user's ``--set key=value`` strings, for a dataset whose
        answer depends on its keys (``slides``: which manifest, tiles at these settings)."""
        raise NotImplementedError

    def load(self, config: Mapping[str, Any], seed: int, data_root: str | None) -> Splits:
        """Build train/val/test bags. Raise :class:`milbench.errors.DataError`
        with where it looked and what to do if the data is missing or corrupt."""
        raise NotImplementedError

    def verify(self, data_root: str | None, quick: bool = False) -> list[str]:
        """Deep check of the files (counts, readability, checksums); return problems, one
        line each. ``quick``: check a sample (e.g. decode some images, not all)."""
        return []

    def download(self, data_root: str, variant: str | None = None) -> None:
        """Fetch the official files into ``data_root`` (network needed); ``variant`` is one
        of :attr:`variants`, or None for the dataset's default."""
        raise DataError(f"dataset '{self.name}' has no download; place its files under {data_root}")


@dataclass(frozen=True)
class Metric:
    """An extra metric: ``fn(predictions, bags) -> float | None`` over the test split."""

    name: str
    fn: Any
    help: str = ""
