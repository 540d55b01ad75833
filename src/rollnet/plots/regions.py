"""Exact linear regions of a 2-D slice, drawn as polygons (the paper's figure 1).

A slice is what :func:`rollnet.evaluate.plane.plane_regions` returns: the
regions (each a convex polygon in plane coordinates ``(a, b)`` with its
pattern id) that the plane crosses within ``extent``, and the decision
boundary's segments.  Each region is drawn as its exact polygon (a
:class:`~matplotlib.collections.PolyCollection`, never a pixel grid) and
coloured so that regions sharing an edge never share a colour (a greedy
colouring of the adjacency graph); the decision boundary is a black
:class:`~matplotlib.collections.LineCollection`.

:func:`toy_slice` computes the slice of a 2-D model over its data's bounding
box, :func:`plot_regions` draws several slices side by side.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from rollnet.plots.png import png_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.collections import LineCollection, PolyCollection

__all__ = [
    "PALETTE",
    "RegionLike",
    "RegionPolygons",
    "SliceLike",
    "adjacency",
    "colour_regions",
    "draw_regions",
    "plot_regions",
    "region_polygons",
    "toy_slice",
]

Array = NDArray[np.float64]

# Soft qualitative colours (matplotlib's tab20 then Set3): light enough for black
# boundaries and data points on top, many enough that a greedy colouring
# rarely runs out.
PALETTE: tuple[str, ...] = (
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
    "#9edae5", "#c7c7c7", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#bcbd22", "#17becf", "#7f7f7f", "#8dd3c7", "#ffffb3", "#bebada", "#fb8072",
    "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f", "#d9d9d9",
)


class RegionLike(Protocol):
    """One region of a slice: its polygon and its pattern id."""

    @property
    def vertices(self) -> Any:
        """``[n, 2]`` float64 (a, b) vertices, counter-clockwise (tensor or array)."""

    @property
    def pattern_id(self) -> int:
        """Id of the region's activation pattern."""


class SliceLike(Protocol):
    """The regions of a plane slice (:class:`rollnet.evaluate.plane.PlaneRegions`)."""

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(a_min, a_max, b_min, b_max)``."""

    @property
    def decision_boundary(self) -> Any:
        """``[M, 2, 2]`` segments ``((a0, b0), (a1, b1))`` where the predicted label changes."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class RegionPolygons:
    """What :func:`draw_regions` draws, computed without matplotlib.

    Attributes:
        polygons: one ``[n, 2]`` float64 array per region, in the slice's order.
        colours: ``[R]`` index into the palette of each region.
        segments: ``[M, 2, 2]`` float64 decision-boundary segments.
        extent: ``(a_min, a_max, b_min, b_max)``.
    """

    polygons: list[Array]
    colours: NDArray[np.int64]
    segments: Array
    extent: tuple[float, float, float, float]


def _as_array(v: Any) -> Array:
    """A tensor or array-like as a float64 NumPy array."""
    if isinstance(v, Tensor):
        return np.asarray(v.detach().to("cpu", torch.float64).numpy())
    return np.asarray(v, dtype=np.float64)


