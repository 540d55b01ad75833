"""One rule per family of torch operations: how a tangent passes through it.

A rule is called with the running :class:`~rollnet.engine.capture.Trace`, the
torch function and its arguments, whenever at least one argument depends on
the input.  It computes the ordinary result, the tangent of that result
(``[K, *result.shape]``) and reports neurons for piecewise-linear calls.

Adding a layer is one addition to :data:`RULES`: map its torch functions to a
rule.  Anything that reaches :func:`dispatch` without a rule is refused, with
the module path, so an unknown operation can never produce a certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollnet.engine.capture import MaskedTangent, Trace, _iter_values, batch_shared, op_name
from rollnet.engine.gram import GramTangent, GramUnsupported

__all__ = ["RULES", "Rule", "dispatch", "register"]

Rule = Callable[[Trace, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]

RULES: dict[Any, Rule] = {}


def register(*funcs: Any) -> Callable[[Rule], Rule]:
    """Register a rule for the given torch callables (decorator)."""

    def deco(rule: Rule) -> Rule:
        for f in funcs:
            if f is not None:
                RULES[f] = rule
        return rule

    return deco


# Calls that only read metadata: allowed on tracked tensors, results untracked.
_METADATA = {
    "dim", "size", "shape", "numel", "dtype", "device", "__len__", "is_contiguous",
    "stride", "ndim", "ndimension", "requires_grad", "is_floating_point", "is_complex",
    "get_device", "element_size", "nelement", "storage_offset", "layout", "is_cuda",
    "is_sparse", "is_leaf", "grad_fn", "data_ptr", "is_quantized", "is_meta", "__repr__",
    "__str__", "__format__", "names", "_version", "is_mkldnn", "is_nested",
}
# Calls whose result depends on a tracked tensor's shape only (a constant).
_SHAPE_ONLY = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
}


def _name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return str(name)


def dispatch(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Apply the rule for ``func``; refuse what has no rule."""
    rule = RULES.get(func)
    if rule is not None:
        if rule not in GRAM_AWARE and any(
            isinstance(trace.tangent(t), GramTangent) for t in _tracked_tensors(trace, args, kwargs)
        ):
            raise GramUnsupported(op_name(func))
        return rule(trace, func, args, kwargs)
    name = _name(func)
    if name in _METADATA:
        return func(*args, **kwargs)
    if name in _SHAPE_ONLY:
        # type_as / new_* with a tracked *template* only read its shape and dtype.
        return func(*args, **kwargs)
    if name in {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero"}:
        reason = "it turns an input-dependent tensor into Python data (data-dependent control flow)"
    elif name in {"detach", "detach_", "data", "requires_grad_"}:
        reason = "it cuts the input dependence, so the certificate would miss neurons after it"
    elif name in {"__setitem__", "index_put_", "masked_fill_", "copy_", "fill_", "zero_"}:
        reason = "in-place writes into input-dependent tensors are not supported; build a new tensor instead"
    else:
        reason = (
            "it is not an affine or piecewise-linear operation rollnet knows "
            "(supported: Linear, Conv, eval BatchNorm, AvgPool, Flatten, Dropout, ReLU, "
            "LeakyReLU, MaxPool, AdaptiveMaxPool, maxout as max/amax over non-batch dimensions, "
            "additions, concatenations and reshapes)"
        )
    raise trace.refuse(op_name(func), reason)


# ---------------------------------------------------------------------------
# helpers


def _tracked_tensors(trace: Trace, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    values = [*_iter_values(args), *_iter_values(tuple(kwargs.values()))]
    return [v for v in values if trace.is_tracked(v)]


def _per_sample(
    fn: Callable[[Tensor], Tensor], t: Tensor
) -> Tensor:
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


def _vmapped(fn: Callable[..., Any], *tangents: Tensor) -> Any:
    return torch.func.vmap(fn)(*tangents)


def _result_tensors(result: Any) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [r for r in result if isinstance(r, Tensor)]
    return []


def _track_results(trace: Trace, result: Any, tangent: Any) -> None:
    if isinstance(result, Tensor):
        trace.track(result, tangent)
        return
    outs = _result_tensors(result)
    tans = [] if tangent is None else list(tangent)
    for i, r in enumerate(outs):
        trace.track(r, tans[i] if tangent is not None else None)


def _check_float(trace: Trace, func: Callable[..., Any], tensors: list[Tensor]) -> None:
    for t in tensors:
        if not (t.is_floating_point()):
            raise trace.refuse(op_name(func), "input-dependent tensors must be floating point")


# ---------------------------------------------------------------------------
# structural ops: linear, no offset; untracked floating tensors count as zeros

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
    torch.roll, torch.Tensor.sum, torch.sum, torch.Tensor.mean, torch.mean, torch.Tensor.neg,
    torch.neg, torch.Tensor.__neg__, torch.Tensor.movedim, torch.movedim, torch.Tensor.swapaxes,
    torch.Tensor.view_as, torch.Tensor.reshape_as, torch.Tensor.tile, torch.tile,
    torch.Tensor.__pos__, torch.Tensor.positive, torch.Tensor.mT, torch.Tensor.T,
    torch.Tensor.diagonal, torch.Tensor.trace, torch.Tensor.cumsum, torch.cumsum,
    torch.Tensor.index_select, torch.index_select, torch.Tensor.gather, torch.gather,
    torch.Tensor.take_along_dim, torch.Tensor.squeeze_, torch.Tensor.unsqueeze_,
    F.pixel_shuffle, F.pixel_unshuffle,
]


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
    if not isinstance(x, Tensor) or not trace.is_tracked(x) or len(_tracked_tensors(trace, args, kwargs)) != 1:
        return structural(trace, func, args, kwargs)
    _check_float(trace, func, [x])
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


@register(*_STRUCTURAL)
def structural(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Ops linear in their input-dependent tensors, with no constant term."""
    tracked = _tracked_tensors(trace, args, kwargs)
    _check_float(trace, func, tracked)
    if func in (torch.Tensor.squeeze_, torch.Tensor.unsqueeze_):
        raise trace.refuse(op_name(func), "in-place reshapes are not supported; use the out-of-place form")
    result = func(*args, **kwargs)
    tangents = [trace.tangent(t) for t in tracked]
    if tangents[0] is None:
        _track_results(trace, result, None)
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

    tangent = _vmapped(fn, *[t for t in tangents if t is not None])
    _track_results(trace, result, tangent)
    return result


register(*_ORDER_PRESERVING)(reshape)


@register(F.pad, torch.constant_pad_nd)
def pad(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Padding: the pad value is a constant, so the tangent is padded with zeros."""
    (x,) = _tracked_tensors(trace, args, kwargs)
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
        t = _vmapped(lambda u: func(u, *targs[1:], **tkw), t)
    trace.track(result, t)
    return result


_TO = [
    torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
    torch.Tensor.bfloat16, torch.Tensor.type, torch.Tensor.type_as, torch.Tensor.cpu,
    torch.Tensor.cuda,
]


@register(*_TO)
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


# ---------------------------------------------------------------------------
# additions and subtractions: constants vanish from the tangent


def _broadcast_tangent(t: Tensor | None, shape: torch.Size, k: int) -> Tensor | None:
    if t is None:
        return None
    extra = len(shape) - (t.dim() - 1)
    if extra > 0:
        t = t.reshape(t.shape[0], *([1] * extra), *t.shape[1:])
    return t.expand(k, *shape)


_ADD: dict[Any, Any] = {
    torch.add: 1.0, torch.Tensor.add: 1.0, torch.Tensor.__add__: 1.0, torch.Tensor.__radd__: 1.0,
    torch.Tensor.__iadd__: 1.0, torch.Tensor.add_: 1.0,
    torch.sub: -1.0, torch.subtract: -1.0, torch.Tensor.sub: -1.0, torch.Tensor.__sub__: -1.0,
    torch.Tensor.__isub__: -1.0, torch.Tensor.sub_: -1.0,
    torch.rsub: "r", torch.Tensor.__rsub__: "r",
}


@register(*_ADD)
def add(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """a + alpha * b and friends (residual connections, biases)."""
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    _check_float(trace, func, _tracked_tensors(trace, args, kwargs))
    sign = _ADD[func]
    # r-variants: func(a, b) computes b - alpha * a
    coef_a, coef_b = (-float(alpha), 1.0) if sign == "r" else (1.0, float(sign) * float(alpha))
    ta = trace.tangent(a) if trace.is_tracked(a) else None
    tb = trace.tangent(b) if isinstance(b, Tensor) and trace.is_tracked(b) else None
    in_place = func in (torch.Tensor.__iadd__, torch.Tensor.add_, torch.Tensor.__isub__, torch.Tensor.sub_)
    if in_place and isinstance(a, Tensor) and a._base is not None and trace.is_tracked(a._base):
        raise trace.refuse(op_name(func), "in-place update of a view of an input-dependent tensor")
    any_tangent = ta is not None or tb is not None
    result = func(*args, **kwargs)
    if not any_tangent:
        trace.track(result, None)
        return result
    k = (ta if ta is not None else tb).shape[0]  # type: ignore[union-attr]
    shape = result.shape
    ta = _broadcast_tangent(ta, shape, k)
    tb = _broadcast_tangent(tb, shape, k)
    if ta is not None and tb is not None:
        tangent = coef_a * ta + coef_b * tb if (coef_a, coef_b) != (1.0, 1.0) else ta + tb
    elif ta is not None:
        tangent = ta if coef_a == 1.0 else coef_a * ta
    else:
        assert tb is not None
        tangent = tb if coef_b == 1.0 else coef_b * tb
    trace.track(result, tangent)
    return result


# ---------------------------------------------------------------------------
# products with constants

_SCALE = [
    torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__imul__, torch.Tensor.mul_, torch.div, torch.divide, torch.true_divide,
    torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.div_,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.mv, torch.Tensor.mv,
    torch.einsum, torch.tensordot, torch.outer, torch.kron, torch.Tensor.__rdiv__,
    torch.Tensor.__rtruediv__,
]
_DIVISIONS = {torch.div, torch.divide, torch.true_divide, torch.Tensor.div, torch.Tensor.__truediv__,
              torch.Tensor.__itruediv__, torch.Tensor.div_}
_REVERSED_DIVISIONS = {torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__}
_OUT_OF_PLACE: dict[Any, Callable[..., Any]] = {
    torch.Tensor.__imul__: torch.mul, torch.Tensor.mul_: torch.mul,
    torch.Tensor.__itruediv__: torch.div, torch.Tensor.div_: torch.div,
}
_IN_PLACE_SCALE = {torch.Tensor.__imul__, torch.Tensor.mul_, torch.Tensor.__itruediv__, torch.Tensor.div_}


@register(*_SCALE)
def scale(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Products in which exactly one factor depends on the input (linear in it)."""
    tracked = _tracked_tensors(trace, args, kwargs)
    name = op_name(func)
    if len(tracked) != 1:
        raise trace.refuse(name, "a product of two input-dependent tensors is not piecewise linear")
    (x,) = tracked
    _check_float(trace, func, tracked)
    if (func in _DIVISIONS and args[0] is not x) or func in _REVERSED_DIVISIONS:
        raise trace.refuse(name, "dividing by an input-dependent tensor is not piecewise linear")
    if kwargs.get("rounding_mode") is not None:
        raise trace.refuse(name, "rounded division is not linear")
    if func in _IN_PLACE_SCALE and x._base is not None and trace.is_tracked(x._base):
        raise trace.refuse(name, "in-place update of a view of an input-dependent tensor")
    plain = _OUT_OF_PLACE.get(func, func)
    result = func(*args, **kwargs)
    t = trace.tangent(x)
    if t is None:
        trace.track(result, None)
        return result

    def substitute(value: Any, current: Tensor) -> Any:
        if value is x:
            return current
        if isinstance(value, (list, tuple)):
            return type(value)(substitute(v, current) for v in value)
        return value

    def fn(current: Tensor) -> Any:
        return plain(*substitute(args, current), **kwargs)

    trace.track(result, _vmapped(fn, t))
    return result


# ---------------------------------------------------------------------------
# affine layers: the bias drops out of the tangent


@register(F.linear)
def linear(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if not trace.is_tracked(x) or trace.is_tracked(weight):
        raise trace.refuse("torch.nn.functional.linear", "the weight depends on the input")
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"module '{trace.module_path}' expects inputs whose last dimension is "
            f"{weight.shape[-1]}, got inputs of per-example shape {tuple(x.shape[1:])}"
        )
    unit = trace.unit_indices(x)
    if unit is not None and x.dim() == 2:  # (a Gram pass carries no unit indices)
        # The Jacobian of the first affine layer is its weight matrix: e_k -> W[:, k].
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        result, columns = _FirstLayer.apply(x, weight, bias, unit.reshape(-1))
        rows = columns.t().unflatten(0, unit.shape)  # [K, F] shared, or [K, B, F] one axis per example
        tangent = rows if unit.dim() == 2 else rows.unsqueeze(1).expand(rows.shape[0], x.shape[0], rows.shape[1])
        trace.track(result, tangent)
        return result
    result = func(*args, **kwargs)
    pending = trace.masked(x)
    if pending is not None and x.dim() == 2 and weight.shape[0] <= pending.raw.shape[0]:
        # (t * m_b) W^T = t (W diag(m_b))^T: mask the [B, F', F] weights, not the [K, B, F] tangents
        masked_weights = weight.unsqueeze(0) * pending.mask.unsqueeze(1)
        tangent = torch.bmm(pending.raw.transpose(0, 1), masked_weights.transpose(1, 2)).transpose(0, 1)
        trace.track(result, tangent)
        return result
    t = trace.tangent(x)
    if t is None:
        trace.track(result, None)
        return result
    if isinstance(t, GramTangent):
        if x.dim() != 2:
            raise GramUnsupported("linear layer on a tensor with more than one feature dimension")
        trace.track(result, t.linear(weight))
        return result
    if batch_shared(t):
        out = F.linear(t[:, :1], weight)
        tangent = out.expand(t.shape[0], t.shape[1], *out.shape[2:])
    else:
        tangent = F.linear(t, weight)
    trace.track(result, tangent)
    return result


class _FirstLayer(torch.autograd.Function):
    """``F.linear(x, W, b)`` and the columns ``W[:, idx]`` (the tangents of unit directions) in one
    node, so the backward writes both parts of W's gradient into one tensor: ``g^T x``, then the
    columns' gradients added in place.  Two separate nodes (a linear and a gather) cost, per
    training step on the paper's MLP, a zero-filled [D, F] buffer, a transposed copy of it and a
    [F, D] sum (about 2 ms in the CPU profiler); whole approximate steps gained about 4%."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, weight, idx)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        return F.linear(x, weight, bias), weight.index_select(1, idx)

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_cols: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, idx = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        # under autocast the output (so g_out) can have a lower precision than x and W
        if g_out is not None and ctx.needs_input_grad[0]:
            grad_x = (g_out @ weight.to(g_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            if g_out is not None:
                grad_w = (g_out.t() @ x.to(g_out.dtype)).to(weight.dtype)
            else:
                grad_w = torch.zeros_like(weight)
            if g_cols is not None:
                grad_w.index_add_(1, idx, g_cols.to(weight.dtype))
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2] and g_out is not None:
            grad_b = g_out.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def _batched_sum(a: Tensor, b: Tensor) -> Tensor:
    return torch.bmm(a, b).sum(0)


_PRODUCT_OF: dict[Any, Callable[..., Tensor]] = {
    torch.addmm: torch.mm, torch.Tensor.addmm: torch.mm, torch.addmv: torch.mv,
    torch.baddbmm: torch.bmm, torch.addbmm: _batched_sum,
}


@register(*_PRODUCT_OF)
def add_product(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """bias + m1 @ m2 with the bias constant and exactly one factor input-dependent."""
    bias, m1, m2 = args[0], args[1], args[2]
    if trace.is_tracked(bias):
        raise trace.refuse(op_name(func), "the added term depends on the input; write it as an addition")
    tracked = [m for m in (m1, m2) if trace.is_tracked(m)]
    if len(tracked) != 1:
        raise trace.refuse(op_name(func), "a product of two input-dependent tensors is not piecewise linear")
    alpha = kwargs.get("alpha", 1)  # beta only scales the constant term
    result = func(*args, **kwargs)
    t = trace.tangent(tracked[0])
    if t is None:
        trace.track(result, None)
        return result
    product = _PRODUCT_OF[func]

    def fn(u: Tensor) -> Tensor:
        return alpha * (product(u, m2) if tracked[0] is m1 else product(m1, u))

    trace.track(result, _vmapped(fn, t))
    return result


_CONV = [F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d]


@register(*_CONV)
def conv(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if not trace.is_tracked(x) or trace.is_tracked(weight):
        raise trace.refuse(op_name(func), "the kernel depends on the input")
    try:
        result = func(*args, **kwargs)
    except RuntimeError as err:
        raise ValueError(
            f"module '{trace.module_path}' rejected inputs of per-example shape "
            f"{tuple(x.shape[1:])}: {err}"
        ) from err
    t = trace.tangent(x)
    if t is None:
        trace.track(result, None)
        return result
    rest = list(args[2:])
    kw = dict(kwargs)
    if rest:
        rest[0] = None  # bias
    kw.pop("bias", None)
    kw.pop("input", None)
    kw.pop("weight", None)
    trace.track(result, _per_sample(lambda u: func(u, weight, *rest, **kw), t))
    return result


@register(F.batch_norm)
def batch_norm(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
    defaults: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    bound = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    x = bound["input"]
    for n in ("running_mean", "running_var", "weight", "bias"):
        if trace.is_tracked(bound[n]):
            raise trace.refuse("torch.nn.functional.batch_norm", f"its {n} depends on the input")
    training = bool(bound["training"])
    if training and not trace.allow_batch_statistics:
        raise trace.refuse(
            "torch.nn.functional.batch_norm",
            "batch normalisation with batch statistics couples the examples of a batch and is not "
            "a fixed affine map; certify the model in eval mode with running statistics "
            "(a BatchNorm built with track_running_stats=False always uses batch statistics)",
        )
    if training:
        # Regulariser in training mode: the batch statistics are treated as constants;
        # the running statistics are left alone (the loss's own forward updates them).
        dims = [d for d in range(x.dim()) if d != 1]
        var = x.detach().var(dim=dims, unbiased=False)
        if trace.update_running_stats:
            result = func(*args, **kwargs)
        else:
            result = F.batch_norm(x, None, None, bound["weight"], bound["bias"], True, 0.0, bound["eps"])
    else:
        var = bound["running_var"]
        result = func(*args, **kwargs)
    t = trace.tangent(x)
    if t is None:
        trace.track(result, None)
        return result
    scale = torch.rsqrt(var + bound["eps"])
    if bound["weight"] is not None:
        scale = scale * bound["weight"]
    if isinstance(t, GramTangent):
        if x.dim() != 2:
            raise GramUnsupported("batch normalisation of feature maps")
        trace.track(result, t.scaled(scale))
        return result
    shape = [1, 1, -1] + [1] * (x.dim() - 2)
    trace.track(result, t * scale.reshape(shape))
    return result


_POOL = [
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.interpolate, F.upsample_nearest, F.upsample,
]


@register(*_POOL)
def average_pool(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Averages, and nearest/linear resizing: linear maps applied per example."""
    x = args[0] if args else kwargs["input"]
    mode = kwargs.get("mode", args[3] if func is F.interpolate and len(args) > 3 else "nearest")
    if func in (F.interpolate, F.upsample) and mode not in ("nearest", "linear", "bilinear", "trilinear", "area", "nearest-exact"):
        raise trace.refuse(op_name(func), f"interpolation mode {mode!r} is not linear")
    result = func(*args, **kwargs)
    t = trace.tangent(x)
    if t is None:
        trace.track(result, None)
        return result
    rest = args[1:]
    kw = {k: v for k, v in kwargs.items() if k != "input"}
    trace.track(result, _per_sample(lambda u: func(u, *rest, **kw), t))
    return result


@register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout)
def dropout(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ["input", "p", "training", "inplace"]
    bound = {"p": 0.5, "training": True, "inplace": False, **dict(zip(names, args, strict=False)), **kwargs}
    if "train" in kwargs:  # torch.dropout(input, p, train)
        bound["training"] = kwargs["train"]
    x = bound["input"]
    t = trace.tangent(x)
    if not bound["training"] or bound["p"] == 0:
        trace.track(x, t)
        return x
    if not trace.allow_batch_statistics:
        raise trace.refuse(
            op_name(func),
            "dropout in training mode makes the model random; certify the model in eval mode "
            "(rollnet switches nn.Dropout off, but a functional dropout with training=True stays on)",
        )
    template = torch.ones_like(x)
    if func is F.dropout:
        mask = F.dropout(template, float(bound["p"]), True)
    else:
        mask = func(template, float(bound["p"]), True)
    result = x * mask
    if isinstance(t, GramTangent):
        trace.track(result, t.scaled(mask))
    else:
        trace.track(result, None if t is None else t * mask)
    return result


# ---------------------------------------------------------------------------
# piecewise-linear activations: each input is a neuron


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
        trace.track(result, t.scaled(_slopes(on, slope, x)))
        return result
    tangents = None if t is None else t.flatten(2)
    trace.emit(op, values, tangents, on.reshape(b, n))
    if t is None:
        trace.track(result, None)
        return result
    trace.track(result, MaskedTangent(t, _slopes(on, slope, t)))
    return result


def _slopes(on: Tensor, slope: float, like: Tensor) -> Tensor:
    """1 where ``on``, ``slope`` elsewhere, in ``like``'s dtype and device (a Python float
    would go through float32); ReLU's 0/1 mask is a plain cast."""
    if slope == 0.0:
        return on.to(like.dtype)
    return torch.where(on, like.new_ones(()), like.new_full((), slope))


@register(F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_, F.relu_)
def relu(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    in_place = func in (torch.relu_, torch.Tensor.relu_, F.relu_) or bool(
        kwargs.get("inplace", args[1] if func is F.relu and len(args) > 1 else False)
    )
    return _activation(trace, "relu", func, args, kwargs, 0.0, in_place)


@register(F.leaky_relu, torch._C._nn.leaky_relu, torch._C._nn.leaky_relu_, F.leaky_relu_)
def leaky_relu(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    slope = float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    in_place = func in (torch._C._nn.leaky_relu_, F.leaky_relu_) or bool(
        kwargs.get("inplace", args[2] if func is F.leaky_relu and len(args) > 2 else False)
    )
    return _activation(trace, "leaky_relu", func, args, kwargs, slope, in_place)


#: Rules that accept a :class:`GramTangent` (the chain the Gram recursion handles).
GRAM_AWARE: set[Rule] = {linear, reshape, batch_norm, dropout, relu, leaky_relu}

# Max units (MaxPool, maxout) live in their own module and register into RULES on import.
from rollnet.engine import max_units as _max_units  # noqa: E402, F401
