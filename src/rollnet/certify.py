"""Certificates of the linear region around each input.

Radii are in the units of the model's own input: if the model normalises its
input inside ``forward``, radii are in raw (for example pixel) units; if the
data were normalised beforehand, they are in normalised units.

All functions run the model in eval mode and restore every submodule's
train/eval flag afterwards.

Precision: certificates (radii, distances, stability bounds) are exact in
float64.  In a lower precision the arithmetic alone can inflate them (a
neuron within rounding error of its hyperplane; measured in float32: margins
up to 51% too large, stability bounds up to 10^6 times), so by default (``rounding="sound"``) a float32 / float16 / bfloat16
input is certified on a float64 copy of the model and every certificate is
rounded toward zero into the input's dtype, one ulp inside the float64 value:
it never exceeds the float64 certificate.  ``rounding="none"`` computes in the
input's own precision (faster; may overclaim).  See :mod:`rollnet.rounding`
and ``docs/precision.md``.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn

from rollnet.engine.gradients import (
    Collected,
    Request,
    batch_slice,
    collect,
    given_directions,
    unit_directions,
)
from rollnet.engine.modes import eval_mode
from rollnet.patterns import ActivationPatterns
from rollnet.rounding import Rounding, Working, check_rounding, working

__all__ = [
    "LinearRegions",
    "activation_pattern",
    "certified_saliency",
    "check_forward_args",
    "count_regions",
    "directional_margin",
    "margin",
    "neuron_gradients",
    "stability_bounds",
]

Norm = int | float | str
Target = int | Sequence[int] | Tensor | None

_DUAL = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}


def parse_norm(p: Norm) -> float:
    """Map ``1``, ``2``, ``float("inf")`` or ``"inf"`` to a float; refuse anything else."""
    if isinstance(p, str):
        if p.strip().lower() in ("inf", "infinity", "linf"):
            return math.inf
        try:
            p = float(p)
        except ValueError:
            raise ValueError(f"p must be 1, 2 or inf, got {p!r}") from None
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
    value = float(p)
    if value not in _DUAL:
        raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
    return value


def check_input(x: Any, name: str = "x") -> Tensor:
    """Refuse non-tensors, non-float, unbatched, NaN or Inf inputs."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, *input_shape], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must be batched, of shape [B, *input_shape]; got shape {tuple(x.shape)} "
            "(use x.unsqueeze(0) for a single example)"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    # a sum with a NaN or inf term is never finite, so a finite sum clears x in one cheap
    # reduction; only an overflowing (or truly bad) sum needs the elementwise check
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name} contains NaN or Inf (examples {bad[:10]})")
    return x


def check_forward_args(additional_forward_args: Any, x: Tensor) -> tuple[Any, ...]:
    """Captum's ``additional_forward_args``: ``None``, one argument, or a tuple of them, passed as
    ``model(x, *args)`` and never perturbed.  Tensors among them must not need gradients of the
    input (they are constants) and, when they have one entry per example, must have x's batch size."""
    if additional_forward_args is None:
        return ()
    args = additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] != x.shape[0] and a.shape[0] != 1:
            raise ValueError(
                f"additional_forward_args[{i}] has {a.shape[0]} entries along its first dimension but x has "
                f"{x.shape[0]} examples; per-example arguments (sequence lengths) need one entry per example"
            )
    return args


def patterns_of(got: Collected, batch_size: int) -> ActivationPatterns:
    """The activation patterns in ``got``, each example's from its own neurons only."""
    if got.valid is None:
        return ActivationPatterns(got.patterns, batch_size)
    valid: list[Tensor | None] = []
    start = 0
    for group, part in zip(got.groups, got.patterns, strict=True):
        v = got.valid[:, start : start + group.size]
        start += group.size
        valid.append(None if part.shape[1] != group.size or bool(v.all()) else v)
    return ActivationPatterns(got.patterns, batch_size, valid)


def _margin_from(values: Tensor, norms: Tensor) -> Tensor:
    """``min_j |z_j| / norm_j`` per example; neurons with a zero gradient impose nothing."""
    if values.shape[1] == 0:
        return values.new_full((values.shape[0],), math.inf)
    inf = torch.tensor(math.inf, dtype=values.dtype, device=values.device)
    ratio = torch.where(norms > 0, values.abs() / norms, inf)
    return ratio.amin(dim=1)


