"""Bags drawn from a pool of labelled instances, laid out on a grid.

Used by every dataset whose instances are independent images (QMNIST digits,
Imagenette photos). The pool is split *first* (train/val/test pools), then
each split's bags are drawn from its own pool, so no test bag shares a source
image with a training bag. Sampling is balanced (half the bags positive) and
fully determined by the seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from milbench.errors import ConfigError


@dataclass(frozen=True)
class BagPlan:
    """Which pool items form one bag, and its label (no pixels yet)."""

    indices: np.ndarray
    label: int
    bag_id: str


def grid_shape(n: int) -> tuple[int, int]:
    """Smallest near-square board holding ``n`` cells (rows <= cols)."""
    rows = max(1, int(math.floor(math.sqrt(n))))
    cols = max(1, math.ceil(n / rows))
    return rows, cols


def split_pool(n_items: int, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(n_items)`` and cut it into disjoint parts of the given fractions."""
    order = rng.permutation(n_items)
    cuts = np.cumsum([int(round(f * n_items)) for f in fractions[:-1]])
    return [np.sort(part) for part in np.split(order, cuts)]


def bag_sizes(n_bags: int, mean: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """Fixed bag sizes (``std == 0``) or Gaussian around ``mean`` as in Ilse et al. (min 2)."""
    if std <= 0:
        return np.full(n_bags, mean, dtype=int)
    return np.clip(np.rint(rng.normal(mean, std, n_bags)), 2, None).astype(int)


def plan_bags(
    pool: np.ndarray,
    pool_is_key: np.ndarray,
    n_bags: int,
    bag_size: int,
    key_fraction: float,
    rng: np.random.Generator,
    prefix: str,
    size_std: float = 0.0,
) -> list[BagPlan]:
    """Draw ``n_bags`` balanced bags from ``pool`` (indices into the dataset).

    A positive bag holds ``max(1, round(key_fraction * size))`` key instances,
    the rest non-key; a negative bag holds no key instance. Instances are
    distinct within a bag and may recur across bags of the same split.
    """
    keys = pool[pool_is_key]
    others = pool[~pool_is_key]
    sizes = bag_sizes(n_bags, bag_size, size_std, rng)
    labels = np.array([1] * ((n_bags + 1) // 2) + [0] * (n_bags // 2))
    rng.shuffle(labels)
    plans = []
    for i, (size, label) in enumerate(zip(sizes, labels)):
        n_key = max(1, int(round(key_fraction * size))) if label else 0
        n_key = min(n_key, size)
        if n_key > len(keys) or size - n_key > len(others):
            raise ConfigError(
                f"{prefix} pool too small for bag_size={size}: {len(keys)} key and {len(others)} other "
                f"instances available; lower bag_size or key_fraction"
            )
        chosen = np.concatenate([
            rng.choice(keys, n_key, replace=False),
            rng.choice(others, size - n_key, replace=False),
        ])
        rng.shuffle(chosen)  # random grid positions for the key instances
        plans.append(BagPlan(chosen, int(label), f"{prefix}-{i:05d}"))
    return plans


def ids_hash(ids: Sequence[str] | np.ndarray) -> str:
    """A 16-hex-digit hash of a set of instance ids (order-free)."""
    h = hashlib.sha256()
    for s in sorted({str(i) for i in ids}):
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def row_major_grid(n: int, cols: int):
    """(n, 2) long tensor of (row, col) cells filled row by row on a board ``cols`` wide."""
    import torch

    cells = torch.arange(n)
    return torch.stack([cells // cols, cells % cols], dim=1)


class LazyBags(Sequence):
    """Base of bag sequences that build each :class:`milbench.api.Bag` on access
    (so large presets never hold every bag in memory). Subclasses implement
    ``__len__`` and ``_bag(i)`` for ``0 <= i < len``; indexing, negative
    indices and slices are handled here."""

    def _bag(self, i: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._bag(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._bag(i)


class PooledBags(LazyBags):
    """A lazy sequence of :class:`milbench.api.Bag` built from plans and a pool.

    ``get_instances(indices)`` returns a float tensor (n, C, p, p);
    ``instance_class(indices)`` the per-instance labels (key instances are
    ``key_class``). Bags are built on access, so large presets do not hold
    every bag in memory at once.
    """

    def __init__(self, plans: list[BagPlan], get_instances: Callable, is_key: np.ndarray, ids: Sequence[str]):
        self.plans = plans
        self.get_instances = get_instances
        self.is_key = is_key
        self.ids = ids

    def __len__(self) -> int:
        return len(self.plans)

    def _bag(self, i: int):
        import torch

        from milbench.bag import Bag

        plan = self.plans[i]
        x = self.get_instances(plan.indices)
        n = len(plan.indices)
        rows, cols = grid_shape(n)
        grid = row_major_grid(n, cols)
        labels = torch.as_tensor(self.is_key[plan.indices].astype(np.int64))
        return Bag(x, plan.label, grid, (rows, cols), labels,
                   [str(self.ids[j]) for j in plan.indices], None, 1, plan.bag_id)

    def instance_ids(self) -> list[str]:
        return [str(self.ids[j]) for p in self.plans for j in p.indices]
