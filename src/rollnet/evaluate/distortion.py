"""Gradient distortion: how far an explanation moves under small perturbations of the input.

Two measures (the paper's section 4.3 measured both on its ResNet):

* :func:`gradient_distortion`, the expected l1 distance between the
  explanation at x and at a point drawn uniformly from the eps-ball around x
  (intersected with a box ``clamp=(lo, hi)``), estimated from ``n_samples``
  draws;
* :func:`max_gradient_distortion`, the largest such distance a search finds,
  with the point that gives it: the paper's genetic search, or a projected
  ascent on a smoothed surrogate of the network (``method="surrogate"``).

The explanation defaults to the gradient of the target logit
(:func:`default_explanation`); any ``explain(model, inputs, target)`` callable
can be measured the same way.  How points are drawn and kept inside the ball
and box: :mod:`rollnet.evaluate.ball`.  Evaluations: one explanation computed
at one point is one evaluation (for the default explanation, one forward and
one backward pass of one example); see :class:`WorstCase`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rollnet.certify import Target, check_forward_args, check_input, parse_norm
from rollnet.engine.modes import eval_mode
from rollnet.evaluate.ball import Ball, check_clamp, check_eps
from rollnet.evaluate.scoring import Explanation, Scorer, default_explanation, points_per_chunk
from rollnet.evaluate.search import genetic, surrogate

__all__ = ["WorstCase", "default_explanation", "gradient_distortion", "max_gradient_distortion"]

Norm = int | float | str
Clamp = tuple[float | Tensor, float | Tensor] | None


def _check_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_explain(explain: Any) -> Explanation | None:
    if explain is not None and not callable(explain):
        raise TypeError(f"explain must be a callable (model, inputs, target) -> attributions, got {type(explain).__name__}")
    return explain


def _setup(model: nn.Module, x: Any, eps: Any, p: Norm, clamp: Clamp, additional_forward_args: Any,
           generator: torch.Generator | None) -> tuple[Tensor, float, float, tuple[Tensor, Tensor] | None, tuple[Any, ...]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pn = parse_norm(p)
    x = check_input(x).detach()  # the points are data: no graph back to the caller's x
    eps = check_eps(eps)
    box = check_clamp(clamp, x)
    args = check_forward_args(additional_forward_args, x)
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != x.device.type):
        raise ValueError(f"generator must be a torch.Generator on x's device ({x.device}), got {generator!r}")
    return x, eps, pn, box, args


def gradient_distortion(
    model: nn.Module,
    x: Tensor,
    target: Target,
    eps: float,
    p: Norm = "inf",
    n_samples: int = 1000,
    clamp: Clamp = None,
    explain: Callable[[nn.Module, Tensor, Any], Tensor] | None = None,
    generator: torch.Generator | None = None,
    additional_forward_args: Any = None,
    *,
    memory_budget: int | None = None,
) -> Tensor:
    """Expected l1 distance between the explanation at x and at a uniform point of its eps-ball.

    For each example, ``mean_s ||e(x_s) - e(x)||_1`` over ``n_samples`` points
    ``x_s`` drawn uniformly from ``{x' : ||x' - x||_p <= eps}``, intersected
    with the box ``lo <= x' <= hi`` when ``clamp=(lo, hi)`` is given.  The
    draw is exactly uniform on the intersection: for ``p="inf"`` each
    coordinate is uniform in its interval; for p = 1, 2 (Gaussian direction
    times ``U^(1/D)`` radius; exponential construction for l1) coordinates on a
    face of the box are reflected into it and the rest is rejection sampling,
    never clipping (:mod:`rollnet.evaluate.ball`).

    The default explanation ``e`` is the gradient of the ``target`` logit, and
    the result is then **exactly 0.0** when the ball lies inside the certified
    region of x (``eps`` below ``rollnet.margin(model, x, p="inf")``, for any
    p since the l_inf ball contains the others): every point there has x's
    activation pattern and the same gradient, computed by the same operations.

    Args:
        model: the network; the explanation is computed in eval mode and every
            submodule's train/eval flag is restored afterwards.
        x: ``[B, *shape]`` inputs, inside the box when ``clamp`` is given.
        target: Captum's rules: an int, a list or ``[B]`` tensor with one index
            per example, or ``None`` for a model with a single output.
        eps: radius of the ball (>= 0), in the units of the model's input.
        p: 1, 2 or ``"inf"`` (default).
        n_samples: draws per example (default 1000).
        clamp: ``(lo, hi)``, numbers or tensors broadcastable to x, ``lo < hi``; default: no box.
            x must lie inside it; an x within rounding (4 ulps) outside, as normalised data
            can be, widens the box to hold x.
        explain: ``(model, inputs, target) -> attributions`` (one row per input), e.g.
            ``lambda m, inp, t: IntegratedGradients(m).attribute(inp, target=t)``;
            ``target`` is passed as an ``[n]`` index tensor (``None`` for a single
            output).  With ``additional_forward_args``, ``model`` is a wrapper that
            passes them (per-example ones repeated for the points, tiled when the
            callable stacks copies of its batch, as Captum does).
        generator: seeds the draws (default: torch's global generator).
        additional_forward_args: further arguments of the model, ``model(x, *args)``,
            never perturbed; per-example tensors have B entries.
        memory_budget: bytes of activations one explanation call may hold (default
            256 MiB), estimated from a forward pass of one example.

    Returns:
        ``[B]`` mean distances, in x's dtype (accumulated in float64).

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(1.0), net[0].bias.fill_(0.0)
        >>> x = torch.tensor([[0.5], [0.0]])  # kink at 0: margins 0.5 and 0
        >>> g = torch.Generator().manual_seed(0)
        >>> d = rollnet.gradient_distortion(net, x, None, eps=0.4, n_samples=4000, generator=g)
        >>> float(d[0]), abs(float(d[1]) - 0.5) < 0.05  # |1 - 0| on half of [-0.4, 0.4]
        (0.0, True)
    """
    x, eps, pn, box, args = _setup(model, x, eps, p, clamp, additional_forward_args, generator)
    n_samples = _check_count(n_samples, "n_samples")
    explain = _check_explain(explain)
    if x.shape[0] == 0:
        return x.new_zeros(0)
    with eval_mode(model):
        chunk = points_per_chunk(model, x, args, memory_budget)
        scorer = Scorer(model, x, target, explain, args, chunk)
        ball = Ball(x, eps, pn, box)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        per_round = max(1, chunk // x.shape[0])
        done = 0
        while done < n_samples:
            n = min(per_round, n_samples - done)
            total += scorer.score(ball.sample(n, generator)).double().sum(dim=1)
            done += n
    return (total / n_samples).to(x.dtype)


@dataclass(frozen=True)
class WorstCase:
    """The most distorting point a search found, per example.

    Attributes:
        distortion: ``[B]`` the largest l1 distance found between the explanation at
            x and at a point of the ball (>= 0: x itself, distance 0, is the start).
        x: ``[B, *shape]`` the point that gives it (x itself where nothing beat 0),
            inside the ball and box exactly.
        label_changed: ``[B]`` bool, whether the model's predicted label at that
            point (argmax of the logits; for a single output, its sign) differs
            from the one at x.
        evaluations: explanations computed per example at points other than x
            (the explanation at x, which every measure needs, is not counted):
            one evaluation is one explanation at one point, for the default
            explanation one forward and one backward pass of one example.  A
            surrogate step counts as 2 (its explanation, and the backward pass
            through it); it still takes more time than 2 exact evaluations (the
            benchmark reports time per evaluation).
            The forward passes that decide ``label_changed`` are not counted.
    """

    distortion: Tensor
    x: Tensor
    label_changed: Tensor
    evaluations: int


_METHODS = ("genetic", "surrogate")


def max_gradient_distortion(
    model: nn.Module,
    x: Tensor,
    target: Target,
    eps: float,
    method: str = "genetic",
    budget: int | None = None,
    *,
    p: Norm = "inf",
    clamp: Clamp = None,
    explain: Callable[[nn.Module, Tensor, Any], Tensor] | None = None,
    generator: torch.Generator | None = None,
    additional_forward_args: Any = None,
    population: int = 4800,
    generations: int = 30,
    keep: float = 0.25,
    chains: int = 32,
    steps: int | None = None,
    step_size: float = 0.25,
    temperature: float = 0.1,
    memory_budget: int | None = None,
) -> WorstCase:
    """The largest explanation distortion a search finds in the eps-ball, and where.

    Maximises ``||e(x') - e(x)||_1`` over ``x'`` in ``{||x' - x||_p <= eps, lo <= x' <= hi}``
    (the set and the explanation ``e`` as in :func:`gradient_distortion`).
    Every returned point lies inside the ball and box exactly; the distortion
    is the exact network's, never a surrogate's, and never below 0.

    Methods:
        ``"genetic"``: the paper's search (method notes, section 4):
        ``population`` points drawn uniformly in the set, then ``generations``
        rounds that keep the best fraction ``keep`` and refill the population with
        random convex combinations of two kept parents, projected back into the
        set, no mutation.  Cost: ``population + generations * (population - kept)``
        evaluations (112,800 at the paper's sizes), cut at ``budget``.  It holds
        ``B * population`` points at once (search few examples at a time on large inputs).

        ``"surrogate"``: projected steepest ascent from ``chains`` uniform starting
        points on a smoothed surrogate: each ReLU / LeakyReLU call becomes
        softplus with temperature ``temperature * 4**-(c % 4)`` for chain c (in
        units of pre-activations; the model is not modified), the gradient of the
        surrogate explanation's l1 distance to ``e(x)`` comes from autograd, steps
        of ``step_size * eps`` (decaying to a tenth) are projected into the set,
        and every iterate is scored on the exact network.  Cost: 3 evaluations per
        chain and step (2 for the surrogate step, 1 for the exact score); ``steps``
        defaults to ``budget // (3 * chains)`` (30 without a budget).  Needs an explanation differentiable by autograd (the
        default is) and ReLU / LeakyReLU calls to smooth (other piecewise-linear
        units such as max pooling stay exact).

    Args:
        model, x, target, eps, p, clamp, explain, generator, additional_forward_args,
            memory_budget: as in :func:`gradient_distortion`.
        method: ``"genetic"`` (default) or ``"surrogate"``.
        budget: most evaluations per example (see :class:`WorstCase`); default: the method's own sizes.
        population, generations, keep: the genetic search's sizes (defaults: the paper's 4800, 30, 0.25).
        chains, steps, step_size, temperature: the surrogate search's settings.

    Returns:
        :class:`WorstCase` with ``.distortion`` ``[B]``, ``.x`` (like x),
        ``.label_changed`` ``[B]`` and ``.evaluations`` (per example).

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(1.0), net[0].bias.fill_(0.0)
        >>> g = torch.Generator().manual_seed(0)
        >>> w = rollnet.max_gradient_distortion(net, torch.tensor([[0.1]]), None, eps=0.3,
        ...                                     population=20, generations=2, generator=g)
        >>> float(w.distortion[0]), bool(w.x[0, 0] < 0), w.evaluations  # crossed the kink at 0
        (1.0, True, 50)
    """
    x, eps, pn, box, args = _setup(model, x, eps, p, clamp, additional_forward_args, generator)
    explain = _check_explain(explain)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if budget is not None:
        budget = _check_count(budget, "budget")
    population = _check_count(population, "population")
    generations = _check_count(generations, "generations", 0)
    chains = _check_count(chains, "chains")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    for name, value in (("step_size", step_size), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if steps is None:
        steps = 30 if budget is None else max(1, budget // (3 * chains))
    steps = _check_count(steps, "steps")
    if x.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=x.device)
        return WorstCase(x.new_zeros(0), x.clone(), empty, 0)
    with eval_mode(model):
        factor = 3.0 if method == "genetic" else 9.0
        chunk = points_per_chunk(model, x, args, memory_budget, factor)
        scorer = Scorer(model, x, target, explain, args, chunk)
        ball = Ball(x, eps, pn, box)
        if method == "genetic":
            best = genetic(scorer, ball, budget, population, generations, keep, generator)
        else:
            best = surrogate(scorer, ball, budget, max(1, min(chains, budget // 3)) if budget else chains, steps,
                             float(step_size), float(temperature), generator)
        changed = scorer.changed(best.x)
    return WorstCase(best.value.to(x.dtype), best.x, changed, scorer.evaluations)
