"""All neuron gradients at once, reduced on the fly, within a memory budget.

:func:`collect` pushes a set of input directions through the linearized
network (see :mod:`rollnet.engine.capture`) and reduces each neuron group's
tangents as soon as it appears, so only one layer's tangents are alive at a
time.  Batches and directions are split into chunks so that the tangents held
at once stay under ``memory_budget`` bytes, whatever the batch size.

What is kept is chosen by a :class:`Request`:

- ``norms``: the dual norm ``||g_j||_q`` of every neuron gradient (q = 1, 2, inf);
- ``squared_l2``: ``||g_j||_2^2`` kept differentiable (for the regulariser);
- ``crossings``: for every direction d_k, the smallest t > 0 at which some
  neuron flips moving along +d_k and along -d_k;
- ``rows``: the full gradient rows (``[B, N, K]``);
- ``output``: the tangent of the model's output (the Jacobian along d_k).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rollnet.engine import window
from rollnet.engine.capture import NeuronGroup, batch_shared, run_traced
from rollnet.engine.gram import GramTangent, GramUnsupported

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "Collected",
    "Directions",
    "Request",
    "batch_slice",
    "collect",
    "given_directions",
    "plan_chunks",
    "resolve_memory_budget",
    "sampled_axes",
    "unit_directions",
]

def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


# glibc keeps freed chunks of tens of MiB in its heap (its mmap threshold adapts upwards), so a
# long run of equal-sized chunks can grow the resident set far past the budget (measured: 5.6 GiB
# for a 512 MiB budget over 4,096 MNIST inputs).  Handing free memory back after each chunk keeps
# the process near the budget; it changes no setting.
_MALLOC_TRIM = _load_malloc_trim()


def _release_free_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


DEFAULT_MEMORY_BUDGET = 1 << 30  # 1 GiB of tangents at once (on a GPU: at least that, see resolve_memory_budget)
_TEMPORARIES = 3  # reductions and masks make about two more copies of a layer's tangents
# The Gram pass's own count is already close to what it holds: a ReLU's scaled tangent shares
# its input's factors and is counted again, which covers the products' temporaries (measured,
# float32 and float64, 784-300x3 MLP: resident growth 0.8-1.0x the count from 64 examples per
# chunk, up to 1.4x at 8); so a half more, where gradient rows need 3x.
_GRAM_TEMPORARIES = 1.5
# On the CPU, chunks larger than this gain nothing and lose time to fresh pages and cache misses
# (measured on the paper's MLP: 1 GiB chunks 1.85 s, 64-256 MiB chunks 1.3 s, 16 MiB 2.0 s).
# A GPU is the other way round: each chunk costs a few hundred kernel launches from Python, so
# chunks there fill the whole budget (measured on an H200: the residual conv net's margin took
# 486 ms in 192 chunks of 128 MiB against 39 ms for jacfwd + vmap).
_WORKING_SET = 128 << 20
# Tiled passes (rollnet.engine.window) hold much less than the dense plan counts, and larger tiles
# trade fewer passes (each repeats the primal forward) against boxes that grow with the tile.
# Measured on the ResNet-18 layout at 3x64x64, both dual norms, one image on 2 cores: tiles of
# 75 axes (the dense plan) 15.5 s, 300 axes (what this limit gives: 4 dense chunks) 12.1-13.7 s,
# 588 axes 11.4-16 s, 1,200 axes 15.7 s.
_TILE_WORKING_SET = 512 << 20


@dataclass(frozen=True)
class Directions:
    """Directions in input space, pushed through the network as tangents.

    Either unit vectors e_k for ``indices`` (``[K]`` shared by the batch, or
    ``[K, B]`` one axis per example and direction) or explicit
    ``vectors`` ``[K, *input_shape]`` (shared) or ``[K, B, *input_shape]``
    (one set per example).
    """

    count: int
    indices: Tensor | None = None
    vectors: Tensor | None = None

    def bounds(self, chunk: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` of each pass's directions, ``chunk`` at a time."""
        return [(k0, min(k0 + chunk, self.count)) for k0 in range(0, self.count, chunk)]

    def chunk(self, start: int, stop: int, x: Tensor, b0: int) -> tuple[Any, Tensor | None]:
        """Tangent ``[k, b, *input_shape]`` for directions ``start:stop`` and examples ``b0:b0+b``."""
        b, in_shape = x.shape[0], x.shape[1:]
        if self.indices is not None and self.indices.dim() == 2:  # one axis per example
            idx = self.indices[start:stop, b0 : b0 + b].to(x.device)
            onehot = torch.zeros(idx.shape[0], b, math.prod(in_shape), dtype=x.dtype, device=x.device)
            onehot.scatter_(2, idx.unsqueeze(-1), 1.0)
            return onehot.reshape(idx.shape[0], b, *in_shape), idx
        if self.indices is not None:
            idx = self.indices[start:stop].to(x.device)
            d = math.prod(in_shape)
            eye = torch.zeros(idx.shape[0], d, dtype=x.dtype, device=x.device)
            eye[torch.arange(idx.shape[0], device=x.device), idx] = 1.0
            t = eye.reshape(idx.shape[0], 1, *in_shape).expand(idx.shape[0], b, *in_shape)
            return t, idx
        assert self.vectors is not None
        v = self.vectors[start:stop].to(device=x.device, dtype=x.dtype)
        if v.dim() == x.dim():  # shared by every example
            return v.unsqueeze(1).expand(v.shape[0], b, *in_shape), None
        return v[:, b0 : b0 + b], None


