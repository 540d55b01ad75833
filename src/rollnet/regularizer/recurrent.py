"""A fused pass for Elman recurrences: the ROLL term of a recurrent net, using causality.

For ``z_t = W_in x_t + b + W h_{t-1}``, ``h_t = act(z_t)`` (padded steps keep
``h``), the gradient of a step-t neuron with respect to the input at step s is
zero for s > t: a tangent along time step s is zero before step s.  The generic
engine pushes all D = T C input axes through every step; this pass keeps, at
step t, only the (t + 1) C axes of the steps so far:

    G_t = [G_{t-1} W^T ; W_in^T] * slope(z_t)      ([B, (t + 1) C, H] per example)

so the exact term costs sum_t t C H^2 per example instead of T^2 C H^2: about
half (``benchmarks/bench_recurrent.py``).  The approximate term pushes its k
directions per example the same way (no causality to use there).  Everything
is ordinary torch operations, differentiated by autograd.

The result is the engine's computation (the same neurons, in the same order:
step by step, H per step; the same slopes at z = 0; padded steps not neurons),
checked against it in ``tests/regularizer/test_recurrent.py``.

**Declaring a recurrence.**  A model declares what its ``forward(x, lengths=None)``
computes with ``elman_recurrence()`` (:class:`DeclaresRecurrence`), honoured, as
for chains (:mod:`rollnet.regularizer.chain`), only from the class that also
defines the ``forward`` in use, without hooks.  :class:`rollnet.models.ElmanRNN`
and :class:`rollnet.models.ScoRNN` declare themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollnet.engine.gradients import Directions
from rollnet.engine.rules.activations import slopes as activation_slopes
from rollnet.regularizer.chain import (
    autocast_on,
    declaration,
    global_hooks,
    hooked,
    unwrap_parallel,
)
from rollnet.regularizer.hinge import hinge

__all__ = ["DeclaresRecurrence", "Recurrence", "find_recurrence", "recurrent_fusable", "recurrent_terms"]


@dataclass(frozen=True)
class Recurrence:
    """What an Elman model's ``forward(x, lengths=None)`` computes.

    ``h_0 = 0``; for each step t (all T steps without lengths, else
    ``max(lengths)`` of them): ``z_t = input(x[:, t]) + h_{t-1} W^T``,
    ``h_t = leaky_relu(z_t, negative_slope)`` where ``t < lengths`` (the
    pre-activation marked with :func:`rollnet.neuron_mask`) and ``h_{t-1}``
    elsewhere; the logits are ``output(h_T)``.

    Attributes:
        input: the input layer (weights ``[H, C]`` and the bias).
        weight: the recurrent matrix W ``[H, H]``, as computed for this pass
            (differentiable in the parameters it is made from).
        negative_slope: the activation's slope for negative inputs (0 for ReLU).
        output: the read-out layer ``[L, H]``.
    """

    input: nn.Linear
    weight: Tensor
    negative_slope: float
    output: nn.Linear


@runtime_checkable
class DeclaresRecurrence(Protocol):
    """A model whose ``forward(x, lengths=None)`` is the Elman recurrence :class:`Recurrence` describes.

    ``elman_recurrence()`` returns it (computing W afresh), or ``None`` when
    this instance is not such a recurrence.
    """

    def elman_recurrence(self) -> Recurrence | None: ...


def find_recurrence(model: nn.Module) -> Recurrence | None:
    """The recurrence ``model`` declares, or ``None`` when the fused pass does not apply (no
    declaration, a ``forward`` the declaring class does not define, hooks).  A
    ``DistributedDataParallel`` (or ``DataParallel``) wrapper is seen through (its ``.module``)."""
    model = unwrap_parallel(model)
    declare = declaration(model, "elman_recurrence")
    if declare is None or global_hooks() or "forward" in model.__dict__:
        return None
    if any(hooked(m) for m in model.modules()):
        return None
    rec = declare()
    if rec is None:
        return None
    if not isinstance(rec, Recurrence):
        raise TypeError(f"{type(model).__name__}.elman_recurrence() must return a Recurrence or None, got {rec!r}")
    return rec


def _lengths(args: tuple[Any, ...]) -> tuple[bool, Tensor | None]:
    """``(ok, lengths)`` from the model's further arguments: none, or one lengths tensor (or None)."""
    if not args:
        return True, None
    if len(args) != 1:
        return False, None
    (lengths,) = args
    if lengths is None:
        return True, None
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.dtype.is_floating_point:
        return False, None
    return True, lengths


