"""Issue 16: certificates and ROLL training at image scale on conv nets (ResNet-18 layouts).

Run: .venv/bin/python benchmarks/bench_conv.py [--goals 0,1,2,3,4] [--quick] [--device cuda]
     [--images 2] [--size 64] [--large-size 224] [--fraction-directions 1536] [--epoch-batches 20]

Each goal prints one table, measured in this run (about 12 minutes on 2 CPU cores; ``--quick``
about 5). The ImageNet-layout net is ``resnet18(3, 1000, width=64, stem_kernel=7,
stem_stride=2)`` in eval mode, untrained, with BatchNorm running statistics and affine
parameters drawn from a fixed seed (so BatchNorm is not the identity); inputs are Gaussian.

1. Exact l2 and l_inf margins at 3 x ``--size`` x ``--size`` (default 64, D = 12,288 input
   axes), ``--images`` images (default 2, ``--quick`` 1).  Baseline: what a user would write
   with plain ``torch.func``: per image, ``vmap`` of ``jvp`` over chunks of 64 one-hot input
   directions, the neuron values taken by forward pre-hooks on every ``nn.ReLU``, and both
   dual norms (sum of squares for p = 2, sum of absolute values for p = inf) reduced on the
   fly.  Ours: ``rollnet.margin(net, x, p=(2, "inf"), rounding="none")`` (one pass, both
   norms) and ``p=2`` alone, float32 like the baseline.  The radii are checked against the
   baseline (max relative difference, asserted below 1e-3) and against float64
   (``rollnet.margin`` on a float64 copy of the net and inputs).  One call each (after one
   warm-up call on CUDA).
2. 3 x ``--large-size`` x ``--large-size`` (default 224, D = 150,528): time per image
   measured on ``--fraction-directions`` input axes (default 1,536, about 1%; evenly spaced
   over the flat input) and scaled by D / k, ours (``rollnet.engine.gradients.collect``, both
   dual norms, no grad) and the baseline of goal 1 on the same axes, plus the peak resident
   memory of each call (on CUDA: ``torch.cuda.max_memory_allocated``).  With
   ``--device cuda`` also the full margin (all D axes, TF32 off) against the 10 s goal.
3. An approximate ROLL training step (k random input axes, ``ROLLLoss(approx=k)``, the
   one-pass idiom ``term, logits = roll(net, x, return_output=True)``) against a vanilla step
   and against a measured FLOP floor: a forward and backward pass (no optimizer step) of the
   same net in eval mode (BatchNorm a fixed affine map, as in the tangent passes) on a batch
   of B * (k + 1) images, the work of the primal pass plus k tangent passes; also measured
   as k + 1 passes on the B images (the faster of the two is the floor).  Settings: (a)
   the Fashion-MNIST ResNet of ``configs/fashion_resnet_roll_approx.json`` (width 16, 3x3
   stem, 28x28, batch 64, k = 8), (b) the ImageNet layout at 112x112, batch 16, k = 36.
   Timed round-robin (each variant once per round), median; train mode (batch statistics),
   SGD with momentum.
4. The trainer's one-pass idiom against the two-pass step (``logits = net(x); term = roll(net,
   x)``) over an epoch of ``--epoch-batches`` batches (default 20; random data of the real
   shape, 1x28x28 in [0, 1]) on the Fashion-MNIST ResNet, batch 64, k = 8: the two steps
   alternate batch by batch, each on its own copy of the net.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollnet
import rollnet.train.trainer
from common import add_device_argument, machine, table, use_device
from rollnet.engine.gradients import (
    Directions,
    Request,
    TiledAxes,
    _plan_tiles,
    collect,
    plan_chunks,
    resolve_memory_budget,
    unit_directions,
)
from rollnet.engine.window import _span, tile_axes
from rollnet.models import resnet18

# configs/fashion_resnet_roll_approx.json
LAM, C = 0.001, 8.0
BASELINE_CHUNK = 64
FLOOR = "floor"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def once(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (one call)."""
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def imagenet_resnet(seed: int = 0) -> nn.Module:
    """The ResNet-18 ImageNet layout in eval mode, BatchNorm statistics and affine maps randomised."""
    torch.manual_seed(seed)
    net = resnet18(in_channels=3, num_classes=1000, width=64, stem_kernel=7, stem_stride=2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


def fashion_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet18(in_channels=1, num_classes=10, width=16)


# --- the baseline: plain chunked torch.func ---------------------------------------------------

def relu_inputs(net: nn.Module, xi: Tensor) -> Tensor:
    """All neuron values ``[N]`` of one example ``xi`` ``[*input_shape]``: inputs of every nn.ReLU."""
    zs: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: zs.append(args[0].reshape(-1)))
             for m in net.modules() if isinstance(m, nn.ReLU)]
    try:
        net(xi.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(zs)


def baseline_norms(net: nn.Module, xi: Tensor, axes: Tensor,
                   chunk: int = BASELINE_CHUNK) -> tuple[Tensor, Tensor, Tensor]:
    """Neuron values ``[N]`` and, over the input ``axes``, the squared l2 and the l1 norms of
    their gradients, by vmap of jvp over chunks of one-hot directions, reduced on the fly."""
    d = xi.numel()
    with torch.no_grad():
        z = relu_inputs(net, xi)
        sq, l1 = torch.zeros_like(z), torch.zeros_like(z)
        for k0 in range(0, axes.numel(), chunk):
            idx = axes[k0 : k0 + chunk]
            v = torch.zeros(idx.numel(), d, dtype=xi.dtype)
            v[torch.arange(idx.numel()), idx] = 1.0
            v = v.reshape(idx.numel(), *xi.shape)
            _, t = torch.func.vmap(lambda vi: torch.func.jvp(lambda u: relu_inputs(net, u), (xi,), (vi,)))(v)
            sq += t.square().sum(0)
            l1 += t.abs().sum(0)
    return z, sq, l1


def radius(z: Tensor, norm: Tensor) -> Tensor:
    a = z.abs()
    return torch.where(norm > 0, a / norm, torch.full_like(a, math.inf)).amin()


def baseline_margins(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """l2 and l_inf radii ``[B]`` of every image, one image at a time over all D axes."""
    axes = torch.arange(x[0].numel())
    r2, rinf = [], []
    for xi in x:
        z, sq, l1 = baseline_norms(net, xi, axes)
        r2.append(radius(z, sq.sqrt()))
        rinf.append(radius(z, l1))
    return torch.stack(r2), torch.stack(rinf)


def rel_diff(a: Tensor, b: Tensor) -> float:
    """Max relative difference of two radius vectors (both inf counts as equal)."""
    a, b = a.double().cpu(), b.double().cpu()
    same = (a == b) | (torch.isinf(a) & torch.isinf(b))
    d = torch.where(same, torch.zeros_like(a), (a - b).abs() / b.abs())
    return float(d.max())


def partial_diff(a: Tensor, b: Tensor) -> float:
    """Max difference of two norm vectors relative to each entry (or to 1e-6 of the largest, when smaller)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).abs() / b.abs().clamp_min(1e-6 * float(b.abs().max()))).max())


def neuron_count(net: nn.Module, x: Tensor) -> int:
    """How many neurons the engine certifies (values only, no directions)."""
    with torch.no_grad():
        return int(collect(net, x[:1], None, Request()).values.shape[1])


# --- memory --------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, str]:
    """``fn()``, its wall time and a description of its peak memory.

    CUDA: ``torch.cuda.max_memory_allocated`` over the call.  CPU: the peak resident set over the
    call above the resident set before it (the high-water mark is reset through
    ``/proc/self/clear_refs`` where Linux allows it; otherwise the ``ru_maxrss`` growth, a
    process-wide peak that stays 0 when the call stays under an earlier peak).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out, seconds = once(fn)
        peak = torch.cuda.max_memory_allocated()
        return out, seconds, f"{peak / 2**20:,.0f} MiB GPU ({(peak - before) / 2**20:,.0f} above the start)"
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    rss = _status_kib("VmRSS")
    if reset and rss is not None:
        out, seconds = once(fn)
        hwm = _status_kib("VmHWM") or 0
        return out, seconds, f"{hwm / 2**10:,.0f} MiB RSS ({(hwm - rss) / 2**10:,.0f} above the start)"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, seconds = once(fn)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out, seconds, f"process peak {after / 2**10:,.0f} MiB RSS (+{(after - before) / 2**10:,.0f})"


# --- goal 1 --------------------------------------------------------------------------------

def goal_exact(args: argparse.Namespace, device: torch.device) -> None:
    n_images = 1 if args.quick and args.images is None else (args.images or 2)
    size = args.size
    net = imagenet_resnet()
    torch.manual_seed(1)
    x = torch.randn(n_images, 3, size, size)
    d, n = x[0].numel(), neuron_count(net, x)
    if device.type == "cuda":  # warm-up: cuDNN plans, lazy initialisation
        baseline_norms(net, x[0], torch.arange(BASELINE_CHUNK))
        rollnet.margin(net, x[:1], p=(2, "inf"), rounding="none")
        rollnet.margin(net, x[:1], p=2, rounding="none")
    (b2, binf), t_base = once(lambda: baseline_margins(net, x))
    with torch.no_grad():
        (o2, oinf), t_both = once(lambda: rollnet.margin(net, x, p=(2, "inf"), rounding="none"))
        a2, t_l2 = once(lambda: rollnet.margin(net, x, p=2, rounding="none"))
    net64 = copy.deepcopy(net).double()
    (f2, finf), t_f64 = once(lambda: rollnet.margin(net64, x.double(), p=(2, "inf")))
    n_base = int(relu_inputs(net, x[0]).numel())
    diff_both = max(rel_diff(o2, b2), rel_diff(oinf, binf))
    diff_l2 = rel_diff(a2, b2)
    per = [t / n_images for t in (t_base, t_both, t_l2)]
    rows = [
        ["baseline: chunked torch.func (vmap of jvp, 64 one-hot axes a chunk), both norms", per[0], "1.00x"],
        ['ours: margin(p=(2, "inf")), both norms, one pass', per[1], f"{per[0] / per[1]:.2f}x"],
        ["ours: margin(p=2) alone", per[2], f"{per[0] / per[2]:.2f}x"],
    ]
    print(table(
        f"Goal 1: exact l2 and l_inf margins, ResNet-18 layout (7x7 stem, stride 2), 3x{size}x{size}: "
        f"D = {d:,} input axes, {n:,} neurons; {n_images} image(s), float32, {device}, load {load()}",
        ["method", "s per image", "speed-up over baseline"],
        [[r[0], f"{r[1]:.1f}", r[2]] for r in rows],
    ))
    radii = []
    for i in range(n_images):
        radii.append([str(i), "l2", f"{float(b2[i]):.6g}", f"{float(o2[i]):.6g}", f"{float(a2[i]):.6g}",
                      f"{float(f2[i]):.6g}"])
        radii.append([str(i), "l_inf", f"{float(binf[i]):.6g}", f"{float(oinf[i]):.6g}", "",
                      f"{float(finf[i]):.6g}"])
    print(table("Goal 1: the radii", ["image", "norm", "baseline (float32)", 'ours p=(2, "inf")',
                                      "ours p=2 alone", "ours float64"], radii))
    f64_diff = max(rel_diff(o2, f2), rel_diff(oinf, finf))
    f64_base = max(rel_diff(b2, f2), rel_diff(binf, finf))
    print(f"neurons: the engine {n:,}, the baseline's ReLU hooks {n_base:,}"
          + ("" if n == n_base else "  <-- MISMATCH"))
    print(f"check: ours (one pass) vs baseline, max relative difference of the radii {diff_both:.1e}; "
          f"ours p=2 alone vs baseline {diff_l2:.1e} (asserted < 1e-3)")
    print(f"check: float32 vs float64 (margin on a float64 copy, {t_f64 / n_images:.1f} s per image): "
          f"ours max relative difference {f64_diff:.1e}, baseline {f64_base:.1e}\n")
    assert diff_both < 1e-3 and diff_l2 < 1e-3, (diff_both, diff_l2)


# --- locality, from the layer shapes ---------------------------------------------------------

def _through(boxes: list[tuple[int, int]], n_in: int, k: int, stride: int, pad: int) -> tuple[list[tuple[int, int]], int]:
    """Each tile's box ``(start, size)`` along one dimension after a k-tap window (stride, padding)."""
    n_out = (n_in + 2 * pad - k) // stride + 1
    out = []
    for a, h in boxes:
        lo, left, right, _ = _span(a, h, k, stride, pad, 1, n_out)
        out.append((lo, (h + left + right - k) // stride + 1))
    return out, n_out


def locality_share(net: nn.Module, size: int, tile: int) -> float:
    """The share of the dense pass's convolution FLOPs that tiled passes compute, from the layer
    shapes alone: every tile's box through the ResNet's stem, pool and blocks (one spatial
    dimension; tiles form a grid, so the 2-D share of a layer is the square of its mean 1-D share)."""
    boxes = [(a, min(tile, size - a)) for a in range(0, size, tile)]
    dense = boxed = 0.0

    def conv(bx: list[tuple[int, int]], n: int, m: nn.Conv2d) -> tuple[list[tuple[int, int]], int]:
        nonlocal dense, boxed
        out, n_out = _through(bx, n, m.kernel_size[0], m.stride[0], int(m.padding[0]))
        per_position = m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        share = statistics.fmean(h for _, h in out) / n_out
        dense += per_position * n_out**2
        boxed += per_position * n_out**2 * min(1.0, share) ** 2
        return out, n_out

    stem, pool = net.stem[0], net.stem[3]
    bx, n = conv(boxes, size, stem)
    bx, n = _through(bx, n, pool.kernel_size, pool.stride, pool.padding)
    for stage in net.stages:
        for block in stage:
            inner, n1 = conv(bx, n, block.conv1)
            inner, n1 = conv(inner, n1, block.conv2)
            if isinstance(block.shortcut, nn.Sequential):
                short, _ = conv(bx, n, block.shortcut[0])
            else:
                short = bx
            bx = [(min(a, b), max(a + h, b + g) - min(a, b)) for (a, h), (b, g) in zip(inner, short, strict=True)]
            n = n1
    return boxed / dense


def goal_locality(args: argparse.Namespace, device: torch.device) -> None:
    net = imagenet_resnet()
    rows = []
    for size in (64, 112, 224):
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            _, kc = plan_chunks(net, x, unit_directions(x.shape[1:]))
            tiling = _plan_tiles(unit_directions(x.shape[1:]), x, kc, resolve_memory_budget(None, x.device))
        assert tiling is not None
        side = tiling.boxes[0][1][0]
        share = locality_share(net, size, side)
        rows.append([f"3x{size}x{size}", f"{side}x{side} pixels ({3 * side * side} axes)", f"{share:.1%}",
                     f"{1 / share:.2f}x"])
    print(table(
        "Locality from the layer shapes: share of the dense pass's convolution FLOPs the tiled passes "
        "compute (ResNet-18 layout; the tiles margin() uses by default)",
        ["input", "tile", "conv FLOPs computed", "FLOP saving (dense / tiled)"], rows,
    ))


# --- goal 2 --------------------------------------------------------------------------------

def goal_large(args: argparse.Namespace, device: torch.device) -> None:
    size = args.large_size
    net = imagenet_resnet()
    torch.manual_seed(2)
    x = torch.randn(1, 3, size, size)
    d = x[0].numel()
    k = min(args.fraction_directions or (512 if args.quick else 1536), d)
    axes = torch.linspace(0, d - 1, k).round().long()
    n = neuron_count(net, x)
    if device.type == "cuda":
        with torch.no_grad():
            collect(net, x, Directions(count=BASELINE_CHUNK, indices=axes[:BASELINE_CHUNK]),
                    Request(norms=(2.0, 1.0)))
        baseline_norms(net, x[0], axes[:BASELINE_CHUNK])

    def ours() -> Any:
        with torch.no_grad():
            return collect(net, x, Directions(count=k, indices=axes), Request(norms=(2.0, 1.0)))

    # what margin() runs: all axes tile by tile (locality); timed on evenly spaced tiles of that tiling
    full = unit_directions(x.shape[1:])
    with torch.no_grad():  # (tiles are for passes without autograd)
        _, kc = plan_chunks(net, x, full)
        tiling = _plan_tiles(full, x, kc, resolve_memory_budget(None, x.device))
    assert tiling is not None
    per_tile = tiling.channels * math.prod(tiling.boxes[0][1])
    every = max(1, len(tiling.boxes) * per_tile // k)
    boxes = tiling.boxes[every // 2 :: every]
    sample = TiledAxes(count=sum(tiling.channels * math.prod(b[1]) for b in boxes),
                       indices=torch.cat([tile_axes(b[0], b[1], tiling.channels, tiling.spatial) for b in boxes]),
                       boxes=boxes, channels=tiling.channels, spatial=tiling.spatial)

    def tiled() -> Any:
        with torch.no_grad():
            return collect(net, x, sample, Request(norms=(2.0, 1.0)))

    _, t_tiled, mem_tiled = peak_memory(tiled, device)
    got, t_ours, mem_ours = peak_memory(ours, device)
    (_, sq, l1), t_base, mem_base = peak_memory(lambda: baseline_norms(net, x[0], axes), device)
    # same partial norms over the same axes (neurons in execution order in both): the two time the same thing
    diff = max(partial_diff(got.norms[2.0][0], sq.sqrt()), partial_diff(got.norms[1.0][0], l1))
    scale = d / k
    rows = [
        ["baseline: chunked torch.func, both norms", f"{t_base:.1f}", f"{t_base * scale:,.0f}", "1.00x", mem_base],
        ["ours: engine collect, both dual norms (2, 1)", f"{t_ours:.1f}", f"{t_ours * scale:,.0f}",
         f"{t_base / t_ours:.2f}x", mem_ours + f"; engine's tangent count {got.peak_bytes / 2**20:,.0f} MiB"],
        [f"ours as margin() runs it: tiles of {per_tile} axes, {len(boxes)} of the {len(tiling.boxes)} tiles "
         f"({sample.count:,} axes), scaled by D/{sample.count:,}", f"{t_tiled:.1f}",
         f"{t_tiled * d / sample.count:,.0f}", f"{t_base * scale / (t_tiled * d / sample.count):.2f}x", mem_tiled],
    ]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        (_, _), t_full, mem_full = peak_memory(
            lambda: rollnet.margin(net, x, p=(2, "inf"), rounding="none"), device)
        rows.append(['ours: full margin(p=(2, "inf")), all D axes, TF32 off', f"{t_full:.1f}",
                     f"{t_full:,.1f} (goal 10 s: {'met' if t_full <= 10 else 'not met'})",
                     f"{t_base * scale / t_full:.2f}x vs the scaled baseline", mem_full])
    print(table(
        f"Goal 2: ResNet-18 layout at 3x{size}x{size}, D = {d:,}, {n:,} neurons, 1 image; timed on "
        f"k = {k:,} evenly spaced input axes ({k / d:.2%} of D) and scaled by D/k = {scale:.1f}; "
        f"float32, {device}, load {load()}",
        ["method", f"s on {k:,} axes", "s per image, all D axes (scaled)", "speed-up over baseline",
         "peak memory of the call"],
        rows,
    ))
    print(f"check: ours vs baseline on the same {k:,} axes, max relative difference of the partial norms "
          f"{diff:.1e}. The scaled times include the fixed costs (primal pass, the engine's chunk "
          f"planning) D/k times over: a slight overestimate.\n")
    assert diff < 1e-3, diff


# --- goal 3 --------------------------------------------------------------------------------

def time_round_robin(steps: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per step, each variant once per round, after one warm-up step each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(once(step)[1])
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_steps(net: nn.Module, x: Tensor, y: Tensor, k: int,
                   device: torch.device) -> dict[str, Callable[[], Any]]:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    roll = rollnet.ROLLLoss(lam=LAM, C=C, approx=k, generator=torch.Generator(device).manual_seed(0))
    floor_net = copy.deepcopy(net).eval()
    xf = x.repeat(k + 1, *([1] * (x.dim() - 1)))
    yf = y.repeat(k + 1)

    def update(loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def vanilla() -> None:
        update(F.cross_entropy(net(x), y))

    def one_pass() -> None:
        term, logits = roll(net, x, return_output=True)
        update(F.cross_entropy(logits, y) + term)

    def floor() -> None:
        floor_net.zero_grad(set_to_none=True)
        F.cross_entropy(floor_net(xf), yf).backward()

    def floor_chunked() -> None:
        floor_net.zero_grad(set_to_none=True)
        for _ in range(k + 1):
            F.cross_entropy(floor_net(x), y).backward()

    return {"vanilla step": vanilla, f"ROLL approximate, k={k}, one pass": one_pass,
            f"{FLOOR}: forward + backward on one batch of B*(k+1) = {xf.shape[0]} images, eval mode": floor,
            f"{FLOOR}, chunked: k+1 = {k + 1} forward + backward passes on B = {x.shape[0]} images, eval mode":
                floor_chunked}


def goal_training(args: argparse.Namespace, device: torch.device) -> None:
    settings = [
        ("(a) Fashion-MNIST ResNet-18, width 16, 3x3 stem, 1x28x28", fashion_resnet(), (1, 28, 28), 10, 64, 8,
         3 if args.quick else 10),
        ("(b) ResNet-18 layout, width 64, 7x7 stem stride 2, 3x112x112", imagenet_resnet().train(), (3, 112, 112),
         1000, 16, 36, 1 if args.quick else 3),
    ]
    rows = []
    for name, net, shape, classes, batch, k, rounds in settings:
        net.train()
        torch.manual_seed(3)
        x = torch.rand(batch, *shape)
        y = torch.randint(0, classes, (batch,))
        seconds = time_round_robin(training_steps(net, x, y, k, device), rounds)
        vanilla = seconds["vanilla step"]
        floor = min(s for step, s in seconds.items() if step.startswith(FLOOR))
        for step, s in seconds.items():
            rows.append([name, str(batch), str(k), step, f"{s * 1e3:,.0f}", f"{s / vanilla:.1f}x",
                         f"{s / floor:.2f}x", str(rounds)])
    print(table(
        f"Goal 3: approximate ROLL training step on conv nets (lambda {LAM}, C {C}; train mode, SGD), "
        f"median of round-robin rounds after a warm-up; {device}, load {load()}",
        ["net", "batch", "k", "step", "ms per step", "ratio to vanilla", "ratio to floor (the faster floor row)",
         "rounds"],
        rows,
    ))
    print("floor: the primal pass plus k tangent passes, forward and backward, measured as a plain forward + "
          "backward (no optimizer step) of a copy of the same net in eval mode on B*(k+1) images (BatchNorm "
          "a fixed affine map, as in the tangent passes, whose bias and shift ops it adds: negligible); "
          "it leaves out the masks, the norms and the hinge of the term. Measured two ways, as one batch "
          "of B*(k+1) images and as k+1 passes on the B images (gradients accumulated): on a CPU the "
          "large batch can run slower per image than the small one (cache, memory traffic), so the "
          "ratio to floor is taken to the faster of the two.\n")


# --- goal 4 --------------------------------------------------------------------------------

def goal_epoch(args: argparse.Namespace, device: torch.device) -> None:
    batches = args.epoch_batches or (5 if args.quick else 20)
    batch, k = 64, 8
    trainer_src = inspect.getsource(rollnet.train.trainer)
    idiom = ("uses the one-pass idiom (`reg, logits = self.roll(..., return_output=True)`)"
             if "return_output=True" in trainer_src else "does NOT use the one-pass idiom")
    base = fashion_resnet().train()
    torch.manual_seed(4)
    data = [(torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))) for _ in range(batches)]

    def make(two_pass: bool) -> Callable[[Tensor, Tensor], None]:
        net = copy.deepcopy(base)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
        roll = rollnet.ROLLLoss(lam=LAM, C=C, approx=k, generator=torch.Generator(device).manual_seed(0))

        def step(x: Tensor, y: Tensor) -> None:
            if two_pass:
                logits = net(x)
                term = roll(net, x)
            else:
                term, logits = roll(net, x, return_output=True)
            loss = F.cross_entropy(logits, y) + term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    steps = {"one pass: term, logits = roll(net, x, return_output=True)": make(False),
             "two passes: logits = net(x); term = roll(net, x)": make(True)}
    for step in steps.values():  # warm-up
        step(*data[0])
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i, (x, y) in enumerate(data):
        for name in names if i % 2 == 0 else names[::-1]:  # alternate who goes first
            times[name].append(once(lambda s=steps[name], xx=x, yy=y: s(xx, yy))[1])
    one, two = (sum(times[nm]) for nm in names)
    rows = [[nm, f"{statistics.median(times[nm]) * 1e3:,.0f}", f"{sum(times[nm]):.1f}"] for nm in names]
    rows.append(["gain of the one-pass step", f"{1 - statistics.median(times[names[0]]) / statistics.median(times[names[1]]):.1%}",
                 f"{1 - one / two:.1%}"])
    print(table(
        f"Goal 4: one-pass against two-pass ROLL step, Fashion-MNIST ResNet-18 width 16, batch {batch}, "
        f"approx k={k}, an epoch of {batches} batches of random 1x28x28 data (the trainer, "
        f"rollnet.train.trainer, {idiom}); {device}, load {load()}",
        ["step", "ms per step (median)", f"s per epoch of {batches} batches"],
        rows,
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--goals", default="0,1,2,3,4",
                        help="comma-separated goals to run (default 0,1,2,3,4; 0: locality from the layer shapes)")
    parser.add_argument("--quick", action="store_true", help="fewer images, axes, rounds and batches")
    parser.add_argument("--images", type=int, default=None, help="goal 1: images (default 2, --quick 1)")
    parser.add_argument("--size", type=int, default=64, help="goal 1: image side (default 64)")
    parser.add_argument("--large-size", type=int, default=224, help="goal 2: image side (default 224)")
    parser.add_argument("--fraction-directions", type=int, default=None,
                        help="goal 2: input axes timed, then scaled by D/k (default 1536, about 1%%; --quick 512)")
    parser.add_argument("--epoch-batches", type=int, default=None, help="goal 4: batches (default 20, --quick 5)")
    args = parser.parse_args()
    device = use_device(args.device)
    goals = {int(g) for g in args.goals.split(",") if g.strip()}
    print(f"machine: {machine()}\n")
    started = time.perf_counter()
    for goal, run in ((0, goal_locality), (1, goal_exact), (2, goal_large), (3, goal_training), (4, goal_epoch)):
        if goal in goals:
            t = time.perf_counter()
            run(args, device)
            print(f"(goal {goal}: {time.perf_counter() - t:.0f} s)\n")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
