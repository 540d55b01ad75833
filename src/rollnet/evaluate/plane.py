"""The exact linear regions that a plane slice through input space crosses.

The slice is ``{x0 + a u + b v : a_min <= a <= a_max, b_min <= b <= b_max}``.
Inside one linear region every neuron is an affine function of ``(a, b)``, so
the region's part of the slice is a convex polygon: the rectangle cut by one
half-plane per neuron.  :func:`plane_regions` computes these polygons
exactly (float64 geometry, no pixel grid):

1. At a point p of the slice, one engine pass along the two directions u and
   v (:func:`rollnet.engine.gradients.collect`) gives every neuron's value
   z_j and its derivatives along a and b; the region of p is the rectangle
   cut by the half-planes ``s_j (z_j + dz_j/da (a - a_p) + dz_j/db (b - b_p)) >= 0``
   (``s_j`` the sign of z_j, ``+1`` for max-unit differences; neurons whose
   gradient is zero in the plane never cut).  The lines are pruned by their
   distance from p: a line farther from p than the polygon's farthest vertex
   cannot cut it, nor can a line that every vertex already satisfies.
2. From each region, the walk crosses every edge that a neuron made: it
   steps just across a point of the edge (by a small step relative to the
   edge, smaller on a retry), finds the region there (its activation pattern,
   then its polygon), and marks the part of the edge that this neighbour
   covers; the uncovered rest of the edge is crossed again, so an edge with
   several neighbours (lines of deeper layers that end on it) is covered
   whole.  All steps of one round go through the network in one batched pass.
3. The areas must sum to the rectangle's area (relative ``1e-9``); otherwise
   an error is raised rather than an incomplete picture returned.

Regions are told apart by their activation pattern (a pattern's points in
the plane form one convex polygon).  The *Jacobian id* groups regions on
which the network computes the same affine map of ``(a, b)``: the same
logits at three corners of the rectangle, to ``1e-9`` relative to the largest
logit there (so the same output Jacobian along u and v and the same offset);
such regions can be merged into one piece of the function.

Geometry works on the rectangle rescaled to the unit square, so tolerances
(``1e-12`` of the rectangle's sides) do not depend on the units of a and b.

Cost: see :func:`plane_regions`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from rollnet.certify import check_forward_args, patterns_of
from rollnet.engine.gradients import (
    Request,
    collect,
    given_directions,
    plan_chunks,
    resolve_memory_budget,
)
from rollnet.engine.modes import eval_mode
from rollnet.evaluate import polygons
from rollnet.patterns import ActivationPattern
from rollnet.rounding import working

__all__ = ["PlaneRegion", "PlaneRegions", "TooManyRegionsError", "plane_regions"]

Array = NDArray[np.float64]

_TOL = 1e-12  # distance (in the unit square) under which points count as on a line
_AREA_RTOL = 1e-9  # the areas must sum to the rectangle's to this
_FIRST_STEP = 1e-6  # how far across an edge the walk steps, at most (unit square)
_SMALLEST_STEP = 1e-13
_BOUNDARY = -1  # edge label of the rectangle's sides
_POINTS_PER_PASS = 256  # most points in one engine pass (fewer when the rows would be large)


class TooManyRegionsError(ValueError):
    """The slice crosses more linear regions than ``max_regions``.

    Attributes:
        found: regions found before the walk stopped (more than ``limit``).
        limit: the ``max_regions`` given.
    """

    def __init__(self, found: int, limit: int) -> None:
        super().__init__(
            f"the plane slice crosses more than max_regions={limit} linear regions (found {found} before "
            "stopping); pass a smaller extent, or a larger max_regions if the time and memory are acceptable"
        )
        self.found = found
        self.limit = limit


@dataclass(frozen=True, eq=False)
class PlaneRegion:
    """One linear region's part of the slice: a convex polygon in ``(a, b)``.

    Attributes:
        vertices: ``[n, 2]`` float64 ``(a, b)`` vertices, counter-clockwise.
        edge_neurons: ``[n]`` int64, for the edge from vertex i to vertex i + 1: the index of
            the neuron whose hyperplane makes it (in the order of
            :attr:`rollnet.LinearRegions.values`), or ``-1`` for the rectangle's sides.
        pattern: the region's activation pattern (equal to :func:`rollnet.activation_pattern`
            at any point inside it).
        pattern_id: the region's position among the result's regions.
        jacobian_id: equal for regions on which the network computes the same affine map of
            ``(a, b)`` (see the module docstring).
        area: the polygon's area, in units of a times units of b.
        point: ``[2]`` float64 ``(a, b)`` strictly inside the polygon (its centroid).
        output_offset: ``[L]`` float64 logits (the output, flattened) of the region's affine
            map extended to ``(a, b) = (0, 0)``: ``logits(a, b) = output_offset + output_slopes @ (a, b)``.
        output_slopes: ``[L, 2]`` float64 derivatives of the logits along a and b.
        labels: the classes predicted somewhere in the region (argmax of the logits; for one
            logit, ``1`` where it is positive and ``0`` elsewhere), ascending.
        decision_segments: ``[k, 2, 2]`` float64 segments ``((a, b), (a, b))`` inside the
            polygon where the predicted class changes, each once.
    """

    vertices: Tensor
    edge_neurons: Tensor
    pattern: ActivationPattern
    pattern_id: int
    jacobian_id: int
    area: float
    point: Tensor
    output_offset: Tensor
    output_slopes: Tensor
    labels: tuple[int, ...]
    decision_segments: Tensor

    def logits(self, a: float, b: float) -> Tensor:
        """``[L]`` the logits at ``(a, b)`` by the region's affine map (exact inside the polygon)."""
        return self.output_offset + self.output_slopes @ torch.tensor([a, b], dtype=torch.float64)


