"""Worst-case searches for the gradient distortion: the paper's genetic search and a smoothed-surrogate ascent.

Both search, per example, the ball-and-box set of :class:`~rollnet.evaluate.ball.Ball`
for the point whose explanation is farthest (l1) from the explanation at x,
spending evaluations through a :class:`~rollnet.evaluate.scoring.Scorer` (one
evaluation = one explanation at one point).  Each returns the best point it
scored exactly; x itself (distortion 0) is the starting best, so the result is
never below 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from rollnet.evaluate.ball import Ball
from rollnet.evaluate.scoring import Scorer

__all__ = ["Best", "genetic", "smoothed", "surrogate"]


class Best:
    """The best exactly-scored point of each example so far (x itself, distortion 0, to begin with)."""

    def __init__(self, x: Tensor) -> None:
        self.value = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        self.x = x.clone()

    def update(self, pts: Tensor, scores: Tensor) -> None:
        """Keep, per example, the highest of ``scores`` ``[B, n]`` at ``pts`` ``[B, n, *shape]`` if it beats the best."""
        if scores.shape[1] == 0:
            return
        top, idx = scores.double().max(dim=1)
        better = top > self.value
        if bool(better.any()):
            rows = better.nonzero().flatten()
            self.value[rows] = top[rows]
            self.x[rows] = pts[rows, idx[rows]]


def _left(scorer: Scorer, budget: int | None) -> int:
    return math.inf if budget is None else budget - scorer.evaluations  # type: ignore[return-value]


def _gather(pts: Tensor, idx: Tensor) -> Tensor:
    """``pts[b, idx[b, j]]`` for ``pts`` ``[B, n, *shape]`` and ``idx`` ``[B, m]``."""
    b = torch.arange(pts.shape[0], device=pts.device)[:, None]
    return pts[b, idx]


def genetic(scorer: Scorer, ball: Ball, budget: int | None, population: int, generations: int, keep: float,
            generator: torch.Generator | None) -> Best:
    """The paper's genetic search (method notes, section 4).

    Generation 0 is ``population`` points drawn uniformly in the set.  Each of
    the ``generations`` rounds keeps the best ``round(keep * population)``
    points (not re-scored) and fills the population with children
    ``lam * a + (1 - lam) * b``, ``lam ~ U(0, 1)``, of two parents drawn
    uniformly from the kept ones, projected back into the set; no mutation.
    With ``budget``, the last round is cut to the evaluations left.
    """
    x = ball.x
    best = Best(x)
    n0 = int(min(population, _left(scorer, budget)))
    if n0 <= 0:
        return best
    pop = ball.sample(n0, generator)
    scores = scorer.score(pop)
    best.update(pop, scores)
    k = min(n0, max(1, round(keep * population)))
    top, idx = scores.topk(k, dim=1)
    elite, elite_scores = _gather(pop, idx), top
    kw: dict[str, Any] = {"device": x.device, "generator": generator}
    for _ in range(generations):
        c = int(min(population - k, _left(scorer, budget)))
        if c <= 0:
            break
        ia = torch.randint(0, k, (x.shape[0], c), **kw)
        ib = torch.randint(0, k, (x.shape[0], c), **kw)
        lam = torch.rand(x.shape[0], c, *([1] * (x.dim() - 1)), dtype=x.dtype, **kw)
        children = ball.project(lam * _gather(elite, ia) + (1 - lam) * _gather(elite, ib))
        child_scores = scorer.score(children)
        best.update(children, child_scores)
        merged = torch.cat([elite, children], dim=1)
        merged_scores = torch.cat([elite_scores, child_scores], dim=1)
        elite_scores, idx = merged_scores.topk(k, dim=1)
        elite = _gather(merged, idx)
    return best


# ---------------------------------------------------------------------------
# the smoothed surrogate

_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_IN_PLACE = {torch.relu_, torch.Tensor.relu_, F.relu_}
_LEAKY = {F.leaky_relu, torch._C._nn.leaky_relu}
_LEAKY_IN_PLACE = {F.leaky_relu_, torch._C._nn.leaky_relu_}


class _Smooth(TorchFunctionMode):
    """Swap ReLU and LeakyReLU calls for softplus with temperature ``tau`` while active.

    ``relu(z) -> tau * softplus(z / tau)``, ``leaky_relu(z, s) -> s * z + (1 - s) * tau * softplus(z / tau)``.
    ``tau`` is a number or a ``[n]`` tensor, one temperature per point of a batch-first call.
    The model itself is not modified.
    """

    def __init__(self, tau: Tensor) -> None:
        super().__init__()
        self.tau = tau
        self.calls = 0

    def _soft(self, z: Tensor, slope: float) -> Tensor:
        tau = self.tau
        if tau.dim() and z.dim() and z.shape[0] == tau.shape[0]:
            tau = tau.reshape(-1, *([1] * (z.dim() - 1)))
        else:
            tau = tau.mean()
        tau = tau.to(z.dtype)
        self.calls += 1
        soft = tau * F.softplus(z / tau)
        return soft if slope == 0 else slope * z + (1 - slope) * soft

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = _activation_call(func, args, kwargs)
        if kind is None:
            return func(*args, **kwargs)
        slope, inplace = kind
        z = args[0] if args else kwargs["input"]
        if inplace:  # the result replaces z, as the in-place call would; autograd sees a copy
            return z.copy_(self._soft(z.clone(), slope))
        return self._soft(z, slope)


def _activation_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, bool] | None:
    """``(negative slope, in place)`` of a ReLU / LeakyReLU call, None for any other function."""

    def arg(i: int, name: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(name, default)

    if func in _RELU_IN_PLACE:
        return 0.0, True
    if func is F.relu:
        return 0.0, bool(arg(1, "inplace", False))
    if func in _RELU:
        return 0.0, False
    if func in _LEAKY_IN_PLACE:
        return float(arg(1, "negative_slope", 0.01)), True
    if func is F.leaky_relu:
        return float(arg(1, "negative_slope", 0.01)), bool(arg(2, "inplace", False))
    if func in _LEAKY:
        return float(arg(1, "negative_slope", 0.01)), False
    return None


@contextmanager
def smoothed(tau: float | Tensor) -> Iterator[_Smooth]:
    """Run models with ReLU / LeakyReLU replaced by softplus of temperature ``tau`` (see :class:`_Smooth`).

    >>> net = torch.nn.Sequential(torch.nn.ReLU())
    >>> with smoothed(0.5):
    ...     round(float(net(torch.zeros(1))), 4)  # 0.5 * log(2)
    0.3466
    >>> float(net(torch.zeros(1)))
    0.0
    """
    mode = _Smooth(torch.as_tensor(tau, dtype=torch.float64))
    with mode:
        yield mode


def _ascent_direction(grad: Tensor, p: float) -> Tensor:
    """The steepest-ascent unit step for the lp norm: sign (inf), normalised (2), top coordinates (1)."""
    flat = grad.flatten(2)
    if p == math.inf:
        step = flat.sign()
    elif p == 2.0:
        step = flat / flat.norm(dim=2, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    else:
        k = max(1, flat.shape[2] // 100)
        top = flat.abs().topk(k, dim=2).indices
        step = torch.zeros_like(flat).scatter(2, top, flat.gather(2, top).sign() / k)
    return step.reshape(grad.shape)


def surrogate(scorer: Scorer, ball: Ball, budget: int | None, chains: int, steps: int, step_size: float,
              temperature: float, generator: torch.Generator | None) -> Best:
    """Projected ascent on a smoothed surrogate of the explanation, every iterate re-scored exactly.

    ``chains`` starting points are drawn uniformly in the set.  Each step
    computes, at every chain's point, the explanation of the model with each
    ReLU / LeakyReLU replaced by softplus (temperature ``tau`` in units of the
    pre-activations; chain ``c`` uses ``temperature * 4**-(c % 4)``), and the
    gradient of its l1 distance to the exact explanation at x (autograd
    through the explanation); steps by ``step_size * eps`` (decaying linearly
    to a tenth) along the lp steepest-ascent direction, projects into the set,
    and scores the new point on the exact network.  Cost: 3 evaluations per
    chain and step: 2 for the surrogate step (its explanation, one forward and
    backward pass, and the backward pass through that) and 1 for the exact score.
    """
    x = ball.x
    best = Best(x)
    b = x.shape[0]
    tau = temperature * 4.0 ** -(torch.arange(chains, dtype=torch.float64, device=x.device) % 4)
    cur = ball.sample(chains, generator)
    rows = torch.arange(b, device=x.device)
    for t in range(steps):
        if _left(scorer, budget) < 3 * chains:
            break
        grad = _surrogate_gradient(scorer, cur, tau)
        scale = step_size * ball.eps * (1.0 - 0.9 * t / max(1, steps - 1))
        cur = ball.project(cur + scale * _ascent_direction(grad, ball.p))
        best.update(cur, scorer.score(cur, rows))
    return best


def _surrogate_gradient(scorer: Scorer, pts: Tensor, tau: Tensor) -> Tensor:
    """``[B, n, *shape]``: gradient, at each point, of the surrogate explanation's l1 distance to x's."""
    b, n = pts.shape[:2]
    owner = torch.arange(b, device=pts.device).repeat_interleave(n)
    taus = tau.repeat(b)
    flat = pts.reshape(b * n, *pts.shape[2:])
    grads = []
    for start in range(0, b * n, scorer.chunk):
        stop = min(start + scorer.chunk, b * n)
        idx = owner[start:stop]
        inp = flat[start:stop].detach().requires_grad_(True)
        with torch.enable_grad(), smoothed(taus[start:stop]) as mode:
            got = scorer.attributions(inp, scorer.target[idx], scorer.point_args(idx), stop - start)
            if mode.calls == 0:
                raise ValueError(
                    "method='surrogate' smooths ReLU and LeakyReLU calls, and this model made none; "
                    "use method='genetic'"
                )
            if not got.requires_grad:
                raise ValueError(
                    "method='surrogate' needs an explanation that autograd can differentiate with respect to its "
                    "inputs (the default gradient explanation is; build yours with create_graph=True when "
                    "inputs.requires_grad), or use method='genetic'"
                )
            obj = (got.flatten(1) - scorer.reference[idx]).abs().sum()
            (g,) = torch.autograd.grad(obj, inp, allow_unused=True)
        grads.append(torch.zeros_like(inp) if g is None else g.detach())
    scorer.evaluations += 2 * n  # forward + backward, and the backward through them
    return torch.cat(grads).reshape(pts.shape)
