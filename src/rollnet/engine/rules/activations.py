"""Piecewise-linear elementwise ops: every kink is a neuron.

An elementwise op that is linear between kinks k_1 < k_2 < ... reports, for
every element h of its input and every kink k, the neuron z = h - k.  A
neuron is *on* when z > 0; at a tie (z = 0) it is off, and the output's
slope there is the slope of the off side, so the Jacobian reported at a tie
is that of one of the two pieces meeting there and the margin is 0.

======================================  ==============================  ==========================
op                                      neurons (group names)           slope of the output
======================================  ==============================  ==========================
``relu``, ``leaky_relu``, ``prelu``     z = h (``relu``, ...)           1 on, the negative slope
                                                                        off (PReLU: the channel's
                                                                        learned weight)
``abs``                                 z = h (``abs``)                 +1 on, -1 off
``clamp`` / ``clip`` (min a, max b),    z = h - a (``<op>.min``),       1 where h > a and not
``hardtanh`` (min_val, max_val),        z = h - b (``<op>.max``)        h > b, else 0
``relu6`` (0, 6)
======================================  ==============================  ==========================

The output's tangent is the input's tangent times the slopes (a
:class:`~rollnet.engine.tracing.MaskedTangent`, so a following Linear can fold
the slopes into its weight); in a Gram pass (2-D inputs) the Gram factor is
scaled by the slopes and each neuron's squared norm is the input's.  The
slopes (a PReLU weight, a constant tensor bound) and the neuron values keep
their autograd graph to the parameters, for the regulariser.  A clamp bound
that depends on the input is a max/min unit: ``clamp(h, min=m)`` is
``torch.maximum(h, m)`` (see :mod:`~rollnet.engine.rules.max_units`).

**Comparisons and masks.**  ``a > b``, ``a >= b``, ``a < b``, ``a <= b`` (and
``torch.gt``, ``Tensor.less_equal``, ...) with an input-dependent operand
report one neuron per element, the difference of the operands, oriented so
that the strict side of the comparison is *on*: z = a - b for ``a > b`` and
``a <= b``, z = b - a for ``a < b`` and ``a >= b``.  (A tie then lies on the
off side, like the comparison's own closed side: moving so that z grows flips
it at once, moving the other way does not; directional margins need this.)
The result is a *mask*: constant inside the region, tracked with the
:data:`~rollnet.engine.tracing.MASK` marker so that it keeps its batch
dimension.  Calls that read a mask go to the rules registered here with
:func:`~rollnet.engine.rules.registry.register_mask_rule`:

- on masks alone (the result is a mask): ``& | ^ ~`` and ``logical_*``,
  comparisons (also ``==``, ``!=``), arithmetic, ``.float()`` / ``.to()`` /
  ``.type_as()``, reshapes, indexing, ``cat``, ``flip`` (the batch dimension is
  measured as for any structural op: a mask moved across examples is
  refused), ``any`` and ``sum`` over dimensions;
- with input-dependent values: ``h * mask``, ``h / mask``, ``h + mask``,
  ``torch.where(mask, a, b)``, ``h.masked_fill(mask, v)``, ``h > mask``,
  ``clamp(h, min=mask)``: the mask is a constant there;
- anything else (``mask.all()``, ``h[mask]``, ``if mask.any():``, a mask in a
  matrix product, ...) is refused, naming the op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollnet.engine import window
from rollnet.engine.gram import GramTangent, GramUnsupported
from rollnet.engine.rules.batch import (
    BATCH_FIRST_ELEMENTWISE,
    ELEMENTWISE,
    LINEAR_PROBE,
    RESHAPE,
    BatchRole,
    Call,
)
from rollnet.engine.rules.common import broadcast_tangent, result_tensors, tracked_tensors
from rollnet.engine.rules.registry import dispatch, register, register_mask_rule
from rollnet.engine.tracing import MaskedTangent, Trace, op_name

__all__ = [
    "absolute",
    "clamp",
    "compare",
    "hardtanh",
    "leaky_relu",
    "masked_fill",
    "prelu",
    "relu",
    "relu6",
    "slopes",
    "where",
]


class _NeuronsOrMasks(BatchRole):
    """Batch first when the call reports neurons (an operand carries a tangent); elementwise
    when it only reads masks and constants (no neurons, the result is a mask)."""

    def _role(self, trace: Trace, call: Call) -> BatchRole:
        if any(not trace.is_mask(t) for t in call.tracked):
            return BATCH_FIRST_ELEMENTWISE
        return ELEMENTWISE

    def check_inputs(self, trace: Trace, call: Call) -> None:
        self._role(trace, call).check_inputs(trace, call)

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        return self._role(trace, call).result_dims(trace, call, results)


NEURONS_OR_MASKS = _NeuronsOrMasks()


def _carries(trace: Trace, value: Any) -> bool:
    """Whether ``value`` depends on the input with a tangent (tracked, and not a mask)."""
    return trace.is_tracked(value) and not trace.is_mask(value)


def _mask_result(trace: Trace, result: Any) -> Any:
    """Track every tensor ``result`` holds as a mask (a call that read only masks and constants)."""
    for r in result_tensors(result):
        trace.track_mask(r)
    return result


def _check_input(trace: Trace, op: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise trace.refuse(op, "input-dependent tensors must be floating point")
    b = trace.batch_size
    if x.dim() == 0 or x.shape[0] != b:
        raise trace.refuse(
            op,
            f"its input has shape {tuple(x.shape)}, whose first dimension is not the batch size {b}; "
            "rollnet needs the batch first at every activation to attribute neurons to examples",
        )


def _check_in_place(trace: Trace, op: str, x: Tensor) -> None:
    if x._base is not None and trace.is_tracked(x._base):
        raise trace.refuse(op, "in-place update of a view of an input-dependent tensor")


def _flat(t: Tensor, b: int, n: int) -> Tensor:
    """``[K, B, *shape]`` -> ``[K, B, n]`` (a view where possible: a batch-shared tangent stays shared)."""
    return t.reshape(t.shape[0], b, n)


def _raw(t: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A tangent broadcast to ``[K, *shape]`` in the result's dtype."""
    raw = t if t.shape[1:] == shape else broadcast_tangent(t, shape)
    return raw if raw.dtype == dtype else raw.to(dtype)


