"""Hand-made slices: the unit square cut by lines into convex polygons (no model needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def _clip(poly: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """The part of a convex polygon where ``normal . X + offset >= 0`` (Sutherland-Hodgman)."""
    out = []
    h = poly @ normal + offset
    for i in range(len(poly)):
        k = (i + 1) % len(poly)
        if h[i] >= 0:
            out.append(poly[i])
        if (h[i] >= 0) != (h[k] >= 0):
            t = h[i] / (h[i] - h[k])
            out.append(poly[i] + t * (poly[k] - poly[i]))
    return np.array(out).reshape(-1, 2)


@dataclass(frozen=True)
class Region:
    vertices: Tensor
    pattern_id: int


@dataclass
class Slice:
    regions: list[Region]
    extent: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)
    decision_boundary: Tensor = field(default_factory=lambda: torch.zeros(0, 2, 2, dtype=torch.float64))

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)


def arrangement(n_lines: int, seed: int = 0) -> Slice:
    """The unit square cut by ``n_lines`` random lines; the first line is the decision boundary."""
    rng = np.random.default_rng(seed)
    polys = [np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])]
    lines = []
    for _ in range(n_lines):
        angle = rng.uniform(0, np.pi)
        normal = np.array([np.cos(angle), np.sin(angle)])
        offset = -float(normal @ rng.uniform(0.1, 0.9, size=2))
        lines.append((normal, offset))
        cut = []
        for p in polys:
            for side in (1.0, -1.0):
                q = _clip(p, side * normal, side * offset)
                if len(q) >= 3 and abs(_area(q)) > 1e-12:
                    cut.append(q)
        polys = cut
    normal, offset = lines[0]
    # the first line inside the square: clip a long segment along it
    d = np.array([-normal[1], normal[0]])
    base = -offset * normal
    ts = np.linspace(-3, 3, 60001)
    inside = ts[((base + ts[:, None] * d >= 0) & (base + ts[:, None] * d <= 1)).all(axis=1)]
    boundary = torch.from_numpy(np.array([[base + inside[0] * d, base + inside[-1] * d]]))
    regions = [Region(torch.tensor(p, dtype=torch.float64), i) for i, p in enumerate(polys)]
    return Slice(regions, decision_boundary=boundary)


def _area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))
