"""Max units: MaxPool, adaptive MaxPool and maxout (``max``/``amax`` over a dimension).

A max unit over inputs u_1..u_k selects one of them; its part of the
activation pattern is the selected index (categorical, ``int64``).  With the
selection fixed the unit is linear (its output is u_sel), and its linear
region is cut out by the constraints u_sel(x') - u_i(x') >= 0 for every other
input i.  Each such difference is reported as a neuron with
``always_on=True``: it is >= 0 at x, and the pattern changes as soon as it
would become negative, so a difference of exactly 0 (a tie) gives margin 0.

Min units (``min``/``amin``/``minimum``) are the same with the constraints
u_i - u_sel >= 0.

Every unit is described by an *index map*: for each window m, the flat
positions (within one channel's plane) of its members, padding positions
excluded (they are not inputs).  Windows may overlap (stride < kernel), have
different sizes (padding, ``ceil_mode``, adaptive pooling) or a single member
(no neuron).  The selection comes from torch itself (``return_indices``, or
the indices of ``torch.max``), so the pattern is exactly torch's choice and the
same input always gives the same pattern.

Neurons of one call are ordered by channel (for maxout: by the position in
the kept dimensions), then window, then member in torch's scan order, with
the selected member skipped; the pattern part is ``[B, C * M]``: the selected
position of each unit within its channel's plane, exactly as torch's
``return_indices`` reports it (for maxout: the index within the flattened
reduced dimensions).  A tie whose two inputs have the same gradient (the
difference is identically zero in the region) imposes no constraint, like
any neuron with a zero gradient.

The rules here register themselves into :data:`rollnet.engine.rules.RULES`; they need
the batch first (dimension 0) and never reduce over it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollnet.engine.rules.batch import BATCH_FIRST_ELEMENTWISE, BatchRole, Call, Layer
from rollnet.engine.rules.common import broadcast_tangent
from rollnet.engine.rules.registry import register
from rollnet.engine.tracing import Trace, op_name

__all__ = ["adaptive_windows", "pool_windows"]


# ---------------------------------------------------------------------------
# index maps


def _window_positions(
    size: int, out: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[Tensor, Tensor]:
    """Along one dimension: ``[out, kernel]`` input positions of each window and their validity."""
    o = torch.arange(out).unsqueeze(1)
    k = torch.arange(kernel).unsqueeze(0)
    pos = o * stride - padding + k * dilation
    return pos, (pos >= 0) & (pos < size)


def _adaptive_positions(size: int, out: int) -> tuple[Tensor, Tensor]:
    """Along one dimension: windows [floor(o I / O), ceil((o + 1) I / O)) as in torch."""
    starts = [(o * size) // out for o in range(out)]
    ends = [-((-(o + 1) * size) // out) for o in range(out)]
    width = max(e - s for s, e in zip(starts, ends, strict=True))
    start = torch.tensor(starts).unsqueeze(1)
    end = torch.tensor(ends).unsqueeze(1)
    pos = start + torch.arange(width).unsqueeze(0)
    return pos, pos < end


def _combine(
    per_dim: Sequence[tuple[Tensor, Tensor]], sizes: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Cartesian product over dimensions: ``[M, W]`` flat plane positions and validity.

    Windows are in row-major order of the output positions, members in
    row-major order of the kernel offsets (torch's scan order).
    """
    n = len(per_dim)
    flat = torch.zeros((), dtype=torch.int64)
    valid = torch.ones((), dtype=torch.bool)
    plane_stride = 1
    for d in reversed(range(n)):
        pos, ok = per_dim[d]
        # output axis d at position d, kernel axis d at position n + d
        shape = [1] * (2 * n)
        shape[d], shape[n + d] = pos.shape
        flat = flat + pos.clamp(min=0).reshape(shape) * plane_stride
        valid = valid & ok.reshape(shape)
        plane_stride *= sizes[d]
    m = math.prod(p.shape[0] for p, _ in per_dim)
    w = math.prod(p.shape[1] for p, _ in per_dim)
    return flat.reshape(m, w), valid.reshape(m, w)