class PlaneRegions(Sequence[PlaneRegion]):
    """All regions of a slice, in the order the walk found them (``pattern_id``).

    Attributes:
        extent: ``(a_min, a_max, b_min, b_max)``.
        decision_boundary: ``[M, 2, 2]`` float64, every region's decision segments.
        num_patterns: the number of regions (distinct activation patterns).
        num_jacobians: the number of distinct affine maps (distinct ``jacobian_id``).
        evaluations: points the network was run on (engine passes over all of them).
    """

    def __init__(
        self, regions: list[PlaneRegion], extent: tuple[float, float, float, float], evaluations: int
    ) -> None:
        self._regions = regions
        self.extent = extent
        self.evaluations = evaluations
        segments = [r.decision_segments for r in regions if r.decision_segments.shape[0]]
        self.decision_boundary = (
            torch.cat(segments) if segments else torch.zeros((0, 2, 2), dtype=torch.float64)
        )
        self.num_patterns = len(regions)
        self.num_jacobians = len({r.jacobian_id for r in regions})

    def __len__(self) -> int:
        return len(self._regions)

    @overload
    def __getitem__(self, i: int) -> PlaneRegion: ...

    @overload
    def __getitem__(self, i: slice) -> list[PlaneRegion]: ...

    def __getitem__(self, i: int | slice) -> PlaneRegion | list[PlaneRegion]:
        return self._regions[i]

    def __iter__(self) -> Iterator[PlaneRegion]:
        return iter(self._regions)

    def __repr__(self) -> str:
        return (
            f"PlaneRegions(extent={self.extent}, regions={self.num_patterns}, "
            f"jacobians={self.num_jacobians}, decision_segments={self.decision_boundary.shape[0]})"
        )


# ---------------------------------------------------------------------------
# input checks


def _check_extent(extent: Any) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(e) for e in extent)
    except (TypeError, ValueError):
        raise ValueError(f"extent must be (a_min, a_max, b_min, b_max), got {extent!r}") from None
    if len(values) != 4:
        raise ValueError(f"extent must be (a_min, a_max, b_min, b_max): four numbers, got {len(values)}")
    a_min, a_max, b_min, b_max = values
    if not all(math.isfinite(e) for e in values):
        raise ValueError(f"extent must be finite, got {values}")
    if not a_min < a_max:
        raise ValueError(f"extent needs a_min < a_max, got a_min={a_min}, a_max={a_max}")
    if not b_min < b_max:
        raise ValueError(f"extent needs b_min < b_max, got b_min={b_min}, b_max={b_max}")
    return a_min, a_max, b_min, b_max


