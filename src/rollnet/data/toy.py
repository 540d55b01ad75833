"""Seeded 2-D toy problems: two moons, two spirals, concentric rings.

Points are generated with a private :class:`torch.Generator`, so a seed
always gives the same data and the global random state is left alone.
Inputs are raw 2-D coordinates (no pixel units, no normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from rollnet.data.base import DataSplits, Split, stratified_split

__all__ = ["TOYS", "load_toy", "make_moons", "make_rings", "make_spirals"]


def _labels(n: int) -> Tensor:
    """``n`` labels, half 0 then half 1 (class 0 gets the extra point when n is odd)."""
    n1 = n // 2
    return torch.cat([torch.zeros(n - n1, dtype=torch.int64), torch.ones(n1, dtype=torch.int64)])


def make_moons(n: int = 1000, noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two interleaving half circles.

    Returns:
        ``(x [n, 2] float32, y [n] int64)``; class 0 is the upper moon.

    >>> x, y = make_moons(10, seed=0)
    >>> x.shape, int(y.sum())
    (torch.Size([10, 2]), 5)
    """
    gen = torch.Generator().manual_seed(seed)
    y = _labels(n)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * math.pi
    upper = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    x = torch.where(y.unsqueeze(1) == 0, upper, lower)
    x = x + noise * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.float(), y


def make_spirals(n: int = 1000, noise: float = 0.1, turns: float = 1.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two interleaved Archimedean spirals (the second is the first turned by pi).

    Returns:
        ``(x [n, 2] float32, y [n] int64)``, radii up to about 1.

    >>> x, y = make_spirals(10, seed=0)
    >>> x.shape
    torch.Size([10, 2])
    """
    gen = torch.Generator().manual_seed(seed)
    y = _labels(n)
    r = torch.sqrt(torch.rand(n, generator=gen, dtype=torch.float64)) * 0.95 + 0.05
    angle = r * turns * 2 * math.pi + y.double() * math.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    x = x + noise * 0.5 * torch.randn(n, 2, generator=gen, dtype=torch.float64) * r.unsqueeze(1)
    return x.float(), y


def make_rings(n: int = 1000, noise: float = 0.05, factor: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two concentric circles: class 0 of radius 1, class 1 of radius ``factor``.

    Returns:
        ``(x [n, 2] float32, y [n] int64)``.

    >>> x, y = make_rings(10, seed=0)
    >>> x.shape
    torch.Size([10, 2])
    """
    gen = torch.Generator().manual_seed(seed)
    y = _labels(n)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 2 * math.pi
    radius = torch.where(y == 0, 1.0, factor).double()
    x = torch.stack([radius * torch.cos(t), radius * torch.sin(t)], dim=1)
    x = x + noise * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.float(), y


TOYS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "moons": make_moons,
    "spirals": make_spirals,
    "rings": make_rings,
}


def load_toy(
    name: str, *, n: int = 1000, noise: float | None = None, seed: int = 0,
    val_fraction: float = 0.15, test_fraction: float = 0.15,
) -> DataSplits:
    """A 2-D toy as :class:`DataSplits`: stratified seeded 70% / 15% / 15% splits.

    Args:
        name: ``"moons"``, ``"spirals"`` or ``"rings"``.
        n: number of points in all.
        noise: Gaussian noise level (default: the generator's own).
        seed: seed of the points and of the split.

    >>> data = load_toy("moons", n=200)
    >>> len(data.train), len(data.val), len(data.test), data.input_units
    (140, 30, 30, 'raw')
    """
    if name not in TOYS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {sorted(TOYS)}")
    kwargs = {} if noise is None else {"noise": noise}
    x, y = TOYS[name](n, seed=seed, **kwargs)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    val_idx, test_idx, train_idx = stratified_split(y, [n_val, n_test, None], seed=seed)
    return DataSplits(
        name=name,
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=Split(x[test_idx], y[test_idx]),
        input_shape=(2,),
        num_classes=2,
        normalization=None,
        normalized=False,
        classes=("0", "1"),
        source=(
            f"generated 2-D {name} ({n} points, seed {seed}); stratified split: {len(train_idx)} "
            f"train / {len(val_idx)} validation / {len(test_idx)} test"
        ),
    )
