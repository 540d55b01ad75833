"""Helpers the rule families share: reading arguments, applying an op to tangents, tracking results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rollnet.engine.tracing import Trace, batch_shared, iter_values, op_name

__all__ = [
    "broadcast_tangent",
    "check_float",
    "per_sample",
    "result_tensors",
    "substitute",
    "track_results",
    "tracked_tensors",
    "vmapped",
]


def tracked_tensors(trace: Trace, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """The arguments (nested in lists and tuples too) that depend on the input, in order."""
    return [v for v in iter_values((*args, *kwargs.values())) if trace.is_tracked(v)]


def substitute(value: Any, replace: dict[int, Any]) -> Any:
    """``value`` with every object whose ``id`` is in ``replace`` swapped, through lists and tuples."""
    if id(value) in replace:
        return replace[id(value)]
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(substitute(v, replace) for v in value)
    return value


def per_sample(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """Apply a batch-first op ``fn`` to every direction of ``t`` ([K, B, ...]) at once.

    Folds K into the batch dimension; a tangent shared by all examples is
    computed once and expanded back.
    """
    k, b = t.shape[0], t.shape[1]
    if batch_shared(t):
        out = fn(t[:, :1].flatten(0, 1))
        return out.unflatten(0, (k, 1)).expand(k, b, *out.shape[1:])
    out = fn(t.flatten(0, 1))
    return out.unflatten(0, (k, b))


def vmapped(fn: Callable[..., Any], *tangents: Tensor) -> Any:
    """``fn`` applied to each of the K directions of ``tangents`` ([K, ...] each)."""
    return torch.func.vmap(fn)(*tangents)


def result_tensors(result: Any) -> list[Tensor]:
    """The tensors an op returned: one tensor, or the tensors of a tuple or list (``chunk``, ``max``)."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [r for r in result if isinstance(r, Tensor)]
    return []


def track_results(trace: Trace, result: Any, tangent: Any) -> None:
    """Track an op's result tensors with the matching tangents (``tangent`` mirrors ``result``)."""
    if isinstance(result, Tensor):
        trace.track(result, tangent)
        return
    tans = [] if tangent is None else list(tangent)
    for i, r in enumerate(result_tensors(result)):
        trace.track(r, tans[i] if tangent is not None else None)


def check_float(trace: Trace, func: Callable[..., Any], tensors: list[Tensor]) -> None:
    """Refuse input-dependent tensors that are not floating point (no tangent can describe them)."""
    for t in tensors:
        if not t.is_floating_point():
            raise trace.refuse(op_name(func), "input-dependent tensors must be floating point")


def broadcast_tangent(t: Tensor, shape: torch.Size) -> Tensor:
    """A tangent ``[K, *s]`` broadcast to ``[K, *shape]`` (leading dimensions added as needed)."""
    extra = len(shape) - (t.dim() - 1)
    if extra > 0:
        t = t.reshape(t.shape[0], *([1] * extra), *t.shape[1:])
    return t.expand(t.shape[0], *shape)
