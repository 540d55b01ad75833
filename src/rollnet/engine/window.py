"""Tangents that are zero outside a box of a feature map: locality in the early conv stages.

A unit direction e_k along one input pixel moves, after a convolution, only the
outputs whose receptive field holds that pixel: a few positions at the stem,
growing with depth.  When the directions of one pass are the axes of a small
tile of pixels (every channel), the tangents of every feature map are zero
outside one box (the union of their footprints), so the pass keeps only that
box: a :class:`WindowTangent` ``[K, B, C, *box]`` at ``start`` in a map of
spatial shape ``full``.  Convolutions and average pools compute the output box
from the input box alone (zero outside the box is exactly the convolution's
zero padding); per-channel and per-position factors, masks and residual sums
act on the box.  Every other op reads the dense tangent (:meth:`WindowTangent.dense`),
and a box that has grown to the whole map becomes a plain tensor again.  The
result is the same tangent as the dense pass, to the last bit for everything
but the order of a sum (``tests/engine/test_window.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rollnet.engine.tracing import batch_shared

__all__ = ["WindowTangent", "add", "conv", "crop", "scale", "tiles"]


class WindowTangent:
    """The tangent ``[K, B, C, *full]`` of a feature map, zero outside ``box`` at ``start``.

    Attributes:
        data: ``[K, B, C, *box]`` the tangent inside the box (may have stride 0 along B).
        start: the box's first position along each spatial dimension.
        full: the map's spatial shape.
    """

    __slots__ = ("data", "full", "start")

    def __init__(self, data: Tensor, start: Sequence[int], full: Sequence[int]) -> None:
        self.data = data
        self.start = tuple(int(s) for s in start)
        self.full = tuple(int(f) for f in full)

    @property
    def box(self) -> tuple[int, ...]:
        return tuple(self.data.shape[3:])

    @property
    def shape(self) -> torch.Size:
        """The dense tangent's shape ``[K, B, C, *full]``."""
        return torch.Size((*self.data.shape[:3], *self.full))

    @property
    def nbytes(self) -> int:
        d = self.data if not batch_shared(self.data) else self.data[:, :1]
        return d.numel() * d.element_size()

    def slices(self) -> tuple[Any, ...]:
        """``(..., slice, ...)``: the box's place in a ``[..., *full]`` tensor."""
        return (Ellipsis, *(slice(s, s + n) for s, n in zip(self.start, self.box, strict=True)))

    def dense(self) -> Tensor:
        """The full tangent ``[K, B, C, *full]`` (zeros outside the box)."""
        d = self.data
        shared = batch_shared(d)
        src = d[:, :1] if shared else d
        out = src.new_zeros((*src.shape[:3], *self.full))
        out[self.slices()] = src
        return out.expand(self.shape) if shared else out

    def reduced(self, part: Tensor) -> Tensor:
        """``part`` ``[B, C, *box]`` (a reduction over the directions) placed in zeros ``[B, C, *full]``."""
        out = part.new_zeros((*part.shape[:2], *self.full))
        out[self.slices()] = part
        return out


def settle(data: Tensor, start: Sequence[int], full: Sequence[int]) -> WindowTangent | Tensor:
    """A window, or the plain tensor when the box is the whole map."""
    if tuple(data.shape[3:]) == tuple(full):
        return data
    return WindowTangent(data, start, full)


