"""The registry of rules and the one dispatch every traced call goes through.

A rule is called with the running :class:`~rollnet.engine.tracing.Trace`, the
torch function and its arguments, whenever an argument depends on the input.
It computes the ordinary result, the tangent of that result
(``[K, *result.shape]``), and reports neurons for piecewise-linear calls.

:func:`register` maps torch callables to a rule together with the rule's
:class:`~rollnet.engine.rules.batch.BatchRole` (required: no rule exists
without one).  :func:`dispatch` enforces, for every rule alike:

- nothing unknown: a call with no rule is refused, naming the module path;
- batch independence: the role checks the inputs before the rule runs and
  places the batch dimension of every input-dependent result after it
  (or refuses the call);
- copies cut off from the input (``detach``, ``.data``) may be stored and
  logged, but are refused at their first use beside input-dependent tensors;
- the Gram recursion only meets the rules that declare they handle it;
- masks (comparisons of input-dependent values, constant inside the region,
  :data:`~rollnet.engine.tracing.MASK`) only meet the rules registered with
  :func:`register_mask_rule`: any other call that reads a mask is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from rollnet.engine.gram import GramUnsupported
from rollnet.engine.rules.batch import BatchRole, Call
from rollnet.engine.rules.common import result_tensors
from rollnet.engine.tracing import Trace, iter_values, op_name

__all__ = ["MASK_RULES", "RULES", "Dispatch", "Rule", "RuleEntry", "dispatch", "register", "register_mask_rule"]

Rule = Callable[[Trace, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
Dispatch = Callable[[Trace, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


@dataclass(frozen=True)
class RuleEntry:
    """A rule with its declarations.

    Attributes:
        rule: computes the result, its tangent and any neurons.
        batch: how the op treats the batch dimension.
        gram: whether the rule accepts a :class:`~rollnet.engine.gram.GramTangent`.
    """

    rule: Rule
    batch: BatchRole
    gram: bool = False

    def __call__(self, trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.rule(trace, func, args, kwargs)


RULES: dict[Any, RuleEntry] = {}
#: Rules for calls that read a mask (see :func:`register_mask_rule`).
MASK_RULES: dict[Any, RuleEntry] = {}


def register(
    *funcs: Any, batch: BatchRole, gram: bool = False, table: dict[Any, RuleEntry] | None = None
) -> Callable[[Rule], Rule]:
    """Register a rule for the given torch callables (decorator).

    Args:
        funcs: the torch functions and methods the rule handles (``None`` entries,
            for functions missing from this torch version, are skipped).
        batch: how the op treats the batch dimension (:mod:`rollnet.engine.rules.batch`).
        gram: the rule accepts the Gram recursion's tangents.
        table: where to register (default :data:`RULES`; :func:`register_mask_rule` uses
            :data:`MASK_RULES`).
    """
    if not isinstance(batch, BatchRole):
        raise TypeError("register(...) needs batch=<a BatchRole> saying how the op treats the batch")
    into = RULES if table is None else table

    def deco(rule: Rule) -> Rule:
        for f in funcs:
            if f is not None:
                into[f] = RuleEntry(rule, batch, gram)
        return rule

    return deco


def register_mask_rule(*funcs: Any, batch: BatchRole, gram: bool = False) -> Callable[[Rule], Rule]:
    """Register a rule for calls of ``funcs`` in which some argument is a mask (decorator).

    A call that reads a mask goes to these rules only (never to :data:`RULES`),
    so no rule that does not know masks ever sees one.  Arguments as for :func:`register`.
    """
    return register(*funcs, batch=batch, gram=gram, table=MASK_RULES)


# Calls that only read metadata: allowed on tracked tensors, results untracked.
_METADATA = {
    "dim", "size", "shape", "numel", "dtype", "device", "__len__", "is_contiguous",
    "stride", "ndim", "ndimension", "requires_grad", "is_floating_point", "is_complex",
    "get_device", "element_size", "nelement", "storage_offset", "layout", "is_cuda",
    "is_sparse", "is_leaf", "grad_fn", "data_ptr", "is_quantized", "is_meta", "__repr__",
    "__str__", "__format__", "names", "_version", "is_mkldnn", "is_nested", "requires_grad_",
    "retain_grad", "register_hook",
}
# Calls whose result depends on a tracked tensor's shape only (a constant).
_SHAPE_ONLY = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
}
# Copies cut off from the input: allowed, and refused at their first use.
_CUTS = {"detach", "detach_", "data"}
# Data leaving torch in bulk (logging): allowed; a NumPy array stays marked, so a tensor made
# from it again is refused at its use.
_EXPORTS = {"numpy", "tolist"}
# Python scalars from a tensor: the door to data-dependent control flow.
_SCALARS = {"item", "__bool__", "__float__", "__int__", "__index__", "__complex__"}
_IN_PLACE_WRITES = {"__setitem__", "index_put_", "masked_fill_", "masked_scatter_", "copy_", "fill_",
                    "zero_", "scatter_", "index_copy_", "index_fill_", "put_"}


def _name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return str(name)


def _writes_in_place(name: str) -> bool:
    return name in _IN_PLACE_WRITES or (name.endswith("_") and not name.startswith("_")) or (
        name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__init__")
    )


def dispatch(trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Apply the rule for ``func`` under the checks every rule shares; refuse what has no rule."""
    values = list(iter_values((*args, *kwargs.values())))
    tracked = [v for v in values if trace.is_tracked(v)]
    name = _name(func)
    if trace.any_tainted and any(trace.is_tainted(v) for v in values):
        return _on_cut_copy(trace, func, args, kwargs, name, bool(tracked))
    if name in _CUTS:
        result = func(*args, **kwargs)
        for r in result_tensors(result):
            trace.taint(r)
        return result
    reads_mask = trace.any_masks and any(trace.is_mask(t) for t in tracked)
    entry = (MASK_RULES if reads_mask else RULES).get(func)
    if entry is None:
        return _without_rule(trace, func, args, kwargs, name, reads_mask)
    if not entry.gram and any(trace.is_gram(t) for t in tracked):
        raise GramUnsupported(op_name(func))
    call = Call(op_name(func), func, args, kwargs, tracked, [trace.batch_dim(t) for t in tracked])
    entry.batch.check_inputs(trace, call)
    result = entry.rule(trace, func, args, kwargs)
    outs = []
    for r in result_tensors(result):
        if not trace.is_tracked(r):
            # computed from the input without a tangent (the indices of a max): usable only as data
            trace.taint(r)
        elif not (r.is_floating_point() or trace.is_mask(r)):
            raise trace.refuse(call.op, f"it turns an input-dependent tensor into {r.dtype}, which has no tangent")
        else:
            outs.append(r)
    if outs:
        call.result = result
        dims = entry.batch.result_dims(trace, call, outs)
        for r, d in zip(outs, dims, strict=True):
            trace.set_batch_dim(r, d)
    return result


