"""Shared helpers for the benchmarks: timing, FLOP counting, reference models, tables."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {dev}"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``cpu``): where models, inputs and the matmul ceilings live."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")


def use_device(name: str) -> torch.device:
    """Make ``name`` the default device (models and inputs built afterwards land there)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    torch.set_default_device(device)
    return device


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1, min_time: float = 0.0) -> float:
    """Best (smallest) wall time of ``fn()`` in seconds over the repeats (after ``warmup`` calls).

    The best time is the least disturbed by other load on a shared machine; the
    ceiling (``matmul_rate``) is measured the same way.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return min(times)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Achieved FLOP/s of an (m x k) @ (k x n) product, the hardware ceiling we compare with."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    t = timeit(lambda: a @ b, repeat=5, min_time=0.3)
    return 2.0 * m * k * n / t


def forward_flops(model: nn.Module, x: Tensor) -> list[float]:
    """FLOPs of each Linear / Conv call for ONE example, in execution order."""
    flops: list[float] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        if isinstance(module, nn.Linear):
            flops.append(2.0 * module.in_features * module.out_features * out.shape[:-1].numel() / out.shape[0])
        elif isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
            flops.append(2.0 * per_out * out[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return flops


def gradient_pass_flops(model: nn.Module, x: Tensor) -> float:
    """FLOPs of pushing all D input axes through the linearized network for a batch.

    Every affine layer is applied to D tangents per example (2 * fan_in * fan_out
    per tangent), except the first one, whose Jacobian is shared by the batch
    (counted once).  Elementwise masks and reductions are not counted.
    """
    d = x[0].numel()
    per_layer = forward_flops(model, x)
    return d * per_layer[0] + x.shape[0] * d * sum(per_layer[1:])


class PaperMLP(nn.Module):
    """The paper's MNIST MLP: 784-300x4-10 with ReLU."""

    def __init__(self, widths: tuple[int, ...] = (300, 300, 300, 300), d: int = 784, out: int = 10) -> None:
        super().__init__()
        sizes = [d, *widths]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.out = nn.Linear(sizes[-1], out)

    def neurons(self, x: Tensor) -> Tensor:
        """All pre-activations, concatenated: ``[N]`` for one example ``[784]``."""
        zs = []
        h = x.reshape(-1)
        for layer in self.hidden:
            z = layer(h)
            zs.append(z)
            h = F.relu(z)
        return torch.cat(zs)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.out(h)


class SmallResNet(nn.Module):
    """A small residual conv net on 28x28 inputs (conv stem, two residual stages)."""

    def __init__(self, width: int = 8, pool: str = "avg") -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.a1 = nn.Conv2d(width, width, 3, padding=1)
        self.a2 = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.b1 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.b2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.pool = nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width * 7 * 7, 10)

    def neurons(self, x: Tensor) -> Tensor:
        zs: list[Tensor] = []

        def act(z: Tensor) -> Tensor:
            zs.append(z.reshape(-1))
            return F.relu(z)

        x = x.unsqueeze(0)
        h = act(self.stem(x))
        h = act(h + self.a2(act(self.a1(h))))
        h = act(self.down(h))
        act(h + self.b2(act(self.b1(h))))
        return torch.cat(zs)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(h + self.a2(F.relu(self.a1(h))))
        h = F.relu(self.down(h))
        h = F.relu(h + self.b2(F.relu(self.b1(h))))
        return self.fc(torch.flatten(self.pool(h), 1))


def margins_by_autograd(model: nn.Module, x: Tensor, q: float = 2.0, limit: int | None = None) -> Tensor:
    """The alternative a user would write: one backward pass per neuron.

    With ``limit``, only the first ``limit`` neurons are done (for timing a
    sample of a large network; the result is then not the margin).
    """
    x = x.detach().requires_grad_(True)
    z = torch.stack([model.neurons(xi) for xi in x])  # type: ignore[operator]
    if limit is not None:
        z = z[:, :limit]
    norms = []
    for j in range(z.shape[1]):
        (g,) = torch.autograd.grad(z[:, j].sum(), x, retain_graph=True)
        norms.append(g.flatten(1).norm(p=q, dim=1))
    n = torch.stack(norms, dim=1)
    return torch.where(n > 0, z.detach().abs() / n, torch.full_like(n, math.inf)).amin(1)


def margins_by_jacfwd(model: nn.Module, x: Tensor, q: float = 2.0) -> Tensor:
    """torch.func: jacfwd of all neurons, vmapped over the batch."""
    fn = model.neurons  # type: ignore[attr-defined]
    with torch.no_grad():
        jac = torch.func.vmap(torch.func.jacfwd(fn))(x)
        z = torch.func.vmap(fn)(x)
    n = jac.flatten(2).norm(p=q, dim=2)
    return torch.where(n > 0, z.abs() / n, torch.full_like(n, math.inf)).amin(1)


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([f"### {title}", "", line, sep, *body, ""])
