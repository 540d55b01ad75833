"""A fused pass for plain chains of Linear layers and ReLU-like activations (MLPs).

The approximate ROLL term pushes k input directions per example through the
linearized network.  For a *chain* (optionally an elementwise input
normalization ``(x - mean) / std`` and a ``Flatten``, then ``Linear,
activation, Linear, activation, ..., Linear``) every hidden layer's share of
that work is one matmul over each example's stacked rows ``[z; t_1 .. t_k]``
(the pre-activation and its k tangents: the activation's slopes multiply all
1 + k rows alike, and only the primal row gets the bias).  :class:`_ChainTerms`
runs the whole pass as one autograd node with a hand-written backward: per
layer, two matmuls over the stacked rows (weight gradient, input gradient) and
a few elementwise operations.  The generic engine
(:mod:`rollnet.engine.capture`) instead runs the model op by op under a
``TorchFunctionMode`` and records an autograd node per op; on the paper's MLP
at batch 64 (2-core CPU) a whole approximate training step with the fused pass
takes 15-20% less time (``benchmarks/bench_training.py``).

The result is the same computation as the engine's (the same neurons in the
same order, the same tangents, the same conventions at z = 0, the same hinge,
:mod:`rollnet.regularizer.hinge`), checked against it in
``tests/regularizer/test_chain.py``.  Anything outside the chain (a hook, a
subclass that changes ``forward``, a train-mode Dropout, an input that needs
its own gradient, autocast, an input that is not ``[B, D]`` rows) goes through
the engine instead; see :func:`find_chain` and :func:`fusable`.

**Declaring a chain.**  The fused pass does not call the modules, so it only
takes what it knows: exact ``nn.Sequential``, ``nn.Linear``, ``nn.ReLU``,
``nn.LeakyReLU``, ``nn.Flatten``, ``nn.Identity`` and ``nn.Dropout``, and
modules that declare what their ``forward`` computes (:class:`DeclaresChain`:
``plain_chain()`` returns the modules ``forward`` applies, in order;
:class:`DeclaresNormalization`: ``input_normalization()`` returns scalar
``(mean, std)`` when ``forward`` is ``(x - mean) / std``).  A declaration is a
promise the finder cannot check (it does not read ``forward``); it checks what
it can: the declaration is honoured only when the class that defines it also
defines the ``forward`` in use (a subclass that overrides ``forward`` must
declare again), when the module is called the standard way (no override of
``__call__``, no ``forward`` set on the instance, no hooks), and only when it
returns what the protocol says.  :class:`rollnet.models.MLP` and
:class:`rollnet.models.layers.InputNormalization` declare themselves, and
each also returns ``None`` (not a chain) unless ``type(self).forward`` is its
own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from rollnet.engine.gradients import DEFAULT_MEMORY_BUDGET, Directions, resolve_memory_budget
from rollnet.engine.rules.activations import slopes as activation_slopes
from rollnet.regularizer.hinge import hinge, hinge_derivative

__all__ = ["Chain", "DeclaresChain", "DeclaresNormalization", "chain_terms", "find_chain", "fusable"]


@runtime_checkable
class DeclaresChain(Protocol):
    """A module whose ``forward`` applies a fixed sequence of modules, one after the other.

    ``plain_chain()`` returns those modules in order (containers are expanded
    in turn: an exact ``nn.Sequential`` or another declared chain), or
    ``None`` when this instance is not such a chain (e.g. a subclass with its
    own ``forward``).  Declaring is a promise that ``forward(x)`` equals
    applying them in that order; it is honoured only from the class that also
    defines the ``forward`` in use.
    """

    def plain_chain(self) -> Sequence[nn.Module] | None: ...


@runtime_checkable
class DeclaresNormalization(Protocol):
    """An input layer whose ``forward`` is ``(x - mean) / std``, elementwise.

    ``input_normalization()`` returns ``(mean, std)`` as 0-dim tensors (other
    shapes: the engine runs the model instead), or ``None`` when this
    instance does not compute that.  The same promise and rule as
    :class:`DeclaresChain`.
    """

    def input_normalization(self) -> tuple[Tensor, Tensor] | None: ...


@dataclass(frozen=True)
class Chain:
    """A model recognised as ``[normalization] [flatten] Linear (act Linear)*``.

    Attributes:
        linears: the affine layers, input to output (at least two).
        slopes: each activation's slope for negative inputs (0 for ReLU).
        normalization: the leading ``(x - mean) / std`` as 0-dim ``(mean, std)``
            (read when :func:`find_chain` ran), if any.
        flatten: whether the input is flattened first (``[B, *shape] -> [B, D]``).
    """

    linears: tuple[nn.Linear, ...]
    slopes: tuple[float, ...]
    normalization: tuple[Tensor, Tensor] | None
    flatten: bool


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper (``.module``, also
    nested), else ``model`` itself: the fused passes are detected on the wrapped model.

    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> unwrap_parallel(nn.DataParallel(net)) is net
    True
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def run_through_wrapper(wrapper: nn.parallel.DistributedDataParallel, compute: Callable[[nn.Module], Any]) -> Any:
    """``compute(wrapper.module)`` run as the wrapper's forward, so DistributedDataParallel prepares
    its reducer for the backward (its gradient hooks all-reduce the gradients) exactly as for
    ``wrapper(x)``.  The wrapper's module is the same object again afterwards.

    Args:
        wrapper: the DistributedDataParallel model.
        compute: the pass on the wrapped model (it returns tensors, or tuples of them).

    Returns:
        What ``compute`` returns, through DDP's post-forward.
    """
    inner = wrapper.module
    wrapper.module = _Pass(inner, compute)
    try:
        return wrapper()
    finally:
        wrapper.module = inner


class _Pass(nn.Module):
    """A module whose forward is ``compute(inner)`` (its parameters are ``inner``'s)."""

    def __init__(self, inner: nn.Module, compute: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self.inner = inner
        self.compute = compute

    def forward(self) -> Any:
        return self.compute(self.inner)


def hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _called_plainly(m: nn.Module) -> bool:
    """``m(x)`` is ``type(m).forward(m, x)``: no hooks, no ``forward`` set on the instance, and
    nn.Module's own ``__call__`` (torch's exact types below have it)."""
    if hooked(m) or "forward" in m.__dict__:
        return False
    cls = type(m)
    return cls in _TORCH_TYPES or (cls.__call__ is nn.Module.__call__ and cls._call_impl is nn.Module._call_impl)


# torch's layers the fused pass knows, by exact type (a subclass may change forward)
_TORCH_LEAVES = frozenset({nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Flatten, nn.Identity, nn.Dropout})
_TORCH_TYPES = _TORCH_LEAVES | {nn.Sequential}


def global_hooks() -> bool:
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(bool(getattr(_module_globals, name, None)) for name in names)


def _owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO that defines ``name``."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def declaration(m: nn.Module, name: str) -> Callable[[], Any] | None:
    """``m``'s declaration ``name`` (bound), honoured only when the class that defines it also
    defines the ``forward`` in use; ``None`` otherwise."""
    cls = type(m)
    owner = _owner(cls, name)
    if owner is None or owner is not _owner(cls, "forward"):
        return None
    bound: Callable[[], Any] = vars(owner)[name].__get__(m, cls)  # the class's, not an instance attribute
    return bound


def _declared_chain(m: nn.Module) -> list[nn.Module] | None:
    declare = declaration(m, "plain_chain")
    if declare is None:
        return None
    modules = declare()
    if modules is None:
        return None
    if not isinstance(modules, (list, tuple)) or not all(isinstance(c, nn.Module) for c in modules):
        raise TypeError(f"{type(m).__name__}.plain_chain() must return a list or tuple of modules "
                        f"or None, got {modules!r}")
    return list(modules)


def _declared_normalization(m: nn.Module) -> tuple[Tensor, Tensor] | None:
    declare = declaration(m, "input_normalization")
    if declare is None:
        return None
    constants = declare()
    if constants is None:
        return None
    if (not isinstance(constants, tuple) or len(constants) != 2
            or not all(isinstance(c, Tensor) for c in constants)):
        raise TypeError(f"{type(m).__name__}.input_normalization() must return (mean, std) tensors "
                        f"or None, got {constants!r}")
    mean, std = constants
    if mean.dim() != 0 or std.dim() != 0 or not (mean.is_floating_point() and std.is_floating_point()):
        return None  # per-feature constants: not what the fused pass computes; the engine runs forward
    return mean, std


def _sequence(model: nn.Module, within: tuple[nn.Module, ...] = ()) -> list[nn.Module] | None:
    """The modules ``model(x)`` applies in order, or ``None`` if its forward is not a known sequence.

    A module that is neither an exact ``nn.Sequential`` nor a declared chain is a leaf (judged by
    :func:`find_chain`); ``within`` holds the containers being expanded (a cycle is no chain).
    """
    if not _called_plainly(model):
        return None
    kind = type(model)
    if kind in _TORCH_LEAVES:
        return [model]
    if any(model is c for c in within):
        return None
    if kind is nn.Sequential:
        children: list[nn.Module] | None = list(cast(nn.Sequential, model))  # (repeats kept)
    elif _owner(kind, "plain_chain") is not None:  # (a DeclaresChain; no slow Protocol check)
        children = _declared_chain(model)
    else:
        return [model]
    if children is None:
        return None
    out: list[nn.Module] = []
    for child in children:
        inner = _sequence(child, (*within, model))
        if inner is None:
            return None
        out += inner
    return out


def _is_identity(m: nn.Module) -> bool:
    if type(m) is nn.Identity:
        return True
    return type(m) is nn.Dropout and (not m.training or m.p == 0.0)


def find_chain(model: nn.Module) -> Chain | None:
    """The chain ``model`` is, or ``None`` when the fused pass does not apply.

    Recognised: an ``nn.Sequential`` (nested ones too), a
    :class:`rollnet.models.MLP` or any model that declares itself a chain
    (:class:`DeclaresChain`), whose modules are, in order, an optional
    declared input normalization (:class:`DeclaresNormalization`, such as
    :class:`rollnet.models.layers.InputNormalization`) and ``nn.Flatten()``,
    then ``nn.Linear`` layers separated by one ``nn.ReLU`` or ``nn.LeakyReLU``
    each and ending in a Linear; ``nn.Identity`` and eval-mode (or p = 0)
    ``nn.Dropout`` anywhere.  Exact types only for torch's layers (a subclass
    may change ``forward``), declarations only from the class that defines
    the ``forward`` in use, and no module or global forward/backward hooks,
    since the fused pass does not call the modules.  A ``DistributedDataParallel``
    (or ``DataParallel``) wrapper is seen through: its ``.module`` is judged.
    """
    modules = _sequence(unwrap_parallel(model))
    if modules is None or global_hooks():
        return None
    linears: list[nn.Linear] = []
    slopes: list[float] = []
    normalization: tuple[Tensor, Tensor] | None = None
    flatten = False
    expect_linear = True  # after an activation (or at the start): a Linear must come next
    for m in modules:
        kind = type(m)
        if _is_identity(m):
            continue
        if kind is nn.Flatten and not linears and not flatten:
            if (m.start_dim, m.end_dim) != (1, -1):
                return None
            flatten = True
        elif kind is nn.Linear and expect_linear:
            linears.append(m)  # type: ignore[arg-type]
            expect_linear = False
        elif kind is nn.ReLU and not expect_linear:
            slopes.append(0.0)
            expect_linear = True
        elif kind is nn.LeakyReLU and not expect_linear:
            slopes.append(float(m.negative_slope))  # type: ignore[arg-type]
            expect_linear = True
        elif (_owner(kind, "input_normalization") is not None  # a DeclaresNormalization
              and not linears and normalization is None and not flatten):
            normalization = _declared_normalization(m)
            if normalization is None:
                return None
        else:
            return None
    if len(linears) < 2 or expect_linear:
        return None
    return Chain(tuple(linears), tuple(slopes), normalization, flatten)


def autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def fusable(chain: Chain, x: Tensor, directions: Directions, memory_budget: int | None = None) -> bool:
    """Whether :func:`chain_terms` can take ``x`` along ``directions`` within ``memory_budget`` bytes
    (the engine's default when ``None``).

    Only ``[B, D]`` rows (``[B, *shape]`` when the chain flattens first) with D the first
    layer's inputs: any other shape goes to the engine, which runs the model as it is (a Linear
    on the last dimension of ``[B, S, D]``) or refuses it with its own error.  Not for an empty
    batch either, nor when ``x`` needs its own gradient (the fused node is differentiable
    once, in the parameters), under autocast (the engine follows autocast's
    per-op casts), when parameters and ``x`` differ in dtype or device, for
    directions shared by the batch, or when the stacked rows would not fit.
    """
    if x.dim() < 2 or (x.dim() != 2 and not chain.flatten):
        return False
    if math.prod(x.shape[1:]) != chain.linears[0].in_features:
        return False
    if x.requires_grad or x.shape[0] == 0 or autocast_on(x.device.type):
        return False
    for layer in chain.linears:
        for p in (layer.weight, layer.bias):
            if p is not None and (p.dtype != x.dtype or p.device != x.device):
                return False
    per_example = directions.indices is not None and directions.indices.dim() == 2
    if directions.vectors is not None:
        per_example = directions.vectors.dim() == x.dim() + 1
    if not per_example:
        return False
    rows = x.shape[0] * (1 + directions.count)
    width = sum(layer.out_features for layer in chain.linears[:-1])
    # (the default is read as 1 GiB here, on a GPU too: no device query per training step)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else resolve_memory_budget(memory_budget, x.device)
    return 3 * rows * width * x.element_size() <= budget  # each layer keeps its rows, masks, masked rows


def chain_terms(
    chain: Chain, x: Tensor, directions: Directions, scale: float, C: float, mean: bool = False
) -> tuple[Tensor, Tensor]:
    """The model's output and every neuron's ROLL term, ``scale * sum_k (g_j . d_k)^2 + C * hinge(z_j)``
    (:func:`rollnet.regularizer.hinge.hinge`).

    Args:
        chain: from :func:`find_chain`.
        x: ``[B, *input_shape]`` inputs (see :func:`fusable`).
        directions: k directions per example: ``indices`` ``[k, B]`` (unit
            axes) or ``vectors`` ``[k, B, *input_shape]``.
        scale: factor of the sum of squared directional derivatives (D / k
            for axes, 1 / k for Gaussian directions).
        C: weight of the hinge.
        mean: return each example's mean over its neurons, ``[B]``, instead of
            every term (fewer operations, forward and backward).

    Returns:
        ``(output [B, L], terms [B, N])``, the N hidden neurons in layer order
        (or ``[B]`` means), differentiable in the chain's parameters.
    """
    b = x.shape[0]
    h = x.flatten(1) if chain.flatten else x
    first_scale: Tensor | None = None
    if chain.normalization is not None:
        shift, spread = chain.normalization
        h = (h - shift) / spread  # what the declaring layer's forward computes
        first_scale = (1.0 / spread).to(x.dtype)
    axes = vectors = None
    if directions.indices is not None:
        axes = directions.indices.to(x.device).t().reshape(-1)  # example-major: [B * k]
    else:
        assert directions.vectors is not None
        vectors = directions.vectors.to(device=x.device, dtype=x.dtype).transpose(0, 1).reshape(b * directions.count, -1)
        if first_scale is not None:
            vectors = vectors * first_scale
            first_scale = None
    params: list[Tensor | None] = []
    for layer in chain.linears:
        params += [layer.weight, layer.bias]
    out, terms = _ChainTerms.apply(h, axes, vectors, first_scale, float(scale), float(C), chain.slopes, mean, *params)
    return out, terms


class _ChainTerms(torch.autograd.Function):
    """Output and neuron terms of a chain, stacked rows ``[B, 1 + k, F]`` per layer, hand-written backward."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        axes: Tensor | None,
        vectors: Tensor | None,
        first_scale: Tensor | None,
        scale: float,
        C: float,
        slopes: tuple[float, ...],
        mean: bool,
        *params: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        weights, biases = params[0::2], params[1::2]
        assert all(w is not None for w in weights)
        b = h.shape[0]
        w0 = weights[0]
        assert w0 is not None
        z = F.linear(h, w0, biases[0])
        if axes is not None:
            t = w0.t().index_select(0, axes)  # e_k -> W[:, k]
            if first_scale is not None:
                t = t * first_scale
        else:
            assert vectors is not None
            t = vectors @ w0.t()
        k = t.shape[0] // b
        rows = torch.cat([z.unsqueeze(1), t.view(b, k, -1)], dim=1)  # [B, 1 + k, F]
        saved_rows, saved_masks, saved_inputs, terms = [], [], [], []
        last = len(weights) - 1
        out: Tensor | None = None
        for i in range(1, len(weights)):
            zp, tangents = rows[:, 0], rows[:, 1:]
            hinged = hinge(zp)
            if mean:  # per example: one reduction each, no [B, F] term
                squared = torch.linalg.vector_norm(tangents.reshape(b, -1), dim=1).square()
                terms.append(scale * squared + C * hinged.sum(1))
            else:
                terms.append(scale * tangents.square().sum(1) + C * hinged)
            mask = activation_slopes(zp > 0, slopes[i - 1], zp)  # the engine's own slopes (its convention at z = 0)
            w, bias = weights[i], biases[i]
            assert w is not None
            saved_rows.append(rows)
            saved_masks.append(mask)
            if i == last:  # the output layer sees only the primal row
                a = zp * mask
                saved_inputs.append(a)
                out = F.linear(a, w, bias)
                break
            a = rows * mask.unsqueeze(1)
            saved_inputs.append(a)
            rows = (a.view(-1, a.shape[-1]) @ w.t()).view(b, 1 + k, -1)
            if bias is not None:
                rows[:, 0] += bias
        assert out is not None
        ctx.save_for_backward(h, axes, vectors, first_scale, *params, *saved_rows, *saved_masks, *saved_inputs)
        neurons = sum(r.shape[-1] for r in saved_rows)
        ctx.meta = (len(params), len(saved_rows), k, scale, C, neurons if mean else 0)
        ctx.set_materialize_grads(False)
        if mean:
            return out, torch.stack(terms).sum(0) / neurons
        return out, torch.cat(terms, dim=1)

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_terms: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would silently miss terms
            raise RuntimeError(
                "ROLLLoss's fused chain pass is differentiable once (backward(create_graph=True) was asked); "
                "for higher-order gradients build ROLLLoss(..., fused=False)"
            )
        n_params, n_groups, k, scale, C, mean_over = ctx.meta
        saved = ctx.saved_tensors
        h, axes, vectors, first_scale = saved[:4]
        params = saved[4 : 4 + n_params]
        rows_of = saved[4 + n_params : 4 + n_params + n_groups]
        masks = saved[4 + n_params + n_groups : 4 + n_params + 2 * n_groups]
        inputs = saved[4 + n_params + 2 * n_groups :]
        weights = params[0::2]
        needs = ctx.needs_input_grad[8:]
        grads: list[Tensor | None] = [None] * n_params
        b = h.shape[0]

        def want(i: int, bias: bool = False) -> bool:
            return bool(needs[2 * i + int(bias)]) and params[2 * i + int(bias)] is not None

        last = len(weights) - 1
        d_in: Tensor | None = None  # gradient of the last group's masked rows (primal row only)
        if g_out is not None:
            if want(last):
                grads[2 * last] = g_out.t() @ inputs[-1]
            if want(last, bias=True):
                grads[2 * last + 1] = g_out.sum(0)
            d_in = g_out @ weights[last]
        offsets = [0]
        for rows in rows_of:
            offsets.append(offsets[-1] + rows.shape[-1])
        d_stacked: Tensor | None = None  # gradient of a group's masked stacked rows [B, 1 + k, F]
        for g in range(n_groups - 1, -1, -1):
            rows, mask = rows_of[g], masks[g]
            zp, tangents = rows[:, 0], rows[:, 1:]
            if d_stacked is not None:
                d_rows = d_stacked.mul_(mask.unsqueeze(1))
            else:
                d_rows = torch.zeros_like(rows)
                if d_in is not None:
                    torch.mul(d_in, mask, out=d_rows[:, 0])
            if g_terms is not None:
                # [B, F] per neuron, or [B, 1] when the terms were averaged per example
                gt = g_terms.unsqueeze(1) / mean_over if mean_over else g_terms[:, offsets[g] : offsets[g + 1]]
                d_rows[:, 1:].addcmul_(tangents, (2.0 * scale) * gt.unsqueeze(1))
                d_rows[:, 0].addcmul_(hinge_derivative(zp), gt, value=C)
            if g == 0:
                break
            flat = d_rows.view(-1, d_rows.shape[-1])
            prev = inputs[g - 1]
            if want(g):
                grads[2 * g] = flat.t() @ prev.view(-1, prev.shape[-1])
            if want(g, bias=True):
                grads[2 * g + 1] = d_rows[:, 0].sum(0)
            d_stacked = (flat @ weights[g]).view(b, 1 + k, -1)
        primal, d_tangents = d_rows[:, 0], d_rows[:, 1:].reshape(b * k, -1)
        if want(0):
            grad_w = primal.t() @ h
            if axes is not None:
                cols = d_tangents if first_scale is None else d_tangents * first_scale
                grad_w.index_add_(1, axes, cols.t())
            else:
                grad_w.addmm_(d_tangents.t(), vectors)
            grads[0] = grad_w
        if want(0, bias=True):
            grads[1] = primal.sum(0)
        grad_h = primal @ weights[0] if ctx.needs_input_grad[0] else None
        return (grad_h, None, None, None, None, None, None, None, *grads)