@dataclass(frozen=True)
class TiledAxes(Directions):
    """All input axes of a ``[C, *spatial]`` input, in tiles of pixels (every channel of a pixel
    in its tile): direction k is axis ``indices[k]``, and each tile's chunk of directions is a
    :class:`~rollnet.engine.window.WindowTangent` on the tile's box."""

    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    channels: int = 0
    spatial: tuple[int, ...] = ()

    def bounds(self, chunk: int) -> list[tuple[int, int]]:
        out, k0 = [], 0
        for _, size in self.boxes:
            k1 = k0 + self.channels * math.prod(size)
            out.append((k0, k1))
            k0 = k1
        return out

    def chunk(self, start: int, stop: int, x: Tensor, b0: int) -> tuple[Any, Tensor | None]:
        """A whole tile: its window; any other range of directions: dense unit vectors."""
        assert self.indices is not None
        for (k0, k1), (box_start, size) in zip(self.bounds(0), self.boxes, strict=True):
            if (k0, k1) == (start, stop):
                tangent = window.one_hot_tile(box_start, size, self.channels, self.spatial, x.shape[0], x)
                return tangent, self.indices[start:stop].to(x.device)
        return super().chunk(start, stop, x, b0)


def unit_directions(input_shape: torch.Size | tuple[int, ...]) -> Directions:
    """All D = prod(input_shape) coordinate axes: gives the full gradient rows."""
    d = math.prod(input_shape)
    return Directions(count=d, indices=torch.arange(d))


def sampled_axes(indices: Tensor) -> Directions:
    """Unit vectors along per-example axes: ``indices`` ``[K, B]`` (flat input coordinates)."""
    if indices.dim() != 2:
        raise ValueError(f"indices must have shape [K, B], got {tuple(indices.shape)}")
    return Directions(count=indices.shape[0], indices=indices)


def given_directions(vectors: Tensor, x: Tensor) -> Directions:
    """Explicit directions ``[K, *input_shape]`` or ``[K, B, *input_shape]``."""
    if vectors.shape[1:] != x.shape[1:] and vectors.shape[1:] != x.shape:
        raise ValueError(
            f"directions must have shape [K, *{tuple(x.shape[1:])}] or [K, *{tuple(x.shape)}], "
            f"got {tuple(vectors.shape)}"
        )
    return Directions(count=vectors.shape[0], vectors=vectors)


@dataclass(frozen=True)
class Request:
    """What :func:`collect` keeps (see the module docstring)."""

    norms: tuple[float, ...] = ()
    squared_l2: bool = False
    crossings: bool = False
    rows: bool = False
    output: bool = False


@dataclass
class GroupInfo:
    """Where a neuron group comes from."""

    module_path: str
    op: str
    size: int
    always_on: bool