def _contacts(polygons: Sequence[Array], tol: float) -> tuple[NDArray[np.int64], NDArray[np.int64], Array]:
    """Every (vertex of polygon i, edge of polygon j != i) within ``tol`` of each other.

    Edges are bucketed in a uniform grid (cells about twice the median edge
    length), each vertex is tested against the edges of its own cell only:
    ``O(vertices x edges per cell)``, vectorised.

    Returns:
        ``(i, j, points)``: ``[C]`` owners of the vertex and of the edge, ``[C, 2]`` the vertex.
    """
    sizes = np.array([p.shape[0] for p in polygons], dtype=np.int64)
    owner = np.repeat(np.arange(len(polygons), dtype=np.int64), sizes)
    starts = np.concatenate(polygons)
    ends = np.concatenate([np.roll(p, -1, axis=0) for p in polygons])
    lengths = np.hypot(*(ends - starts).T)
    cell = 2.0 * max(float(np.median(lengths)), 1e3 * tol)
    origin = starts.min(axis=0) - 2 * tol
    lo = np.floor((np.minimum(starts, ends) - tol - origin) / cell).astype(np.int64)
    hi = np.floor((np.maximum(starts, ends) + tol - origin) / cell).astype(np.int64)
    width = int(max(hi[:, 0].max(), np.floor((starts[:, 0].max() - origin[0]) / cell))) + 1
    # (edge, cell) entries: every cell of each edge's bounding box
    nx, ny = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    counts = nx * ny
    edge_of = np.repeat(np.arange(starts.shape[0], dtype=np.int64), counts)
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    cx = lo[edge_of, 0] + k % nx[edge_of]
    cy = lo[edge_of, 1] + k // nx[edge_of]
    key = cy * width + cx
    order = np.argsort(key, kind="stable")
    key, edge_of = key[order], edge_of[order]
    # each vertex against the edges of its cell
    vcell = np.floor((starts - origin) / cell).astype(np.int64)
    vkey = vcell[:, 1] * width + vcell[:, 0]
    first = np.searchsorted(key, vkey, side="left")
    last = np.searchsorted(key, vkey, side="right")
    per = last - first
    vertex = np.repeat(np.arange(starts.shape[0], dtype=np.int64), per)
    offset = np.arange(int(per.sum()), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    edge = edge_of[np.repeat(first, per) + offset]
    keep = owner[vertex] != owner[edge]
    vertex, edge = vertex[keep], edge[keep]
    a, d, x = starts[edge], ends[edge] - starts[edge], starts[vertex]
    length2 = (d * d).sum(axis=1)
    t = np.clip(((x - a) * d).sum(axis=1) / np.where(length2 > 0, length2, 1.0), 0.0, 1.0)
    near = np.hypot(*(x - a - t[:, None] * d).T) <= tol
    return owner[vertex[near]], owner[edge[near]], x[near]


def adjacency(polygons: Sequence[Array], tol: float) -> list[set[int]]:
    """Which polygons share an edge (a boundary segment longer than ``tol``).

    Two convex polygons with disjoint interiors share a segment exactly when
    their contact points (vertices of one lying on an edge of the other) span
    more than ``tol``; a shared corner alone does not count.  T-junctions (a
    vertex of one polygon inside another's edge) are handled.

    Args:
        polygons: ``[n_i, 2]`` convex polygons with disjoint interiors (a tiling).
        tol: distance under which a point lies on an edge (in the plane's units).

    Returns:
        ``neighbours[i]``: the indices of the polygons sharing an edge with polygon ``i``.

    >>> sq = lambda x, y: np.array([[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1]], dtype=float)
    >>> adjacency([sq(0, 0), sq(1, 0), sq(1, 1)], 1e-9)  # the first and last touch at a corner only
    [{1}, {0, 2}, {1}]
    """
    n = len(polygons)
    neighbours: list[set[int]] = [set() for _ in range(n)]
    if n < 2:
        return neighbours
    i, j, points = _contacts(polygons, tol)
    if i.size == 0:
        return neighbours
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    pair = lo * n + hi
    order = np.argsort(pair, kind="stable")
    pair, points = pair[order], points[order]
    cut = np.flatnonzero(np.diff(pair)) + 1
    heads = np.concatenate([[0], cut])
    span = np.hypot(*(np.maximum.reduceat(points, heads) - np.minimum.reduceat(points, heads)).T)
    for p in pair[heads][span > tol].tolist():
        a, b = divmod(int(p), n)
        neighbours[a].add(b)
        neighbours[b].add(a)
    return neighbours


def colour_regions(neighbours: Sequence[set[int]], n_colours: int = len(PALETTE)) -> NDArray[np.int64]:
    """A greedy colouring: neighbours get different colours while the palette allows.

    Regions are coloured most-connected first; each takes, among the colours
    none of its coloured neighbours has, the one used least so far (so the
    palette is spread evenly).  A region whose neighbours already use every
    colour takes the one fewest of them use.

    Args:
        neighbours: ``neighbours[i]``, as :func:`adjacency` returns.
        n_colours: palette size (>= 1).

    Returns:
        ``[R]`` int64 colour indices in ``[0, n_colours)``.

    >>> colour_regions([{1, 2}, {0, 2}, {0, 1}], 3).tolist()
    [0, 1, 2]
    """
    if n_colours < 1:
        raise ValueError(f"n_colours must be >= 1, got {n_colours}")
    n = len(neighbours)
    colours = np.full(n, -1, dtype=np.int64)
    used = np.zeros(n_colours, dtype=np.int64)
    for i in sorted(range(n), key=lambda k: (-len(neighbours[k]), k)):
        taken = np.zeros(n_colours, dtype=np.int64)
        for j in neighbours[i]:
            if colours[j] >= 0:
                taken[colours[j]] += 1
        free = np.flatnonzero(taken == 0)
        pick = free[np.argmin(used[free])] if free.size else int(np.argmin(taken))
        colours[i] = pick
        used[pick] += 1
    return colours


def count_label(n: int) -> str:
    """``"1 region"``, ``"553 regions"``: a panel title's count."""
    return f"{n} region" if n == 1 else f"{n} regions"


def _extent(regions: SliceLike) -> tuple[float, float, float, float]:
    a0, a1, b0, b1 = (float(e) for e in regions.extent)
    if not (a0 < a1 and b0 < b1):
        raise ValueError(f"extent must be (a_min, a_max, b_min, b_max) with a_min < a_max, b_min < b_max, "
                         f"got {regions.extent}")
    return a0, a1, b0, b1


def region_polygons(regions: SliceLike, n_colours: int = len(PALETTE)) -> RegionPolygons:
    """The polygons, colours and decision boundary that :func:`draw_regions` draws.

    Args:
        regions: a slice (:func:`rollnet.evaluate.plane.plane_regions`).
        n_colours: palette size.

    Raises:
        ValueError: a region whose vertices are not ``[n >= 3, 2]`` finite values, boundary
            segments not ``[M, 2, 2]``, or an empty extent.

    >>> from types import SimpleNamespace as NS
    >>> tri = [NS(vertices=torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), pattern_id=0),
    ...        NS(vertices=torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), pattern_id=1)]
    >>> class Slice(list):
    ...     extent = (0.0, 1.0, 0.0, 1.0)
    ...     decision_boundary = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    >>> got = region_polygons(Slice(tri))
    >>> len(got.polygons), got.colours.tolist(), got.segments.shape
    (2, [0, 1], (1, 2, 2))
    """
    extent = _extent(regions)
    polygons = []
    for k, region in enumerate(regions):
        v = _as_array(region.vertices)
        if v.ndim != 2 or v.shape[1] != 2 or v.shape[0] < 3:
            raise ValueError(f"region {k}: vertices must be [n >= 3, 2], got shape {tuple(v.shape)}")
        if not np.isfinite(v).all():
            raise ValueError(f"region {k}: vertices hold non-finite values")
        polygons.append(v)
    segments = _as_array(regions.decision_boundary)
    if segments.size == 0:
        segments = np.zeros((0, 2, 2), dtype=np.float64)
    if segments.ndim != 3 or segments.shape[1:] != (2, 2):
        raise ValueError(f"decision_boundary must be [M, 2, 2] segments, got shape {tuple(segments.shape)}")
    scale = max(extent[1] - extent[0], extent[3] - extent[2])
    colours = colour_regions(adjacency(polygons, 1e-7 * scale), n_colours)
    return RegionPolygons(polygons, colours, segments, extent)


def draw_regions(
    ax: Axes, regions: SliceLike, *, points: Tensor | None = None, labels: Tensor | None = None,
    palette: Sequence[str] = PALETTE, edges: bool = True,
) -> tuple[PolyCollection, LineCollection]:
    """Draw a slice's regions (one polygon each) and decision boundary into ``ax``.

    Args:
        ax: matplotlib axes.
        regions: the slice.
        points: optional ``[P, 2]`` points in plane coordinates (e.g. the data).
        labels: optional ``[P]`` integer labels of ``points`` (marker style per label).
        palette: the region colours.
        edges: draw thin grey region edges (helps where tiny regions crowd).

    Returns:
        ``(polygons, boundary)``: the collections added, one path per region and one
        segment per decision-boundary piece.
    """
    from matplotlib.collections import LineCollection, PolyCollection

    drawn = region_polygons(regions, len(palette))
    faces = [palette[c] for c in drawn.colours.tolist()]
    polys = PolyCollection(drawn.polygons, facecolors=faces, edgecolors="#555555" if edges else "face",
                           linewidths=0.15 if edges else 0.0, alpha=0.8)
    ax.add_collection(polys)
    boundary = LineCollection(list(drawn.segments), colors="black", linewidths=1.6)
    ax.add_collection(boundary)
    if points is not None:
        p = _as_array(points)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"points must be [P, 2], got shape {tuple(p.shape)}")
        lab = np.zeros(p.shape[0], dtype=np.int64) if labels is None else np.asarray(
            torch.as_tensor(labels).cpu().numpy(), dtype=np.int64)
        if lab.shape != (p.shape[0],):
            raise ValueError(f"labels must be [{p.shape[0]}], got shape {tuple(lab.shape)}")
        styles = [("white", "black", "o"), ("black", "white", "o"), ("white", "black", "s"),
                  ("black", "white", "s"), ("white", "black", "^"), ("black", "white", "^")]
        for c in np.unique(lab).tolist():
            face, edge, marker = styles[c % len(styles)]
            sel = lab == c
            ax.scatter(p[sel, 0], p[sel, 1], s=7, c=face, edgecolors=edge, linewidths=0.4, marker=marker,
                       zorder=3, label=f"class {c}")
    a0, a1, b0, b1 = drawn.extent
    ax.set_xlim(a0, a1)
    ax.set_ylim(b0, b1)
    ax.set_aspect("equal" if max(a1 - a0, b1 - b0) <= 3 * min(a1 - a0, b1 - b0) else "auto")
    return polys, boundary