def tiles(spatial: Sequence[int], channels: int, per_chunk: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes ``(start, size)`` of pixels cutting the input map into tiles of about
    ``per_chunk / channels`` pixels each (every channel of a pixel goes in its tile)."""
    pixels = max(1, per_chunk // max(channels, 1))
    side = max(1, round(pixels ** (1.0 / len(spatial))))
    ranges = [[(s, min(side, n - s)) for s in range(0, n, side)] for n in spatial]
    return [(tuple(s for s, _ in combo), tuple(n for _, n in combo)) for combo in itertools.product(*ranges)]


def tile_axes(start: Sequence[int], size: Sequence[int], channels: int, spatial: Sequence[int]) -> Tensor:
    """Flat input coordinates ``c * prod(spatial) + ...`` of every channel of every pixel in a tile,
    in the order of the tile's own ``[C, *size]`` layout."""
    grids = torch.meshgrid(*[torch.arange(s, s + n) for s, n in zip(start, size, strict=True)], indexing="ij")
    flat = torch.zeros_like(grids[0])
    for g, n in zip(grids, spatial, strict=True):
        flat = flat * n + g
    per_channel = math.prod(spatial)
    return (torch.arange(channels).reshape(-1, *([1] * len(spatial))) * per_channel + flat).reshape(-1)


def one_hot_tile(
    start: Sequence[int], size: Sequence[int], channels: int, spatial: Sequence[int], batch: int, like: Tensor
) -> WindowTangent | Tensor:
    """The unit directions of a tile's axes (:func:`tile_axes` order) as a window ``[K, B, C, *size]``."""
    k = channels * math.prod(size)
    eye = torch.eye(k, dtype=like.dtype, device=like.device).reshape(k, 1, channels, *size)
    return settle(eye.expand(k, batch, channels, *size), start, spatial)


def _span(a: int, h: int, k: int, s: int, p: int, dl: int, n_out: int) -> tuple[int, int, int, bool]:
    """Along one dimension: the output box ``[lo, hi]`` a box ``[a, a + h)`` reaches through a
    window of ``k`` taps (stride ``s``, left padding ``p``, dilation ``dl``), and the padding
    (negative: cropping) that gives the box exactly the input those outputs read."""
    reach = dl * (k - 1)
    lo = max(0, -((reach - a - p) // s))  # ceil((a + p - reach) / s)
    hi = min(n_out - 1, (a + h - 1 + p) // s)
    empty = lo > hi  # the box reaches no output (a stride steps over it): one zero output
    if empty:
        lo = hi = min(lo, n_out - 1)
    first, last = s * lo - p, s * hi - p + reach
    return lo, a - first, last - (a + h - 1), empty


def conv(
    w: WindowTangent,
    fn: Any,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_full: Sequence[int],
) -> WindowTangent | Tensor:
    """A window through a sliding-window linear map ``fn(u)`` (a convolution or sum-pool applied
    with no padding): the output box, and ``fn`` on the input box padded to exactly what it reads."""
    los, pads, empty = [], [], False
    for a, h, k, s, p, dl, n in zip(w.start, w.box, kernel, stride, padding, dilation, out_full, strict=True):
        lo, left, right, nothing = _span(a, h, k, s, p, dl, n)
        los.append(lo)
        pads.append((left, right))
        empty = empty or nothing
    flat_pad: list[int] = []
    for left, right in reversed(pads):
        flat_pad += [left, right]
    data = w.data
    shared = batch_shared(data)
    src = data[:, :1] if shared else data
    k_, b = src.shape[0], src.shape[1]
    if empty:  # zeros shaped as what one output reads
        reads = [dl * (k - 1) + 1 for k, dl in zip(kernel, dilation, strict=True)]
        padded = src.new_zeros((k_ * b, src.shape[2], *reads))
    else:
        padded = F.pad(src.flatten(0, 1), flat_pad)
    out = fn(padded)
    out = out.unflatten(0, (k_, b))
    if shared:
        out = out.expand(data.shape[0], data.shape[1], *out.shape[2:])
    return settle(out, los, out_full)


def crop(c: Any, w: WindowTangent) -> Any:
    """A constant broadcast against the map ``[B, C, *full]`` (a number, or a tensor aligned to the
    right), cut to the window's box along the spatial dimensions it spans."""
    if not isinstance(c, Tensor) or c.dim() == 0:
        return c
    spatial = len(w.full)
    for i in range(1, min(spatial, c.dim()) + 1):
        dim, j = c.dim() - i, spatial - i
        if c.shape[dim] != 1:
            c = c.narrow(dim, w.start[j], w.box[j])
    return c


def scale(w: WindowTangent, factor: Any) -> WindowTangent | Tensor:
    """The window of ``x * factor`` (``factor`` broadcast against x ``[B, C, *full]``)."""
    return settle(w.data * crop(factor, w), w.start, w.full)


def grown(w: WindowTangent, start: Sequence[int], box: Sequence[int]) -> Tensor:
    """``w``'s data padded to a larger box (containing its own)."""
    pad: list[int] = []
    for s0, n0, s1, n1 in reversed(list(zip(w.start, w.box, start, box, strict=True))):
        pad += [s0 - s1, (s1 + n1) - (s0 + n0)]
    data = w.data
    if batch_shared(data):
        return F.pad(data[:, :1], pad).expand(data.shape[0], data.shape[1], *data.shape[2:3], *box)
    return F.pad(data, pad)


def add(a: WindowTangent, ca: float, b: WindowTangent, cb: float) -> WindowTangent | Tensor:
    """``ca * a + cb * b`` for two windows of the same map: on the union of their boxes."""
    start = [min(s, t) for s, t in zip(a.start, b.start, strict=True)]
    stop = [max(s + n, t + m) for s, n, t, m in zip(a.start, a.box, b.start, b.box, strict=True)]
    box = [e - s for s, e in zip(start, stop, strict=True)]
    da, db = grown(a, start, box), grown(b, start, box)
    if (ca, cb) != (1.0, 1.0):
        da, db = ca * da, cb * db
    return settle(da + db, start, a.full)
