"""Activation patterns: which side of its hyperplane every neuron is on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor

__all__ = ["ActivationPattern", "ActivationPatterns"]


@dataclass(frozen=True)
class ActivationPattern:
    """One example's activation pattern; compares and hashes.

    Two examples with equal patterns lie in the same linear region's closure
    description, and their networks' Jacobians are identical.

    Attributes:
        key: packed bytes of the pattern (ReLU signs as bits, max-unit
            selections as int64), the value that is compared and hashed.
        num_neurons: number of ReLU-like neurons plus max units.
    """

    key: bytes
    num_neurons: int

    def __repr__(self) -> str:
        return f"ActivationPattern(neurons={self.num_neurons}, hash={hash(self.key) & 0xFFFFFFFF:08x})"


class ActivationPatterns(Sequence[ActivationPattern]):
    """The patterns of a batch: ``len()`` B, indexable, with the raw parts.

    Attributes:
        parts: per neuron group, ``[B, n]`` bool signs (ReLU-like) or
            ``[B, m]`` int64 selected indices (max units), in execution order.
        valid: per group, ``[B, n]`` bool (``False`` for entries that are not neurons of
            the example: padded time steps, :func:`rollnet.neuron_mask`) or ``None`` (all are).
            An example's key holds its own neurons only, with where they are, so a
            sequence gets the same pattern in any batch, however long the batch runs.
    """

    def __init__(self, parts: list[Tensor], batch_size: int, valid: list[Tensor | None] | None = None) -> None:
        self.parts = parts
        self._batch_size = batch_size
        self.valid = valid  # (given, even all None: keys in the per-example form, comparable across batches)
        self._keys: list[bytes] | None = None

    @property
    def num_neurons(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def _example_neurons(self, i: int) -> int:
        if self.valid is None:
            return self.num_neurons
        return sum(p.shape[1] if v is None else int(v[i].sum()) for p, v in zip(self.parts, self.valid, strict=True))

    def as_tensor(self) -> Tensor:
        """``[B, N]`` int64: 1/0 for ReLU-like neurons, the selected index for max units."""
        if not self.parts:
            return torch.zeros((self._batch_size, 0), dtype=torch.int64)
        return torch.cat([p.to(torch.int64).cpu() for p in self.parts], dim=1)

    def keys(self) -> list[bytes]:
        """Packed bytes of each example's pattern (what equality and hashing use)."""
        if self._keys is None and self.valid is not None:
            self._keys = self._valid_keys(self.valid)
        if self._keys is None:
            chunks = []
            for p in self.parts:
                a = p.detach().cpu().numpy()
                if a.dtype == np.bool_:
                    chunks.append(np.packbits(a, axis=1))
                else:
                    chunks.append(np.ascontiguousarray(a.astype(np.int64)).view(np.uint8))
            if chunks:
                packed = np.concatenate(chunks, axis=1)
                self._keys = [row.tobytes() for row in packed]
            else:
                self._keys = [b""] * self._batch_size
        return self._keys

    def _valid_keys(self, valid: list[Tensor | None]) -> list[bytes]:
        """Keys from each example's own neurons: for every group where it has some, the group's
        position, which entries are neurons, and their pattern (groups it has none of, such as
        steps past its end, leave no trace)."""
        rows: list[list[bytes]] = [[] for _ in range(self._batch_size)]
        for g, (p, v) in enumerate(zip(self.parts, valid, strict=True)):
            a = p.detach().cpu().numpy()
            m = np.ones(a.shape, dtype=np.bool_) if v is None else v.detach().cpu().numpy().astype(np.bool_)
            tag = np.int64(g).tobytes()
            for i in range(self._batch_size):
                if not m[i].any():
                    continue
                own = a[i][m[i]]
                body = np.packbits(own) if own.dtype == np.bool_ else np.ascontiguousarray(own.astype(np.int64))
                rows[i].append(tag + np.packbits(m[i]).tobytes() + body.tobytes())
        return [b"".join(r) for r in rows]

    def __len__(self) -> int:
        return self._batch_size

    @overload
    def __getitem__(self, i: int) -> ActivationPattern: ...

    @overload
    def __getitem__(self, i: slice) -> ActivationPatterns: ...

    def __getitem__(self, i: int | slice) -> ActivationPattern | ActivationPatterns:
        if isinstance(i, slice):
            parts = [p[i] for p in self.parts]
            valid = None if self.valid is None else [None if v is None else v[i] for v in self.valid]
            return ActivationPatterns(parts, len(range(*i.indices(self._batch_size))), valid)
        if i < 0:
            i += self._batch_size
        if not 0 <= i < self._batch_size:
            raise IndexError(f"pattern index {i} out of range for a batch of {self._batch_size}")
        return ActivationPattern(self.keys()[i], self._example_neurons(i))

    def __iter__(self) -> Iterator[ActivationPattern]:
        return (ActivationPattern(k, self._example_neurons(i)) for i, k in enumerate(self.keys()))

    def __repr__(self) -> str:
        return f"ActivationPatterns(batch={self._batch_size}, neurons={self.num_neurons})"
