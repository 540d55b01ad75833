"""Affine ops: additions, products with constants, Linear, Conv, BatchNorm, averages, Dropout.

Constants (biases, running statistics, added tensors) drop out of the
tangent; the linear part acts on each of the K directions.  The first Linear
after the input reads unit directions off its weight (:class:`FirstLayer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollnet.engine import tangents, window
from rollnet.engine.rules.batch import ELEMENTWISE, LINEAR_PROBE, MATRIX_PRODUCT, Layer
from rollnet.engine.rules.common import (
    broadcast_tangent,
    check_float,
    per_sample,
    substitute,
    tracked_tensors,
    vmapped,
)
from rollnet.engine.rules.registry import register
from rollnet.engine.tracing import Trace, iter_values, op_name

__all__ = [
    "FirstLayer",
    "add",
    "add_product",
    "average_pool",
    "batch_norm",
    "conv",
    "dropout",
    "linear",
    "scale",
]


def _weight(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    assert isinstance(weight, Tensor)
    return weight


def _conv_layout(rank: int) -> str:
    spatial = ", ".join(["L"] if rank == 3 else ["H", "W"] if rank == 4 else ["D", "H", "W"][: rank - 2])
    return f"[B, C, {spatial}]"


_ADD: dict[Any, Any] = {
    torch.add: 1.0, torch.Tensor.add: 1.0, torch.Tensor.__add__: 1.0, torch.Tensor.__radd__: 1.0,
    torch.Tensor.__iadd__: 1.0, torch.Tensor.add_: 1.0,
    torch.sub: -1.0, torch.subtract: -1.0, torch.Tensor.sub: -1.0, torch.Tensor.__sub__: -1.0,
    torch.Tensor.__isub__: -1.0, torch.Tensor.sub_: -1.0,
    torch.rsub: "r", torch.Tensor.__rsub__: "r",
}


@register(*_ADD, batch=ELEMENTWISE)
def add(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """a + alpha * b and friends (residual connections, biases)."""
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    check_float(trace, func, tracked_tensors(trace, args, kwargs))
    sign = _ADD[func]
    # r-variants: func(a, b) computes b - alpha * a
    coef_a, coef_b = (-float(alpha), 1.0) if sign == "r" else (1.0, float(sign) * float(alpha))
    ta = trace.boxed_tangent(a) if trace.is_tracked(a) else None
    tb = trace.boxed_tangent(b) if isinstance(b, Tensor) and trace.is_tracked(b) else None
    in_place = func in (torch.Tensor.__iadd__, torch.Tensor.add_, torch.Tensor.__isub__, torch.Tensor.sub_)
    if in_place and isinstance(a, Tensor) and a._base is not None and trace.is_tracked(a._base):
        raise trace.refuse(op_name(func), "in-place update of a view of an input-dependent tensor")
    any_tangent = ta is not None or tb is not None
    result = func(*args, **kwargs)
    if not any_tangent:
        trace.track(result, None)
        return result
    shape = result.shape
    boxed = _add_windows(ta, coef_a, tb, coef_b, shape)
    if boxed is not None:
        trace.track(result, boxed)
        return result
    ta = None if ta is None else broadcast_tangent(_dense(ta), shape)
    tb = None if tb is None else broadcast_tangent(_dense(tb), shape)
    if ta is not None and tb is not None:
        tangent = coef_a * ta + coef_b * tb if (coef_a, coef_b) != (1.0, 1.0) else ta + tb
    elif ta is not None:
        tangent = ta if coef_a == 1.0 else coef_a * ta
    else:
        assert tb is not None
        tangent = tb if coef_b == 1.0 else coef_b * tb
    trace.track(result, tangent)
    return result



def _dense(t: Any) -> Any:
    return t.dense() if isinstance(t, window.WindowTangent) else t


def _add_windows(ta: Any, ca: float, tb: Any, cb: float, shape: torch.Size) -> Any:
    """``ca * ta + cb * tb`` kept as a window, when the tangents are windows of the result's map
    (or one is absent: a constant added); ``None`` when the sum needs dense tangents."""
    parts = [(t, c) for t, c in ((ta, ca), (tb, cb)) if t is not None]
    if not all(isinstance(t, window.WindowTangent) and t.shape[1:] == shape for t, _ in parts):
        return None
    if len(parts) == 1:
        (t, c), = parts
        return t if c == 1.0 else window.scale(t, c)
    return window.add(ta, ca, tb, cb)


# ---------------------------------------------------------------------------
# products with constants

_ELEMENTWISE_SCALE = [
    torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__imul__, torch.Tensor.mul_, torch.div, torch.divide, torch.true_divide,
    torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.div_,
    torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__,
]
# Contractions (matrix products, einsum): they may sum over the batch dimension, so the batch
# dimension of the result is measured.
_ELEMENTWISE = set(_ELEMENTWISE_SCALE)
_MATRIX_PRODUCTS = [
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
    torch.bmm, torch.Tensor.bmm, torch.mv, torch.Tensor.mv,
]
_CONTRACTIONS = [torch.Tensor.__rmatmul__, torch.einsum, torch.tensordot, torch.outer, torch.kron]
_DIVISIONS = {torch.div, torch.divide, torch.true_divide, torch.Tensor.div, torch.Tensor.__truediv__,
              torch.Tensor.__itruediv__, torch.Tensor.div_}
_REVERSED_DIVISIONS = {torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__}
_OUT_OF_PLACE: dict[Any, Callable[..., Any]] = {
    torch.Tensor.__imul__: torch.mul, torch.Tensor.mul_: torch.mul,
    torch.Tensor.__itruediv__: torch.div, torch.Tensor.div_: torch.div,
}
_IN_PLACE_SCALE = {torch.Tensor.__imul__, torch.Tensor.mul_, torch.Tensor.__itruediv__, torch.Tensor.div_}


@register(*_ELEMENTWISE_SCALE, batch=ELEMENTWISE)
@register(*_MATRIX_PRODUCTS, batch=MATRIX_PRODUCT)
@register(*_CONTRACTIONS, batch=LINEAR_PROBE)
def scale(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Products in which exactly one factor depends on the input (linear in it)."""
    tracked = tracked_tensors(trace, args, kwargs)
    name = op_name(func)
    if len(tracked) != 1:
        raise trace.refuse(name, "a product of two input-dependent tensors is not piecewise linear")
    (x,) = tracked
    check_float(trace, func, tracked)
    if (func in _DIVISIONS and args[0] is not x) or func in _REVERSED_DIVISIONS:
        raise trace.refuse(name, "dividing by an input-dependent tensor is not piecewise linear")
    if kwargs.get("rounding_mode") is not None:
        raise trace.refuse(name, "rounded division is not linear")
    if func in _IN_PLACE_SCALE and x._base is not None and trace.is_tracked(x._base):
        raise trace.refuse(name, "in-place update of a view of an input-dependent tensor")
    plain = _OUT_OF_PLACE.get(func, func)
    result = func(*args, **kwargs)
    box = trace.window(x)
    if box is not None and func in _ELEMENTWISE and result.shape == x.shape:
        # elementwise: the constant, cut to the box, broadcasts against [K, B, C, *box]
        cut = {id(v): window.crop(v, box) for v in iter_values((*args, *kwargs.values())) if isinstance(v, Tensor)}
        cut[id(x)] = box.data
        out = plain(*substitute(args, cut), **{k: substitute(v, cut) for k, v in kwargs.items()})
        trace.track(result, window.settle(out, box.start, box.full))
        return result
    t = trace.tangent(x)
    if t is None:
        trace.track(result, None)
        return result

    def fn(current: Tensor) -> Any:
        return plain(*substitute(args, {id(x): current}), **kwargs)

    trace.track(result, vmapped(fn, t))
    return result