def _on_cut_copy(
    trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str,
    with_tracked: bool,
) -> Any:
    """A call that reads a copy cut off from the input (``detach``, ``.data``, a NumPy copy)."""
    op = op_name(func)
    if with_tracked:
        raise trace.refuse(
            op, "it combines input-dependent tensors with a value computed from the input without "
            "a tangent (a detached copy: detach, .data, a NumPy copy; or the indices of a max), "
            "whose dependence on the input rollnet cannot follow; use the tensor itself, or "
            "compute the constant without the input",
        )
    if name == "__bool__":
        raise trace.refuse(
            op, "it branches on a detached copy of an input-dependent tensor (data-dependent "
            "control flow), which a certificate cannot follow",
        )
    result = func(*args, **kwargs)
    for r in (*result_tensors(result), *([result] if type(result).__module__ == "numpy" else [])):
        trace.taint(r)
    written = args[0] if args and _writes_in_place(name) else kwargs.get("out")
    if written is not None:  # a constant that now holds input-dependent data
        for w in iter_values([written]):
            if isinstance(w, Tensor):
                trace.taint(w)
    return result


def _without_rule(
    trace: Trace, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str,
    reads_mask: bool = False,
) -> Any:
    if name in _METADATA or name in _SHAPE_ONLY:
        # type_as / new_* with a tracked *template* only read its shape and dtype
        return func(*args, **kwargs)
    if name in _EXPORTS:
        result = func(*args, **kwargs)
        if type(result).__module__ == "numpy":
            trace.taint(result)
        return result
    if name in _SCALARS or name == "nonzero":
        what = "a mask computed from input-dependent values" if reads_mask else "an input-dependent tensor"
        reason = f"it turns {what} into Python data (data-dependent control flow)"
    elif reads_mask:
        reason = (
            "it reads a mask computed from input-dependent values (a comparison such as h > c) in a "
            "way rollnet does not know to be safe; masks may be combined (& | ~), converted "
            "(.float(), .to()), reshaped or indexed per example, and used as h * mask, "
            "torch.where(mask, a, b) or h.masked_fill(mask, value)"
        )
    elif name in _IN_PLACE_WRITES:
        reason = "in-place writes into input-dependent tensors are not supported; build a new tensor instead"
    else:
        reason = (
            "it is not an affine or piecewise-linear operation rollnet knows "
            "(see the README's list of supported layers and operations)"
        )
    raise trace.refuse(op_name(func), reason)
