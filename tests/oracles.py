"""Independent oracles for certificates (see docs/testing.md)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.zoo import Recording


def recorded_neurons(model: Recording, x: Tensor) -> Tensor:
    """``[B, N]`` neuron values from the model's own record."""
    model.record = []
    try:
        with torch.no_grad():
            model(x)
        return torch.cat([z.reshape(x.shape[0], -1) for z in model.record], dim=1)
    finally:
        model.record = None


def recorded_pattern(model: Recording, x: Tensor) -> Tensor:
    """``[B, N]`` bool: which recorded neurons are on (z > 0)."""
    return recorded_neurons(model, x) > 0


def autograd_gradients(model: Recording, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(z [B, N], grads [B, N, *input_shape])`` by one backward pass per neuron."""
    x = x.detach().clone().requires_grad_(True)
    model.record = []
    try:
        model(x)
        z = torch.cat([r.reshape(x.shape[0], -1) for r in model.record], dim=1)
    finally:
        model.record = None
    grads = []
    for j in range(z.shape[1]):
        (g,) = torch.autograd.grad(z[:, j].sum(), x, retain_graph=True)
        grads.append(g)
    return z.detach(), torch.stack(grads, dim=1)


def dual(p: float) -> float:
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]


def oracle_margin(z: Tensor, g: Tensor, p: float) -> Tensor:
    """min_j |z_j| / ||g_j||_q, skipping zero gradients."""
    norms = g.flatten(2).norm(p=dual(p), dim=2)
    ratio = torch.where(norms > 0, z.abs() / norms, torch.full_like(z, math.inf))
    return ratio.amin(1) if z.shape[1] else torch.full((z.shape[0],), math.inf, dtype=z.dtype)


def sample_ball(n: int, shape: tuple[int, ...], p: float, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``[n, *shape]`` points u with ||u||_p <= 1: half on the surface, half inside,
    including the worst points (vertices) for p = 1 and inf."""
    d = math.prod(shape)
    half = n // 2
    if p == 2.0:
        u = torch.randn(n, d, generator=gen, dtype=dtype)
        u = u / u.norm(dim=1, keepdim=True)
    elif p == math.inf:
        u = torch.rand(n, d, generator=gen, dtype=dtype) * 2 - 1
        quarter = n // 4
        # vertices: all coordinates +-1
        u[:quarter] = torch.randint(0, 2, (quarter, d), generator=gen).to(dtype) * 2 - 1
        # surface: one random coordinate set to +-1
        rows = torch.arange(quarter, n)
        cols = torch.randint(0, d, (n - quarter,), generator=gen)
        u[rows, cols] = torch.randint(0, 2, (n - quarter,), generator=gen).to(dtype) * 2 - 1
    else:
        e = -torch.log(torch.rand(n, d, generator=gen, dtype=dtype))
        signs = torch.randint(0, 2, (n, d), generator=gen).to(dtype) * 2 - 1
        u = signs * e / e.sum(dim=1, keepdim=True)
        k = min(n // 4, 2 * d)
        vert = torch.zeros(k, d, dtype=dtype)
        idx = torch.arange(k)
        vert[idx, idx % d] = torch.where(idx < d, 1.0, -1.0).to(dtype)
        u[:k] = vert
    scale = torch.ones(n, 1, dtype=dtype)
    scale[half:] = torch.rand(n - half, 1, generator=gen, dtype=dtype)
    return (u * scale).reshape(n, *shape)


def worst_direction(g: Tensor, z: float, p: float, always_on: bool = False) -> Tensor:
    """The unit-lp direction that moves neuron (z, g) fastest towards its hyperplane.

    ``always_on``: a max-unit difference, which is on even at z = 0 (a tie).
    """
    s = 1.0 if (always_on or z > 0) else -1.0
    if p == 2.0:
        return -s * g / g.norm()
    if p == math.inf:
        return -s * torch.sign(g)
    flat = g.flatten()
    k = int(flat.abs().argmax())
    u = torch.zeros_like(flat)
    u[k] = -s * torch.sign(flat[k])
    return u.reshape(g.shape)


def bisect_line(model: Recording, x: Tensor, d: Tensor, hi: float, steps: int = 56) -> float:
    """Largest t in [0, hi] with pattern(x + t d) == pattern(x), by bisection (region is convex)."""
    base = recorded_pattern(model, x.unsqueeze(0))
    lo, up = 0.0, hi
    for _ in range(steps):
        mid = (lo + up) / 2
        same = bool((recorded_pattern(model, (x + mid * d).unsqueeze(0)) == base).all())
        lo, up = (mid, up) if same else (lo, mid)
    return lo