# ---------------------------------------------------------------------------
# affine layers: the bias drops out of the tangent


@register(F.linear, batch=Layer(2, at_least=True, layout="[B, ..., features]"), gram=True)
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
        result, columns = FirstLayer.apply(x, weight, bias, unit.reshape(-1))
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
    trace.track(result, tangents.linear(trace.tangent(x), weight, features=x.dim()))
    return result


class FirstLayer(torch.autograd.Function):
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


@register(*_PRODUCT_OF, batch=LINEAR_PROBE)
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

    trace.track(result, vmapped(fn, t))
    return result


_CONV = [F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d]


@register(*_CONV, batch=Layer(lambda args, kwargs: _weight(args, kwargs).dim(), layout=_conv_layout))
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
    box = trace.window(x)
    if box is not None and func in _SLIDING:
        trace.track(result, _conv_window(box, func, weight, args, kwargs, result))
        return result
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
    trace.track(result, per_sample(lambda u: func(u, weight, *rest, **kw), t))
    return result


_SLIDING = {F.conv1d, F.conv2d, F.conv3d}


def _per_dim(value: Any, rank: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * rank


def _conv_window(
    box: window.WindowTangent, func: Callable[..., Any], weight: Tensor, args: tuple[Any, ...],
    kwargs: dict[str, Any], result: Tensor,
) -> Any:
    """A convolution of a windowed tangent (:mod:`rollnet.engine.window`): on the box alone."""
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    bound = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **dict(zip(names, args, strict=False)), **kwargs}
    rank = weight.dim() - 2
    kernel = list(weight.shape[2:])
    stride, dilation = _per_dim(bound["stride"], rank), _per_dim(bound["dilation"], rank)
    padding = bound["padding"]
    if padding == "valid":
        left = [0] * rank
    elif padding == "same":  # torch pads the odd element at the end
        left = [d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True)]
    else:
        left = _per_dim(padding, rank)
    groups = int(bound["groups"])
    return window.conv(
        box, lambda u: func(u, weight, None, stride, 0, dilation, groups), kernel, stride, left, dilation,
        list(result.shape[2:]),
    )