def _resolve_target(target: Target, output: Tensor) -> Tensor:
    """Captum's ``target`` rules: an index per example, ``[B]`` int64."""
    b = output.shape[0]
    if target is None:
        if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
            return torch.zeros(b, dtype=torch.int64, device=output.device)
        raise ValueError(f"target is required for an output of shape {tuple(output.shape)}")
    if output.dim() != 2:
        raise ValueError(f"target needs an output of shape [B, L], got {tuple(output.shape)}")
    if isinstance(target, Tensor):
        idx = target.to(device=output.device, dtype=torch.int64).flatten()
        if idx.numel() == 1:
            idx = idx.expand(b)
    elif isinstance(target, int):
        idx = torch.full((b,), target, dtype=torch.int64, device=output.device)
    else:
        idx = torch.as_tensor(list(target), dtype=torch.int64, device=output.device)
    if idx.shape != (b,):
        raise ValueError(f"target must be an int or have one entry per example ({b}), got {idx.numel()}")
    n = output.shape[1]
    if bool(((idx < 0) | (idx >= n)).any()):
        raise ValueError(f"target indices must lie in [0, {n}), got {idx.tolist()[:10]}")
    return idx


def _target_gradient(rows: Tensor, output: Tensor, target: Target, x_shape: torch.Size) -> Tensor:
    """The target logit's row of the output Jacobian ``rows`` ``[B, L, D]`` (or ``[B, D]``), shaped like x."""
    idx = _resolve_target(target, output)
    picked = rows if rows.dim() == 2 else rows[torch.arange(rows.shape[0], device=rows.device), idx]
    return picked.reshape(x_shape)


