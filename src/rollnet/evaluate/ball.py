"""The perturbation set of the distortion measures: an lp ball intersected with a box.

:class:`Ball` draws points uniformly from ``{x' : ||x' - x||_p <= eps, lo <= x' <= hi}``
and maps any point back into that set, exactly in floating point: every point
it returns satisfies the box with no tolerance and ``||x' - x||_p <= eps``
when the difference and its norm are computed exactly (in float64 for
float32 inputs), hence also when they are computed in x's own dtype.

Uniform draws:

* ``p = inf``: the intersection is a box, one interval per coordinate, so each
  coordinate is drawn uniformly in its interval: exactly uniform, no rejection.
* ``p = 2``: a Gaussian direction scaled by ``eps * U^(1/D)``.
* ``p = 1``: ``D + 1`` standard exponentials ``E``; ``E[:D] / sum(E)`` is uniform
  on the simplex ``{s >= 0, sum(s) <= 1}``; random signs and a factor ``eps``
  make it uniform in the l1 ball.

With a box and p = 1 or 2, a coordinate that sits on a face of the box
(``x_i = lo_i`` or ``x_i = hi_i``, as for black or white pixels) takes the
absolute value of its draw, pointing into the box: the ball is symmetric under
sign flips, so this is exactly uniform on the ball's part inside that face.
Draws that still leave the box are rejected (exact, no clipping).  When fewer
than one draw in a thousand is accepted the sampler stops with a ValueError
rather than loop for long.  Rounding can put a draw an ulp outside the ball;
such a draw is shrunk toward x by a relative ``1e-7`` or so (see :meth:`Ball.project`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Ball", "check_clamp", "check_eps"]

_MIN_ACCEPTANCE = 1e-3


def check_eps(eps: float) -> float:
    """A finite, non-negative radius as a float."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number (the radius of the ball), got {type(eps).__name__}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return value


