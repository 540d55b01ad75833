"""Piecewise-linear activations: each input is a neuron.

A neuron is on when its value z > 0; its slope is 1 there and the
activation's negative slope elsewhere.  The tangent of the output is the
input's tangent times those slopes (a :class:`~rollnet.engine.tracing.MaskedTangent`,
so a following Linear can fold the slopes into its weight instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollnet.engine.gram import GramTangent, GramUnsupported
from rollnet.engine.rules.batch import BATCH_FIRST_ELEMENTWISE
from rollnet.engine.rules.registry import register
from rollnet.engine.tracing import MaskedTangent, Trace

__all__ = ["leaky_relu", "relu", "slopes"]


def _activation(
    trace: Trace,
    op: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    slope: float,
    in_place: bool,
) -> Any:
    x = args[0] if args else kwargs["input"]
    if not x.is_floating_point():
        raise trace.refuse(op, "input-dependent tensors must be floating point")
    b = trace.batch_size
    if x.dim() == 0 or x.shape[0] != b:
        raise trace.refuse(
            op,
            f"its input has shape {tuple(x.shape)}, whose first dimension is not the batch size {b}; "
            "rollnet needs the batch first at every activation to attribute neurons to examples",
        )
    if in_place and x._base is not None and trace.is_tracked(x._base):
        raise trace.refuse(op, "in-place activation of a view of an input-dependent tensor")
    t = trace.tangent(x)
    # an in-place activation overwrites x: keep its values (and their graph, for the regulariser's
    # hinge) in a copy taken first
    z = x.clone() if in_place else x
    result = func(*args, **kwargs)
    on = z.detach() > 0
    n = math.prod(x.shape[1:])  # (not -1: an empty batch has no size to infer)
    values = z.reshape(b, n)
    if isinstance(t, GramTangent):
        if x.dim() != 2:
            raise GramUnsupported("activation on a tensor with more than one feature dimension")
        trace.emit(op, values, None, on.reshape(b, n), squared_norms=t.diagonal().expand(b, n))
        trace.track(result, t.scaled(slopes(on, slope, x)))
        return result
    tangents = None if t is None else t.flatten(2)
    trace.emit(op, values, tangents, on.reshape(b, n))
    if t is None:
        trace.track(result, None)
        return result
    trace.track(result, MaskedTangent(t, slopes(on, slope, t)))
    return result


def slopes(on: Tensor, slope: float, like: Tensor) -> Tensor:
    """1 where ``on``, ``slope`` elsewhere, in ``like``'s dtype and device (a Python float
    would go through float32); ReLU's 0/1 mask is a plain cast."""
    if slope == 0.0:
        return on.to(like.dtype)
    return torch.where(on, like.new_ones(()), like.new_full((), slope))


@register(F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_, F.relu_, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def relu(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    in_place = func in (torch.relu_, torch.Tensor.relu_, F.relu_) or bool(
        kwargs.get("inplace", args[1] if func is F.relu and len(args) > 1 else False)
    )
    return _activation(trace, "relu", func, args, kwargs, 0.0, in_place)


@register(F.leaky_relu, torch._C._nn.leaky_relu, torch._C._nn.leaky_relu_, F.leaky_relu_, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def leaky_relu(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    slope = float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    in_place = func in (torch._C._nn.leaky_relu_, F.leaky_relu_) or bool(
        kwargs.get("inplace", args[2] if func is F.leaky_relu and len(args) > 2 else False)
    )
    return _activation(trace, "leaky_relu", func, args, kwargs, slope, in_place)


#: Rules that accept a :class:`GramTangent` (the chain the Gram recursion handles).