def recurrent_fusable(rec: Recurrence, x: Tensor, directions: Directions, args: tuple[Any, ...]) -> bool:
    """Whether :func:`recurrent_terms` computes what the engine would on ``model(x, *args)``:
    ``x`` ``[B, T, C]`` with C the input layer's inputs, at most one further argument (valid
    lengths), parameters in x's dtype and device, no autocast, and x not needing its own
    gradient; otherwise the engine runs the model (and gives its own errors)."""
    ok, lengths = _lengths(args)
    if not ok or x.dim() != 3 or x.shape[0] == 0 or x.shape[2] != rec.input.in_features:
        return False
    if lengths is not None:
        if lengths.shape[0] != x.shape[0] or lengths.device != x.device:
            return False
        if bool(((lengths < 1) | (lengths > x.shape[1])).any()):
            return False  # (the model refuses them in its own words)
    if x.requires_grad or autocast_on(x.device.type):
        return False
    for p in (rec.input.weight, rec.input.bias, rec.weight, rec.output.weight, rec.output.bias):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return False
    if directions.vectors is not None:
        return directions.vectors.dim() == x.dim() + 1  # one set per example
    return directions.indices is not None


def _input_tangents(directions: Directions, x: Tensor) -> Tensor:
    """``[B, k, T, C]`` the input tangents of per-example directions (sampled axes or vectors)."""
    b, t, c = x.shape
    if directions.vectors is not None:
        return directions.vectors.to(device=x.device, dtype=x.dtype).transpose(0, 1)
    assert directions.indices is not None and directions.indices.dim() == 2
    idx = directions.indices.to(x.device).t()  # [B, k]
    onehot = torch.zeros(b, idx.shape[1], t * c, dtype=x.dtype, device=x.device)
    onehot.scatter_(2, idx.unsqueeze(-1), 1.0)
    return onehot.view(b, idx.shape[1], t, c)


def recurrent_terms(
    rec: Recurrence, x: Tensor, args: tuple[Any, ...], directions: Directions, scale: float, C: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The logits, the ``[B, N]`` bracketed ROLL term of every neuron, and which are neurons.

    Args:
        rec: the model's recurrence (:func:`find_recurrence`).
        x: ``[B, T, C]`` inputs; ``args``: ``()`` or ``(lengths,)`` as the model takes them.
        directions: all D = T C input axes (the exact term, by causality) or per-example
            directions (sampled axes ``[k, B]`` or vectors ``[k, B, T, C]``).
        scale: the estimator's factor on the summed squares (1 for the exact term).
        C: the hinge's weight.

    Returns:
        ``(logits [B, L], terms [B, N], valid [B, N] or None)`` with N = H times the steps
        run, ``terms = scale * ||grad z_j||^2 + C * max(0, 1 - |z_j|)`` (0 where not a neuron).
    """
    _, lengths = _lengths(args)
    b, t_all, c = x.shape
    steps = t_all if lengths is None else int(lengths.max())
    w_in, bias = rec.input.weight, rec.input.bias
    w = rec.weight
    h_size = w.shape[0]
    exact = directions.vectors is None and (directions.indices is None or directions.indices.dim() == 1)
    if exact:
        assert directions.count == t_all * c, "the exact term takes all input axes"
        fresh = w_in.t().unsqueeze(0).expand(b, c, h_size)  # d z_t / d x_t, the same for every example
        fresh_sq = w_in.square().sum(1)  # [H]: its share of each neuron's squared norm
        tangent = x.new_zeros(b, 0, h_size)  # d h / d x over the steps so far: [B, t C, H]
    else:
        v = _input_tangents(directions, x)  # [B, k, T, C]
        tangent = x.new_zeros(b, v.shape[1], h_size)
    h = x.new_zeros(b, h_size)
    terms: list[Tensor] = []
    valid: list[Tensor] = []
    for t in range(steps):
        z = F.linear(x[:, t], w_in, bias) + F.linear(h, w)
        # the earlier steps' axes through W, as one 2-D product: autograd's weight gradient of a
        # 3-D F.linear on these shapes ran at a tenth of the matmul rate (measured, 2-core CPU)
        carried = (tangent.reshape(-1, h_size) @ w.t()).view(tangent.shape)
        if exact:
            squared = carried.square().sum(1) + fresh_sq
            t_z = torch.cat([carried, fresh], dim=1)
        else:
            t_z = carried + F.linear(v[:, :, t], w_in)
            squared = t_z.square().sum(1) * scale
        slope = activation_slopes(z > 0, rec.negative_slope, z)
        h_new = F.leaky_relu(z, rec.negative_slope) if rec.negative_slope else F.relu(z)
        t_new = t_z * slope.unsqueeze(1)
        term = squared + C * hinge(z)
        if lengths is None:
            h, tangent = h_new, t_new
        else:
            on = (lengths > t).unsqueeze(1)  # [B, 1]
            h = torch.where(on, h_new, h)
            kept = tangent if not exact else torch.cat([tangent, tangent.new_zeros(b, c, h_size)], dim=1)
            tangent = torch.where(on.unsqueeze(2), t_new, kept)
            term = torch.where(on, term, 0.0)
            valid.append(on.expand(b, h_size))
        terms.append(term)
    logits = rec.output(h)
    out = torch.cat(terms, dim=1) if terms else x.new_zeros(b, 0)
    mask = torch.cat(valid, dim=1) if valid else None
    return logits, out, mask

