"""Where the time of a call goes on a GPU: wall time against GPU kernel time, and kernel launches.

Run: python benchmarks/profile_cuda.py  (needs CUDA)

A call whose GPU kernel time is far below its wall time is bound by the launches
from Python (each op costs some microseconds of host time), not by the GPU.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollnet
from common import PaperMLP, SmallResNet, machine, margins_by_jacfwd, table
from rollnet.models import MLP


def profile(fn: Callable[[], object]) -> tuple[float, float, int]:
    """(wall ms, GPU kernel ms, kernel launches) of one call, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.time_range.elapsed_us() for e in kernels) / 1e3  # us -> ms
    return wall * 1e3, gpu, len(kernels)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    torch.set_default_device("cuda")
    torch.manual_seed(0)
    print(f"machine: {machine()}\n")
    mlp, conv = PaperMLP().eval(), SmallResNet().eval()
    x256, x64 = torch.rand(256, 1, 28, 28), torch.rand(64, 1, 28, 28)
    train_mlp = MLP((1, 28, 28), 10)  # a plain chain: the approximate term takes the fused pass
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(train_mlp.parameters(), lr=1e-4)

    def step(roll: rollnet.ROLLLoss | None) -> Callable[[], object]:
        def run() -> object:
            opt.zero_grad()
            if roll is None:
                loss = F.cross_entropy(train_mlp(x64), y)
            else:
                term, logits = roll(train_mlp, x64, return_output=True)
                loss = F.cross_entropy(logits, y) + term
            loss.backward()
            opt.step()
            return loss
        return run

    cases: list[tuple[str, Callable[[], object]]] = [
        ("margin p=2, MLP, batch 256", lambda: rollnet.margin(mlp, x256, p=2, rounding="none")),
        ("margin p=inf, MLP, batch 256", lambda: rollnet.margin(mlp, x256, p=math.inf, rounding="none")),
        ("jacfwd+vmap, MLP, batch 256", lambda: margins_by_jacfwd(mlp, x256)),
        ("margin p=2, residual conv, batch 64", lambda: rollnet.margin(conv, x64, p=2, rounding="none")),
        ("margin p=inf, residual conv, batch 64", lambda: rollnet.margin(conv, x64, p=math.inf, rounding="none")),
        ("jacfwd+vmap, residual conv, batch 64", lambda: margins_by_jacfwd(conv, x64)),
        ("vanilla step, MLP, batch 64", step(None)),
        ("ROLL exact step, MLP, batch 64", step(rollnet.ROLLLoss(2.0, 0.25))),
        ("ROLL approx k=3 step, MLP, batch 64 (fused chain pass)", step(rollnet.ROLLLoss(2.0, 0.25, approx=3))),
        ("ROLL approx k=3 step, MLP, batch 64 (generic engine)",
         step(rollnet.ROLLLoss(2.0, 0.25, approx=3, fused=False))),
    ]
    rows = []
    for name, fn in cases:
        wall, gpu, launches = profile(fn)
        rows.append([name, f"{wall:.1f}", f"{gpu:.1f}", f"{gpu / wall:.0%}", str(launches)])
    print(table("one call on the GPU", ["call", "wall ms", "GPU kernel ms", "GPU busy", "kernels"], rows))


if __name__ == "__main__":
    main()