@dataclass
class Collected:
    """What :func:`collect` returns.  N neurons, K directions, B examples.

    Attributes:
        values: ``[B, N]`` neuron values.
        patterns: per group, ``[B, m]`` bool signs or int64 selections.
        groups: description of each group, in execution order.
        norms: q -> ``[B, N]`` dual norms of the neuron gradients.
        squared_l2: ``[B, N]`` squared l2 norms (differentiable when asked).
        cross_plus, cross_minus: ``[B, K]`` distance along +d_k / -d_k to the first flip.
        rows: ``[B, N, K]`` neuron gradients along each direction.
        valid: ``[B, N]`` bool, ``False`` for elements that are not neurons (padded time
            steps, :func:`rollnet.engine.padding.neuron_mask`; their gradients are zero),
            ``None`` when every element is a neuron.
        output: ``[B, *output_shape]`` model output.
        output_rows: ``[B, *output_shape, K]`` output derivatives along each direction.
        chunk_sizes: the examples in each batch chunk, in order (how the batch was cut).
        peak_bytes: the most tangent bytes one pass held (the tracer's count, which
            the chunks are planned from; Gram factors shared by the batch excluded).
    """

    values: Tensor
    patterns: list[Tensor]
    groups: list[GroupInfo]
    output: Tensor
    norms: dict[float, Tensor] = field(default_factory=dict)
    squared_l2: Tensor | None = None
    cross_plus: Tensor | None = None
    cross_minus: Tensor | None = None
    rows: Tensor | None = None
    output_rows: Tensor | None = None
    valid: Tensor | None = None
    chunk_sizes: list[int] = field(default_factory=list)
    peak_bytes: int = 0


def _reduce_over_directions(t: Tensor, q: float) -> Tensor:
    """Partial dual-norm statistic of ``t`` ``[K, B, n]`` over K (sum of |.|^q or max)."""
    if batch_shared(t):
        return _reduce_over_directions(t[:, :1], q).expand(t.shape[1:])
    if q == 1.0:
        return t.abs().sum(0)
    if q == 2.0:
        return t.square().sum(0)
    return t.abs().amax(0)


