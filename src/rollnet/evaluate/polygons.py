"""Plain 2-D geometry on convex polygons, in float64 NumPy arrays.

A polygon is ``[n, 2]`` vertices in counter-clockwise order, with ``[n]``
int64 edge labels: ``labels[i]`` names the edge from vertex ``i`` to vertex
``i + 1`` (cyclically), so that a polygon cut out by half-planes remembers
which half-plane made each of its sides.  A half-plane is ``offset +
normal . (X - origin) >= 0`` with a unit ``normal``: its value is the signed
distance to the line.

These are the pieces of :mod:`rollnet.evaluate.plane`: clipping a convex
polygon by a half-plane (Sutherland-Hodgman, with a tolerance so that
vertices on the line stay on it), areas, containment and the part of a
segment inside a polygon.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Polygon",
    "area",
    "clip",
    "contains",
    "rectangle",
    "segment_inside",
]

Array = NDArray[np.float64]
Labels = NDArray[np.int64]
Polygon = tuple[Array, Labels]


def rectangle(a_min: float, a_max: float, b_min: float, b_max: float, label: int = -1) -> Polygon:
    """The axis-aligned rectangle, counter-clockwise from its lower-left corner.

    Args:
        a_min, a_max, b_min, b_max: its sides (``a_min < a_max``, ``b_min < b_max``).
        label: the label of all four edges.

    Returns:
        ``(vertices [4, 2], labels [4])``.

    >>> v, lab = rectangle(0.0, 2.0, 0.0, 1.0)
    >>> area(v)
    2.0
    """
    v = np.array([[a_min, b_min], [a_max, b_min], [a_max, b_max], [a_min, b_max]], dtype=np.float64)
    return v, np.full(4, label, dtype=np.int64)


def area(vertices: Array) -> float:
    """Signed area (shoelace formula): positive for counter-clockwise vertices.

    Args:
        vertices: ``[n, 2]`` polygon vertices (``n < 3`` gives 0).

    >>> area(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    0.5
    """
    if vertices.shape[0] < 3:
        return 0.0
    x, y = vertices[:, 0], vertices[:, 1]
    # about the first vertex, so that the products stay small far from the origin
    x = x - x[0]
    y = y - y[0]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def clip(
    vertices: Array, labels: Labels, normal: Array, offset: float, origin: Array, label: int, tol: float
) -> Polygon:
    """The part of a convex polygon where ``offset + normal . (X - origin) >= 0``.

    Vertices within ``tol`` of the line count as on it (and are kept); the
    new edge along the line gets ``label``, every other edge keeps its own.
    Consecutive vertices closer than ``tol`` are merged.

    Args:
        vertices: ``[n, 2]`` counter-clockwise convex polygon.
        labels: ``[n]`` its edge labels.
        normal: ``[2]`` unit normal of the line, pointing into the kept side.
        offset: the half-plane's value at ``origin`` (a signed distance).
        origin: ``[2]`` the point the offset refers to.
        label: the label of the edge the line makes.
        tol: distance under which a vertex lies on the line.

    Returns:
        ``(vertices [m, 2], labels [m])``, counter-clockwise; ``m == 0`` when
        nothing of the polygon is left (or only a point or a segment).

    >>> v, lab = rectangle(0.0, 1.0, 0.0, 1.0)
    >>> v2, lab2 = clip(v, lab, np.array([-1.0, 0.0]), 0.5, np.zeros(2), 7, 1e-12)
    >>> area(v2), sorted(set(lab2.tolist()))
    (0.5, [-1, 7])
    """
    n = vertices.shape[0]
    if n == 0:
        return vertices, labels
    h = offset + (vertices - origin) @ normal
    h = np.where(np.abs(h) <= tol, 0.0, h)
    if bool((h >= 0).all()):
        return vertices, labels
    if bool((h <= 0).all()):
        empty = np.zeros((0, 2), dtype=np.float64)
        return empty, np.zeros(0, dtype=np.int64)
    out_v: list[Array] = []
    out_l: list[int] = []
    for i in range(n):
        k = (i + 1) % n
        hi, hk = h[i], h[k]
        if hi >= 0:
            if hk >= 0:
                out_v.append(vertices[i])
                out_l.append(int(labels[i]))
            elif hi == 0:  # leaving from a vertex on the line: the next edge runs along it
                out_v.append(vertices[i])
                out_l.append(label)
            else:  # leaving: the edge's inside part, then along the line
                out_v.append(vertices[i])
                out_l.append(int(labels[i]))
                out_v.append(_crossing(vertices[i], vertices[k], hi, hk))
                out_l.append(label)
        elif hk > 0:  # entering through the edge's own side
            out_v.append(_crossing(vertices[i], vertices[k], hi, hk))
            out_l.append(int(labels[i]))
    v = np.array(out_v, dtype=np.float64).reshape(-1, 2)
    lab = np.array(out_l, dtype=np.int64)
    return _merge_close(v, lab, tol)


def _crossing(p: Array, q: Array, hp: float, hq: float) -> Array:
    """Where the segment p -> q meets the line, from the values at its ends (opposite signs)."""
    t = hp / (hp - hq)
    return p + t * (q - p)


def _merge_close(vertices: Array, labels: Labels, tol: float) -> Polygon:
    """Drop vertices whose outgoing edge is shorter than ``tol``; fewer than 3 left: empty."""
    n = vertices.shape[0]
    if n >= 2:
        nxt = np.roll(vertices, -1, axis=0)
        keep = np.hypot(*(nxt - vertices).T) > tol
        if not bool(keep.all()):
            vertices, labels = vertices[keep], labels[keep]
    if vertices.shape[0] < 3:
        return np.zeros((0, 2), dtype=np.float64), np.zeros(0, dtype=np.int64)
    return vertices, labels


def _inward(vertices: Array) -> tuple[Array, Array]:
    """Unit inward normals ``[n, 2]`` of a counter-clockwise polygon's edges and their lengths."""
    edge = np.roll(vertices, -1, axis=0) - vertices
    length = np.hypot(edge[:, 0], edge[:, 1])
    normal = np.stack([-edge[:, 1], edge[:, 0]], axis=1) / np.maximum(length, 1e-300)[:, None]
    return normal, length


def contains(vertices: Array, points: Array, margin: float = 0.0) -> NDArray[np.bool_]:
    """Which points lie inside the convex polygon, at least ``margin`` from every edge.

    Args:
        vertices: ``[n, 2]`` counter-clockwise convex polygon.
        points: ``[m, 2]``.
        margin: distance inside the edges (negative: a tolerance outside).

    Returns:
        ``[m]`` bool.

    >>> v, _ = rectangle(0.0, 1.0, 0.0, 1.0)
    >>> contains(v, np.array([[0.5, 0.5], [1.5, 0.5], [1.0, 0.5]])).tolist()
    [True, False, True]
    """
    if vertices.shape[0] < 3:
        return np.zeros(points.shape[0], dtype=np.bool_)
    normal, _ = _inward(vertices)
    dist = (points[:, None, :] - vertices[None, :, :]) * normal[None]
    return np.asarray(dist.sum(-1).min(axis=1) >= margin)


def segment_inside(vertices: Array, start: Array, end: Array, tol: float) -> tuple[float, float] | None:
    """The parameters ``[t0, t1]`` of ``start + t (end - start)``, ``0 <= t <= 1``, inside a polygon.

    Edges of the polygon parallel to the segment and within ``tol`` of it
    (the segment lies along them) do not cut it; every other edge is moved
    ``tol`` outwards.

    Args:
        vertices: ``[n, 2]`` counter-clockwise convex polygon.
        start, end: ``[2]`` the segment's ends.
        tol: distance tolerance.

    Returns:
        ``(t0, t1)`` with ``t0 <= t1``, or ``None`` when the segment misses the polygon.

    >>> v, _ = rectangle(0.0, 1.0, 0.0, 1.0)
    >>> segment_inside(v, np.array([-1.0, 0.5]), np.array([3.0, 0.5]), 0.0)
    (0.25, 0.5)
    >>> t0, t1 = segment_inside(v, np.array([0.5, 0.0]), np.array([2.0, 0.0]), 1e-12)  # along an edge
    >>> round(t0, 9), round(t1, 9)
    (0.0, 0.333333333)
    """
    if vertices.shape[0] < 3:
        return None
    normal, _ = _inward(vertices)
    d = end - start
    g0 = ((start[None, :] - vertices) * normal).sum(1)  # each edge's value at the start
    g1 = normal @ d  # and its change along the segment
    lo, hi = 0.0, 1.0
    for a, b in zip(g0.tolist(), g1.tolist(), strict=True):
        if max(abs(a), abs(a + b)) <= tol:  # the segment runs along this edge
            continue
        if b == 0.0:
            if a < -tol:
                return None
            continue
        t = (-tol - a) / b
        if b > 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
    if lo > hi:
        return None
    return lo, hi
