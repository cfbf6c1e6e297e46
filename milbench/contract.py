"""The plugin contract's types: what a method or dataset subclasses, returns and receives.

:class:`Method` and :class:`Dataset` are the base classes a plugin subclasses;
:class:`Prediction`, :class:`DataSpec`, :class:`Splits`, :class:`DataStatus`,
:class:`RunContext` and :class:`Metric` are what passes between a plugin and the
harness; :data:`hookimpl` marks a plugin's hook implementations. Plugins import
them from :mod:`milbench.api`; harness modules import them here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import pluggy

from milbench.bag import Bag
from milbench.config import Param
from milbench.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["hookimpl", "Prediction", "DataSpec", "Splits", "DataStatus", "RunContext", "Method", "Dataset", "Metric"]

#: Decorator marking a plugin's hook implementations (project name ``milbench``).
hookimpl = pluggy.HookimplMarker("milbench")


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