def plot_regions(
    panels: Sequence[tuple[str, SliceLike]], path: str | Path, *, points: Tensor | None = None,
    labels: Tensor | None = None, axis_labels: tuple[str, str] = ("$x_1$", "$x_2$"),
) -> Path:
    """Write a PNG with one panel per ``(title, slice)``, side by side: exact regions, each its
    own colour, the decision boundary in black, optionally the data points.

    Args:
        panels: the panels, left to right (e.g. ``[("vanilla", s1), ("ROLL", s2)]``);
            each title gets the slice's number of regions.
        path: the PNG to write (its folder is created).
        points: optional ``[P, 2]`` points drawn on every panel, in plane coordinates.
        labels: optional ``[P]`` integer labels of the points.
        axis_labels: names of the plane's two axes.

    Returns:
        The path written.

    Raises:
        ValueError: no panels, or a malformed slice or points.

    Example:
        >>> import tempfile, pathlib
        >>> from types import SimpleNamespace as NS
        >>> class Slice(list):
        ...     extent = (0.0, 1.0, 0.0, 1.0)
        ...     decision_boundary = torch.zeros(0, 2, 2)
        >>> s = Slice([NS(vertices=torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), pattern_id=0)])
        >>> out = plot_regions([("one region", s)], pathlib.Path(tempfile.mkdtemp()) / "r.png")
        >>> out.stat().st_size > 0
        True
    """
    if not panels:
        raise ValueError("no panels to draw")
    path = Path(path)
    a0, a1, b0, b1 = _extent(panels[0][1])
    height = min(max(4.8 * (b1 - b0) / (a1 - a0), 2.0), 6.0) + 0.9  # the axes' aspect, plus titles
    with png_figure(path, 1, len(panels), figsize=(4.8 * len(panels), height)) as (_, axes):
        for ax, (title, regions) in zip(axes[0], panels, strict=True):
            draw_regions(ax, regions, points=points, labels=labels)
            ax.set_title(f"{title}: {count_label(len(regions))}")
            ax.set_xlabel(axis_labels[0])
            ax.set_ylabel(axis_labels[1])
    return path