# ---------------------------------------------------------------------------
# kinks: ReLU-like activations, abs, clamp, hardtanh, relu6, prelu


Slope = Callable[[list[Tensor], Tensor], Tensor]


def _kinked(
    trace: Trace,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    x: Tensor,
    kinks: Sequence[tuple[str, Any]],
    slope: Slope,
    in_place: bool,
) -> Any:
    """Report the neurons h - k of an elementwise piecewise-linear op and track its output.

    Args:
        x: the op's input-dependent input h.
        kinks: ``(group name, k)`` per kink, k a number or a tensor constant in the region
            (a constant, a parameter, a mask), broadcastable against h.
        slope: ``(on, like) -> slopes``: from the ``[*shape]`` bool sides ``h > k`` of every
            kink, the output's slope (broadcastable to the result), in ``like``'s dtype.
        in_place: the op overwrites ``x``.
    """
    name = op_name(func)
    _check_input(trace, name, x)
    if in_place:
        _check_in_place(trace, name, x)
    box = trace.window(x)
    t = box if box is not None and trace.validity(x) is None else trace.tangent(x)
    # an in-place op overwrites x: keep its values (and their graph, for the regulariser's
    # hinge) in a copy taken first
    z = x.clone() if in_place else x
    result = func(*args, **kwargs)
    shape = result.shape
    b = trace.batch_size
    n = math.prod(shape[1:])  # (not -1: an empty batch has no size to infer)
    values = []
    for _, k in kinks:
        if isinstance(k, (int, float)) and k == 0:
            # a copy: the values must not change with a later in-place update of x (``h += 1``)
            d = z if in_place else z.clone()
        else:
            d = z - _numeric(k, z)
        values.append((d if d.shape == shape else d.expand(shape)).reshape(b, n))
    on = [v.detach() > 0 for v in values]
    like = t if isinstance(t, Tensor) else t.data if isinstance(t, window.WindowTangent) else z
    s = slope([o.reshape(shape) for o in on], like)
    marked = trace.validity(x)  # elements that are neurons (padded steps are not), see neuron_mask
    valid = None if marked is None else torch.broadcast_to(marked, shape).reshape(b, n)
    if isinstance(t, GramTangent):
        if x.dim() != 2 or shape != x.shape:
            raise GramUnsupported("activation on a tensor with more than one feature dimension")
        squared = t.diagonal().expand(b, n)
        for (group, _), v, o in zip(kinks, values, on, strict=True):
            trace.emit(group, v, None, o, squared_norms=squared, valid=valid)
        trace.track(result, t.scaled(s.expand(shape)))
        return result
    if isinstance(t, window.WindowTangent) and t.shape[1:] == shape:
        for (group, _), v, o in zip(kinks, values, on, strict=True):
            trace.emit(group, v, None, o, window=t)
        trace.track(result, window.scale(t, s.expand(shape)))
        return result
    if isinstance(t, window.WindowTangent):
        t = t.dense()
    tangents = None if t is None else _flat(_raw(t, shape, t.dtype), b, n)
    for (group, _), v, o in zip(kinks, values, on, strict=True):
        trace.emit(group, v, tangents, o, valid=valid)
    if t is None:
        trace.track(result, None)
        return result
    trace.track(result, MaskedTangent(_raw(t, shape, t.dtype), s.expand(shape)))
    return result


