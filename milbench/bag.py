"""The data model: a bag is a grid of patches, read whole or lazily.

A :class:`Bag` has two views -- the instances ``(N, C, p, p)`` for set-based
MIL methods and :meth:`Bag.image`, one ``(C, rows*p, cols*p)`` picture for
image-based methods (streaming CNNs) -- so every method runs on every dataset.
A :class:`LazyBag` reads its instances (and image) from a source on demand, so
a whole-slide bag is never held in memory unless a method asks for all of it.
:meth:`LazyBag.augmented` augments such a bag without reading it: each instance
is transformed when it is read, with its own seeded generator, so every read of
one visit (chunks, re-reads for recomputation, the streamed image) sees the
same augmented pixels.

Plugins import these from :mod:`milbench.api`; harness modules import them here,
below the API, so the API stays a face and nothing circles back through it.
Torch is imported lazily: building a bag type must not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Bag", "InstanceSource", "LazyInstances", "ImageSource", "LazyImage", "LazyBag",
           "AugmentedInstances", "AugmentedImage"]

#: An augmentation: (n, C, p, p) instances and a generator -> augmented instances (a dataset's ``augment``).
Augment = Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"]


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

    @property
    def resident_bytes(self) -> int:
        """Bytes the source holds in memory while its bag is in use, beyond what was
        loaded with the dataset (a slide's uint8 box is read on first crop: 3 B a
        pixel). A memory planner that sized itself before the first read
        (streamingclam's ``tile_size=auto``) subtracts them. 0: nothing extra."""
        return 0


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

    @property
    def resident_bytes(self) -> int:
        """The source's :attr:`ImageSource.resident_bytes`."""
        return int(getattr(self.source, "resident_bytes", 0))

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


def instance_seed(visit_seed: int, index: int) -> int:
    """The generator seed of instance ``index`` in one augmented visit of a bag."""
    return (visit_seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1)


class AugmentedInstances(InstanceSource):
    """``source``'s instances, each passed through ``augment`` when read.

    Instance ``i`` gets a generator seeded by ``(visit_seed, i)``, so its pixels do not
    depend on which chunk it was read in or how often: a chunked method's gradient on
    an augmented bag equals the whole-bag method's, as it does without augmentation.
    """

    def __init__(self, source: InstanceSource, augment: Augment, visit_seed: int):
        self.source = source
        self.augment = augment
        self.visit_seed = int(visit_seed)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def instance_shape(self) -> tuple[int, int, int]:
        return self.source.instance_shape

    def read(self, index: Any) -> "torch.Tensor":
        import torch

        x = self.source.read(index)
        out = torch.empty_like(x)
        gen = torch.Generator()
        for j, i in enumerate(index):  # one call per instance: ~0.3 ms per 32-px tile, the price of chunk-invariance
            out[j:j + 1] = self.augment(x[j:j + 1], gen.manual_seed(instance_seed(self.visit_seed, int(i))))
        return out


class AugmentedImage(ImageSource):
    """A bag image whose instance cells show the augmented instances.

    The crop is read from ``base`` (background between tiles as it is) and every grid
    cell it touches is overwritten with that instance from ``instances`` -- the image a
    streaming method sees is the one a set-based method's instances would tile into.
    Cells are read ``chunk`` at a time, so a crop never holds more than its own pixels
    plus one chunk of tiles.
    """

    def __init__(self, base: ImageSource, instances: AugmentedInstances, grid: "torch.Tensor",
                 patch: int, chunk: int = 256):
        import numpy as np

        _, h, w = base.shape
        g = np.asarray(grid.detach().cpu() if hasattr(grid, "detach") else grid, dtype=np.int64).reshape(-1, 2)
        if len(g) and ((g[:, 0].max() + 1) * patch > h or (g[:, 1].max() + 1) * patch > w):
            raise ValueError(f"AugmentedImage: grid cells of {patch} px fall outside the {h}x{w} image")
        self.base, self.instances, self.grid, self.patch, self.chunk = base, instances, g, int(patch), int(chunk)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    @property
    def resident_bytes(self) -> int:
        return int(getattr(self.base, "resident_bytes", 0))

    def read(self, r0: int, r1: int, c0: int, c1: int) -> "torch.Tensor":
        import numpy as np

        crop = self.base.read(r0, r1, c0, c1).clone()
        p, rows, cols = self.patch, self.grid[:, 0], self.grid[:, 1]
        hit = np.flatnonzero((rows * p < r1) & ((rows + 1) * p > r0) & (cols * p < c1) & ((cols + 1) * p > c0))
        for a in range(0, len(hit), self.chunk):
            part = hit[a:a + self.chunk]
            for tile, i in zip(self.instances.read(part), part):
                y0, x0 = int(rows[i]) * p, int(cols[i]) * p
                ys, ye, xs, xe = max(y0, r0), min(y0 + p, r1), max(x0, c0), min(x0 + p, c1)
                crop[:, ys - r0:ye - r0, xs - c0:xe - c0] = tile[:, ys - y0:ye - y0, xs - x0:xe - x0]
        return crop


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

    def _with(self, source: InstanceSource, image_source: ImageSource | None, device: Any) -> "LazyBag":
        """This bag's labels and layout over another source, image source or device."""
        return LazyBag(source, self.label, self.grid, self.grid_shape, self.instance_labels, self.instance_ids,
                       self.mask, self.key_class, self.bag_id, image_source=image_source, device=device,
                       instance_labels_known=self.instance_labels_known, meta=self.meta)

    def to(self, device: Any) -> "LazyBag":
        return self._with(self.source, self.image_source, device)

    def augmented(self, augment: Augment, visit_seed: int) -> "LazyBag":
        """This bag with every instance augmented on read (:class:`AugmentedInstances`) and,
        when it has an image source, its image too (:class:`AugmentedImage`); nothing is read now."""
        source = AugmentedInstances(self.source, augment, visit_seed)
        image = (AugmentedImage(self.image_source, source, self.grid, self.patch_size)
                 if self.image_source is not None else None)
        return self._with(source, image, self.device)

    def __repr__(self) -> str:
        return (f"LazyBag(bag_id={self.bag_id!r}, label={self.label}, n={len(self)}, grid_shape={self.grid_shape}, "
                f"source={type(self.source).__name__})")

    __eq__ = object.__eq__  # type: ignore[assignment]
    __hash__ = object.__hash__  # type: ignore[assignment]