class LinearRegions:
    """The linear regions around a batch of inputs: compute once, ask many things.

    Runs the model once to record every neuron (the inputs of ReLU,
    LeakyReLU and max units) and, on the first question that needs
    gradients, pushes all D input axes through the linearized network in one
    batched pass, keeping every certificate that pass can give: the dual
    norms for p = 1, 2, inf, the per-coordinate stability bounds and the
    output Jacobian.  Later questions are answered from that.

    Args:
        model: a network of affine layers and piecewise-linear activations.
            It is run in eval mode; its train/eval flags are restored.
        x: ``[B, *input_shape]`` float inputs, no NaN or Inf.
        additional_forward_args: further arguments of the model, ``model(x, *args)``
            (Captum's convention: one value or a tuple; sequence ``lengths`` ``[B]``), never
            perturbed.
        memory_budget: bytes of tangents held at once (default 1 GiB; on a CUDA device
            a quarter of its free memory when that is more).
        keep_gradients: also keep every neuron's full gradient
            (``[B, N, *input_shape]``, can be large); needed by
            :meth:`neuron_gradients`, which sets it on first use.
        rounding: ``"sound"`` (default): for inputs below float64, everything is
            computed once on a float64 copy of the model; certificates
            (:meth:`margin`, :meth:`directional_margin`, :meth:`stability_bounds`)
            are rounded toward zero into x's dtype, so they never exceed the
            float64 ones; values, outputs and gradients come back rounded to
            nearest, and the activation pattern is the float64 one.
            ``"none"``: computed in x's own precision (see :mod:`rollnet.rounding`).

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> regions = rollnet.LinearRegions(net, torch.randn(5, 2))
        >>> regions.margin(p=2).shape
        torch.Size([5])
        >>> lower, upper = regions.stability_bounds()
        >>> bool((lower <= 0).all() and (upper >= 0).all())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        additional_forward_args: Any = None,
        memory_budget: int | None = None,
        keep_gradients: bool = False,
        rounding: Rounding = "sound",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.x = check_input(x)
        self.additional_forward_args = check_forward_args(additional_forward_args, self.x)
        self.memory_budget = memory_budget
        self._keep_gradients = keep_gradients
        self._full: Collected | None = None
        self.rounding: Rounding = check_rounding(rounding)
        self._work = working(model, self.x, self.rounding, self.additional_forward_args)
        work = self._work
        with torch.no_grad(), eval_mode(work.model), work.arithmetic():
            self._base = collect(work.model, work.x, None, Request(), memory_budget=memory_budget,
                                 forward_args=work.args)

    # -- cheap: one forward pass ------------------------------------------------
    @property
    def values(self) -> Tensor:
        """``[B, N]`` neuron values (pre-activations; max-unit differences)."""
        return self._work.plain(self._base.values)

    @property
    def output(self) -> Tensor:
        """``[B, ...]`` the model's output at x."""
        return self._work.plain(self._base.output)

    @property
    def num_neurons(self) -> int:
        return int(self._base.values.shape[1])

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` bool: which entries of :attr:`values` are neurons of their example (padded
        time steps marked with :func:`rollnet.neuron_mask` are not; they constrain nothing)."""
        v = self._base.valid
        return torch.ones_like(self._base.values, dtype=torch.bool) if v is None else v

    def neuron_info(self) -> list[tuple[str, str, int]]:
        """``(module_path, op, size)`` for each neuron group, in the order of :attr:`values`."""
        return [(g.module_path, g.op, g.size) for g in self._base.groups]

    def activation_pattern(self) -> ActivationPatterns:
        """Per-example activation patterns (see :func:`activation_pattern`)."""
        return patterns_of(self._base, self.x.shape[0])

    # -- one batched pass over all D input axes --------------------------------
    def _all_axes(self) -> Collected:
        if self._full is None or (self._keep_gradients and self._full.rows is None):
            request = Request(
                norms=(1.0, 2.0, math.inf), crossings=True, output=True, rows=self._keep_gradients
            )
            work = self._work
            with torch.no_grad(), eval_mode(work.model), work.arithmetic():
                self._full = collect(
                    work.model, work.x, unit_directions(self.x.shape[1:]), request,
                    memory_budget=self.memory_budget, forward_args=work.args,
                )
        return self._full

    def margin(self, p: Norm = 2) -> Tensor:
        """``[B]`` radius of the largest lp ball around each x inside its linear region.

        eps_p(x) = min_j |z_j| / ||g_j||_q with 1/p + 1/q = 1 (exact, closed form).
        ``inf`` when no neuron can flip (no neurons, or all gradients zero).
        """
        q = _DUAL[parse_norm(p)]
        full = self._all_axes()
        return self._work.certificate(_margin_from(full.values, full.norms[q]))

    def directional_margin(self, direction: Tensor) -> Tensor:
        """``[B]`` largest t >= 0 with x + t * direction in x's region (see :func:`directional_margin`)."""
        return _directional(self._work, self.x, direction, self.memory_budget)

    def stability_bounds(self) -> tuple[Tensor, Tensor]:
        """``(lower, upper)``, each shaped like x: the open interval of displacements
        ``lower < delta_k < upper`` of coordinate k alone that keep the pattern
        (``lower <= 0 <= upper``)."""
        full = self._all_axes()
        assert full.cross_plus is not None and full.cross_minus is not None
        cert = self._work.certificate
        return cert(-full.cross_minus.reshape(self.x.shape)), cert(full.cross_plus.reshape(self.x.shape))

    def jacobian(self) -> Tensor:
        """``[B, *output_shape, *input_shape]`` Jacobian of the output, constant in the region."""
        full = self._all_axes()
        assert full.output_rows is not None
        rows = full.output_rows
        return self._work.plain(rows.reshape(*rows.shape[:-1], *self.x.shape[1:]))

    def saliency(self, target: Target = None) -> Tensor:
        """Gradient of the target logit, shaped like x (Captum's ``target`` rules)."""
        full = self._all_axes()
        assert full.output_rows is not None
        return self._work.plain(_target_gradient(full.output_rows, full.output, target, self.x.shape))

    def neuron_gradients(self) -> tuple[Tensor, Tensor]:
        """``(z [B, N], grads [B, N, *input_shape])``: every neuron's value and input gradient."""
        self._keep_gradients = True
        full = self._all_axes()
        assert full.rows is not None
        plain = self._work.plain
        return plain(full.values), plain(full.rows.reshape(*full.rows.shape[:2], *self.x.shape[1:]))


# ---------------------------------------------------------------------------
# functions


@overload
def margin(
    model: nn.Module, x: Tensor, p: Norm = 2, *, additional_forward_args: Any = None,
    memory_budget: int | None = None, rounding: Rounding = "sound",
) -> Tensor: ...


@overload
def margin(
    model: nn.Module, x: Tensor, p: tuple[Norm, ...] | list[Norm], *, additional_forward_args: Any = None,
    memory_budget: int | None = None, rounding: Rounding = "sound",
) -> tuple[Tensor, ...]: ...


def margin(
    model: nn.Module, x: Tensor, p: Norm | tuple[Norm, ...] | list[Norm] = 2, *, additional_forward_args: Any = None,
    memory_budget: int | None = None, rounding: Rounding = "sound",
) -> Tensor | tuple[Tensor, ...]:
    """Radius of the largest lp ball around each input inside its linear region.

    Exact and closed form: eps_p(x) = min_j |z_j(x)| / ||grad z_j(x)||_q over all
    neurons j (inputs of ReLU-like and max units), q the dual of p.  Every
    point strictly inside the ball has x's activation pattern, so the
    network's gradients are constant there.

    Args:
        model: the network, run in eval mode (flags restored afterwards).
        x: ``[B, *input_shape]`` inputs.
        p: 1, 2, or ``float("inf")`` / ``"inf"``; or a sequence of them, such as
            ``(2, "inf")``: every radius from the same pass over the input axes (each
            neuron gradient's norms are reduced on the fly, no gradient row is held).
        additional_forward_args: further arguments of the model, ``model(x, *args)``:
            one value or a tuple (Captum's convention), never perturbed; tensors with one
            entry per example (sequence ``lengths`` ``[B]``) are cut with the batch.
        memory_budget: bytes of tangents held at once (default 1 GiB; on a CUDA device
            a quarter of its free memory when that is more).
        rounding: ``"sound"`` (default): the radius never exceeds the float64
            one. For x below float64 (float32, float16, bfloat16) it is computed
            on a float64 copy of the model and rounded toward zero into x's
            dtype, one ulp inside the float64 value; float64 inputs are computed
            as they are.  ``"none"``: computed in x's own precision, faster (by
            1.5-6x on the CPU), but rounding can inflate it (measured in
            float32: by up to 51%).  See :mod:`rollnet.rounding`.

    Returns:
        ``[B]`` radii in the units of the model's input (``inf`` where no neuron can flip);
        for a sequence ``p``, a tuple of them in the order of ``p``.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(2.0), net[0].bias.fill_(-1.0)
        >>> rollnet.margin(net, torch.tensor([[2.0]]), p=2)  # z = 3, |dz/dx| = 2
        tensor([1.5000])
        >>> l2, linf = rollnet.margin(net, torch.tensor([[2.0]]), p=(2, "inf"))  # one pass
    """
    several = isinstance(p, (tuple, list))
    norms = [parse_norm(v) for v in (p if isinstance(p, (tuple, list)) else [p])]
    if not norms:
        raise ValueError("p must name at least one norm (1, 2 or inf)")
    duals = [_DUAL[v] for v in norms]
    x = check_input(x)
    args = check_forward_args(additional_forward_args, x)
    rounding = check_rounding(rounding)
    if x.shape[0] == 0:
        radii = tuple(x.new_empty(0) for _ in duals)
    else:
        work = working(model, x, rounding, args)
        with torch.no_grad(), eval_mode(work.model), work.arithmetic():
            got = collect(
                work.model, work.x, unit_directions(x.shape[1:]), Request(norms=tuple(dict.fromkeys(duals))),
                memory_budget=memory_budget, forward_args=work.args,
            )
        radii = tuple(work.certificate(_margin_from(got.values, got.norms[q])) for q in duals)
    return radii if several else radii[0]


def _directional(work: Working, x: Tensor, direction: Tensor, memory_budget: int | None) -> Tensor:
    """The directional margin of ``x`` (the caller's input), computed on ``work``."""
    x = check_input(x)
    if not isinstance(direction, Tensor):
        raise TypeError("direction must be a tensor shaped like x or like one example")
    direction = direction.to(dtype=x.dtype, device=x.device)
    if direction.shape == x.shape:
        per_example = direction.flatten(1)
    elif direction.shape == x.shape[1:]:
        per_example = direction.reshape(1, -1)
    else:
        raise ValueError(
            f"direction must have shape {tuple(x.shape)} (one per example) or {tuple(x.shape[1:])} "
            f"(shared), got {tuple(direction.shape)}"
        )
    if not bool(torch.isfinite(direction).all()):
        raise ValueError("direction contains NaN or Inf")
    zero = (per_example == 0).all(dim=1)
    if bool(zero.any()):
        which = zero.nonzero().flatten().tolist()
        raise ValueError(f"direction is zero (for examples {which[:10]}); a direction must be non-zero")
    if x.shape[0] == 0:
        return x.new_empty(0)
    # (a float32 direction is exact in float64: the float64 stand-in sees the same direction)
    vectors = work.cast(direction).unsqueeze(0)
    with torch.no_grad(), eval_mode(work.model), work.arithmetic():
        got = collect(work.model, work.x, given_directions(vectors, work.x), Request(crossings=True),
                      memory_budget=memory_budget, forward_args=work.args)
    assert got.cross_plus is not None
    return work.certificate(got.cross_plus[:, 0])


def directional_margin(
    model: nn.Module, x: Tensor, direction: Tensor, *, additional_forward_args: Any = None,
    memory_budget: int | None = None, rounding: Rounding = "sound",
) -> Tensor:
    """Largest t >= 0 such that x + s * direction keeps x's pattern for all 0 <= s < t.

    Closed form: min over neurons moving towards their hyperplane of
    |z_j| / |g_j . d| (``inf`` if none moves towards it).  In units of the
    direction's length: for a unit-norm direction, a distance.

    Args:
        model: the network (eval mode, flags restored).
        x: ``[B, *input_shape]`` inputs.
        direction: shaped like x (one per example) or like one example (shared);
            must be non-zero.
        additional_forward_args: further arguments of the model, ``model(x, *args)``:
            one value or a tuple (Captum's convention), never perturbed; tensors with one
            entry per example (sequence ``lengths`` ``[B]``) are cut with the batch.
        rounding: ``"sound"`` (default) or ``"none"``, as in :func:`margin`: with
            ``"sound"``, t never exceeds the float64 distance.

    Returns:
        ``[B]`` the distance t along the direction.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> rollnet.directional_margin(net, torch.randn(3, 2), torch.tensor([1.0, 0.0])).shape
        torch.Size([3])
    """
    x = check_input(x)
    args = check_forward_args(additional_forward_args, x)
    rounding = check_rounding(rounding)
    if x.shape[0] == 0:  # (validates the direction first, without copying the model)
        return _directional(working(model, x, "none", args), x, direction, memory_budget)
    return _directional(working(model, x, rounding, args), x, direction, memory_budget)


def stability_bounds(
    model: nn.Module, x: Tensor, *, additional_forward_args: Any = None, memory_budget: int | None = None,
    rounding: Rounding = "sound",
) -> tuple[Tensor, Tensor]:
    """Per-coordinate stability intervals: how far each input coordinate alone can move.

    Returns ``(lower, upper)``, each shaped like x, with ``lower <= 0 <= upper``:
    moving coordinate k alone by delta with ``lower[k] < delta < upper[k]``
    keeps the activation pattern (so the gradients) exactly.  For sequences
    ``[B, T, C]``, every time step and channel gets its own interval; padded
    steps (past ``lengths``, given through ``additional_forward_args`` to a model
    that marks them with :func:`rollnet.neuron_mask`) get unbounded ones.

    ``rounding="sound"`` (default) or ``"none"``, as in :func:`margin`: with
    ``"sound"``, both bounds are rounded toward zero, so each interval lies
    inside the float64 one.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> lower, upper = rollnet.stability_bounds(net, torch.randn(2, 3))
        >>> lower.shape, upper.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """
    x = check_input(x)
    args = check_forward_args(additional_forward_args, x)
    rounding = check_rounding(rounding)
    if x.shape[0] == 0:
        return x.new_empty(x.shape), x.new_empty(x.shape)
    work = working(model, x, rounding, args)
    with torch.no_grad(), eval_mode(work.model), work.arithmetic():
        got = collect(work.model, work.x, unit_directions(x.shape[1:]), Request(crossings=True),
                      memory_budget=memory_budget, forward_args=work.args)
    assert got.cross_plus is not None and got.cross_minus is not None
    return work.certificate(-got.cross_minus.reshape(x.shape)), work.certificate(got.cross_plus.reshape(x.shape))


def activation_pattern(model: nn.Module, x: Tensor, *, additional_forward_args: Any = None) -> ActivationPatterns:
    """The activation pattern of each example: hashable, comparable.

    ``activation_pattern(model, x)[i] == activation_pattern(model, y)[j]``
    iff the two examples put every ReLU-like neuron on the same side (on iff
    ``z > 0``) and every max unit on the same selected input.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> pats = rollnet.activation_pattern(net, torch.zeros(2, 2))
        >>> pats[0] == pats[1], len({*pats})
        (True, 1)
    """
    x = check_input(x)
    args = check_forward_args(additional_forward_args, x)
    with torch.no_grad(), eval_mode(model):
        got = collect(model, x, None, Request(), forward_args=args)
    return patterns_of(got, x.shape[0])


def neuron_gradients(
    model: nn.Module, x: Tensor, *, additional_forward_args: Any = None, memory_budget: int | None = None
) -> tuple[Tensor, Tensor]:
    """All neuron values and their input gradients, from one batched forward-mode pass.

    Returns:
        ``(z, grads)``: ``z`` ``[B, N]`` neuron values and ``grads``
        ``[B, N, *input_shape]`` with ``grads[b, j] = d z_j / d x`` at ``x[b]``.
        Neurons are ordered by execution, each group flattened per example.  Entries
        that are not neurons (padded steps, :func:`rollnet.neuron_mask`) have zero gradients.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> z, g = rollnet.neuron_gradients(net, torch.randn(5, 3))
        >>> z.shape, g.shape
        (torch.Size([5, 4]), torch.Size([5, 4, 3]))
    """
    x = check_input(x)
    args = check_forward_args(additional_forward_args, x)
    with torch.no_grad(), eval_mode(model):
        got = collect(model, x, unit_directions(x.shape[1:]), Request(rows=True), memory_budget=memory_budget,
                      forward_args=args)
    assert got.rows is not None
    return got.values, got.rows.reshape(*got.rows.shape[:2], *x.shape[1:])


def certified_saliency(
    model: nn.Module, x: Tensor, target: Target = None, p: Norm = 2, *, additional_forward_args: Any = None,
    memory_budget: int | None = None, rounding: Rounding = "sound",
) -> tuple[Tensor, Tensor]:
    """The gradient of the target logit and the lp radius within which it is exactly constant.

    Args:
        model: the network (eval mode, flags restored).
        x: ``[B, *input_shape]`` inputs.
        target: Captum's rules: an int (same logit for all), a list or
            tensor with one index per example, or ``None`` for a single output.
        p: norm of the radius: 1, 2 or inf.
        additional_forward_args: further arguments of the model, ``model(x, *args)``:
            one value or a tuple (Captum's convention), never perturbed; tensors with one
            entry per example (sequence ``lengths`` ``[B]``) are cut with the batch.
        rounding: ``"sound"`` (default) or ``"none"``, as in :func:`margin`: with
            ``"sound"`` the radius never exceeds the float64 one, and the
            saliency is the float64 gradient rounded to x's dtype.

    Returns:
        ``(saliency, radius)``: saliency shaped like x, radius ``[B]``.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> s, r = rollnet.certified_saliency(net, torch.randn(5, 3), target=1)
        >>> s.shape, r.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """
    q = _DUAL[parse_norm(p)]
    x = check_input(x)
    args = check_forward_args(additional_forward_args, x)
    rounding = check_rounding(rounding)
    work = working(model, x, rounding if x.shape[0] else "none", args)
    with torch.no_grad(), eval_mode(work.model), work.arithmetic():
        got = collect(work.model, work.x, unit_directions(x.shape[1:]), Request(norms=(q,), output=True),
                      memory_budget=memory_budget, forward_args=work.args)
    assert got.output_rows is not None
    saliency = _target_gradient(got.output_rows, got.output, target, x.shape)
    return work.plain(saliency), work.certificate(_margin_from(got.values, got.norms[q]))


def _batches(data: Any, batch_size: int, args: tuple[Any, ...]) -> Iterable[tuple[Tensor, tuple[Any, ...]]]:
    if isinstance(data, Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size], batch_slice(args, i, i + batch_size, data.shape[0])
        return
    for item in data:
        yield (item[0] if isinstance(item, (tuple, list)) else item), ()


def _stack_args(parts: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Per-example further arguments (each cut to one example) joined into one batch's."""
    if not parts or not parts[0]:
        return ()
    return tuple(
        torch.cat([p[i] for p in parts]) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
        for i, a in enumerate(parts[0])
    )


def count_regions(
    model: nn.Module, data: Tensor | Iterable[Any], batch_size: int = 256, *,
    additional_forward_args: Any = None, memory_budget: int | None = None,
) -> tuple[int, int]:
    """Bounds on the number of complete linear regions that the data points occupy.

    Args:
        model: the network (eval mode, flags restored).
        data: a tensor ``[M, *input_shape]`` or an iterable of batches (tensors,
            or tuples whose first element is the input, as a DataLoader gives).
        batch_size: examples per forward pass when ``data`` is a tensor.
        additional_forward_args: further arguments of the model for a tensor ``data``
            (one value or a tuple; tensors with one entry per example, such as sequence
            ``lengths`` ``[M]``, are cut with the batches).

    Returns:
        ``(n_patterns, n_jacobians)``: the number of distinct activation
        patterns (an upper bound on the regions) and the number of distinct
        output Jacobians (a lower bound).  Jacobians are computed in float64
        for one representative per pattern and count as distinct only if they
        differ by more than 1e-9 relative, so the lower bound stays sound
        under rounding.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> rollnet.count_regions(net, torch.zeros(4, 1))
        (1, 1)
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    args: tuple[Any, ...] = ()
    if additional_forward_args is not None:
        if not isinstance(data, Tensor):
            raise ValueError(
                "additional_forward_args needs data as one tensor [M, *input_shape] (its per-example "
                "arguments are cut with it); for a DataLoader, call count_regions per batch"
            )
        args = check_forward_args(additional_forward_args, data)
    representatives: dict[bytes, tuple[Tensor, tuple[Any, ...]]] = {}
    with torch.no_grad(), eval_mode(model):
        for xb, argsb in _batches(data, batch_size, args):
            xb = check_input(xb, "data")
            if xb.shape[0] == 0:
                continue
            got = collect(model, xb, None, Request(), forward_args=argsb)
            keys = patterns_of(got, xb.shape[0]).keys()
            for i, key in enumerate(keys):
                if key not in representatives:
                    representatives[key] = (xb[i], batch_slice(argsb, i, i + 1, xb.shape[0]))
    if not representatives:
        return 0, 0
    points = list(representatives.values())
    return len(representatives), _count_distinct_jacobians(model, points, batch_size, memory_budget)


def _count_distinct_jacobians(
    model: nn.Module, points: list[tuple[Tensor, tuple[Any, ...]]], batch_size: int, memory_budget: int | None
) -> int:
    try:
        model64 = copy.deepcopy(model).to(torch.float64)
        dtype = torch.float64
        rel = 1e-9
    except Exception:  # a model that cannot be copied: use its own precision
        model64 = model
        dtype = points[0][0].dtype
        rel = 1e-9 if dtype == torch.float64 else 1e-4
    jacobians = []
    with torch.no_grad(), eval_mode(model64):
        for i in range(0, len(points), batch_size):
            part = points[i : i + batch_size]
            xb = torch.stack([p[0] for p in part]).to(dtype)
            argsb = tuple(
                a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a
                for a in _stack_args([p[1] for p in part])
            )
            got = collect(model64, xb, unit_directions(xb.shape[1:]), Request(output=True),
                          memory_budget=memory_budget, forward_args=argsb)
            assert got.output_rows is not None
            jacobians.append(got.output_rows.flatten(1))
    flat = torch.cat(jacobians)
    scale = float(flat.abs().max()) if flat.numel() else 0.0
    tol = rel * max(scale, 1e-30)
    # Greedy set of pairwise-distinct Jacobians (each differs from all kept by > tol in some
    # entry), found through a sorted random projection: a kept Jacobian within tol of a new one
    # has a projection within tol * ||r||_1 of it.
    r = torch.randn(flat.shape[1], dtype=flat.dtype, device="cpu", generator=torch.Generator().manual_seed(0))
    proj = (flat @ r.to(flat.device)).tolist()
    window = tol * float(r.abs().sum())
    keys: list[float] = []
    kept: list[int] = []
    for i, v in enumerate(proj):
        lo = bisect.bisect_left(keys, v - window)
        hi = bisect.bisect_right(keys, v + window)
        if any(float((flat[i] - flat[kept[j]]).abs().max()) <= tol for j in range(lo, hi)):
            continue
        pos = bisect.bisect_left(keys, v)
        keys.insert(pos, v)
        kept.insert(pos, i)
    return len(kept)
