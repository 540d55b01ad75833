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

ReLU zeroes the slopes of inactive neurons, so S_i G_i S_i lives on the k
active ones (about half): each example's step then gathers those columns,
H = G_i[act, act] and A = W_{i+1}[:, act] S_i[act], and forms A H A^T in
about k^2 (k + F_{i+1}) operations instead of 2 F_i^2 F_{i+1}.

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
        shared: ``left`` and ``right`` are the same for every example (the first
            layer's weight and what follows from it before any per-example
            scaling): they do not grow with the batch, and :attr:`nbytes` leaves
            them out.
        shared_scale: ``scale`` is the same for every example (eval BatchNorm),
            so a linear layer after it keeps shared factors shared.  (Its shape
            cannot tell: a chunk of one example has ``[1, F]`` slopes too.)
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
        shared: bool = False,
        shared_scale: bool = False,
    ) -> None:
        self.left = left
        self.right = right
        self.scale = scale
        self.identity = identity
        self.max_width = max_width
        self.shared = shared
        self.shared_scale = shared_scale or scale is None
        self.width = width if identity else int(left.shape[1])  # type: ignore[union-attr]
        # L @ R^T and its diagonal, formed at most once when the factors are shared by the batch:
        # kept by the tangents with the same factors (``scaled``)
        self._products: dict[str, Tensor] = {}
        # the input's tangent, reused by every chunk of a batch: the first layer's tangent,
        # so that the Gram of its weight (the same for every chunk) is formed once per batch
        self._first: tuple[Tensor, int, GramTangent] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes that grow with the batch: per-example factors and scales.

        Factors shared by the batch are left out: the first layer's are views of
        its weight (its Gram ``W1 W1^T`` is formed once per batch), and any other
        is one ``[F, M]`` product per chunk, like a weight.  Counting them per example made the planner size chunks of one
        example under a small budget (the shared factors dominate one example's
        bytes), and thousands of one-example passes cost time and memory.
        """
        if self.identity or self.left is None or self.right is None:
            return 0
        size = 0 if self.shared else self.left.numel() + self.right.numel()
        if self.scale is not None and not self.shared_scale:
            size += self.scale.numel()
        return size * self.left.element_size()

    def diagonal(self) -> Tensor:
        """``[b, F]`` squared l2 norms of the rows of J (b = B once scaled)."""
        assert self.left is not None and self.right is not None
        d = self._products.get("diagonal")
        if d is None:
            d = (self.left * self.right).sum(-1)
            if self.left.shape[0] == 1 and self.right.shape[0] == 1:  # shared: once per batch
                self._products["diagonal"] = d
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
        shared_scale = self.shared_scale and s.dim() == 1  # [F]: one scale for the batch
        s = s if s.dim() == 2 else s.unsqueeze(0)
        scale = s if self.scale is None else self.scale * s
        out = GramTangent(
            self.left, self.right, scale, max_width=self.max_width, shared=self.shared, shared_scale=shared_scale
        )
        out._products = self._products  # same factors, same product
        return out

    def _product(self) -> Tensor:
        """``L @ R^T`` (unscaled), formed once for factors shared by the batch."""
        assert self.left is not None and self.right is not None
        if self.left.shape[0] != 1 or self.right.shape[0] != 1:
            return torch.matmul(self.left, self.right.transpose(-1, -2))
        g = self._products.get("g")
        if g is None:
            g = self._products["g"] = torch.matmul(self.left, self.right.transpose(-1, -2))
        return g

    def linear(self, weight: Tensor) -> GramTangent:
        """The Gram of W J for ``weight`` ``[F', F]``."""
        if self.max_width is not None and weight.shape[0] > self.max_width:
            raise GramUnsupported("a layer as wide as the input: gradient rows are cheaper")
        if self.identity:
            if weight.shape[1] != self.width:
                raise GramUnsupported("the first layer does not read the whole input")
            version = _version(weight)
            if self._first is not None and self._first[0] is weight and self._first[1] == version >= 0:
                return self._first[2]
            w = weight.unsqueeze(0)
            first = GramTangent(w, w, max_width=self.max_width, shared=True)
            self._first = (weight, version, first)  # one entry: a new weight replaces it
            return first
        assert self.left is not None and self.right is not None
        if self.scale is not None:
            active = _active_columns(self.scale)
            if active is not None:
                return self._linear_on_active(weight, *active)
        out_width, in_width = weight.shape
        inner = self.left.shape[-1]
        shared = self.shared and self.shared_scale
        w = weight.unsqueeze(0) if self.scale is None else weight.unsqueeze(0) * self.scale.unsqueeze(1)
        # either compose the factors (cheap for narrow outputs) or form G first
        compose = 2 * out_width * inner
        materialise = in_width * inner + out_width * in_width
        if compose <= materialise:
            return GramTangent(
                torch.matmul(w, self.left), torch.matmul(w, self.right), max_width=self.max_width, shared=shared
            )
        g = self._product()
        if self.scale is not None:
            g = g * self.scale.unsqueeze(-1) * self.scale.unsqueeze(-2)
        return GramTangent(torch.matmul(weight, g), weight.unsqueeze(0), max_width=self.max_width, shared=shared)

    def _linear_on_active(self, weight: Tensor, index: Tensor, scale: Tensor) -> GramTangent:
        """W S G S W^T using only the columns with a non-zero scale (ReLU's active neurons).

        ``index`` ``[b, k]`` lists each example's active columns (padded with
        inactive ones, whose ``scale`` ``[b, k]`` is 0).  With A = W[:, index] *
        scale and H = G[index, index], the result is A H A^T, kept factored as
        (A H, A): about k^2 (k + F') work per example instead of 2 F^2 F'.
        """
        assert self.left is not None and self.right is not None
        b, k = index.shape
        # index_select (not advanced indexing): its backward is a fast index_add
        a = weight.t().index_select(0, index.reshape(-1)).reshape(b, k, -1) * scale.unsqueeze(-1)
        a = a.transpose(1, 2)  # [b, F', k]
        if self.left.shape[0] == 1 and self.right.shape[0] == 1:
            # G shared by the batch (the first layer's W1 W1^T): form it once per batch, then gather
            g = self._product()[0]
            flat = index.unsqueeze(-1) * g.shape[1] + index.unsqueeze(-2)  # [b, k, k]
            h = g.reshape(-1).index_select(0, flat.reshape(-1)).reshape(b, k, k)
        else:
            h = torch.matmul(_rows(self.left, index), _rows(self.right, index).transpose(-1, -2))
        return GramTangent(torch.matmul(a, h), a, max_width=self.max_width)


def _version(t: Tensor) -> int:
    """``t``'s version counter (bumped by in-place changes), or -1 where it has none (inference tensors)."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1


def _active_columns(scale: Tensor, dense_above: float = 0.8) -> tuple[Tensor, Tensor] | None:
    """Per example, the columns with a non-zero scale, padded to the batch's largest count.

    Returns ``(index [b, k], scale[index])``, or ``None`` when too few scales
    are zero for the gathers to pay off (k > ``dense_above`` * F).
    """
    if scale.shape[0] == 0:
        return None
    nonzero = scale != 0
    k = max(int(nonzero.sum(dim=1).max()), 1)
    if k > dense_above * scale.shape[1]:
        return None
    # stable sort: active columns first, in their original order
    index = torch.argsort((~nonzero).to(torch.uint8), dim=1, stable=True)[:, :k]
    return index, scale.gather(1, index)


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``[b, k]`` of ``t`` ``[b' , F, M]`` (b' = 1 broadcasts): ``[max(b, b'), k, M]``."""
    if t.shape[0] == 1:
        return t[0].index_select(0, index.reshape(-1)).reshape(*index.shape, t.shape[-1])
    if index.shape[0] == 1:
        index = index.expand(t.shape[0], -1)
    return torch.gather(t, 1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