def _check_tensor(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor shaped like one example, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_directions(u: Tensor, v: Tensor) -> None:
    uu = float((u * u).sum())
    vv = float((v * v).sum())
    if uu == 0.0:
        raise ValueError("u is zero; the plane needs two non-zero, non-parallel directions")
    if vv == 0.0:
        raise ValueError("v is zero; the plane needs two non-zero, non-parallel directions")
    uv = float((u * v).sum())
    if uu * vv - uv * uv <= 1e-12 * uu * vv:
        raise ValueError(
            f"u and v are parallel (cosine {uv / math.sqrt(uu * vv):.12f}); the plane needs two "
            "non-parallel directions"
        )


def _one_example_batch(model: nn.Module, x0: Tensor, args: tuple[Any, ...]) -> bool:
    """Whether ``x0`` (shape ``[1, ...]``) is one example rather than a batch of one: the model
    accepts ``x0[None]`` and returns one example's output."""
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x0.unsqueeze(0), *args)
    except Exception:
        return False
    return isinstance(out, Tensor) and out.dim() >= 1 and out.shape[0] == 1


# ---------------------------------------------------------------------------
# the slice


@dataclass
class _Points:
    """The engine's answer at a batch of points (unit-square coordinates)."""

    keys: list[bytes]
    patterns: list[ActivationPattern]
    values: Array  # [Q, N]
    rows: Array  # [Q, N, 2] derivatives along the unit square's axes
    output: Array  # [Q, L]
    output_rows: Array  # [Q, L, 2]


@dataclass
class _Region:
    vertices: Array  # unit square, counter-clockwise
    labels: NDArray[np.int64]
    key: bytes
    pattern: ActivationPattern
    point: Array  # where the network was run
    output: Array  # [L] logits at point
    output_rows: Array  # [L, 2]