def _crossings(values: Tensor, signs: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``[K, B]`` distance along +d_k and -d_k before one of the neurons ``values`` ``[B, n]``
    (on/off ``signs`` ``[B, n]``, tangents ``t`` ``[K, B, n]``) flips."""
    absz = values.detach().abs()
    s = signs
    prod = t.detach() * s
    inf = torch.tensor(math.inf, dtype=t.dtype, device=t.device)
    plus = torch.where(prod < 0, absz / (-prod), inf)
    minus = torch.where(prod > 0, absz / prod, inf)
    k, b = t.shape[0], t.shape[1]
    if plus.shape[-1] == 0:
        empty = torch.full((k, b), math.inf, dtype=t.dtype, device=t.device)
        return empty, empty.clone()
    return plus.amin(-1), minus.amin(-1)


class _ChunkObserver:
    """Accumulates one batch chunk over its direction chunks."""

    def __init__(self, request: Request, num_directions: int, batch_size: int) -> None:
        self.request = request
        self.batch_size = batch_size
        self.k_total = num_directions
        self.k0 = 0
        self.first = True
        self.values: list[Tensor] = []
        self.patterns: list[Tensor] = []
        self.groups: list[GroupInfo] = []
        self.norms: dict[float, list[Tensor]] = {q: [] for q in request.norms}
        self.sq: list[Tensor] = []
        self.plus: Tensor | None = None
        self.minus: Tensor | None = None
        self.rows: list[Tensor] = []
        self.valid: list[Tensor | None] = []
        self.output_value: Tensor | None = None
        self.output_rows: Tensor | None = None

    def start(self, k0: int) -> None:
        self.k0 = k0

    def finish_pass(self) -> None:
        self.first = False

    def neurons(self, group: NeuronGroup) -> None:
        i = group.index
        if self.first:
            self.values.append(group.values)
            self.patterns.append(group.pattern)
            self.valid.append(group.valid)
            self.groups.append(GroupInfo(group.module_path, group.op, group.values.shape[1], group.always_on))
        elif i >= len(self.groups) or group.values.shape[1] != self.groups[i].size:
            raise RuntimeError("the model ran differently on the same input (non-deterministic forward)")
        t = group.tangents
        req = self.request
        if group.window is not None:
            if req.rows or req.squared_l2:
                t = group.window.dense().flatten(2)
            else:
                self._windowed(group)
                return
        if t is None:
            if group.squared_norms is not None:  # a Gram pass: squared l2 norms only
                self._accumulate_squared(group.squared_norms)
            return
        for q in req.norms:
            part = _reduce_over_directions(t.detach(), q)
            if self.first:
                self.norms[q].append(part)
            elif q == math.inf:
                self.norms[q][i] = torch.maximum(self.norms[q][i], part)
            else:
                self.norms[q][i] = self.norms[q][i] + part
        if req.squared_l2:
            part = _reduce_over_directions(t, 2.0)
            if self.first:
                self.sq.append(part)
            else:
                self.sq[i] = self.sq[i] + part
        if req.crossings:
            p, m = _crossings(group.values, group.signs(), t)
            self._min_into(p, m)
        if req.rows:
            block = t.detach().permute(1, 2, 0)  # [B, n, k]
            if self.first:
                full = block.new_empty((block.shape[0], block.shape[1], self.k_total))
                self.rows.append(full)
            self.rows[i][:, :, self.k0 : self.k0 + block.shape[2]] = block

    def _windowed(self, group: NeuronGroup) -> None:
        """Norms and crossings of a windowed group: reduced on the box, added into its place."""
        w, i = group.window, group.index
        data = w.data.detach()
        for q in self.request.norms:
            part = _reduce_over_directions(data, q)  # [B, C, *box]
            if self.first:
                self.norms[q].append(w.reduced(part).flatten(1))
                continue
            into = self.norms[q][i].view(part.shape[0], part.shape[1], *w.full)[w.slices()]
            if q == math.inf:
                torch.maximum(into, part, out=into)
            else:
                into += part
        if self.request.crossings:
            k, b = data.shape[0], data.shape[1]
            shape = (b, data.shape[2], *w.full)

            def boxed(t: Tensor) -> Tensor:
                return t.reshape(shape)[w.slices()].reshape(b, -1)

            p, m = _crossings(boxed(group.values), boxed(group.signs()), data.reshape(k, b, -1))
            self._min_into(p, m)

    def _accumulate_squared(self, squared: Tensor) -> None:
        """A Gram pass runs once per batch chunk, so each group arrives once."""
        if 2.0 in self.request.norms:
            self.norms[2.0].append(squared.detach())
        if self.request.squared_l2:
            self.sq.append(squared)

    def _min_into(self, plus: Tensor, minus: Tensor) -> None:
        k, b = plus.shape
        if self.plus is None or self.minus is None:
            self.plus = plus.new_full((b, self.k_total), math.inf)
            self.minus = plus.new_full((b, self.k_total), math.inf)
        sl = slice(self.k0, self.k0 + k)
        self.plus[:, sl] = torch.minimum(self.plus[:, sl], plus.t())
        self.minus[:, sl] = torch.minimum(self.minus[:, sl], minus.t())

    def output(self, value: Tensor, tangent: Tensor | None) -> None:
        if self.first:
            self.output_value = value
        if tangent is None or not self.request.output:
            return
        block = tangent.detach().movedim(0, -1)  # [B, *out, k]
        if self.output_rows is None:
            self.output_rows = block.new_empty((*block.shape[:-1], self.k_total))
        self.output_rows[..., self.k0 : self.k0 + block.shape[-1]] = block


def plan_chunks(
    model: nn.Module,
    x: Tensor,
    directions: Directions,
    memory_budget: int | None = None,
    allow_batch_statistics: bool = False,
    forward_args: tuple[Any, ...] = (),
) -> tuple[int, int]:
    """Chunk sizes (examples, directions) that :func:`collect` would use, from one probe pass."""
    with torch.no_grad():
        budget = resolve_memory_budget(memory_budget, x.device)
        return _plan(model, x, directions, budget, allow_batch_statistics, forward_args)


def batch_slice(args: tuple[Any, ...], start: int, stop: int, batch_size: int) -> tuple[Any, ...]:
    """The model's further arguments for examples ``start:stop``: tensors with one entry per
    example (first dimension ``batch_size``) are sliced, everything else is passed whole."""
    if not args or (start == 0 and stop >= batch_size):
        return args
    return tuple(
        a[start:stop] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch_size else a for a in args
    )


def resolve_memory_budget(memory_budget: int | None, device: torch.device) -> int:
    """The caller's budget, or the default: 1 GiB, and on a CUDA device a quarter of its free memory
    when that is more."""
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(DEFAULT_MEMORY_BUDGET, free // 4)
        return DEFAULT_MEMORY_BUDGET
    budget = int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    return budget


def _chunk_bytes(budget: int, device: torch.device) -> int:
    """Bytes of tangents one chunk may hold: the CPU's working set at most, a GPU's whole budget."""
    return min(budget, _WORKING_SET) if device.type == "cpu" else budget


def _plan(
    model: nn.Module, x: Tensor, directions: Directions, budget: int, allow_batch_statistics: bool,
    forward_args: tuple[Any, ...] = (),
) -> tuple[int, int]:
    """Chunk sizes (examples, directions) whose tangents fit in ``budget`` bytes."""
    b, k = x.shape[0], directions.count
    if k == 0 or b == 0:
        return max(b, 1), k
    # One direction through a few examples (more than one: BatchNorm in training mode needs it).
    n = min(b, 8)
    probe = _ChunkObserver(Request(), 1, n)
    tangent, _ = directions.chunk(0, 1, x[:n], 0)
    # the probe must not consume random numbers (train-mode Dropout), or runs with and without
    # a cached plan would diverge
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        _, trace = run_traced(
            model, x[:n], probe, tangent=tangent.contiguous(), unit=None,
            allow_batch_statistics=allow_batch_statistics, forward_args=batch_slice(forward_args, 0, n, b),
        )
    per_unit = max(trace.peak_bytes // n, 1) * _TEMPORARIES
    budget = _chunk_bytes(budget, x.device)
    if per_unit * k * b <= budget:
        return b, k
    if per_unit * k <= budget:
        return _thread_multiple(max(1, budget // (per_unit * k)), x.device), k
    return 1, max(1, budget // per_unit)


def _thread_multiple(examples: int, device: torch.device) -> int:
    """On the CPU, round a chunk's examples down to a multiple of the intra-op threads: batched
    matmuls (the rows path's per-example masked weights) split their batch over the threads, and
    an odd count leaves one idle (measured, 2 threads, the paper's MLP at batch 256: 5 examples
    per chunk 44 GFLOP/s, 4 per chunk 63)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or examples <= threads:
        return examples
    return examples - examples % threads


def _even_chunks(total: int, fits: int, device: torch.device) -> int:
    """Examples per chunk to cut ``total`` into as few even chunks of at most ``fits`` as
    possible, a multiple of the CPU's threads where that still fits (rounding each chunk down
    instead would leave a small chunk over at the end)."""
    even = math.ceil(total / math.ceil(total / fits))
    threads = torch.get_num_threads()
    if device.type == "cpu" and even > threads:
        up = even + (-even % threads)
        return up if up <= fits else _thread_multiple(even, device)
    return even


def _gram_applies(request: Request, directions: Directions | None, x: Tensor) -> bool:
    """Squared l2 norms over all D axes only: the Gram recursion can serve the request."""
    if directions is None or directions.indices is None or directions.indices.dim() != 1:
        return False
    if directions.count != math.prod(x.shape[1:]):
        return False
    if request.crossings or request.rows or request.output:
        return False
    return set(request.norms) <= {2.0} and (bool(request.norms) or request.squared_l2)


def collect(
    model: nn.Module,
    x: Tensor,
    directions: Directions | None,
    request: Request,
    *,
    memory_budget: int | None = None,
    allow_batch_statistics: bool = False,
    method: str = "auto",
    plan: tuple[int, int] | None = None,
    update_running_stats: bool = False,
    forward_args: tuple[Any, ...] = (),
    locality: bool = True,
) -> Collected:
    """Run the linearized network on ``x`` along ``directions`` and keep what ``request`` asks.

    Gradients with respect to the model's parameters flow through
    ``squared_l2`` and ``values`` when autograd is enabled by the caller.

    Args:
        model: the network (its mode is not changed here).
        x: ``[B, *input_shape]`` inputs.
        directions: input directions, or ``None`` for values and patterns only.
        request: what to keep.
        memory_budget: bytes of tangents to hold at once (default 1 GiB; on a CUDA device a
            quarter of its free memory when that is more).
        allow_batch_statistics: see :class:`rollnet.engine.capture.Trace`.
        method: how to get squared l2 norms over all axes: ``"gram"`` (Gram
            recursion, for chains of Linear and ReLU-like layers narrower than
            the input), ``"rows"`` (propagate every gradient row) or ``"auto"``
            (Gram when the request and the model allow it and it is cheaper).
        plan: chunk sizes (examples, directions) from :func:`plan_chunks`, to
            skip its probe pass when the same shapes come again.
        update_running_stats: in training mode, let BatchNorm update its
            running statistics in this pass (when it is the training forward).
        forward_args: further arguments, ``model(x, *forward_args)`` (Captum's
            ``additional_forward_args``): never perturbed; tensors with one entry per
            example are cut with the batch chunks.
        locality: when the directions are all the axes of a feature-map input, no
            gradient is recorded and neither ``rows`` nor ``output`` is asked, take them tile by tile and keep each pass's tangents in
            the box they can reach (:mod:`rollnet.engine.window`); ``False`` pushes dense
            tangents (the same numbers, up to the order of sums).
    """
    if method not in ("auto", "gram", "rows"):
        raise ValueError(f"method must be 'auto', 'gram' or 'rows', got {method!r}")
    budget = resolve_memory_budget(memory_budget, x.device)
    b = x.shape[0]
    k_total = 0 if directions is None else directions.count
    if directions is None:
        bc, kc = max(b, 1), 0  # (an empty batch still runs one empty chunk)
    elif plan is not None:
        bc, kc = plan
    else:
        bc, kc = _plan(model, x, directions, budget, allow_batch_statistics, forward_args)
    traced = functools.partial(
        run_traced, allow_batch_statistics=allow_batch_statistics, update_running_stats=update_running_stats
    )
    if method != "rows" and _gram_applies(request, directions, x):
        try:
            return _collect_gram(model, x, request, bc, budget, traced, method == "auto", forward_args)
        except GramUnsupported:
            if method == "gram":
                raise
    chunks: list[_ChunkObserver] = []
    # CPU chunks hold at most the working set each: hand memory back once a budget's worth passed
    trim = directions is not None and (bc < b or kc < k_total) and x.device.type == "cpu"
    trim_every, passes, peak = max(1, budget // _chunk_bytes(budget, x.device)), 0, 0
    # Gradients (rows, the output's Jacobian) stay on dense passes: every point then gets them from
    # the same arithmetic, so points of one region get bit-identical gradients, which a tile's box
    # (a convolution over a different extent) would change in the last bits.
    tiled = _plan_tiles(directions, x, kc, budget) if locality and not (request.rows or request.output) else None
    if tiled is not None:
        directions = tiled
    for b0 in range(0, max(b, 1), bc):  # (an empty batch: one empty chunk)
        xb = x[b0 : b0 + bc]
        args = batch_slice(forward_args, b0, b0 + bc, b)
        obs = _ChunkObserver(request, k_total, xb.shape[0])
        if directions is None:
            traced(model, xb, obs, tangent=None, forward_args=args)
        else:
            for k0, k1 in directions.bounds(kc):
                obs.start(k0)
                tangent, unit = directions.chunk(k0, k1, xb, b0)
                _, trace = traced(model, xb, obs, tangent=tangent, unit=unit, forward_args=args)
                peak = max(peak, trace.peak_bytes)
                del tangent, unit, trace
                obs.finish_pass()
                passes += 1
                if trim and passes % trim_every == 0:
                    _release_free_memory()
        chunks.append(obs)
    result = _assemble(chunks, request, x)
    result.peak_bytes = peak
    if tiled is not None:
        _in_axis_order(result, tiled)
    return result


def _tiled(directions: Directions | None, x: Tensor, kc: int) -> TiledAxes | None:
    """All input axes of a feature-map input ``[B, C, *spatial]``, taken tile by tile so each pass's
    tangents stay in a box while the convolutions let them (:mod:`rollnet.engine.window`).  Only
    for passes without autograd (the regulariser's passes keep dense tangents)."""
    if directions is None or directions.indices is None or directions.indices.dim() != 1:
        return None
    if x.dim() < 3 or torch.is_grad_enabled() or kc >= directions.count:
        return None
    d = math.prod(x.shape[1:])
    if directions.count != d or not torch.equal(directions.indices.cpu(), torch.arange(d)):
        return None
    channels, spatial = x.shape[1], tuple(x.shape[2:])
    boxes = window.tiles(spatial, channels, kc)
    axes = [window.tile_axes(start, size, channels, spatial) for start, size in boxes]
    return TiledAxes(count=d, indices=torch.cat(axes), boxes=boxes, channels=channels, spatial=spatial)


def _plan_tiles(directions: Directions | None, x: Tensor, kc: int, budget: int) -> TiledAxes | None:
    """Tiles for the tiled passes, with more directions per pass than the dense plan's ``kc``.

    A tile's tangents stay in small boxes through the early stages, where dense tangents are
    largest, so a pass holds far less than the dense count, and fewer passes repeat the primal
    forward less often.  A pass of ``f * kc`` directions holds at most ``f`` dense chunks, so
    ``f = min(budget, _TILE_WORKING_SET) // chunk`` keeps even a model without locality under
    the caller's budget.
    """
    chunk = _chunk_bytes(budget, x.device)
    grow = max(1, min(budget, _TILE_WORKING_SET) // chunk) if x.device.type == "cpu" else 1
    return _tiled(directions, x, kc * grow)


def _in_axis_order(result: Collected, tiled: TiledAxes) -> None:
    """Put the per-direction results of a tiled pass (the crossings) back in the order of the input axes."""
    assert tiled.indices is not None
    inverse = torch.argsort(tiled.indices).to(result.values.device)
    if result.cross_plus is not None and result.cross_minus is not None:
        result.cross_plus = result.cross_plus[:, inverse]
        result.cross_minus = result.cross_minus[:, inverse]


def _collect_gram(
    model: nn.Module,
    x: Tensor,
    request: Request,
    bc: int,
    budget: int,
    traced: Callable[..., Any],
    only_if_cheaper: bool,
    forward_args: tuple[Any, ...] = (),
) -> Collected:
    """Squared l2 norms by the Gram recursion (see :mod:`rollnet.engine.gram`).

    ``bc`` (sized for gradient rows) serves the first chunk; the Gram factors
    are usually much smaller than the rows, so the remaining examples are
    re-chunked from the memory that first chunk actually held (per example:
    factors shared by the batch, such as the first layer's weight, do not
    count, see :attr:`GramTangent.nbytes`).  A later chunk that holds more per
    example (more active neurons to pad to) shrinks the chunks after it.  On
    the CPU, free memory goes back to the system whenever a budget's worth of
    factors has passed, as on the rows path.
    """
    d = math.prod(x.shape[1:])
    b = x.shape[0]
    chunk_bytes = _chunk_bytes(budget, x.device)
    # rows cost ~ D * sum(F_in * F_out); the Gram recursion ~ sum(F_in^2 * F_out):
    # worth it while the layers are narrower than the input
    limit = d // 2 if only_if_cheaper else None
    trim = x.device.type == "cpu" and bc < b
    identity = GramTangent(identity=True, width=d, max_width=limit)  # one for all chunks (see gram.py)
    chunks: list[_ChunkObserver] = []
    per_example = 0
    passed = peak = 0
    b0 = 0
    while b0 < b or not chunks:  # (an empty batch: one empty chunk)
        xb = x[b0 : b0 + bc]
        n = xb.shape[0]
        obs = _ChunkObserver(request, d, n)
        args = batch_slice(forward_args, b0, b0 + n, b)
        _, trace = traced(model, xb, obs, tangent=identity, forward_args=args)
        chunks.append(obs)
        b0 += n
        peak = max(peak, trace.peak_bytes)
        rest = b - b0
        if n and rest:
            held = max(math.ceil(trace.peak_bytes * _GRAM_TEMPORARIES / n), 1)
            fits = max(1, chunk_bytes // max(per_example, held))
            if not per_example:  # after the first chunk: as many as fit, in even chunks
                bc = _even_chunks(rest, fits, x.device)
            elif fits < bc:
                bc = _thread_multiple(fits, x.device)
            per_example = max(per_example, held)
        del trace
        if trim:
            passed += n * per_example
            if passed >= budget:
                _release_free_memory()
                passed = 0
    result = _assemble(chunks, request, x)
    result.peak_bytes = peak
    return result


def _pad_groups(chunks: list[_ChunkObserver]) -> None:
    """Give every chunk the neuron groups of the longest one.

    A model may run fewer steps on a chunk whose sequences are all short (``range(max(lengths))``):
    its groups are then a prefix of a longer chunk's.  The groups it did not run are not neurons
    of its examples: they are added as such (``valid`` False, zero values and gradients, a
    constant pattern).  Chunks whose groups are not a prefix of the longest's are refused.
    """
    longest = max(chunks, key=lambda c: len(c.groups))
    for c in chunks:
        n = len(c.groups)
        if n == len(longest.groups):
            continue
        if c.groups != longest.groups[:n]:
            raise RuntimeError(
                "the model ran different operations on different chunks of the batch, and not one a "
                "prefix of the other (a forward that depends on the batch's composition)"
            )
        for i in range(n, len(longest.groups)):
            size = longest.groups[i].size
            like = longest.values[i]
            c.groups.append(longest.groups[i])
            c.values.append(like.new_zeros((c.batch_size, size)))
            pattern = longest.patterns[i]
            c.patterns.append(pattern.new_full((c.batch_size, size), False if pattern.dtype == torch.bool else -1))
            c.valid.append(torch.zeros((c.batch_size, size), dtype=torch.bool, device=like.device))
            for q, parts in c.norms.items():
                parts.append(longest.norms[q][i].new_zeros((c.batch_size, size)))
            if c.request.squared_l2:
                c.sq.append(longest.sq[i].new_zeros((c.batch_size, size)))
            if c.request.rows:
                c.rows.append(longest.rows[i].new_zeros((c.batch_size, size, c.k_total)))


def _assemble(chunks: list[_ChunkObserver], request: Request, x: Tensor) -> Collected:
    """Concatenate the batch chunks."""
    if len({len(c.groups) for c in chunks}) > 1:
        _pad_groups(chunks)

    def neurons(parts: list[Tensor], c: _ChunkObserver) -> Tensor:
        return torch.cat(parts, dim=1) if parts else x.new_zeros((c.batch_size, 0))

    def no_crossing(c: _ChunkObserver) -> Tensor:
        return x.new_full((c.batch_size, c.k_total), math.inf)

    first = chunks[0]
    outputs = [c.output_value for c in chunks]
    assert all(o is not None for o in outputs)
    result = Collected(
        values=torch.cat([neurons(c.values, c) for c in chunks]),
        patterns=[torch.cat([c.patterns[i] for c in chunks]) for i in range(len(first.patterns))],
        groups=first.groups,
        output=torch.cat(outputs),  # type: ignore[arg-type]
        chunk_sizes=[c.batch_size for c in chunks],
    )
    if any(v is not None for c in chunks for v in c.valid):

        def valid(c: _ChunkObserver) -> list[Tensor]:
            return [
                torch.ones_like(values, dtype=torch.bool) if v is None else v
                for v, values in zip(c.valid, c.values, strict=True)
            ]

        result.valid = torch.cat([neurons(valid(c), c) for c in chunks])
    for q in request.norms:
        norms = torch.cat([neurons(c.norms[q], c) for c in chunks])
        result.norms[q] = norms.sqrt() if q == 2.0 else norms
    if request.squared_l2:
        result.squared_l2 = torch.cat([neurons(c.sq, c) for c in chunks])
    if request.crossings:
        result.cross_plus = torch.cat([no_crossing(c) if c.plus is None else c.plus for c in chunks])
        result.cross_minus = torch.cat([no_crossing(c) if c.minus is None else c.minus for c in chunks])
    if request.rows:
        result.rows = torch.cat(
            [torch.cat(c.rows, dim=1) if c.rows else x.new_zeros((c.batch_size, 0, c.k_total)) for c in chunks]
        )
    if request.output and all(c.output_rows is not None for c in chunks):
        result.output_rows = torch.cat([c.output_rows for c in chunks])  # type: ignore[misc]
    return result