def toy_slice(
    model: nn.Module, x: Tensor, *, pad: float = 0.1, max_regions: int = 10000,
    additional_forward_args: Any = None,
) -> SliceLike:
    """The exact regions of a model with 2-D input over its data's bounding box.

    The plane is the input space itself (``x0 = 0``, ``u = e1``, ``v = e2``), so plane
    coordinates are the inputs.

    Args:
        model: a piecewise-linear network with input ``[B, 2]``.
        x: ``[P, 2]`` the data (only its bounding box is used).
        pad: margin added on each side, as a fraction of the box's width and height (>= 0).
        max_regions: passed to :func:`rollnet.evaluate.plane.plane_regions`.

    Returns:
        The :class:`rollnet.evaluate.plane.PlaneRegions` of the box.

    Raises:
        ValueError: ``x`` not ``[P >= 1, 2]`` or not finite, or ``pad < 0``.
        rollnet.evaluate.plane.TooManyRegionsError: more than ``max_regions`` regions.
    """
    from rollnet.evaluate.plane import plane_regions

    if x.dim() != 2 or x.shape[1] != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [P >= 1, 2] points of a 2-D model, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds non-finite values")
    if not pad >= 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    lo, hi = x.detach().to(torch.float64).amin(0), x.detach().to(torch.float64).amax(0)
    size = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - pad * size, hi + pad * size
    extent = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    eye = torch.eye(2, dtype=dtype)
    result: SliceLike = plane_regions(model, torch.zeros(2, dtype=dtype), eye[0], eye[1], extent,
                                      additional_forward_args=additional_forward_args,
                                      max_regions=max_regions)
    return result