@register(F.batch_norm, batch=Layer(2, at_least=True, layout="[B, C, ...]"), gram=True)
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
    factor = torch.rsqrt(var + bound["eps"])
    if bound["weight"] is not None:
        factor = factor * bound["weight"]
    per_channel = factor.reshape([1, -1] + [1] * (x.dim() - 2))
    trace.track(result, tangents.scale(trace.boxed_tangent(x), per_channel, per_feature=per_channel.squeeze(0)))
    return result


_POOLS = {
    1: [F.avg_pool1d, F.adaptive_avg_pool1d], 2: [F.avg_pool2d, F.adaptive_avg_pool2d],
    3: [F.avg_pool3d, F.adaptive_avg_pool3d],
}
_RESIZES = [F.interpolate, F.upsample_nearest, F.upsample]


def average_pool(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Averages, and nearest/linear resizing: linear maps applied per example."""
    x = args[0] if args else kwargs["input"]
    mode = kwargs.get("mode", args[3] if func is F.interpolate and len(args) > 3 else "nearest")
    if func in (F.interpolate, F.upsample) and mode not in ("nearest", "linear", "bilinear", "trilinear", "area", "nearest-exact"):
        raise trace.refuse(op_name(func), f"interpolation mode {mode!r} is not linear")
    result = func(*args, **kwargs)
    box = trace.window(x)
    if box is not None and func in _AVERAGES:
        windowed = _pool_window(box, func, args, kwargs, result)
        if windowed is not None:
            trace.track(result, windowed)
            return result
    t = trace.tangent(x)
    if t is None:
        trace.track(result, None)
        return result
    rest = args[1:]
    kw = {k: v for k, v in kwargs.items() if k != "input"}
    trace.track(result, per_sample(lambda u: func(u, *rest, **kw), t))
    return result


_AVERAGES = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


def _pool_window(
    box: window.WindowTangent, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
    result: Tensor,
) -> Any:
    """An average pool of a windowed tangent, when its divisor is the kernel's size everywhere
    (``count_include_pad``, no ``ceil_mode``, no ``divisor_override``); ``None`` otherwise."""
    names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
    bound = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None,
             **dict(zip(names, args, strict=False)), **kwargs}
    if bound["ceil_mode"] or not bound["count_include_pad"] or bound["divisor_override"] is not None:
        return None
    rank = _AVERAGES[func]
    kernel = _per_dim(bound["kernel_size"], rank)
    stride = kernel if bound["stride"] in (None, [], ()) else _per_dim(bound["stride"], rank)
    padding = _per_dim(bound["padding"], rank)
    return window.conv(
        box, lambda u: func(u, kernel, stride, 0), kernel, stride, padding, [1] * rank, list(result.shape[2:])
    )


for _spatial, _funcs in _POOLS.items():
    register(*_funcs, batch=Layer(_spatial + 2, layout=_conv_layout))(average_pool)
register(*_RESIZES, batch=Layer(3, at_least=True, layout="[B, C, *spatial]"))(average_pool)


@register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout, batch=ELEMENTWISE, gram=True)
def dropout(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ["input", "p", "training", "inplace"]
    bound = {"p": 0.5, "training": True, "inplace": False, **dict(zip(names, args, strict=False)), **kwargs}
    if "train" in kwargs:  # torch.dropout(input, p, train)
        bound["training"] = kwargs["train"]
    x = bound["input"]
    t = trace.boxed_tangent(x)
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
    trace.track(result, tangents.scale(t, mask))
    return result
