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

from milbench.config import Param  # re-exported for plugin authors

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "hookimpl", "Param", "Bag", "Prediction", "DataSpec", "Splits", "Method", "Dataset",
    "DataStatus", "Metric", "RunContext",
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
    bags lazily). ``info`` goes into the record verbatim: at least ``source``
    (``"sample"`` when a reduced copy shipped in the package was read — the
    report flags it — otherwise a dataset-specific name of what was read),
    ``files`` read, ``split_seed`` and per-split instance-id hashes.
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
    source: str  # "full", "partial", "sample" or "missing"
    detail: str
    looked_in: list[str] = field(default_factory=list)
    fetch_hint: str = ""


@dataclass
class RunContext:
    """Per-run facts handed to plugins: where to write artifacts, the device, the seed."""

    device: Any
    seed: int
    artifact_dir: str | None = None
    data_root: str | None = None


class Method:
    """Base class of a method plugin. Subclass it, set the class attributes,
    implement :meth:`build`, :meth:`backward` and :meth:`predict`.

    The harness owns the optimizer, schedule, epochs, accumulation over bags
    (``bags_per_step``), checkpoint selection, seeds, device, timing, memory
    and metrics; a method only decides how one bag's gradient is computed and
    how one bag is predicted. That is what makes the comparison fair.

    ``params`` declares the method's own config keys; ``defaults`` overrides
    harness or dataset defaults (e.g. ``lr``); ``presets`` maps a preset name
    to overrides; ``smoke`` is the ``--smoke`` overlay. ``supervision`` is
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

    ``load`` must hold out the test split at the level of source images
    (no test bag shares a source image/tile with a training bag) and be
    deterministic given ``config`` and ``seed``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Param]] = {}
    defaults: ClassVar[Mapping[str, Any]] = {}
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    smoke: ClassVar[Mapping[str, Any]] = {}

    def status(self, data_root: str | None) -> DataStatus:
        """Where the data is looked for and what was found (no heavy loading)."""
        raise NotImplementedError

    def load(self, config: Mapping[str, Any], seed: int, data_root: str | None) -> Splits:
        """Build train/val/test bags. Raise :class:`milbench.errors.DataError`
        with where it looked and what to do if the data is missing or corrupt."""
        raise NotImplementedError

    def verify(self, data_root: str | None) -> list[str]:
        """Deep check of the files (counts, readability, checksums); return problems."""
        return []

    def download(self, data_root: str) -> None:
        """Fetch the official files into ``data_root`` (network needed)."""
        from milbench.errors import DataError

        raise DataError(f"dataset '{self.name}' has no download; place its files under {data_root}")


@dataclass(frozen=True)
class Metric:
    """An extra metric: ``fn(predictions, bags) -> float | None`` over the test split."""

    name: str
    fn: Any
    help: str = ""
