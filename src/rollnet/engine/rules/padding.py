"""The rule of :func:`rollnet.engine.padding.neuron_mask`: a marked alias of the pre-activation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rollnet.engine.padding import neuron_mask
from rollnet.engine.rules.batch import ELEMENTWISE
from rollnet.engine.rules.registry import register
from rollnet.engine.tracing import Trace

__all__ = ["mark_neurons"]

_OP = "rollnet.neuron_mask"


@register(neuron_mask, batch=ELEMENTWISE, gram=True)
def mark_neurons(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Track an alias of ``z`` with the same tangent, whose elements outside ``valid`` are not neurons."""
    z = args[0] if args else kwargs["z"]
    valid = args[1] if len(args) > 1 else kwargs["valid"]
    if not isinstance(z, Tensor) or not trace.is_tracked(z) or trace.is_mask(z):
        raise trace.refuse(_OP, "z must be a pre-activation that depends on the input")
    if not z.is_floating_point():
        raise trace.refuse(_OP, "z must be floating point")
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        raise trace.refuse(_OP, "valid must be a bool tensor")
    if trace.is_tracked(valid):
        raise trace.refuse(_OP, "valid must not depend on the input: pass lengths through additional_forward_args")
    try:
        grown = torch.broadcast_shapes(valid.shape, z.shape) != z.shape
    except RuntimeError:
        grown = True
    if grown:
        raise trace.refuse(_OP, f"valid {tuple(valid.shape)} does not broadcast to z {tuple(z.shape)}")
    pending = trace.masked(z)
    result = z.view_as(z)
    trace.track(result, pending if pending is not None else trace.tangent(z))
    earlier = trace.validity(z)
    mask = valid.to(z.device)
    trace.set_validity(result, mask if earlier is None else earlier & mask)
    return result
