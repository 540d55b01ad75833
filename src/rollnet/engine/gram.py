"""Squared l2 norms of all neuron gradients by a Gram recursion.

For a chain of affine layers and ReLU-like activations (an MLP), the
Jacobian J_i ``[F_i, D]`` of layer i's pre-activations obeys
J_{i+1} = W_{i+1} S_i J_i with S_i the diagonal of activation slopes, so its
Gram matrix G_i = J_i J_i^T ``[F_i, F_i]`` obeys

    G_{i+1} = W_{i+1} S_i G_i S_i W_{i+1}^T,    G_1 = W_1 W_1^T,

and the squared l2 norms of the neuron gradients are diag(G_i).  This costs
O(F^3) per example and layer instead of O(D F^2) for propagating all D
gradient rows, so it wins when the layers are narrower than the input (the
paper's 784-300x4 MLP), and it never materialises the ``[D, B, F]`` tangents.

A :class:`GramTangent` stands in for the tangent of a ``[B, F]`` tensor.  Only
the rules that know it (linear, ReLU-like, eval BatchNorm, eval Dropout,
reshapes of the input) accept it; any other op raises
:class:`GramUnsupported` and the caller falls back to gradient rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GramTangent", "GramUnsupported"]


class GramUnsupported(Exception):
    """The model leaves the chain the Gram recursion handles; use gradient rows instead."""


class GramTangent:
    """G = s * (L @ R^T) * s^T for a ``[B, F]`` tensor, kept factored until needed.

    Args:
        left: ``[b, F, M]`` (b = 1 when shared by the batch, or B).
        right: ``[b, F, M]``.
        scale: ``[B, F]`` per-example row/column scaling (activation slopes,
            BatchNorm scales), or ``None``.
        identity: the input itself (G = I): ``left``/``right`` are unused.
        width: with ``identity``, the input dimension D.
        max_width: refuse (:class:`GramUnsupported`) layers wider than this,
            where propagating gradient rows is cheaper.
    """

    def __init__(
        self,
        left: Tensor | None = None,
        right: Tensor | None = None,
        scale: Tensor | None = None,
        *,
        identity: bool = False,
        width: int = 0,
        max_width: int | None = None,
    ) -> None:
        self.left = left
        self.right = right
        self.scale = scale
        self.identity = identity
        self.max_width = max_width
        self.width = width if identity else int(left.shape[1])  # type: ignore[union-attr]

    @property
    def nbytes(self) -> int:
        if self.identity or self.left is None or self.right is None:
            return 0
        size = self.left.numel() + self.right.numel()
        return size * self.left.element_size()

    def diagonal(self) -> Tensor:
        """``[b, F]`` squared l2 norms of the rows of J (b = B once scaled)."""
        assert self.left is not None and self.right is not None
        d = (self.left * self.right).sum(-1)
        return d if self.scale is None else d * self.scale.square()

    def full(self) -> Tensor:
        """``[b, F, F]`` the Gram matrix."""
        assert self.left is not None and self.right is not None
        g = torch.matmul(self.left, self.right.transpose(-1, -2))
        if self.scale is not None:
            g = g * self.scale.unsqueeze(-1) * self.scale.unsqueeze(-2)
        return g

    def scaled(self, s: Tensor) -> GramTangent:
        """The Gram of diag(s) J: ``s`` ``[B, F]`` or ``[F]``."""
        if self.identity:
            raise GramUnsupported("scaling the input directly")
        s = s if s.dim() == 2 else s.unsqueeze(0)
        scale = s if self.scale is None else self.scale * s
        return GramTangent(self.left, self.right, scale, max_width=self.max_width)

    def linear(self, weight: Tensor) -> GramTangent:
        """The Gram of W J for ``weight`` ``[F', F]``."""
        if self.max_width is not None and weight.shape[0] > self.max_width:
            raise GramUnsupported("a layer as wide as the input: gradient rows are cheaper")
        if self.identity:
            if weight.shape[1] != self.width:
                raise GramUnsupported("the first layer does not read the whole input")
            w = weight.unsqueeze(0)
            return GramTangent(w, w, max_width=self.max_width)
        assert self.left is not None and self.right is not None
        out_width, in_width = weight.shape
        inner = self.left.shape[-1]
        w = weight.unsqueeze(0) if self.scale is None else weight.unsqueeze(0) * self.scale.unsqueeze(1)
        # either compose the factors (cheap for narrow outputs) or form G first
        compose = 2 * out_width * inner
        materialise = in_width * inner + out_width * in_width
        if compose <= materialise:
            return GramTangent(torch.matmul(w, self.left), torch.matmul(w, self.right), max_width=self.max_width)
        g = torch.matmul(self.left, self.right.transpose(-1, -2))
        if self.scale is not None:
            g = g * self.scale.unsqueeze(-1) * self.scale.unsqueeze(-2)
        return GramTangent(torch.matmul(weight, g), weight.unsqueeze(0), max_width=self.max_width)
