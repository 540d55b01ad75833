"""Structural ops: reshapes, indexing, concatenation, reductions, padding, conversions.

They are linear in their input-dependent tensors, with no constant term
(untracked floating tensors count as zeros in the tangent), so the tangent
of each direction goes through the same op.  Order-preserving reshapes move
the tangent without vmap; everything else is applied to the K directions at
once with :func:`torch.func.vmap`.  Where the batch dimension ends up is
measured by :data:`~rollnet.engine.rules.batch.LINEAR_PROBE` (indexing,
``cat``, ``sum``, ``flip``, ``einsum``-like ops can all mix examples) or, for
reshapes, read off the shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollnet.engine.gram import GramTangent, GramUnsupported
from rollnet.engine.rules.batch import ELEMENTWISE, INDEXING, LINEAR_PROBE, RESHAPE
from rollnet.engine.rules.common import check_float, track_results, tracked_tensors, vmapped
from rollnet.engine.rules.registry import register
from rollnet.engine.tracing import Trace, batch_shared, op_name

__all__ = ["convert", "pad", "reshape", "structural"]


_STRUCTURAL = [
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
    torch.Tensor.unflatten, torch.unflatten, torch.Tensor.permute, torch.permute,
    torch.Tensor.transpose, torch.transpose, torch.Tensor.t, torch.t, torch.Tensor.__getitem__,
    torch.Tensor.select, torch.select, torch.Tensor.narrow, torch.narrow,
    torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze, torch.unsqueeze,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.chunk, torch.chunk,
    torch.Tensor.split, torch.split, torch.Tensor.unbind, torch.unbind, torch.cat, torch.concat,
    torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.Tensor.expand,
    torch.Tensor.expand_as, torch.Tensor.repeat, torch.Tensor.flip, torch.flip, torch.Tensor.roll,
    torch.roll, torch.Tensor.sum, torch.sum, torch.Tensor.mean, torch.mean,
    torch.Tensor.movedim, torch.movedim, torch.Tensor.swapaxes,
    torch.Tensor.view_as, torch.Tensor.reshape_as, torch.Tensor.tile, torch.tile,
    torch.Tensor.mT, torch.Tensor.T,
    torch.Tensor.diagonal, torch.Tensor.trace, torch.Tensor.cumsum, torch.cumsum,
    torch.Tensor.index_select, torch.index_select, torch.Tensor.gather, torch.gather,
    torch.Tensor.take_along_dim, torch.Tensor.squeeze_, torch.Tensor.unsqueeze_,
    F.pixel_shuffle, F.pixel_unshuffle,
]


# Elementwise sign changes: the generic rule, with the cheaper elementwise batch role.
_SIGNS = [torch.Tensor.neg, torch.neg, torch.Tensor.__neg__, torch.Tensor.__pos__, torch.Tensor.positive]

# Ops that keep the row-major order of the elements: the tangent is reshaped alike.
_ORDER_PRESERVING = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
    torch.Tensor.unflatten, torch.unflatten, torch.Tensor.squeeze, torch.squeeze,
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.contiguous, torch.Tensor.clone,
    torch.clone, torch.Tensor.view_as, torch.Tensor.reshape_as,
}


def reshape(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Reshapes: the tangent of each direction is reshaped the same way (no vmap needed)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor) or not trace.is_tracked(x) or len(tracked_tensors(trace, args, kwargs)) != 1:
        return structural(trace, func, args, kwargs)
    check_float(trace, func, [x])
    result = func(*args, **kwargs)
    t = trace.tangent(x)
    if isinstance(t, GramTangent):
        # the input's identity Gram survives flattening to [B, D]; other reshapes leave the chain
        if not ((t.identity and result.dim() == 2) or result.shape == x.shape):
            raise GramUnsupported("reshape inside the network")
        trace.track(result, t)
    elif t is None:
        trace.track(result, None)
    else:
        batch_first = result.dim() > 0 and result.shape[0] == t.shape[1] == x.shape[0]
        if batch_shared(t) and batch_first:
            k = t.shape[0]
            tangent = t[:, :1].reshape(k, 1, *result.shape[1:]).expand(k, *result.shape)
        else:
            tangent = t.reshape(t.shape[0], *result.shape)
        # unit directions index flat per-example coordinates, which a batch-first reshape keeps
        trace.track(result, tangent, unit=trace.unit_indices(x) if batch_first else None)
    return result


@register(*_STRUCTURAL, batch=LINEAR_PROBE)
def structural(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Ops linear in their input-dependent tensors, with no constant term."""
    tracked = tracked_tensors(trace, args, kwargs)
    check_float(trace, func, tracked)
    if func in (torch.Tensor.squeeze_, torch.Tensor.unsqueeze_):
        raise trace.refuse(op_name(func), "in-place reshapes are not supported; use the out-of-place form")
    result = func(*args, **kwargs)
    tangents = [trace.tangent(t) for t in tracked]
    if tangents[0] is None:
        track_results(trace, result, None)
        return result
    slots = {id(t): i for i, t in enumerate(tracked)}

    def substitute(value: Any, current: tuple[Tensor, ...]) -> Any:
        if isinstance(value, Tensor):
            if id(value) in slots and trace.is_tracked(value):
                return current[slots[id(value)]]
            if value.is_floating_point():
                return torch.zeros_like(value)
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(substitute(v, current) for v in value)
        return value

    def fn(*current: Tensor) -> Any:
        return func(*substitute(args, current), **{k: substitute(v, current) for k, v in kwargs.items()})

    tangent = vmapped(fn, *[t for t in tangents if t is not None])
    track_results(trace, result, tangent)
    return result


register(*_SIGNS, batch=ELEMENTWISE)(structural)
register(torch.Tensor.__getitem__, batch=INDEXING)(structural)
register(*_ORDER_PRESERVING, batch=RESHAPE, gram=True)(reshape)


@register(F.pad, torch.constant_pad_nd, batch=LINEAR_PROBE)
def pad(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Padding: the pad value is a constant, so the tangent is padded with zeros."""
    (x,) = tracked_tensors(trace, args, kwargs)
    result = func(*args, **kwargs)
    t = trace.tangent(x)
    if t is not None:
        targs = list(args)
        tkw = dict(kwargs)
        if func is F.pad:
            if len(targs) > 3:
                targs[3] = 0.0
            if "value" in tkw:
                tkw["value"] = 0.0
        elif len(targs) > 2:
            targs[2] = 0.0
        t = vmapped(lambda u: func(u, *targs[1:], **tkw), t)
    trace.track(result, t)
    return result


_TO = [
    torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
    torch.Tensor.bfloat16, torch.Tensor.type, torch.Tensor.type_as, torch.Tensor.cpu,
    torch.Tensor.cuda,
]


@register(*_TO, batch=ELEMENTWISE)
def convert(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """dtype and device conversions."""
    result = func(*args, **kwargs)
    src = args[0]
    if not trace.is_tracked(src):  # e.g. constant.type_as(tracked): only reads the dtype
        return result
    if not isinstance(result, Tensor):  # x.type() with no argument returns a string
        return result
    t = trace.tangent(src)
    trace.track(result, None if t is None else t.to(dtype=result.dtype, device=result.device))
    return result