@functools.lru_cache(maxsize=128)
def _compact(key: tuple[Any, ...], device: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """The members of every window, valid ones first, and the neuron layout.

    Returns ``(members [M, Wv], keep, window_of)``: ``members[m, :v_m]`` are the
    valid positions of window m (``-1`` after), ``Wv = max v_m``.  Neuron slot
    ``(m, k)``, ``k < Wv - 1``, is the k-th unselected member; ``keep`` lists
    the flat slots ``m * (Wv - 1) + k`` that exist (``k < v_m - 1``), or is
    ``None`` when all do; ``window_of`` gives each kept slot's window.
    """
    kind, sizes, rest = key[0], key[1], key[2:]
    if kind == "pool":
        outs, kernel, stride, padding, dilation = rest
        per_dim = [
            _window_positions(sizes[d], outs[d], kernel[d], stride[d], padding[d], dilation[d])
            for d in range(len(sizes))
        ]
    elif kind == "adaptive":
        (outs,) = rest
        per_dim = [_adaptive_positions(sizes[d], outs[d]) for d in range(len(sizes))]
    else:  # "all": one window holding every position
        per_dim = [(torch.arange(sizes[0]).unsqueeze(0), torch.ones(1, sizes[0], dtype=torch.bool))]
    flat, valid = _combine(per_dim, sizes)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    members = torch.where(valid.gather(1, order), flat.gather(1, order), -1)
    counts = valid.sum(1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    members = members[:, :width]
    slots = width - 1
    k = torch.arange(slots).unsqueeze(0)
    exists = (k < (counts.unsqueeze(1) - 1)).flatten()
    window_of = torch.arange(members.shape[0]).repeat_interleave(slots)
    keep: Tensor | None = None
    if not bool(exists.all()):
        keep = exists.nonzero().flatten().to(device)
        window_of = window_of[exists]
    return members.to(device), keep, window_of.to(device)


def pool_windows(
    sizes: Sequence[int], outs: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """``[M, W]`` flat plane positions of every max-pool window's members and their validity.

    For inspection and tests; padding positions (and positions past the end
    with ``ceil_mode``) are marked invalid.
    """
    per_dim = [
        _window_positions(sizes[d], outs[d], kernel[d], stride[d], padding[d], dilation[d])
        for d in range(len(sizes))
    ]
    return _combine(per_dim, sizes)


def adaptive_windows(sizes: Sequence[int], outs: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``[M, W]`` flat plane positions of every adaptive max-pool window and their validity."""
    return _combine([_adaptive_positions(s, o) for s, o in zip(sizes, outs, strict=True)], sizes)


# ---------------------------------------------------------------------------
# the unit


def _max_unit(
    trace: Trace,
    op: str,
    u: Tensor,
    t: Tensor | None,
    sel: Tensor,
    key: tuple[Any, ...],
    sign: float,
) -> Tensor | None:
    """Report the differences of a family of max units; return the output tangent.

    Args:
        u: ``[B, C, P]`` inputs: C independent planes of P positions.
        t: ``[K, B, C, P]`` their tangents (or ``None``).
        sel: ``[B, C, M]`` selected plane position of each of the M windows.
        key: index-map description for :func:`_compact`.
        sign: +1 for max units, -1 for min units.

    Returns:
        ``[K, B, C, M]`` tangent of the unit outputs (the selected members'), or ``None``.
    """
    b, c = u.shape[0], u.shape[1]
    members, keep, window_of = _compact(key, str(u.device))
    m, width = members.shape
    slots = width - 1
    # position of the selected member within its window's list
    hit = members.unsqueeze(0).unsqueeze(0) == sel.unsqueeze(-1)  # [B, C, M, Wv]
    if not bool(hit.any(-1).all()):
        raise RuntimeError(f"internal error: {op} selected a position outside its window")
    at = hit.to(torch.int8).argmax(-1, keepdim=True)  # [B, C, M, 1]
    k = torch.arange(slots, device=u.device)
    slot = k + (k >= at).to(torch.int64)  # [B, C, M, slots]: skip the selected member
    others = members.expand(b, c, m, width).gather(3, slot).flatten(2)  # [B, C, M * slots]
    if keep is not None:
        others = others.index_select(2, keep)
    n_c = others.shape[2]

    # irregular windows: the selected position repeated for each kept neuron (gathers are
    # much faster than index_select on the tangents)
    sel_n = None if keep is None else sel.index_select(2, window_of)  # [B, C, n_c]
    u_oth = u.gather(2, others)  # [B, C, n_c]
    if sel_n is None:
        diff = u.gather(2, sel).unsqueeze(-1) - u_oth.view(b, c, m, slots)
    else:
        diff = u.gather(2, sel_n) - u_oth
    values = diff.reshape(b, c * n_c)
    if sign != 1.0:
        values = sign * values
    pattern = sel.detach().reshape(b, c * m).to(torch.int64)
    if t is None:
        trace.emit(op, values, None, pattern, always_on=True)
        return None

    kk = t.shape[0]
    t_sel = t.gather(3, sel.unsqueeze(0).expand(kk, b, c, m))  # [K, B, C, M]
    t_oth = t.gather(3, others.unsqueeze(0).expand(kk, b, c, n_c))
    if sel_n is None:
        t_diff = t_sel.unsqueeze(-1) - t_oth.view(kk, b, c, m, slots)
    else:
        t_diff = t.gather(3, sel_n.unsqueeze(0).expand(kk, b, c, n_c)) - t_oth
    tangents = t_diff.reshape(kk, b, c * n_c)
    if sign != 1.0:
        tangents = sign * tangents
    # The rule's own temporaries (gathered members and differences) are not
    # tracked tensors: count them so that the memory planner sees them.
    extra = 2 * tangents.numel() * tangents.element_size()
    trace.peak_bytes = max(trace.peak_bytes, trace.live_bytes + extra)
    trace.emit(op, values, tangents, pattern, always_on=True)
    return t_sel


def _checked_input(trace: Trace, op: str, x: Any, spatial: int | None) -> Tensor:
    if not isinstance(x, Tensor) or not trace.is_tracked(x):
        raise trace.refuse(op, "only the input of a max unit may depend on the model's input")
    if trace.validity(x) is not None:
        raise trace.refuse(op, "neuron_mask marks the input of an elementwise activation, not of a max unit")
    if not x.is_floating_point():
        raise trace.refuse(op, "input-dependent tensors must be floating point")
    b = trace.batch_size
    if x.dim() == 0 or x.shape[0] != b or (spatial is not None and x.dim() != spatial + 2):
        want = f"[B, C, {', '.join('*' * spatial)}]" if spatial else "[B, ...]"
        raise trace.refuse(
            op,
            f"its input has shape {tuple(x.shape)}; rollnet needs {want} with the batch size {b} "
            "first, to attribute the max units to examples",
        )
    return x


def _bind(names: Sequence[str], defaults: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **dict(zip(names, args, strict=False)), **kwargs}


def _tuple(value: Any, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return (int(value[0]),) * n
        if len(value) != n:
            raise ValueError(f"{name} must have {n} entries, got {value!r}")
        return tuple(int(v) for v in value)
    return (int(value),) * n


# ---------------------------------------------------------------------------
# MaxPool


_WITH_INDICES: dict[int, Callable[..., Any]] = {
    1: F.max_pool1d_with_indices, 2: F.max_pool2d_with_indices, 3: F.max_pool3d_with_indices,
}
_ADAPTIVE_WITH_INDICES: dict[int, Callable[..., Any]] = {
    1: F.adaptive_max_pool1d_with_indices, 2: F.adaptive_max_pool2d_with_indices,
    3: F.adaptive_max_pool3d_with_indices,
}

# func -> (spatial dims, whether it returns indices: True, False, or None = its return_indices argument)
_POOLS: dict[Any, tuple[int, bool | None]] = {
    F.max_pool1d: (1, None), F.max_pool2d: (2, None), F.max_pool3d: (3, None),
    F.max_pool1d_with_indices: (1, True), F.max_pool2d_with_indices: (2, True),
    F.max_pool3d_with_indices: (3, True),
    torch.max_pool1d: (1, False), torch.max_pool2d: (2, False), torch.max_pool3d: (3, False),
    torch.max_pool1d_with_indices: (1, True),
    torch._C._nn.max_pool2d_with_indices: (2, True), torch._C._nn.max_pool3d_with_indices: (3, True),
}
_ADAPTIVE: dict[Any, tuple[int, bool | None]] = {
    F.adaptive_max_pool1d: (1, None), F.adaptive_max_pool2d: (2, None),
    F.adaptive_max_pool3d: (3, None),
    F.adaptive_max_pool1d_with_indices: (1, True), F.adaptive_max_pool2d_with_indices: (2, True),
    F.adaptive_max_pool3d_with_indices: (3, True),
    torch.adaptive_max_pool1d: (1, True),
    torch._C._nn.adaptive_max_pool2d: (2, True), torch._C._nn.adaptive_max_pool3d: (3, True),
}


def _finish_pool(trace: Trace, op: str, x: Tensor, out: Tensor, sel: Tensor, key: tuple[Any, ...]) -> None:
    """Report the pooling's max units and track its output."""
    b, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])  # (not -1: an empty batch has no size to infer)
    u = x.reshape(b, c, s)
    t = trace.tangent(x)
    tf = None if t is None else t.reshape(t.shape[0], b, c, s)
    t_sel = _max_unit(trace, op, u, tf, sel.reshape(b, c, math.prod(sel.shape[2:])), key, 1.0)
    trace.track(out, None if t_sel is None else t_sel.reshape(t_sel.shape[0], *out.shape))


def max_pool(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """MaxPool1d/2d/3d, any kernel, stride, padding, dilation and ceil_mode."""
    spatial, returns = _POOLS[func]
    op = f"max_pool{spatial}d"
    names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    bound = _bind(names, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                          "return_indices": False}, args, kwargs)
    x = _checked_input(trace, op_name(func), bound["input"], spatial)
    kernel = _tuple(bound["kernel_size"], spatial, "kernel_size")
    stride_arg = bound["stride"]
    stride = kernel if stride_arg is None or (isinstance(stride_arg, (list, tuple)) and not stride_arg) \
        else _tuple(stride_arg, spatial, "stride")
    padding = _tuple(bound["padding"], spatial, "padding")
    dilation = _tuple(bound["dilation"], spatial, "dilation")
    out, sel = _WITH_INDICES[spatial](x, kernel, stride, padding, dilation, bool(bound["ceil_mode"]))
    key = ("pool", tuple(x.shape[2:]), tuple(out.shape[2:]), kernel, stride, padding, dilation)
    _finish_pool(trace, op, x, out, sel, key)
    with_indices = bool(bound["return_indices"]) if returns is None else returns
    return (out, sel) if with_indices else out


def adaptive_max_pool(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """AdaptiveMaxPool1d/2d/3d (windows [floor(o I / O), ceil((o + 1) I / O)))."""
    spatial, returns = _ADAPTIVE[func]
    op = f"adaptive_max_pool{spatial}d"
    bound = _bind(["input", "output_size", "return_indices"], {"return_indices": False}, args, kwargs)
    x = _checked_input(trace, op_name(func), bound["input"], spatial)
    out, sel = _ADAPTIVE_WITH_INDICES[spatial](x, bound["output_size"])
    key = ("adaptive", tuple(x.shape[2:]), tuple(out.shape[2:]))
    _finish_pool(trace, op, x, out, sel, key)
    with_indices = bool(bound["return_indices"]) if returns is None else returns
    return (out, sel) if with_indices else out


for _spatial in (1, 2, 3):
    _layout = Layer(_spatial + 2, layout="[B, C, " + ", ".join("*" * _spatial) + "]")
    register(*[f for f, (s, _) in _POOLS.items() if s == _spatial], batch=_layout)(max_pool)
    register(*[f for f, (s, _) in _ADAPTIVE.items() if s == _spatial], batch=_layout)(adaptive_max_pool)


# ---------------------------------------------------------------------------
# maxout: max / amax (and min / amin) over dimensions


_REDUCE: dict[Any, tuple[str, bool]] = {  # func -> (op, returns (values, indices) when given a dim)
    torch.max: ("max", True), torch.Tensor.max: ("max", True),
    torch.min: ("min", True), torch.Tensor.min: ("min", True),
    torch.amax: ("amax", False), torch.Tensor.amax: ("amax", False),
    torch.amin: ("amin", False), torch.Tensor.amin: ("amin", False),
}
_ELEMENTWISE: dict[Any, str] = {
    torch.maximum: "maximum", torch.Tensor.maximum: "maximum",
    torch.minimum: "minimum", torch.Tensor.minimum: "minimum",
}


def _dims(trace: Trace, op: str, dim: Any, ndim: int) -> list[int]:
    dims = [int(d) for d in dim] if isinstance(dim, (list, tuple)) else [int(dim)]
    if not dims:  # amax(x) / amax(x, ()) reduces every dimension
        dims = list(range(ndim))
    dims = sorted({d % ndim for d in dims})
    if 0 in dims:
        raise trace.refuse(
            op,
            "it takes a maximum over the batch dimension, which mixes the examples of a batch; "
            "reduce over the other dimensions (maxout: x.amax(dim=...) with dim >= 1)",
        )
    return dims


class _MaxReduction(BatchRole):
    """``max(x, dim)`` keeps the batch first (the rule refuses dim 0); ``max(a, b)`` is elementwise."""

    def check_inputs(self, trace: Trace, call: Call) -> None:
        if _pairwise(call.args, call.kwargs):
            BATCH_FIRST_ELEMENTWISE.check_inputs(trace, call)
        else:
            _BATCH_FIRST.check_inputs(trace, call)

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        if _pairwise(call.args, call.kwargs):
            return BATCH_FIRST_ELEMENTWISE.result_dims(trace, call, results)
        return _BATCH_FIRST.result_dims(trace, call, results)


_BATCH_FIRST = Layer(1, at_least=True, layout="[B, ...]")


def _pairwise(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    other = args[1] if len(args) > 1 else kwargs.get("other")
    return isinstance(other, Tensor)


@register(*_REDUCE, batch=_MaxReduction())
def reduce_max(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Maxout: ``torch.max(x, dim)``, ``x.amax(dims)`` (and min, amin) over non-batch dimensions."""
    op, has_indices = _REDUCE[func]
    name = op_name(func)
    x = args[0] if args else kwargs.get("input")
    rest = list(args[1:])
    other = rest[0] if rest else kwargs.get("other")
    if has_indices and isinstance(other, Tensor):  # torch.max(a, b): elementwise
        return _elementwise(trace, func, "maximum" if op == "max" else "minimum", x, other, kwargs)
    if "out" in kwargs:
        raise trace.refuse(name, "the out= argument is not supported")
    dim = rest[0] if rest else kwargs.get("dim", () if not has_indices else None)
    if dim is None:
        raise trace.refuse(
            name,
            "a maximum over the whole tensor mixes the examples of a batch; give dim (maxout: "
            "x.max(dim=...) or x.amax(dim=...) over non-batch dimensions)",
        )
    x = _checked_input(trace, name, x, None)
    dims = _dims(trace, name, dim, x.dim())
    result = func(*args, **kwargs)
    b = x.shape[0]
    kept = [d for d in range(x.dim()) if d not in dims]
    moved = x.permute(*kept, *dims)
    width = math.prod(x.shape[d] for d in dims)
    units = math.prod(x.shape[d] for d in kept[1:])  # (not -1: an empty batch has no size to infer)
    u = moved.reshape(b, units, width)
    if has_indices:
        values, sel = result[0], result[1]
        sel = sel.reshape(b, units, 1)
    else:
        values = result
        picked = torch.max(u, -1) if op == "amax" else torch.min(u, -1)
        sel = picked.indices.unsqueeze(-1)
    t = trace.tangent(x)
    tu = None
    if t is not None:
        tu = t.permute(0, *[d + 1 for d in kept], *[d + 1 for d in dims]).reshape(t.shape[0], b, units, width)
    sign = 1.0 if op in ("max", "amax") else -1.0
    t_sel = _max_unit(trace, op, u, tu, sel, ("all", (width,)), sign)
    trace.track(values, None if t_sel is None else t_sel.reshape(t_sel.shape[0], *values.shape))
    return result


@register(*_ELEMENTWISE, batch=BATCH_FIRST_ELEMENTWISE)
def elementwise_max(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.maximum(a, b)`` (and minimum): a max unit of two inputs per element."""
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other")
    return _elementwise(trace, func, _ELEMENTWISE[func], a, b, kwargs)


def _elementwise(
    trace: Trace, func: Callable[..., Any], op: str, a: Any, b: Any, kwargs: dict[str, Any]
) -> Any:
    name = op_name(func)
    if "out" in kwargs:
        raise trace.refuse(name, "the out= argument is not supported")
    tracked = [v for v in (a, b) if trace.is_tracked(v)]
    for v in tracked:
        if not v.is_floating_point():
            raise trace.refuse(name, "input-dependent tensors must be floating point")
    result = func(a, b)
    bsz = trace.batch_size
    if result.dim() == 0 or result.shape[0] != bsz:
        raise trace.refuse(
            name,
            f"its result has shape {tuple(result.shape)}, whose first dimension is not the batch "
            f"size {bsz}; rollnet needs the batch first to attribute the max units to examples",
        )
    shape = result.shape
    av = torch.as_tensor(a, dtype=result.dtype, device=result.device).expand(shape)
    bv = torch.as_tensor(b, dtype=result.dtype, device=result.device).expand(shape)
    units = math.prod(shape[1:])  # (not -1: an empty batch has no size to infer)
    u = torch.stack([av, bv], dim=-1).reshape(bsz, units, 2)
    pick_b = (bv > av) if op == "maximum" else (bv < av)
    sel = pick_b.to(torch.int64).reshape(bsz, units, 1)
    tangents = [trace.tangent(v) if trace.is_tracked(v) else None for v in (a, b)]
    present = [tg for tg in tangents if tg is not None]
    tu = None
    if present:
        kk = present[0].shape[0]
        zero = present[0].new_zeros(())
        full = [
            zero.expand(kk, *shape) if tg is None else broadcast_tangent(tg, shape)
            for tg in tangents
        ]
        tu = torch.stack(full, dim=-1).reshape(kk, bsz, units, 2)
    sign = 1.0 if op == "maximum" else -1.0
    t_sel = _max_unit(trace, op, u, tu, sel, ("all", (2,)), sign)
    trace.track(result, None if t_sel is None else t_sel.reshape(t_sel.shape[0], *shape))
    return result
