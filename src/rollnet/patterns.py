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
    """

    def __init__(self, parts: list[Tensor], batch_size: int) -> None:
        self.parts = parts
        self._batch_size = batch_size
        self._keys: list[bytes] | None = None

    @property
    def num_neurons(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def as_tensor(self) -> Tensor:
        """``[B, N]`` int64: 1/0 for ReLU-like neurons, the selected index for max units."""
        if not self.parts:
            return torch.zeros((self._batch_size, 0), dtype=torch.int64)
        return torch.cat([p.to(torch.int64).cpu() for p in self.parts], dim=1)

    def keys(self) -> list[bytes]:
        """Packed bytes of each example's pattern (what equality and hashing use)."""
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

    def __len__(self) -> int:
        return self._batch_size

    @overload
    def __getitem__(self, i: int) -> ActivationPattern: ...

    @overload
    def __getitem__(self, i: slice) -> ActivationPatterns: ...

    def __getitem__(self, i: int | slice) -> ActivationPattern | ActivationPatterns:
        if isinstance(i, slice):
            parts = [p[i] for p in self.parts]
            return ActivationPatterns(parts, len(range(*i.indices(self._batch_size))))
        if i < 0:
            i += self._batch_size
        if not 0 <= i < self._batch_size:
            raise IndexError(f"pattern index {i} out of range for a batch of {self._batch_size}")
        return ActivationPattern(self.keys()[i], self.num_neurons)

    def __iter__(self) -> Iterator[ActivationPattern]:
        n = self.num_neurons
        return (ActivationPattern(k, n) for k in self.keys())

    def __repr__(self) -> str:
        return f"ActivationPatterns(batch={self._batch_size}, neurons={self.num_neurons})"
