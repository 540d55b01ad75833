"""How each rule treats the batch dimension: declared by the rule, enforced by the dispatch.

A certificate is a statement about one example: the radius around ``x[b]`` in
which ``model(x)[b]`` stays linear.  It is only true if example b's neurons and
output depend on ``x[b]`` alone.  Every tracked tensor therefore carries its
*batch dimension* (see :class:`~rollnet.engine.tracing.Trace`), and every rule
is registered with a :class:`BatchRole` that says how its op maps it:

- :data:`ELEMENTWISE` (and :data:`BATCH_FIRST_ELEMENTWISE` for ops that
  report neurons): the op works element by element after broadcasting, so
  the batch dimension is where broadcasting puts it; every input-dependent
  operand must agree on it.
- :class:`Layer`: the op treats dimension 0 as its batch (Linear, Conv,
  BatchNorm, pooling); its input must have the batch first and the rank of
  the batched form (an unbatched image to a convolution would treat the
  examples as channels).
- :data:`RESHAPE`: order-preserving reshapes; the batch dimension must survive
  as a whole dimension (not merged with or split into others).
- :data:`LINEAR_PROBE`: any op linear in its input-dependent operands (indexing,
  concatenation, reductions, permutations, contractions such as ``einsum``):
  the batch dimension of the result is *measured*, by running the op on random
  inputs restricted to subsets of the examples and checking that nothing
  leaks into the other examples' slices (exact for linear ops; see
  :func:`probe_batch_dims`).

The dispatch (:func:`rollnet.engine.rules.registry.dispatch`) calls the role
before and after every rule and records the batch dimension of every tracked
result; a rule cannot be registered without a role.  A role that cannot place
the batch dimension refuses the call with :class:`UnsupportedOperationError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rollnet.engine.rules.common import result_tensors, substitute
from rollnet.engine.tracing import Trace

__all__ = [
    "BATCH_FIRST_ELEMENTWISE",
    "ELEMENTWISE",
    "INDEXING",
    "LINEAR_PROBE",
    "MATRIX_PRODUCT",
    "RESHAPE",
    "BatchRole",
    "Call",
    "Elementwise",
    "Indexing",
    "Layer",
    "LinearProbe",
    "MatrixProduct",
    "Reshape",
    "probe_batch_dims",
]

MIXES = (
    "its result mixes the examples of the batch: a value of one example would depend on another "
    "example (a reduction, reordering, indexing or contraction along the batch dimension); "
    "rollnet certifies each example on its own, so every example must be computed from its own "
    "input only"
)


@dataclass
class Call:
    """One call of a torch function on input-dependent tensors, as a batch role sees it.

    Attributes:
        op: the function's readable name (for messages).
        func, args, kwargs: the call.
        tracked: its input-dependent operands, in argument order.
        in_dims: their batch dimensions (read before the rule ran).
        result: what the call returned (set once the rule has run).
    """

    op: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tracked: list[Tensor]
    in_dims: list[int]
    result: Any = None

    def operand_dim(self, value: Tensor) -> int:
        """The batch dimension of one of the tracked operands."""
        return self.in_dims[next(i for i, t in enumerate(self.tracked) if t is value)]


class BatchRole:
    """How an op maps the batch dimension of its input-dependent operands to its results.

    Subclasses implement :meth:`result_dims` (given the input-dependent result
    tensors, in the order the op returned them); :meth:`check_inputs` runs before the op.
    """

    def check_inputs(self, trace: Trace, call: Call) -> None:
        """Refuse inputs whose batch dimension the op would not treat as a batch."""

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        """The batch dimension of each input-dependent result (or refuse the call)."""
        raise NotImplementedError


def _sized(trace: Trace, op: str, result: Tensor, dim: int) -> int:
    if not 0 <= dim < result.dim() or result.shape[dim] != trace.batch_size:
        raise trace.refuse(op, f"{MIXES} (result of shape {tuple(result.shape)})")
    return dim


class Elementwise(BatchRole):
    """Element-by-element ops after broadcasting (additions, products with constants, activations).

    Args:
        batch_first: the op reports neurons, which are attributed to examples by
            dimension 0: every input-dependent operand must have its batch first
            and the result's rank.
    """

    def __init__(self, batch_first: bool = False) -> None:
        self.batch_first = batch_first

    def check_inputs(self, trace: Trace, call: Call) -> None:
        if not self.batch_first:
            return
        for t, d in zip(call.tracked, call.in_dims, strict=True):
            if d != 0:
                raise trace.refuse(
                    call.op,
                    f"its input-dependent operand of shape {tuple(t.shape)} has the examples along "
                    f"dimension {d}; rollnet needs the batch first at every activation to attribute "
                    "neurons to examples",
                )

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        dims = []
        for r in results:
            aligned = {d + r.dim() - t.dim() for t, d in zip(call.tracked, call.in_dims, strict=True)}
            if len(aligned) != 1:
                raise trace.refuse(
                    call.op, f"{MIXES} (its input-dependent operands have their examples along different "
                    "dimensions after broadcasting)",
                )
            (d,) = aligned
            if self.batch_first and d != 0:
                raise trace.refuse(
                    call.op, "broadcasting moves the examples off the first dimension; rollnet needs the "
                    "batch first to attribute neurons to examples",
                )
            dims.append(_sized(trace, call.op, r, d))
        return dims


ELEMENTWISE = Elementwise()
BATCH_FIRST_ELEMENTWISE = Elementwise(batch_first=True)


class Layer(BatchRole):
    """Ops whose dimension 0 is their batch: Linear, Conv, BatchNorm, pooling, resizing.

    Args:
        rank: the rank of the op's batched input: an ``int``, or a function of the
            call's ``(args, kwargs)`` (a convolution: its weight's rank); with
            ``at_least=True`` a minimum.
        layout: the expected layout for messages, such as ``"[B, C, H, W]"``.
    """

    def __init__(
        self, rank: int | Callable[[tuple[Any, ...], dict[str, Any]], int], *,
        at_least: bool = False, layout: str | Callable[[int], str] = "",
    ) -> None:
        self.rank = rank
        self.at_least = at_least
        self.layout = layout

    def check_inputs(self, trace: Trace, call: Call) -> None:
        x = call.args[0] if call.args else call.kwargs.get("input")
        if not isinstance(x, Tensor) or not trace.is_tracked(x):
            return  # the rule refuses input-dependent parameters itself
        d = call.operand_dim(x)
        rank = self.rank(call.args, call.kwargs) if callable(self.rank) else self.rank
        ok_rank = x.dim() >= rank if self.at_least else x.dim() == rank
        layout = self.layout(rank) if callable(self.layout) else self.layout
        want = layout or f"rank {rank}{' or more' if self.at_least else ''}, batch first"
        if not ok_rank:
            hint = ""
            if x.dim() == rank - 1 and not self.at_least:
                hint = (
                    " (an unbatched example? give a batch: x.unsqueeze(0); without one the op "
                    "would treat the examples as channels)"
                )
            raise trace.refuse(
                call.op, f"it expects inputs of shape {want}, got a tensor of shape {tuple(x.shape)}{hint}"
            )
        if d != 0:
            raise trace.refuse(
                call.op, f"its input of shape {tuple(x.shape)} has the examples along dimension {d}; "
                f"the op treats dimension 0 as the batch (expected {want})",
            )

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        return [_sized(trace, call.op, r, 0) for r in results]


class Reshape(BatchRole):
    """Order-preserving reshapes (view, reshape, flatten, unflatten, squeeze, unsqueeze, clone).

    Elements keep their row-major order, so the batch dimension d (size B, with
    P elements of the dimensions before it) survives when the result has a
    dimension of size B after exactly P elements' worth of leading dimensions.
    Otherwise the reshape merges the examples with another dimension or splits
    them, and is refused.
    """

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        source = call.args[0] if call.args else call.kwargs.get("input")
        if not isinstance(source, Tensor) or not any(t is source for t in call.tracked) or len(results) != 1:
            return probe_batch_dims(trace, call, results)
        d = call.operand_dim(source)
        before = math.prod(source.shape[:d])
        (r,) = results
        b = trace.batch_size
        places = [i for i in range(r.dim()) if r.shape[i] == b and math.prod(r.shape[:i]) == before]
        if not places:
            raise trace.refuse(
                call.op,
                f"it reshapes {tuple(source.shape)} (examples along dimension {d}) to "
                f"{tuple(r.shape)}, which merges the examples with another dimension or splits "
                "them; keep the batch as its own dimension (for example x.flatten(1), "
                "x.view(x.shape[0], -1))",
            )
        if len(places) > 1:  # only with one example: dimensions of size 1 are ambiguous
            suffix = [i for i in places if r.shape[i + 1 :] == source.shape[d + 1 :]]
            prefix = [i for i in places if r.shape[:i] == source.shape[:d]]
            places = suffix or prefix or ([d] if d in places else places)
        return [places[0]]


RESHAPE = Reshape()


def _kept(u: Tensor, dim: int, keep: Tensor) -> Tensor:
    """``u`` with the examples outside ``keep`` (along ``dim``) set to zero."""
    shape = [1] * u.dim()
    shape[dim] = u.shape[dim]
    return u * keep.to(device=u.device, dtype=u.dtype).reshape(shape)


def probe_batch_dims(trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
    """Measure where an op that is affine in its tracked operands puts the batch dimension.

    For each bit of the example index, the op runs on random inputs kept only on
    the examples whose bit is set, and on those whose bit is clear.  Minus the
    op's value at zero, a result slice of an example outside the kept set must
    then be exactly zero along the batch dimension: any two distinct examples
    differ in some bit, so a value of example b' that depends on example b != b'
    is caught by the subset that keeps b but not b'.  (An affine op whose
    coefficients cancel exactly on random inputs would escape; that has
    probability zero.)  2 ceil(log2 B) + 1 calls of the op on value-sized inputs.
    """
    b = trace.batch_size
    func, args, kwargs, tracked, in_dims = call.func, call.args, call.kwargs, call.tracked, call.in_dims
    outs = result_tensors(call.result)
    where = [next(i for i, o in enumerate(outs) if o is r) for r in results]
    candidates = [[d for d in range(r.dim()) if r.shape[d] == b] for r in results]
    if b > 1 and all(candidates):

        def run(values: list[Tensor]) -> list[Tensor]:
            with torch.no_grad():
                got = result_tensors(
                    func(*substitute(args, swap(values)), **substitute(kwargs, swap(values)))
                )
            return [got[i] for i in where]

        def swap(values: list[Tensor]) -> dict[int, Any]:
            return {id(t): v for t, v in zip(tracked, values, strict=True)}

        base = run([torch.zeros_like(t) for t in tracked])
        gen = trace.probe_generator()
        noise = [
            torch.rand(t.shape, generator=gen, dtype=torch.float64).to(dtype=t.dtype, device=t.device) + 0.5
            for t in tracked
        ]
        index = torch.arange(b)
        for bit in range(max(1, math.ceil(math.log2(b)))):
            on = (index >> bit) & 1 == 1
            for keep in (on, ~on):
                if bool(keep.all()) or not bool(keep.any()):
                    continue
                got = run([_kept(u, d, keep) for u, d in zip(noise, in_dims, strict=True)])
                off = (~keep).nonzero().flatten()
                for i, (g, z) in enumerate(zip(got, base, strict=True)):
                    idx = off.to(g.device)
                    candidates[i] = [
                        d for d in candidates[i] if torch.equal(g.index_select(d, idx), z.index_select(d, idx))
                    ]
    dims = []
    for r, c in zip(results, candidates, strict=True):
        if not c:
            raise trace.refuse(call.op, f"{MIXES} (result of shape {tuple(r.shape)})")
        # with one example every dimension of size 1 passes: prefer the operand's own dimension
        same = [d for t, d in zip(tracked, in_dims, strict=True) if t.dim() == r.dim() and d in c]
        dims.append(same[0] if same else c[0])
    return dims


class LinearProbe(BatchRole):
    """Ops affine in their input-dependent operands; the batch dimension is measured
    (:func:`probe_batch_dims`)."""

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        return probe_batch_dims(trace, call, results)


LINEAR_PROBE = LinearProbe()


def _basic_index(index: Any) -> tuple[Any, ...] | None:
    """The index as a tuple if it is basic (ints, slices, None, Ellipsis), else ``None``."""
    items = index if isinstance(index, tuple) else (index,)
    if all(i is None or i is Ellipsis or (isinstance(i, (int, slice)) and not isinstance(i, bool)) for i in items):
        return items
    return None


class Indexing(BatchRole):
    """``x[index]``: with basic indexing the batch dimension is followed through the index (it must
    be kept whole: ``x[:, t]``); advanced indexing (tensors, lists, masks) is measured."""

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        x = call.args[0]
        items = _basic_index(call.args[1]) if len(call.args) > 1 else None
        if items is None or len(results) != 1 or not any(t is x for t in call.tracked):
            return probe_batch_dims(trace, call, results)
        d = call.operand_dim(x)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        if sum(1 for i in items if i is Ellipsis) > 1:
            return probe_batch_dims(trace, call, results)
        expanded: list[Any] = []
        for i in items:
            expanded.extend([slice(None)] * (x.dim() - used) if i is Ellipsis else [i])
        expanded.extend([slice(None)] * (x.dim() - sum(1 for i in expanded if i is not None)))
        src, out = 0, 0
        for i in expanded:
            if i is None:
                out += 1
                continue
            if src == d:
                whole = isinstance(i, slice) and range(*i.indices(x.shape[d])) == range(x.shape[d])
                if not whole:
                    raise trace.refuse(
                        call.op, f"{MIXES} (it indexes the batch dimension {d} of a tensor of shape "
                        f"{tuple(x.shape)} with {i!r}; keep every example: x[:, ...])",
                    )
                return [_sized(trace, call.op, results[0], out)]
            src += 1
            out += 0 if isinstance(i, int) else 1
        raise RuntimeError("internal error: the batch dimension was not met while indexing")


INDEXING = Indexing()


class MatrixProduct(BatchRole):
    """``a @ b`` (matmul, mm, bmm, mv) with one input-dependent factor: its batch dimension must not
    be the contracted one; otherwise it keeps its place among the rows, the columns or the leading
    (broadcast) dimensions of the product."""

    def result_dims(self, trace: Trace, call: Call, results: list[Tensor]) -> list[int]:
        a, b = (*call.args, None, None)[:2]
        if len(results) != 1 or len(call.tracked) != 1 or not isinstance(a, Tensor) or not isinstance(b, Tensor):
            return probe_batch_dims(trace, call, results)
        (r,) = results
        (t,) = call.tracked
        d = call.in_dims[0]
        first = t is a
        rank, other = (a.dim(), b.dim()) if first else (b.dim(), a.dim())
        contracted = rank - 1 if first or rank == 1 else rank - 2
        if d == contracted:
            raise trace.refuse(call.op, f"{MIXES} (the product sums over the batch dimension)")
        if first:
            dim = d if other == 1 else d + r.dim() - rank
        elif d == rank - 1:
            dim = r.dim() - 1
        else:
            dim = d if other == 1 else d + r.dim() - rank
        return [_sized(trace, call.op, r, dim)]


MATRIX_PRODUCT = MatrixProduct()