def slopes(on: Tensor, slope: float, like: Tensor) -> Tensor:
    """1 where ``on``, ``slope`` elsewhere, in ``like``'s dtype and device (a Python float
    would go through float32); ReLU's 0/1 mask is a plain cast."""
    if slope == 0.0:
        return on.to(like.dtype)
    return torch.where(on, like.new_ones(()), like.new_full((), slope))


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
    if trace.is_mask(x):
        return _mask_result(trace, func(*args, **kwargs))
    return _kinked(
        trace, func, args, kwargs, x, [(op, 0.0)], lambda on, like: slopes(on[0], slope, like), in_place
    )


@register_mask_rule(
    F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_, F.relu_, batch=NEURONS_OR_MASKS,
    gram=True,
)
@register(F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_, F.relu_, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def relu(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    in_place = func in (torch.relu_, torch.Tensor.relu_, F.relu_) or bool(
        kwargs.get("inplace", args[1] if func is F.relu and len(args) > 1 else False)
    )
    return _activation(trace, "relu", func, args, kwargs, 0.0, in_place)


_LEAKY = (F.leaky_relu, torch._C._nn.leaky_relu, torch._C._nn.leaky_relu_, F.leaky_relu_)


@register_mask_rule(*_LEAKY, batch=NEURONS_OR_MASKS, gram=True)
@register(*_LEAKY, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def leaky_relu(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    slope = float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    in_place = func in (torch._C._nn.leaky_relu_, F.leaky_relu_) or bool(
        kwargs.get("inplace", args[2] if func is F.leaky_relu and len(args) > 2 else False)
    )
    return _activation(trace, "leaky_relu", func, args, kwargs, slope, in_place)


_PRELU = (torch.prelu, F.prelu, getattr(torch.Tensor, "prelu", None), getattr(torch._C._nn, "prelu", None))


@register_mask_rule(*_PRELU, batch=NEURONS_OR_MASKS, gram=True)
@register(*_PRELU, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def prelu(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """PReLU: one neuron per element, slope 1 on and the channel's learned weight off."""
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if trace.is_tracked(weight):
        raise trace.refuse(op_name(func), "its weight depends on the input")
    if trace.is_mask(x):
        return _mask_result(trace, func(*args, **kwargs))
    w = weight.reshape(()) if weight.numel() == 1 else weight.reshape(1, -1, *[1] * (x.dim() - 2))

    def slope(on: list[Tensor], like: Tensor) -> Tensor:
        ww = w.to(like.dtype)
        return torch.where(on[0], ww.new_ones(()), ww)

    return _kinked(trace, func, args, kwargs, x, [("prelu", 0.0)], slope, False)


_ABS = (torch.abs, torch.Tensor.abs, torch.Tensor.__abs__, torch.absolute, torch.Tensor.absolute)
_ABS_IN_PLACE = (torch.abs_, torch.Tensor.abs_, torch.Tensor.absolute_)


@register_mask_rule(*_ABS, *_ABS_IN_PLACE, batch=NEURONS_OR_MASKS, gram=True)
@register(*_ABS, *_ABS_IN_PLACE, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def absolute(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """|h|: one neuron z = h per element, slope +1 on and -1 off."""
    x = args[0] if args else kwargs["input"]
    if trace.is_mask(x):
        return _mask_result(trace, func(*args, **kwargs))

    def slope(on: list[Tensor], like: Tensor) -> Tensor:
        return torch.where(on[0], like.new_ones(()), like.new_full((), -1.0))

    return _kinked(trace, func, args, kwargs, x, [("abs", 0.0)], slope, func in _ABS_IN_PLACE)


def _between(on: list[Tensor], like: Tensor) -> Tensor:
    """Slope of a clamp with both bounds: 1 where h > a and not h > b."""
    return (on[0] & ~on[1]).to(like.dtype)


def _above(on: list[Tensor], like: Tensor) -> Tensor:
    return on[0].to(like.dtype)


def _below(on: list[Tensor], like: Tensor) -> Tensor:
    return (~on[0]).to(like.dtype)


def _two_sided(
    trace: Trace,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    op: str,
    x: Tensor,
    lo: Any,
    hi: Any,
    in_place: bool,
) -> Any:
    """An elementwise clamp to [lo, hi] with constant (or mask) bounds, either may be ``None``."""
    kinks: list[tuple[str, Any]] = []
    if lo is not None:
        kinks.append((f"{op}.min", lo))
    if hi is not None:
        kinks.append((f"{op}.max", hi))
    if not kinks:  # torch raises its own error
        return func(*args, **kwargs)
    slope = _between if len(kinks) == 2 else _above if lo is not None else _below
    return _kinked(trace, func, args, kwargs, x, kinks, slope, in_place)


_CLAMP = (torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip)
_CLAMP_IN_PLACE = (torch.clamp_, torch.Tensor.clamp_, torch.clip_, torch.Tensor.clip_)
_CLAMP_MIN = (torch.clamp_min, torch.Tensor.clamp_min)
_CLAMP_MIN_IN_PLACE = (torch.clamp_min_, torch.Tensor.clamp_min_)
_CLAMP_MAX = (torch.clamp_max, torch.Tensor.clamp_max)
_CLAMP_MAX_IN_PLACE = (torch.clamp_max_, torch.Tensor.clamp_max_)
_ALL_CLAMPS = (*_CLAMP, *_CLAMP_IN_PLACE, *_CLAMP_MIN, *_CLAMP_MIN_IN_PLACE, *_CLAMP_MAX, *_CLAMP_MAX_IN_PLACE)


@register_mask_rule(*_ALL_CLAMPS, batch=NEURONS_OR_MASKS, gram=True)
@register(*_ALL_CLAMPS, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def clamp(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """clamp / clip / clamp_min / clamp_max (and in place): one neuron per bound and element.

    A bound that depends on the input makes a max (min) unit of two inputs:
    ``clamp(h, a, b) = minimum(maximum(h, a), b)``, each step through the dispatch.
    """
    name = op_name(func)
    x = args[0] if args else kwargs["input"]
    rest = list(args[1:])
    if func in _CLAMP_MIN or func in _CLAMP_MIN_IN_PLACE:
        lo, hi = (rest[0] if rest else kwargs.get("min")), None
    elif func in _CLAMP_MAX or func in _CLAMP_MAX_IN_PLACE:
        lo, hi = None, (rest[0] if rest else kwargs.get("max"))
    else:
        lo = rest[0] if rest else kwargs.get("min")
        hi = rest[1] if len(rest) > 1 else kwargs.get("max")
    if "out" in kwargs:
        raise trace.refuse(name, "the out= argument is not supported")
    in_place = func in _CLAMP_IN_PLACE or func in _CLAMP_MIN_IN_PLACE or func in _CLAMP_MAX_IN_PLACE
    if _carries(trace, lo) or _carries(trace, hi):
        if in_place:
            raise trace.refuse(name, "an in-place clamp to input-dependent bounds; use torch.maximum / minimum")
        with torch.no_grad():
            func(*args, **kwargs)  # torch's own checks of the arguments (shapes, types)
        return _clamp_by_units(trace, x, lo, hi)
    if not _carries(trace, x):  # masks and constants only
        return _mask_result(trace, func(*args, **kwargs))
    return _two_sided(trace, func, args, kwargs, "clamp", x, lo, hi, in_place)


def _clamp_by_units(trace: Trace, x: Any, lo: Any, hi: Any) -> Any:
    """``minimum(maximum(x, lo), hi)`` with input-dependent bounds: max/min units."""
    r = x
    for bound, unit, side in ((lo, torch.maximum, "min"), (hi, torch.minimum, "max")):
        if bound is None:
            continue
        if _carries(trace, bound):
            r = dispatch(trace, unit, (r, bound), {})
        elif trace.is_tracked(r) or trace.is_tracked(bound):
            r = dispatch(trace, torch.clamp, (r,), {side: bound})
        else:
            r = torch.clamp(r, **{side: bound})
    return r


_HARDTANH = (F.hardtanh, torch._C._nn.hardtanh, F.hardtanh_)


@register_mask_rule(*_HARDTANH, batch=NEURONS_OR_MASKS, gram=True)
@register(*_HARDTANH, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def hardtanh(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Hardtanh (nn.Hardtanh, and nn.ReLU6, which calls hardtanh(0, 6)): two neurons per element."""
    x = args[0] if args else kwargs["input"]
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    if trace.is_tracked(lo) or trace.is_tracked(hi):
        raise trace.refuse(op_name(func), "its bounds depend on the input")
    if trace.is_mask(x):
        return _mask_result(trace, func(*args, **kwargs))
    in_place = func is F.hardtanh_ or bool(kwargs.get("inplace", args[3] if func is F.hardtanh and len(args) > 3 else False))
    return _two_sided(trace, func, args, kwargs, "hardtanh", x, lo, hi, in_place)


_RELU6 = (F.relu6, getattr(torch._C._nn, "relu6", None), getattr(torch._C._nn, "relu6_", None))


@register_mask_rule(*_RELU6, batch=NEURONS_OR_MASKS, gram=True)
@register(*_RELU6, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def relu6(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """ReLU6 = clamp(h, 0, 6): two neurons per element."""
    x = args[0] if args else kwargs["input"]
    if trace.is_mask(x):
        return _mask_result(trace, func(*args, **kwargs))
    in_place = func is getattr(torch._C._nn, "relu6_", None) or bool(
        kwargs.get("inplace", args[1] if func is F.relu6 and len(args) > 1 else False)
    )
    return _two_sided(trace, func, args, kwargs, "relu6", x, 0.0, 6.0, in_place)


# ---------------------------------------------------------------------------
# comparisons: one neuron per element, a mask as result

# func -> (group name, sign of a - b in z, strict)
_COMPARE: dict[Any, tuple[str, float, bool]] = {}
for _f in (torch.gt, torch.greater, torch.Tensor.gt, torch.Tensor.greater, torch.Tensor.__gt__):
    _COMPARE[_f] = ("gt", 1.0, True)
for _f in (torch.ge, torch.greater_equal, torch.Tensor.ge, torch.Tensor.greater_equal, torch.Tensor.__ge__):
    _COMPARE[_f] = ("ge", -1.0, False)
for _f in (torch.lt, torch.less, torch.Tensor.lt, torch.Tensor.less, torch.Tensor.__lt__):
    _COMPARE[_f] = ("lt", -1.0, True)
for _f in (torch.le, torch.less_equal, torch.Tensor.le, torch.Tensor.less_equal, torch.Tensor.__le__):
    _COMPARE[_f] = ("le", 1.0, False)
# equality of masks and constants only (on input-dependent values it is refused)
_EQUALITY = (
    torch.eq, torch.Tensor.eq, torch.Tensor.__eq__, torch.ne, torch.not_equal, torch.Tensor.ne,
    torch.Tensor.not_equal, torch.Tensor.__ne__,
)


def _numeric(v: Any, like: Tensor) -> Any:
    """A bool operand as a number tensor (bool tensors cannot be subtracted)."""
    return v.to(like.dtype) if isinstance(v, Tensor) and v.dtype == torch.bool else v


@register_mask_rule(*_COMPARE, batch=NEURONS_OR_MASKS, gram=True)
@register(*_COMPARE, batch=BATCH_FIRST_ELEMENTWISE, gram=True)
def compare(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``a > b`` and friends: neurons ``+-(a - b)`` (the strict side on), a mask as result."""
    name = op_name(func)
    if "out" in kwargs:
        raise trace.refuse(name, "the out= argument is not supported")
    a = args[0] if args else kwargs["input"]
    b = args[1] if len(args) > 1 else kwargs["other"]
    carried = [v for v in (a, b) if _carries(trace, v)]
    if any(trace.validity(v) is not None for v in carried):
        raise trace.refuse(name, "neuron_mask marks the input of an elementwise activation, not of a comparison")
    result = func(*args, **kwargs)
    if not carried:
        return _mask_result(trace, result)
    for v in carried:
        if not v.is_floating_point():
            raise trace.refuse(name, "input-dependent tensors must be floating point")
    group, sign, _ = _COMPARE[func]
    like = carried[0]
    av, bv = _numeric(a, like), _numeric(b, like)
    diff = (av - bv) if sign > 0 else (bv - av)
    shape = result.shape
    bsz = trace.batch_size
    n = math.prod(shape[1:])  # (not -1: an empty batch has no size to infer)
    values = (diff if diff.shape == shape else diff.expand(shape)).reshape(bsz, n)
    pattern = values.detach() > 0
    tangents = [trace.tangent(v) if _carries(trace, v) else None for v in (a, b)]
    present = [t for t in tangents if t is not None]
    if any(isinstance(t, GramTangent) for t in present):
        if len(present) != 1 or like.dim() != 2 or like.shape != shape:
            raise GramUnsupported("a comparison of two input-dependent tensors, or of feature maps")
        (t,) = present
        trace.emit(group, values, None, pattern, squared_norms=t.diagonal().expand(bsz, n))
    elif len(present) < len(carried):  # a pass without directions
        trace.emit(group, values, None, pattern)
    else:
        ta, tb = (None if t is None else _raw(t, shape, diff.dtype) for t in tangents)
        if ta is not None and tb is not None:
            t_diff = ta - tb if sign > 0 else tb - ta
        elif ta is not None:
            t_diff = ta if sign > 0 else -ta
        else:
            assert tb is not None
            t_diff = -tb if sign > 0 else tb
        trace.emit(group, values, _flat(t_diff, bsz, n), pattern)
    trace.track_mask(result)
    return result


@register_mask_rule(*_EQUALITY, batch=ELEMENTWISE)
def mask_equality(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``==`` / ``!=`` of masks and constants (a mask); of input-dependent values: refused."""
    if any(_carries(trace, v) for v in tracked_tensors(trace, args, kwargs)):
        raise trace.refuse(
            op_name(func), "an equality test of input-dependent values is not piecewise linear; "
            "compare with <, <=, >, >= instead",
        )
    return _mask_result(trace, func(*args, **kwargs))


# ---------------------------------------------------------------------------
# masks in use: products, sums, where, masked_fill


_ADD: dict[Any, Any] = {
    torch.add: 1.0, torch.Tensor.add: 1.0, torch.Tensor.__add__: 1.0, torch.Tensor.__radd__: 1.0,
    torch.Tensor.__iadd__: 1.0, torch.Tensor.add_: 1.0,
    torch.sub: -1.0, torch.subtract: -1.0, torch.Tensor.sub: -1.0, torch.Tensor.__sub__: -1.0,
    torch.Tensor.__isub__: -1.0, torch.Tensor.sub_: -1.0, torch.Tensor.subtract: -1.0,
    torch.rsub: "r", torch.Tensor.__rsub__: "r",
}
_ADD_IN_PLACE = {torch.Tensor.__iadd__, torch.Tensor.add_, torch.Tensor.__isub__, torch.Tensor.sub_}
_MUL = {
    torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__imul__, torch.Tensor.mul_, torch.Tensor.multiply,
}
_DIV = {
    torch.div, torch.divide, torch.true_divide, torch.Tensor.div, torch.Tensor.__truediv__,
    torch.Tensor.__itruediv__, torch.Tensor.div_, torch.Tensor.divide, torch.Tensor.true_divide,
}
_REVERSED_DIV = {torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__}
_PRODUCT_IN_PLACE = {torch.Tensor.__imul__, torch.Tensor.mul_, torch.Tensor.__itruediv__, torch.Tensor.div_}
_NEG = (torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.negative, torch.Tensor.__pos__, torch.Tensor.positive)


@register_mask_rule(*_ADD, *_MUL, *_DIV, *_REVERSED_DIV, *_NEG, batch=ELEMENTWISE, gram=True)
def mask_arithmetic(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Arithmetic with masks: of masks alone a mask; ``h * mask``, ``h / mask``, ``h +- mask``
    are linear in h with the mask a constant."""
    name = op_name(func)
    carried = [v for v in tracked_tensors(trace, args, kwargs) if _carries(trace, v)]
    if not carried:
        return _mask_result(trace, func(*args, **kwargs))
    if kwargs.get("rounding_mode") is not None:
        raise trace.refuse(name, "rounded division is not linear")
    for v in carried:
        if not v.is_floating_point():
            raise trace.refuse(name, "input-dependent tensors must be floating point")
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other")
    if func in _ADD:
        return _add(trace, func, args, kwargs, a, b)
    if len(carried) != 1:
        raise trace.refuse(name, "a product of two input-dependent tensors is not piecewise linear")
    (x,) = carried
    divide = func in _DIV or func in _REVERSED_DIV
    if (func in _DIV and a is not x) or func in _REVERSED_DIV:
        raise trace.refuse(name, "dividing by an input-dependent tensor is not piecewise linear")
    if func in _PRODUCT_IN_PLACE:
        if a is not x:
            raise trace.refuse(name, "an in-place product of a mask with an input-dependent tensor")
        _check_in_place(trace, name, x)
    other = b if a is x else a
    pending = trace.masked(x)
    t = trace.tangent(x)
    result = func(*args, **kwargs)
    shape = result.shape
    if t is None:
        trace.track(result, None)
        return result
    # a copy: the product's tangent is formed later, and the mask may be updated in place before
    factor = (
        other.to(dtype=result.dtype, device=result.device, copy=True) if isinstance(other, Tensor)
        else torch.as_tensor(other, dtype=result.dtype, device=result.device)
    )
    if divide:
        factor = 1.0 / factor
    if isinstance(t, GramTangent):
        if x.dim() != 2 or shape != x.shape:
            raise GramUnsupported("a mask product on a tensor with more than one feature dimension")
        trace.track(result, t.scaled(factor.expand(shape)))
        return result
    if divide:
        trace.track(result, _raw(t, shape, result.dtype) / torch.as_tensor(other, dtype=result.dtype, device=result.device))
    elif pending is not None and x.shape == shape and pending.raw.dtype == result.dtype:
        trace.track(result, MaskedTangent(pending.raw, pending.mask * factor.expand(shape)))
    else:
        trace.track(result, MaskedTangent(_raw(t, shape, result.dtype), factor.expand(shape)))
    return result


def _add(
    trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], a: Any, b: Any
) -> Any:
    """a + alpha * b (and -, rsub) with masks: a mask adds a constant."""
    name = op_name(func)
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    sign = _ADD[func]
    coef_a, coef_b = (-float(alpha), 1.0) if sign == "r" else (1.0, float(sign) * float(alpha))
    if func in _ADD_IN_PLACE and isinstance(a, Tensor):
        if trace.is_mask(a):
            raise trace.refuse(name, "an in-place addition of an input-dependent tensor into a mask")
        _check_in_place(trace, name, a)
    ta = trace.tangent(a) if _carries(trace, a) else None
    tb = trace.tangent(b) if _carries(trace, b) else None
    if isinstance(ta, GramTangent) or isinstance(tb, GramTangent):
        raise GramUnsupported("an addition inside the network")
    result = func(*args, **kwargs)
    if ta is None and tb is None:
        trace.track(result, None)
        return result
    shape = result.shape
    parts = [c * _raw(t, shape, result.dtype) if c != 1.0 else _raw(t, shape, result.dtype)
             for c, t in ((coef_a, ta), (coef_b, tb)) if t is not None]
    trace.track(result, parts[0] if len(parts) == 1 else parts[0] + parts[1])
    return result


_WHERE = (torch.where, torch.Tensor.where)


@register_mask_rule(*_WHERE, batch=ELEMENTWISE, gram=True)
@register(*_WHERE, batch=ELEMENTWISE, gram=True)
def where(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.where(cond, a, b)`` with the condition a mask or a constant: linear in a and b."""
    name = op_name(func)
    if func is torch.Tensor.where:
        a = args[0] if args else kwargs["input"]
        cond = args[1] if len(args) > 1 else kwargs["condition"]
        b = args[2] if len(args) > 2 else kwargs["other"]
    else:
        if len(args) + len(kwargs) < 3:
            raise trace.refuse(name, "torch.where(condition) lists positions (data-dependent shapes)")
        cond = args[0] if args else kwargs["condition"]
        a = args[1] if len(args) > 1 else kwargs["input"]
        b = args[2] if len(args) > 2 else kwargs["other"]
    if "out" in kwargs:
        raise trace.refuse(name, "the out= argument is not supported")
    if _carries(trace, cond):
        raise trace.refuse(name, "its condition is an input-dependent tensor, not a mask")
    sides = [v for v in (a, b) if _carries(trace, v)]
    for v in sides:
        if not v.is_floating_point():
            raise trace.refuse(name, "input-dependent tensors must be floating point")
    ta = trace.tangent(a) if _carries(trace, a) else None
    tb = trace.tangent(b) if _carries(trace, b) else None
    result = func(*args, **kwargs)
    if not sides:
        return _mask_result(trace, result)
    if ta is None and tb is None:
        trace.track(result, None)
        return result
    shape = result.shape
    c = torch.as_tensor(cond, device=result.device)
    if isinstance(ta, GramTangent) or isinstance(tb, GramTangent):
        x, t, pick = (a, ta, c) if ta is not None else (b, tb, ~c)
        if (ta is not None and tb is not None) or x.dim() != 2 or x.shape != shape:
            raise GramUnsupported("torch.where of two input-dependent tensors, or of feature maps")
        assert isinstance(t, GramTangent)
        trace.track(result, t.scaled(pick.to(result.dtype).expand(shape)))
        return result
    if ta is not None and tb is not None:
        tangent = torch.where(c, _raw(ta, shape, result.dtype), _raw(tb, shape, result.dtype))
        trace.track(result, tangent)
    elif ta is not None:
        trace.track(result, MaskedTangent(_raw(ta, shape, result.dtype), c.to(result.dtype).expand(shape)))
    else:
        assert tb is not None
        trace.track(result, MaskedTangent(_raw(tb, shape, result.dtype), (~c).to(result.dtype).expand(shape)))
    return result


_MASKED_FILL = (torch.masked_fill, torch.Tensor.masked_fill, torch.Tensor.masked_fill_)


@register_mask_rule(*_MASKED_FILL, batch=ELEMENTWISE, gram=True)
@register(*_MASKED_FILL, batch=ELEMENTWISE, gram=True)
def masked_fill(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``h.masked_fill(mask, v)`` with the mask a mask or a constant, v a constant: slope ~mask."""
    name = op_name(func)
    x = args[0] if args else kwargs["input"]
    m = args[1] if len(args) > 1 else kwargs["mask"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    if _carries(trace, m):
        raise trace.refuse(name, "its mask is an input-dependent tensor, not a comparison's mask")
    if trace.is_tracked(v):
        raise trace.refuse(name, "its fill value depends on the input")
    in_place = func is torch.Tensor.masked_fill_
    if not _carries(trace, x):
        if in_place and not trace.is_tracked(x):
            raise trace.refuse(name, "an in-place write of a mask into a constant; use torch.where")
        return _mask_result(trace, func(*args, **kwargs))
    if not x.is_floating_point():
        raise trace.refuse(name, "input-dependent tensors must be floating point")
    if in_place:
        _check_in_place(trace, name, x)
    pending = trace.masked(x)
    t = trace.tangent(x)
    result = func(*args, **kwargs)
    if t is None:
        trace.track(result, None)
        return result
    shape = result.shape
    keep = (~torch.as_tensor(m, device=result.device)).to(result.dtype).expand(shape)
    if isinstance(t, GramTangent):
        if x.dim() != 2:
            raise GramUnsupported("masked_fill on a tensor with more than one feature dimension")
        trace.track(result, t.scaled(keep))
    elif pending is not None and pending.raw.dtype == result.dtype:
        trace.track(result, MaskedTangent(pending.raw, pending.mask * keep))
    else:
        trace.track(result, MaskedTangent(_raw(t, shape, result.dtype), keep))
    return result


# ---------------------------------------------------------------------------
# masks alone: logic, conversions, reshapes, indexing


_LOGIC = (
    torch.Tensor.__and__, torch.Tensor.__rand__, torch.Tensor.__or__, torch.Tensor.__ror__,
    torch.Tensor.__xor__, torch.Tensor.__rxor__, torch.Tensor.__invert__,
    torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor, torch.bitwise_not,
    torch.Tensor.bitwise_and, torch.Tensor.bitwise_or, torch.Tensor.bitwise_xor, torch.Tensor.bitwise_not,
    torch.logical_and, torch.logical_or, torch.logical_xor, torch.logical_not,
    torch.Tensor.logical_and, torch.Tensor.logical_or, torch.Tensor.logical_xor, torch.Tensor.logical_not,
)
_CONVERT = (
    torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16,
    torch.Tensor.bool, torch.Tensor.long, torch.Tensor.int, torch.Tensor.short, torch.Tensor.byte,
    torch.Tensor.type, torch.Tensor.type_as, torch.Tensor.cpu, torch.Tensor.cuda,
)
_MASK_RESHAPES = (
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
    torch.Tensor.unflatten, torch.unflatten, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze,
    torch.unsqueeze, torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.view_as,
    torch.Tensor.reshape_as,
)
_MASK_STRUCTURAL = (
    torch.Tensor.permute, torch.permute, torch.Tensor.transpose, torch.transpose, torch.Tensor.t, torch.t,
    torch.Tensor.__getitem__, torch.Tensor.select, torch.select, torch.Tensor.narrow, torch.narrow,
    torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split, torch.Tensor.unbind, torch.unbind,
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.Tensor.expand, torch.Tensor.expand_as,
    torch.Tensor.repeat, torch.Tensor.flip, torch.flip, torch.Tensor.roll, torch.roll, torch.Tensor.movedim,
    torch.movedim, torch.Tensor.tile, torch.tile, torch.Tensor.any, torch.any, torch.Tensor.sum, torch.sum,
)


@register_mask_rule(*_LOGIC, batch=ELEMENTWISE)
def mask_logic(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``& | ^ ~`` (bitwise and logical) of masks and constants: a mask."""
    if any(_carries(trace, v) for v in tracked_tensors(trace, args, kwargs)):
        raise trace.refuse(op_name(func), "a logical operation on input-dependent values is not piecewise linear")
    return _mask_result(trace, func(*args, **kwargs))


@register_mask_rule(*_CONVERT, batch=ELEMENTWISE)
def mask_convert(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """dtype and device conversions of a mask (``mask.float()``, ``mask.to(h)``): a mask."""
    if not trace.is_mask(args[0]):
        raise trace.refuse(op_name(func), "converting an input-dependent tensor to a mask's dtype")
    result = func(*args, **kwargs)
    return _mask_result(trace, result) if isinstance(result, Tensor) else result


def mask_structural(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Reshapes, indexing, concatenation, flips and reductions of masks alone: masks.

    Where the batch dimension goes is measured as for any structural op, so a mask moved
    across examples (``mask.flip(0)``) is refused here, before anything can use it.
    """
    name = op_name(func)
    tracked = tracked_tensors(trace, args, kwargs)
    if any(_carries(trace, v) for v in tracked):
        raise trace.refuse(
            name, "it combines a mask with input-dependent values (indexing by a mask has a "
            "data-dependent shape); use h * mask, torch.where(mask, h, v) or h.masked_fill(~mask, v)",
        )
    for m in tracked:
        if not (m.dtype == torch.bool or m.is_floating_point()):
            raise trace.refuse(name, "reshaping or indexing an integer mask; keep masks bool or floating point")
    if func in (torch.Tensor.squeeze_, torch.Tensor.unsqueeze_):
        raise trace.refuse(name, "in-place reshapes are not supported; use the out-of-place form")
    return _mask_result(trace, func(*args, **kwargs))


register_mask_rule(*_MASK_RESHAPES, batch=RESHAPE)(mask_structural)
register_mask_rule(*_MASK_STRUCTURAL, batch=LINEAR_PROBE)(mask_structural)
