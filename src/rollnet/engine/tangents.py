"""The kinds of tangent a tracked tensor carries, behind the operations the rules share.

A tracked tensor's tangent is one of

- ``None``: a pass without directions (patterns and values only);
- a ``Tensor`` ``[K, *shape]`` (it may have stride 0 along the batch when every
  example shares it);
- a :class:`~rollnet.engine.tracing.MaskedTangent`: ``raw * mask`` not formed yet;
- a :class:`~rollnet.engine.gram.GramTangent`: the Gram factors of the Jacobian
  (squared l2 norms on Linear/ReLU chains);
- a :class:`~rollnet.engine.window.WindowTangent`: a feature map's tangent, zero outside a box.

:func:`scale` and :func:`linear` apply the two maps the affine and activation
rules need to any of them, so those rules hold no branch per kind.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from rollnet.engine import window
from rollnet.engine.gram import GramTangent, GramUnsupported
from rollnet.engine.tracing import MaskedTangent, batch_shared

__all__ = ["Tangent", "linear", "scale"]

Tangent = Tensor | MaskedTangent | GramTangent | window.WindowTangent | None


def scale(t: Any, factor: Tensor, *, per_feature: Tensor | None = None) -> Any:
    """The tangent of ``x * factor`` for a constant ``factor`` broadcast like ``x``.

    Args:
        t: the tangent of x (any kind).
        factor: the factor as it multiplies x (``[B, *shape]`` or broadcastable to it).
        per_feature: the same factor as the Gram recursion needs it, ``[F]`` or ``[B, F]``
            for a 2-D x (defaults to ``factor``); a Gram tangent of feature maps is refused.
    """
    if t is None:
        return None
    if isinstance(t, window.WindowTangent):
        return window.scale(t, factor)
    if isinstance(t, GramTangent):
        f = factor if per_feature is None else per_feature
        if f.dim() > 2:
            raise GramUnsupported("scaling a tensor with more than one feature dimension")
        return t.scaled(f)
    return (t.value() if isinstance(t, MaskedTangent) else t) * factor


def linear(t: Any, weight: Tensor, *, features: int) -> Any:
    """The tangent of ``F.linear(x, weight)`` (no bias); ``features`` is x's rank."""
    if t is None:
        return None
    if isinstance(t, GramTangent):
        if features != 2:
            raise GramUnsupported("linear layer on a tensor with more than one feature dimension")
        return t.linear(weight)
    if isinstance(t, MaskedTangent):
        t = t.value()
    if batch_shared(t):
        out = F.linear(t[:, :1], weight)
        return out.expand(t.shape[0], t.shape[1], *out.shape[2:])
    return F.linear(t, weight)