class _Slice:
    """The network restricted to the plane, on the unit square (alpha, beta) of the extent."""

    def __init__(
        self, model: nn.Module, x0: Tensor, u: Tensor, v: Tensor, extent: tuple[float, float, float, float],
        args: tuple[Any, ...], memory_budget: int | None,
    ) -> None:
        self.model = model
        self.x0, self.u, self.v = x0, u, v
        a_min, a_max, b_min, b_max = extent
        self.extent = extent
        self.widths = (a_max - a_min, b_max - b_min)
        self.args = args
        self.memory_budget = memory_budget
        self.budget = resolve_memory_budget(memory_budget, x0.device)
        self.per_pass = _POINTS_PER_PASS
        self.evaluations = 0
        self.sign_free: NDArray[np.bool_] | None = None  # [N] max-unit differences (always >= 0)
        self.plan: tuple[int, int] | None = None  # the engine's chunks, planned once
        self.plan_points = 0

    def to_plane(self, unit: Array) -> Array:
        """Unit-square points ``[m, 2]`` to ``(a, b)`` (the rectangle's sides exactly at 0 and 1)."""
        (a_min, a_max, b_min, b_max) = self.extent
        a = a_min * (1.0 - unit[:, 0]) + a_max * unit[:, 0]
        b = b_min * (1.0 - unit[:, 1]) + b_max * unit[:, 1]
        return np.stack([a, b], axis=1)

    def inputs(self, unit: Array) -> Tensor:
        """``[m, *input_shape]`` the inputs at unit-square points."""
        ab = torch.from_numpy(self.to_plane(unit)).to(device=self.x0.device, dtype=self.x0.dtype)
        shape = (-1,) + (1,) * (self.x0.dim() - 1)
        return self.x0 + ab[:, 0].reshape(shape) * self.u + ab[:, 1].reshape(shape) * self.v

    def _args_for(self, m: int) -> tuple[Any, ...]:
        return tuple(
            a.expand(m, *a.shape[1:]) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
            for a in self.args
        )

    def evaluate(self, unit: Array) -> _Points:
        """Patterns, neuron values and derivatives, logits at ``[m, 2]`` unit-square points."""
        parts: list[_Points] = []
        for s in range(0, unit.shape[0], self.per_pass):
            parts.append(self._evaluate(unit[s : s + self.per_pass]))
        if len(parts) == 1:
            return parts[0]
        return _Points(
            keys=[k for p in parts for k in p.keys],
            patterns=[q for p in parts for q in p.patterns],
            values=np.concatenate([p.values for p in parts]),
            rows=np.concatenate([p.rows for p in parts]),
            output=np.concatenate([p.output for p in parts]),
            output_rows=np.concatenate([p.output_rows for p in parts]),
        )

    def _evaluate(self, unit: Array) -> _Points:
        m = unit.shape[0]
        x = self.inputs(unit)
        directions = torch.stack([self.u[0] * self.widths[0], self.v[0] * self.widths[1]])
        dirs = given_directions(directions, x)
        args = self._args_for(m)
        if self.plan is None or m > self.plan_points:  # (a plan for more points fits fewer too)
            self.plan = plan_chunks(self.model, x, dirs, self.memory_budget, forward_args=args)
            self.plan_points = m
        got = collect(
            self.model, x, dirs, Request(rows=True, output=True),
            memory_budget=self.memory_budget, forward_args=args, plan=self.plan,
        )
        self.evaluations += m
        assert got.rows is not None
        pats = patterns_of(got, m)
        if self.sign_free is None:
            sizes = [g.size for g in got.groups]
            self.sign_free = np.repeat(np.array([g.always_on for g in got.groups], dtype=np.bool_), sizes)
            n = int(got.values.shape[1])
            # float64 rows [m, N, 2] and the engine's tangents and copies of them: about 128 bytes
            # per neuron and point, kept inside the budget
            self.per_pass = int(max(1, min(_POINTS_PER_PASS, self.budget // (128 * (n + 1)))))
        valid = None if got.valid is None else got.valid.cpu().numpy()
        rows = got.rows.cpu().numpy()
        if valid is not None:  # entries that are not neurons cut nothing
            rows = np.where(valid[:, :, None], rows, 0.0)
        out = got.output.reshape(m, -1)
        if got.output_rows is not None:
            out_rows = got.output_rows.reshape(m, -1, 2)
        else:
            out_rows = out.new_zeros((m, out.shape[1], 2))
        return _Points(
            keys=pats.keys(), patterns=list(pats), values=got.values.cpu().numpy(), rows=rows,
            output=out.cpu().numpy(), output_rows=out_rows.cpu().numpy(),
        )


def _region_polygon(point: Array, values: Array, rows: Array, sign_free: NDArray[np.bool_]) -> polygons.Polygon:
    """The unit square cut by every neuron's half-plane at ``point`` (see the module docstring)."""
    norm = np.hypot(rows[:, 0], rows[:, 1])
    sign = np.where(sign_free | (values > 0), 1.0, -1.0)
    square = polygons.rectangle(0.0, 1.0, 0.0, 1.0, _BOUNDARY)
    cuts = norm > 0
    if not bool(cuts.any()):
        return square
    idx = np.flatnonzero(cuts)
    dist = sign[idx] * values[idx] / norm[idx]  # distance of point from each line (>= 0)
    normal = sign[idx, None] * rows[idx] / norm[idx, None]  # unit normals into the region
    corners = square[0]
    reach = float(np.hypot(*(corners - point).T).max())
    near = dist <= reach + _TOL
    idx, dist, normal = idx[near], dist[near], normal[near]
    order = np.argsort(dist, kind="stable")
    idx, dist, normal = idx[order], dist[order], normal[order]
    verts, labels = square
    while idx.size:
        rel = verts - point
        reach = float(np.hypot(rel[:, 0], rel[:, 1]).max())
        keep = dist <= reach + _TOL
        idx, dist, normal = idx[keep], dist[keep], normal[keep]
        if not idx.size:
            break
        at_vertices = dist[:, None] + normal @ rel.T  # [M, n]
        cutting = (at_vertices < -_TOL).any(axis=1)
        idx, dist, normal = idx[cutting], dist[cutting], normal[cutting]
        if not idx.size:
            break
        verts, labels = polygons.clip(verts, labels, normal[0], float(dist[0]), point, int(idx[0]), _TOL)
        if verts.shape[0] == 0:
            break
        idx, dist, normal = idx[1:], dist[1:], normal[1:]
    return verts, labels


@dataclass
class _Task:
    """A part ``[t0, t1]`` of a region's edge whose neighbours are still to find."""

    start: Array
    end: Array
    outward: Array
    t0: float
    t1: float
    attempt: int = 0
    t: float = 0.0  # where the current query crosses (edge parameter)
    step: float = 0.0  # and how far across

    def query(self) -> Array:
        """A point just across the edge, in its uncovered part (away from its ends); later
        attempts step closer and elsewhere."""
        frac = 0.5 if self.attempt == 0 else 0.2 + 0.6 * ((0.5 + 0.6180339887498949 * self.attempt) % 1.0)
        self.t = self.t0 + (self.t1 - self.t0) * frac
        length = float(np.hypot(*(self.end - self.start))) * (self.t1 - self.t0)
        self.step = min(_FIRST_STEP, 1e-2 * length) / 100.0 ** (self.attempt // 2)
        return self.start + self.t * (self.end - self.start) + self.step * self.outward


def _edge_tasks(region: _Region) -> list[_Task]:
    """One task per edge that a neuron made (the rectangle's sides lead nowhere)."""
    verts, labels = region.vertices, region.labels
    n = verts.shape[0]
    tasks = []
    for i in range(n):
        if labels[i] < 0:
            continue
        a, b = verts[i], verts[(i + 1) % n]
        d = b - a
        length = float(np.hypot(*d))
        if length <= 10 * _TOL:
            continue
        tasks.append(_Task(a, b, np.array([d[1], -d[0]]) / length, 0.0, 1.0))
    return tasks


class _Walk:
    """The regions found so far, and where each one is (for points already known)."""

    def __init__(self, plane: _Slice, max_regions: int) -> None:
        self.plane = plane
        self.max_regions = max_regions
        self.regions: list[_Region] = []
        self.index: dict[bytes, int] = {}
        self.boxes: list[Array] = []
        self.expanded: set[int] = set()  # regions whose edges are queued
        self.uncovered = 0.0  # edge length the walk could not cross

    def add(self, points: _Points, i: int, point: Array) -> int | None:
        """The region of ``points``' i-th point (new or known); ``None`` when its polygon is empty."""
        key = points.keys[i]
        known = self.index.get(key)
        if known is not None:
            return known
        assert self.plane.sign_free is not None
        verts, labels = _region_polygon(point, points.values[i], points.rows[i], self.plane.sign_free)
        if verts.shape[0] < 3 or polygons.area(verts) <= 0.0:
            return None
        self.regions.append(
            _Region(verts, labels, key, points.patterns[i], point, points.output[i], points.output_rows[i])
        )
        self.index[key] = len(self.regions) - 1
        self.boxes.append(np.concatenate([verts.min(axis=0), verts.max(axis=0)]))
        if len(self.regions) > self.max_regions:
            raise TooManyRegionsError(len(self.regions), self.max_regions)
        return len(self.regions) - 1

    def locate(self, points: Array) -> list[int | None]:
        """For each point, a known region holding it at least ``_TOL`` inside, or ``None``."""
        if not self.regions:
            return [None] * points.shape[0]
        boxes = np.stack(self.boxes)
        found: list[int | None] = []
        for p in points:
            hits = np.flatnonzero(
                (boxes[:, 0] <= p[0]) & (p[0] <= boxes[:, 2]) & (boxes[:, 1] <= p[1]) & (p[1] <= boxes[:, 3])
            )
            where = None
            for r in hits.tolist():
                if bool(polygons.contains(self.regions[r].vertices, p[None], _TOL)[0]):
                    where = r
                    break
            found.append(where)
        return found

    def run(self) -> None:
        """Walk from the region at (about) the centre until every neuron edge is crossed."""
        start = np.array([[0.5 + 1e-3 * math.sqrt(2), 0.5 + 1e-3 * math.sqrt(3)]])
        first = self.add(self.plane.evaluate(start), 0, start[0])
        if first is None:
            raise RuntimeError("the region at the centre of the plane slice came out empty (a rollnet bug)")
        tasks = self._expand(first)
        while tasks:
            queries = np.stack([t.query() for t in tasks])
            inside = np.asarray((queries >= 0.0).all(axis=1) & (queries <= 1.0).all(axis=1))
            where = self.locate(queries)
            todo = [i for i, w in enumerate(where) if w is None and bool(inside[i])]
            if todo:
                got = self.plane.evaluate(queries[todo])
                for j, i in enumerate(todo):
                    where[i] = self.add(got, j, queries[i])
            following: list[_Task] = []
            for i, task in enumerate(tasks):
                following.extend(self._cover(task, where[i] if bool(inside[i]) else None))
            tasks = following

    def _expand(self, r: int | None) -> list[_Task]:
        """A region's own edge tasks, once: when it is first reached."""
        if r is None or r in self.expanded:
            return []
        self.expanded.add(r)
        return _edge_tasks(self.regions[r])

    def _cover(self, task: _Task, found: int | None) -> list[_Task]:
        """Mark the part of the task's edge that region ``found`` covers; the rest is to do."""
        covered = None
        if found is not None:
            covered = polygons.segment_inside(self.regions[found].vertices, task.start, task.end, _TOL)
        length = float(np.hypot(*(task.end - task.start)))
        slack = 10 * _TOL / max(length, 1e-300)
        if covered is None or not covered[0] - slack <= task.t <= covered[1] + slack:
            # stepped over a thin region, or onto a line: closer, and elsewhere on the edge
            if task.step <= _SMALLEST_STEP:
                self.uncovered += length * (task.t1 - task.t0)
                return []  # (the area check reports it)
            task.attempt += 1
            return [task]
        rest = []
        lo, hi = covered
        if lo - task.t0 > slack:
            rest.append(_Task(task.start, task.end, task.outward, task.t0, lo))
        if task.t1 - hi > slack:
            rest.append(_Task(task.start, task.end, task.outward, hi, task.t1))
        return rest + self._expand(found)


# ---------------------------------------------------------------------------
# what each region holds: its affine map, decision boundary, Jacobian id


def _decision(region: _Region) -> tuple[tuple[int, ...], list[Array]]:
    """The classes predicted in the region and the segments (unit square) where that changes."""
    verts, point = region.vertices, region.point
    out, rows = region.output, region.output_rows
    if out.shape[0] == 1:  # one logit: the two sides of logit = 0
        diffs = [(out[0:1], rows[0:1]), (-out[0:1], -rows[0:1])]
        cells = []
        for cls, (d, g) in zip((1, 0), diffs, strict=True):
            cell = _cut(verts, point, d, g, np.array([1 - cls]), cls)
            if cell is not None:
                cells.append((cls, cell))
    else:
        cells = []
        classes = np.arange(out.shape[0])
        for c in range(out.shape[0]):
            others = classes[classes != c]
            cell = _cut(verts, point, out[c] - out[others], rows[c][None] - rows[others], others, c)
            if cell is not None:
                cells.append((c, cell))
    labels = tuple(sorted(c for c, _ in cells))
    segments = []
    for c, (cv, cl) in cells:
        n = cv.shape[0]
        for i in range(n):
            k = int(cl[i])
            if k >= 0 and c < k:  # (the same segment is in class k's cell, labelled c)
                segments.append(np.stack([cv[i], cv[(i + 1) % n]]))
    return labels, segments


def _cut(
    verts: Array, point: Array, diff: Array, grad: Array, other: NDArray[np.int64], c: int
) -> polygons.Polygon | None:
    """The part of the polygon where ``diff + grad . (X - point) >= 0`` for every row (class c
    against each other class; a tie goes to the lower index, as ``argmax`` does); ``None`` if empty."""
    cv = verts
    cl = np.full(verts.shape[0], -1, dtype=np.int64)
    for d, g, k in zip(diff.tolist(), grad, other.tolist(), strict=True):
        norm = float(np.hypot(*g))
        if norm == 0.0:  # the same slope: c wins everywhere or nowhere
            if d < 0 or (d == 0 and k < c):
                return None
            continue
        cv, cl = polygons.clip(cv, cl, g / norm, d / norm, point, k, _TOL)
        if cv.shape[0] == 0:
            return None
    if polygons.area(cv) <= _TOL * _TOL:
        return None
    return cv, cl


def _jacobian_ids(regions: list[_Region]) -> list[int]:
    """Group regions with the same affine map (the logits at three corners of the unit square,
    equal to 1e-9 relative to the largest such logit)."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    maps = np.stack([(r.output[None, :] + (corners - r.point) @ r.output_rows.T).ravel() for r in regions])
    scale = float(np.abs(maps).max()) if maps.size else 0.0
    tol = 1e-9 * max(scale, 1e-300)
    # a kept map within tol of a new one has a projection within tol * ||r||_1 of it
    proj_dir = np.random.default_rng(0).standard_normal(maps.shape[1])
    proj = (maps @ proj_dir).tolist()
    window = tol * float(np.abs(proj_dir).sum())
    keys: list[float] = []
    kept: list[int] = []  # region index of each kept map, in projection order
    group_of_kept: dict[int, int] = {}
    ids = []
    for i, p in enumerate(proj):
        lo = bisect.bisect_left(keys, p - window)
        hi = bisect.bisect_right(keys, p + window)
        match = next((kept[j] for j in range(lo, hi) if float(np.abs(maps[i] - maps[kept[j]]).max()) <= tol), None)
        if match is not None:
            ids.append(group_of_kept[match])
            continue
        group_of_kept[i] = len(group_of_kept)
        ids.append(group_of_kept[i])
        pos = bisect.bisect_left(keys, p)
        keys.insert(pos, p)
        kept.insert(pos, i)
    return ids


def _centroid(verts: Array) -> Array:
    """The area centroid of a convex polygon (strictly inside it)."""
    rel = verts - verts[0]
    nxt = np.roll(rel, -1, axis=0)
    cross = rel[:, 0] * nxt[:, 1] - nxt[:, 0] * rel[:, 1]
    a = cross.sum() / 2.0
    c = ((rel + nxt) * cross[:, None]).sum(axis=0) / (6.0 * a)
    return verts[0] + c


# ---------------------------------------------------------------------------


def plane_regions(
    model: nn.Module,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    extent: tuple[float, float, float, float],
    *,
    additional_forward_args: Any = None,
    max_regions: int = 10000,
    memory_budget: int | None = None,
) -> PlaneRegions:
    """The exact linear regions of ``model`` on the slice ``{x0 + a u + b v}`` within ``extent``.

    Every region is a convex polygon in ``(a, b)``, computed exactly from the
    neurons' hyperplanes (see :mod:`rollnet.evaluate.plane` for the walk);
    together the polygons tile the rectangle (checked: their areas sum to its
    area to ``1e-9`` relative, or an error is raised).  Computed in float64 (a
    float64 copy of the model when it or x0 is in a lower precision), in eval
    mode; the model's train/eval flags are restored.

    Args:
        model: a piecewise-linear network (ReLU-like units, max-pool, affine, conv, residual
            layers: whatever :func:`rollnet.margin` accepts).
        x0: the plane's origin, shaped like one example (``[*input_shape]``), or a batch of one
            (``[1, *input_shape]``; a leading 1 is read as one example's own dimension when the
            model accepts ``x0[None]``, as for a one-channel image ``[1, H, W]``).
        u, v: the plane's directions, shaped like x0: non-zero and not parallel (they need not
            be orthogonal or of unit length; ``a`` and ``b`` are in units of u and v).
        extent: ``(a_min, a_max, b_min, b_max)`` with ``a_min < a_max`` and ``b_min < b_max``.
        additional_forward_args: further arguments, ``model(x, *args)`` (Captum's convention),
            for one example; tensors with a first dimension of 1 are repeated for each point.
        max_regions: the most regions to find before giving up with
            :class:`TooManyRegionsError` (default 10000).
        memory_budget: bytes of tangents held at once by the engine (default 1 GiB).

    Returns:
        :class:`PlaneRegions`: iterate for :class:`PlaneRegion` objects (``.vertices``
        ``[n, 2]`` counter-clockwise, ``.pattern``, ``.pattern_id``, ``.jacobian_id``,
        ``.decision_segments``), with ``.decision_boundary`` ``[M, 2, 2]`` for all regions.

    Raises:
        TooManyRegionsError: more than ``max_regions`` regions (its message says how many
            were found).
        RuntimeError: the polygons found do not tile the rectangle (a line the walk could not
            cross: it says how much area is missing).

    Cost: about one network evaluation (two tangent directions) per region and edge side,
    batched; measured on two shared CPU cores, a slice of
    ``rollnet.models.resnet18(in_channels=1, num_classes=10, width=4)`` through a 28x28 image,
    spanned by its gradient and a random direction, crossing 446 regions took 41 s (841
    points evaluated; 191 regions: 15-22 s), almost all of it in the network's passes.

    Example:
        >>> import torch, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        ...     _ = net[0].bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
        >>> x0, u, v = torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> regions = rollnet.plane_regions(net, x0, u, v, (-1.0, 2.0, -1.0, 2.0))
        >>> len(regions), round(sum(r.area for r in regions), 12)
        (7, 9.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x0 = _check_tensor(x0, "x0")
    u = _check_tensor(u, "u")
    v = _check_tensor(v, "v")
    bounds = _check_extent(extent)
    if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
        raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")
    if u.shape != x0.shape or v.shape != x0.shape:
        raise ValueError(
            f"u and v must be shaped like x0 {tuple(x0.shape)}; got u {tuple(u.shape)}, v {tuple(v.shape)}"
        )
    args = check_forward_args(additional_forward_args, x0.reshape(1, -1))
    exact = x0.dtype == torch.float64 and all(
        t.dtype == torch.float64 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()
    )
    # below float64 anywhere: a float64 copy of the model (working() copies for a lower-precision input)
    work = working(model, x0.unsqueeze(0) if exact else x0.unsqueeze(0).float(), "sound", args)
    dev = work.x.device
    x64, u64, v64 = (t.to(device=dev, dtype=torch.float64) for t in (x0, u, v))
    with torch.no_grad(), eval_mode(work.model), work.arithmetic():
        batched = x64.dim() >= 2 and x64.shape[0] == 1 and not _one_example_batch(work.model, x64, work.args)
        if not batched:
            x64, u64, v64 = x64.unsqueeze(0), u64.unsqueeze(0), v64.unsqueeze(0)
        _check_directions(u64, v64)
        plane = _Slice(work.model, x64, u64, v64, bounds, work.args, memory_budget)
        walk = _Walk(plane, max_regions)
        walk.run()
    return _finish(walk, plane, bounds)


def _finish(walk: _Walk, plane: _Slice, bounds: tuple[float, float, float, float]) -> PlaneRegions:
    found = walk.regions
    total = sum(polygons.area(r.vertices) for r in found)
    if abs(total - 1.0) > _AREA_RTOL:
        raise RuntimeError(
            f"the {len(found)} regions found cover {total:.12f} of the rectangle's area, not all of it "
            f"(edges left uncrossed: {walk.uncovered:.3g} of the unit square's side); the slice has lines "
            "closer together than the walk can resolve (about 1e-12 of the extent): try a slightly "
            "different extent or plane"
        )
    ids = _jacobian_ids(found)
    wa, wb = plane.widths
    scale = np.array([wa, wb])
    regions = []
    for pid, (r, jid) in enumerate(zip(found, ids, strict=True)):
        labels, segments = _decision(r)
        slopes = r.output_rows / scale  # d logit / da, d logit / db
        point_ab = plane.to_plane(r.point[None])[0]
        offset = r.output - slopes @ point_ab
        segs = (
            torch.from_numpy(np.stack([plane.to_plane(s) for s in segments]))
            if segments else torch.zeros((0, 2, 2), dtype=torch.float64)
        )
        regions.append(
            PlaneRegion(
                vertices=torch.from_numpy(plane.to_plane(r.vertices)),
                edge_neurons=torch.from_numpy(np.where(r.labels >= 0, r.labels, -1).astype(np.int64)),
                pattern=r.pattern,
                pattern_id=pid,
                jacobian_id=jid,
                area=polygons.area(r.vertices) * wa * wb,
                point=torch.from_numpy(plane.to_plane(_centroid(r.vertices)[None])[0]),
                output_offset=torch.from_numpy(np.ascontiguousarray(offset)),
                output_slopes=torch.from_numpy(np.ascontiguousarray(slopes)),
                labels=labels,
                decision_segments=segs,
            )
        )
    return PlaneRegions(regions, bounds, plane.evaluations)