def check_clamp(clamp: tuple[float | Tensor, float | Tensor] | None, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(lo, hi)`` broadcast to x's shape and dtype; refuse lo >= hi or an x outside the box.

    An x within 4 ulps outside the box (rounding of normalised data) widens the box to hold it.
    """
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"clamp must be None or a pair (lo, hi), got {clamp!r}")
    bounds = []
    for name, b in zip(("lo", "hi"), clamp, strict=True):
        if isinstance(b, bool) or not isinstance(b, (int, float, Tensor)):
            raise TypeError(f"clamp {name} must be a number or a tensor, got {type(b).__name__}")
        t = torch.as_tensor(b, dtype=x.dtype, device=x.device)
        try:
            t = torch.broadcast_to(t, x.shape)
        except RuntimeError:
            raise ValueError(
                f"clamp {name} of shape {tuple(t.shape)} does not broadcast to x's shape {tuple(x.shape)}"
            ) from None
        if bool(torch.isnan(t).any()):
            raise ValueError(f"clamp {name} contains NaN")
        bounds.append(t)
    lo, hi = bounds
    if not bool((lo < hi).all()):
        raise ValueError("clamp must satisfy lo < hi everywhere")
    # data normalised in float32 can sit an ulp outside the box of its own pixel range (MNIST's
    # (0 - mean) / std does): within 4 ulps the box is widened to hold x, farther out is an error
    tol = 4 * torch.finfo(x.dtype).eps * torch.maximum(torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo))
    outside = ((x < lo - tol) | (x > hi + tol)).flatten(1).any(1)
    if bool(outside.any()):
        bad = outside.nonzero().flatten().tolist()
        raise ValueError(f"x lies outside the clamp box (lo, hi) (examples {bad[:10]})")
    return torch.minimum(lo, x), torch.maximum(hi, x)


def _within(x: Tensor, eps: float, upper: bool) -> Tensor:
    """``x + eps`` (or ``x - eps``) in x's dtype, rounded toward x so that ``|bound - x| <= eps`` holds exactly."""
    exact = x.double() + eps if upper else x.double() - eps
    bound = exact.to(x.dtype)
    toward = torch.full_like(bound, -math.inf if upper else math.inf)
    for _ in range(64):
        gap = (bound.double() - x.double()).abs()
        over = gap > eps
        if not bool(over.any()):
            return bound
        bound = torch.where(over, torch.nextafter(bound, toward), bound)
    raise AssertionError("could not round the ball's bounds inside the ball")  # pragma: no cover


class Ball:
    """``{x' : ||x' - x||_p <= eps, lo <= x' <= hi}`` around each example of a batch.

    Args:
        x: ``[B, *shape]`` centres (inside the box).
        eps: radius (>= 0), in the units of x.
        p: 1.0, 2.0 or ``math.inf``.
        box: ``(lo, hi)`` shaped like x (see :func:`check_clamp`) or None.

    Example:
        >>> ball = Ball(torch.zeros(2, 3), 0.5, math.inf, None)
        >>> pts = ball.sample(10, torch.Generator().manual_seed(0))
        >>> pts.shape, bool(pts.abs().max() <= 0.5)
        (torch.Size([2, 10, 3]), True)
    """

    def __init__(self, x: Tensor, eps: float, p: float, box: tuple[Tensor, Tensor] | None) -> None:
        self.x = x
        self.eps = eps
        self.p = p
        self.box = box
        if p == math.inf:
            lo, hi = _within(x, eps, upper=False), _within(x, eps, upper=True)
            self.lo = lo if box is None else torch.maximum(lo, box[0])
            self.hi = hi if box is None else torch.minimum(hi, box[1])
        elif box is not None:
            self.lo, self.hi = box
        if box is not None and p != math.inf:
            self._up = x == box[0]  # on the lower face: perturb upward only
            self._down = x == box[1]

    def select(self, index: slice) -> Ball:
        """The balls of the examples ``x[index]``."""
        box = None if self.box is None else (self.box[0][index], self.box[1][index])
        return Ball(self.x[index], self.eps, self.p, box)

    def _offsets(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``[B, n, D]`` draws uniform in the lp ball of radius eps around 0 (p = 1 or 2)."""
        b, d = self.x.shape[0], self.x[0].numel()
        dt, dev = self.x.dtype, self.x.device
        if self.p == 2.0:
            g = torch.randn(b, n, d, dtype=dt, device=dev, generator=generator)
            r = torch.rand(b, n, 1, dtype=dt, device=dev, generator=generator).pow(1.0 / d)
            return g / g.norm(dim=2, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny) * (r * self.eps)
        e = -torch.log1p(-torch.rand(b, n, d + 1, dtype=dt, device=dev, generator=generator))
        s = e[..., :d] / e.sum(dim=2, keepdim=True)
        sign = torch.rand(b, n, d, dtype=dt, device=dev, generator=generator) < 0.5
        return torch.where(sign, -s, s) * self.eps

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[B, n, *shape]`` points drawn uniformly from each example's set (see the module notes)."""
        b, shape = self.x.shape[0], self.x.shape[1:]
        if self.eps == 0 or n == 0:
            return self.x.unsqueeze(1).expand(b, n, *shape).clone()
        if self.p == math.inf:
            u = torch.rand(b, n, *shape, dtype=self.x.dtype, device=self.x.device, generator=generator)
            lo, hi = self.lo.unsqueeze(1), self.hi.unsqueeze(1)
            return torch.minimum(torch.maximum(lo + (hi - lo) * u, lo), hi)
        if self.box is None:
            pts = self.x.unsqueeze(1) + self._offsets(n, generator).reshape(b, n, *shape)
            return self.project(pts)
        return self._rejection(n, generator)

    def _rejection(self, n: int, generator: torch.Generator | None) -> Tensor:
        b, shape = self.x.shape[0], self.x.shape[1:]
        out = self.x.new_empty(b, n, *shape)
        have = torch.zeros(b, dtype=torch.int64)
        tried = torch.zeros(b, dtype=torch.int64)
        x, lo, hi = self.x.unsqueeze(1), self.lo.unsqueeze(1), self.hi.unsqueeze(1)
        up, down = self._up.unsqueeze(1), self._down.unsqueeze(1)
        while bool((have < n).any()):
            d = self._offsets(n, generator).reshape(b, n, *shape)
            d = torch.where(up, d.abs(), torch.where(down, -d.abs(), d))
            pts = self.project_ball(x + d)
            ok = ((pts >= lo) & (pts <= hi)).flatten(2).all(2)
            tried += n
            for i in (have < n).nonzero().flatten().tolist():
                take = pts[i][ok[i]][: n - int(have[i])]
                out[i, int(have[i]) : int(have[i]) + take.shape[0]] = take
                have[i] += take.shape[0]
            rate = have.double() / tried.double()
            stuck = (have < n) & (tried >= 20 * n) & (rate < _MIN_ACCEPTANCE)
            if bool(stuck.any()):
                i = int(stuck.nonzero()[0])
                raise ValueError(
                    f"the l{self.p:g} ball of radius {self.eps:g} around example {i} lies mostly outside the clamp "
                    f"box: only {int(have[i])} of {int(tried[i])} uniform draws fell inside, too few for rejection "
                    "sampling; use p='inf' (drawn exactly in the intersection), a smaller eps, or no clamp"
                )
        return out

    def project_ball(self, pts: Tensor) -> Tensor:
        """Scale ``pts - x`` back onto the ball where it lies outside (p = 1 or 2), exactly."""
        x = self.x.unsqueeze(1)
        for k in range(12):
            d = pts.double() - x.double()
            norm = d.flatten(2).norm(p=self.p, dim=2)
            over = norm > self.eps
            if not bool(over.any()):
                return pts
            scale = (self.eps / norm.clamp_min(torch.finfo(torch.float64).tiny)) * (1.0 - 1e-7 * 4.0**k)
            scale = torch.where(over, scale, torch.ones_like(scale)).to(pts.dtype)
            scale = scale.reshape(*scale.shape, *([1] * (pts.dim() - 2)))
            shrunk = x + (pts - x) * scale
            if self.box is not None:
                shrunk = torch.minimum(torch.maximum(shrunk, self.lo.unsqueeze(1)), self.hi.unsqueeze(1))
            pts = torch.where(over.reshape(scale.shape), shrunk, pts)
        d = pts.double() - x.double()
        over = (d.flatten(2).norm(p=self.p, dim=2) > self.eps).reshape(*pts.shape[:2], *([1] * (pts.dim() - 2)))
        return torch.where(over, x.expand_as(pts), pts)  # x itself: always inside (never reached in practice)

    def project(self, pts: Tensor) -> Tensor:
        """``[B, n, *shape]`` points mapped into the set: clipped to the box, then (p = 1, 2) scaled toward x.

        Not the Euclidean projection onto the intersection, but every point it
        returns is inside the set exactly, and points already inside are unchanged.
        """
        if self.p == math.inf:
            return torch.minimum(torch.maximum(pts, self.lo.unsqueeze(1)), self.hi.unsqueeze(1))
        if self.box is not None:
            pts = torch.minimum(torch.maximum(pts, self.lo.unsqueeze(1)), self.hi.unsqueeze(1))
        return self.project_ball(pts)
