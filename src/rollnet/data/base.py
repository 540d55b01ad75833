"""Containers shared by the loaders: a split, a data set's three splits, normalisation.

Every loader returns a :class:`DataSplits`: train / validation / test tensors
with fixed, seeded splits, and the normalisation that maps pixel units to the
model's input space.  Radii certified on the model's input (see
:func:`rollnet.margin`) convert between the two spaces with
:meth:`DataSplits.to_pixel` and :meth:`DataSplits.to_normalized`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DataSplits", "Normalization", "Split", "stratified_split"]


@dataclass(frozen=True)
class Normalization:
    """``x_norm = (x_pixel - mean) / std`` with scalar ``mean`` and ``std``.

    Because ``std`` is a scalar, an lp radius r in normalised units is a radius
    ``r * std`` in pixel units, for every p.

    >>> n = Normalization(mean=0.5, std=0.25)
    >>> n.apply(torch.tensor([0.75])), n.pixel_radius(2.0)
    (tensor([1.]), 0.5)
    """

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def apply(self, x: Tensor) -> Tensor:
        """Pixel units to normalised units (any shape)."""
        return (x - self.mean) / self.std

    def invert(self, x: Tensor) -> Tensor:
        """Normalised units back to pixel units (any shape)."""
        return x * self.std + self.mean

    def pixel_radius(self, radius: float) -> float:
        """A radius in normalised units, in pixel units."""
        return radius * self.std


IDENTITY = Normalization(0.0, 1.0)


class Split(Dataset[tuple[Tensor, ...]]):
    """One split: inputs ``x`` ``[M, *input_shape]`` float32, labels ``y`` ``[M]`` int64.

    A map-style :class:`torch.utils.data.Dataset`: ``split[i] == (x[i], y[i])``,
    or ``(x[i], y[i], lengths[i])`` for sequences with ``lengths``, so a
    :class:`torch.utils.data.DataLoader` yields ``(x, y)`` or ``(x, y, lengths)``
    batches.

    Args:
        x: ``[M, *input_shape]`` inputs.
        y: ``[M]`` int64 labels.
        lengths: optional ``[M]`` int64 valid lengths of zero-padded sequences
            ``x`` ``[M, T, ...]`` (time on dimension 1), each in ``1 .. T``.

    Raises:
        ValueError: mismatched sizes, wrong dtypes, or lengths outside ``1 .. T``.

    >>> s = Split(torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    >>> len(s), s[1][1].item()
    (3, 1)
    >>> q = Split(torch.zeros(2, 4, 3), torch.tensor([0, 1]), lengths=torch.tensor([4, 2]))
    >>> [t.tolist() for t in q[1][1:]]
    [1, 2]
    """

    def __init__(self, x: Tensor, y: Tensor, *, lengths: Tensor | None = None) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
        if y.dtype != torch.int64 or y.dim() != 1:
            raise ValueError(f"y must be a 1-D int64 tensor, got {y.dtype} of shape {tuple(y.shape)}")
        if lengths is not None:
            if lengths.dtype != torch.int64 or lengths.dim() != 1:
                raise ValueError(
                    f"lengths must be a 1-D int64 tensor, got {lengths.dtype} of shape "
                    f"{tuple(lengths.shape)}"
                )
            if lengths.shape[0] != x.shape[0]:
                raise ValueError(f"x has {x.shape[0]} examples but lengths has {lengths.shape[0]}")
            if x.dim() < 2:
                raise ValueError(
                    f"lengths need sequences x [M, T, ...] (time on dimension 1), got x of shape "
                    f"{tuple(x.shape)}"
                )
            steps = int(x.shape[1])
            if lengths.numel() and not (int(lengths.min()) >= 1 and int(lengths.max()) <= steps):
                raise ValueError(
                    f"lengths must lie in 1 .. {steps} (x.shape[1]), got "
                    f"{int(lengths.min())} .. {int(lengths.max())}"
                )
        self.x = x
        self.y = y
        self.lengths = lengths

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        if self.lengths is None:
            return self.x[i], self.y[i]
        return self.x[i], self.y[i], self.lengths[i]

    def select(self, index: Tensor) -> Split:
        """The examples at ``index`` (an int64 index tensor, e.g. a part of
        :func:`stratified_split`), with their ``lengths`` when the split has them.

        >>> s = Split(torch.zeros(3, 4, 1), torch.tensor([0, 1, 2]), lengths=torch.tensor([1, 2, 3]))
        >>> s.select(torch.tensor([2, 0])).lengths
        tensor([3, 1])
        """
        lengths = None if self.lengths is None else self.lengths[index]
        return Split(self.x[index], self.y[index], lengths=lengths)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all when ``n`` is ``None`` or larger than the split)."""
        if n is None or n >= len(self):
            return self
        lengths = None if self.lengths is None else self.lengths[:n]
        return Split(self.x[:n], self.y[:n], lengths=lengths)

    def __repr__(self) -> str:
        extra = "" if self.lengths is None else ", lengths"
        return f"Split(n={len(self)}, x={tuple(self.x.shape[1:])}{extra})"


@dataclass(frozen=True)
class DataSplits:
    """A data set's three splits and how its inputs relate to pixel units.

    Attributes:
        name: loader name (``"mnist_subset"``, ``"fashion_mnist"``, ...).
        train, val, test: the splits; ``val`` is held out for model selection,
            ``test`` only for the final report.
        input_shape: shape of one example (without the batch dimension).
        num_classes: number of labels L (labels are ``0 .. L-1``).
        normalization: pixel-to-normalised map of the data set (``None`` for
            data without pixel units, such as the 2-D toys).
        normalized: ``True`` when ``x`` is already normalised (the model's
            input space is the normalised one), ``False`` when ``x`` is in pixel
            units.
        classes: human-readable label names.
        source: where the data come from and how the splits were drawn.
    """

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    normalization: Normalization | None
    normalized: bool
    classes: tuple[str, ...]
    source: str

    @property
    def input_units(self) -> str:
        """``"normalized"``, ``"pixel"`` or ``"raw"`` (no pixel units): the units of ``x``."""
        if self.normalization is None:
            return "raw"
        return "normalized" if self.normalized else "pixel"

    def to_pixel(self, radius: Tensor) -> Tensor:
        """Radii in the model's input units, in pixel units (unchanged without pixel units)."""
        if self.normalization is None or not self.normalized:
            return radius
        return radius * self.normalization.std

    def to_normalized(self, radius: Tensor) -> Tensor:
        """Radii in the model's input units, in normalised units (unchanged without pixel units)."""
        if self.normalization is None or self.normalized:
            return radius
        return radius / self.normalization.std

    def __repr__(self) -> str:
        return (
            f"DataSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, input_shape={self.input_shape}, units={self.input_units!r})"
        )


def _quotas(counts: Tensor, total: int) -> Tensor:
    """Per-class quotas summing to ``total``, proportional to ``counts`` (largest remainder)."""
    n = int(counts.sum())
    if total > n:
        raise ValueError(f"cannot take {total} examples out of {n}")
    exact = counts.double() * total / max(n, 1)
    base = exact.floor().long()
    short = total - int(base.sum())
    if short > 0:
        order = torch.argsort(exact - base.double(), descending=True, stable=True)
        base[order[:short]] += 1
    return base


def stratified_split(labels: Tensor, sizes: Sequence[int | None], seed: int) -> list[Tensor]:
    """Seeded split of ``range(len(labels))`` into parts with the labels' proportions.

    Args:
        labels: ``[M]`` int64 class labels.
        sizes: the size of each part; at most one may be ``None`` (everything left).
        seed: seed of the permutation inside each class.

    Returns:
        One sorted int64 index tensor per part.  The same arguments always
        give the same parts.  :meth:`Split.select` takes a part of a split
        together with its ``lengths``, if any.

    >>> parts = stratified_split(torch.tensor([0, 0, 1, 1, 0, 1]), [2, None], seed=0)
    >>> [len(p) for p in parts]
    [2, 4]
    """
    labels = labels.to(torch.int64).cpu()
    m = labels.shape[0]
    if sum(1 for s in sizes if s is None) > 1:
        raise ValueError("at most one part size may be None")
    fixed = sum(s for s in sizes if s is not None)
    if fixed > m or any(s is not None and s < 0 for s in sizes):
        raise ValueError(f"part sizes {list(sizes)} do not fit {m} examples")
    sizes_full = [m - fixed if s is None else s for s in sizes]
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(idx.shape[0], generator=gen)] for idx in per_class]
    counts = torch.tensor([idx.shape[0] for idx in per_class])
    remaining = counts.clone()
    offsets = torch.zeros_like(counts)
    parts: list[Tensor] = []
    for size in sizes_full:
        quota = _quotas(remaining, size) if int(remaining.sum()) != size else remaining.clone()
        chunk = [idx[int(o) : int(o) + int(q)] for idx, o, q in zip(per_class, offsets, quota, strict=True)]
        parts.append(torch.sort(torch.cat(chunk)).values if chunk else torch.zeros(0, dtype=torch.int64))
        offsets += quota
        remaining -= quota
    return parts
