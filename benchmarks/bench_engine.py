"""The all-neuron gradient engine against the alternatives, with memory and scaling tables.

Run: .venv/bin/python benchmarks/bench_engine.py [--quick]

Tables (float32, everything measured in this run, best of a few repeats):
1. margin(p) on the paper's MLP at batch 256 vs torch.func (jacfwd + vmap) and
   per-neuron autograd, and the gradient pass's FLOP rate against a same-run
   matmul of the same shape ((D*B) x 300 @ 300 x 300, the better of one product
   and blocks of 8192 rows).
2. Our gradient rows against the official implementation's pass (the zero
   image and all D one-hot images through every masked layer, then subtract).
3. Peak resident memory of margin() over 4,096 MNIST-sized inputs with a
   512 MiB budget (in a child process).
4. Scaling of margin(p=2) and margin(p=inf) with batch size, width and depth.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollnet
from common import (
    PaperMLP,
    add_device_argument,
    gradient_pass_flops,
    machine,
    margins_by_autograd,
    margins_by_jacfwd,
    matmul_rate,
    table,
    timeit,
    use_device,
)
from rollnet.engine.gradients import Request, collect, unit_directions


def official_style_rows(model: PaperMLP, x: Tensor) -> Tensor:
    """The official implementation's gradient pass: feed the zero image and the D one-hot
    images through every layer with x's masks fixed, and subtract.  Returns squared norms."""
    b, d = x.shape[0], x[0].numel()
    with torch.no_grad():
        masks = []
        h = x.flatten(1)
        for layer in model.hidden:
            z = layer(h)
            masks.append((z > 0).to(x.dtype))
            h = F.relu(z)
        probe = torch.cat([torch.zeros(1, d), torch.eye(d)]).unsqueeze(0).expand(b, d + 1, d)
        h = probe
        norms = []
        for layer, m in zip(model.hidden, masks, strict=True):
            z = layer(h)  # [B, D+1, F]
            g = z[:, 1:] - z[:, :1]
            norms.append(g.square().sum(1))
            h = z * m.unsqueeze(1)
        return torch.cat(norms, dim=1)


def peak_memory_child(n: int, budget: int) -> str:
    """Peak resident memory (VmHWM) of a fresh process running margin() once."""
    code = (
        "import torch, rollnet, sys; sys.path.insert(0, 'benchmarks');"
        "from common import PaperMLP\n"
        "def hwm():\n"
        "    return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024\n"
        f"torch.manual_seed(0); m = PaperMLP().eval(); x = torch.rand({n}, 1, 28, 28)\n"
        f"before = hwm(); r = rollnet.margin(m, x, p=float('inf'), memory_budget={budget}, rounding='none')\n"
        "print(before, hwm())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    before, after = (float(v) for v in out.stdout.split())
    return f"peak resident memory {after:.0f} MiB ({before:.0f} MiB after importing torch and building the inputs)"


def peak_gpu_memory(n: int, budget: int) -> str:
    """Peak GPU memory allocated by margin() over n inputs (the default device is the GPU)."""
    torch.manual_seed(0)
    m = PaperMLP().eval()
    x = torch.rand(n, 1, 28, 28)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    rollnet.margin(m, x, p=float("inf"), memory_budget=budget, rounding="none")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return f"peak GPU memory allocated {peak / 2**20:.0f} MiB ({before / 2**20:.0f} MiB for the model and inputs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    add_device_argument(parser)
    args = parser.parse_args()
    device = use_device(args.device)
    repeat = 1 if args.quick else 3
    torch.manual_seed(0)
    print(f"machine: {machine()}\n")

    # 1. MLP, batch 256
    b = 256
    model = PaperMLP().eval()
    x = torch.rand(b, 1, 28, 28)
    d = x[0].numel()
    # the ceiling: the better of one monolithic (D*B) x 300 @ 300 x 300 product (memory-bound at
    # this size) and the same product done in cache-sized blocks of rows, as our pass does
    monolithic = matmul_rate(d * b, 300, 300, device=str(device))
    blocked = matmul_rate(8192, 300, 300, device=str(device))
    ceiling = max(monolithic, blocked)
    flops = gradient_pass_flops(model, x)
    t_jac = timeit(lambda: margins_by_jacfwd(model, x), repeat=repeat)
    sample = 200
    t_auto = timeit(lambda: margins_by_autograd(model, x, limit=sample), repeat=1, warmup=0) * 1200 / sample
    rows = []
    for p in (2, 1, math.inf):
        t = timeit(lambda pp=p: rollnet.margin(model, x, p=pp, rounding="none"), repeat=repeat)
        t_rows = t if p != 2 else timeit(
            lambda: collect(model, x, unit_directions(x.shape[1:]), Request(norms=(2.0,)), method="rows"),
            repeat=repeat)
        rows.append([
            str(p), f"{t * 1e3:.0f} ms", f"{t_jac / t:.1f}x", f"{t_auto / t:.0f}x",
            f"{flops / t_rows / 1e9:.1f} ({flops / t_rows / ceiling:.0%})" + (" rows path" if p == 2 else ""),
        ])
    print(table(
        f"margin on the MLP 784-300x4-10, batch {b} (p=2 takes the Gram recursion)",
        ["p", "time", "vs jacfwd+vmap", "vs per-neuron autograd", "gradient rows GFLOP/s (of same-shape matmul)"],
        rows,
    ))
    print(f"same-shape matmul ({d * b} x 300 @ 300 x 300): {monolithic / 1e9:.1f} GFLOP/s in one product, "
          f"{blocked / 1e9:.1f} GFLOP/s in blocks of 8192 rows; the better is the ceiling; "
          f"jacfwd+vmap {t_jac * 1e3:.0f} ms; per-neuron autograd {t_auto * 1e3:.0f} ms "
          f"(timed on {sample} of 1200 neurons, scaled)")
    print("FLOPs: 2*fan_in*fan_out per tangent for layers 2..5 on D tangents per example, layer 1 once.\n")

    # 2. against the official implementation's pass, batch 64
    xb = x[:64]
    t_off = timeit(lambda: official_style_rows(model, xb), repeat=repeat)
    t_rows = timeit(lambda: collect(model, xb, unit_directions(xb.shape[1:]), Request(norms=(2.0,)),
                                    method="rows"), repeat=repeat)
    t_gram = timeit(lambda: collect(model, xb, unit_directions(xb.shape[1:]), Request(norms=(2.0,)),
                                    method="gram"), repeat=repeat)
    ref = official_style_rows(model, xb)
    got = collect(model, xb, unit_directions(xb.shape[1:]), Request(norms=(2.0,)), method="gram").norms[2.0]
    assert torch.allclose(ref.sqrt(), got, rtol=1e-3, atol=1e-6)
    off_flops = 2.0 * 64 * (d + 1) * (784 * 300 + 3 * 300 * 300)
    print(table("gradient pass, batch 64: official-style vs rollnet", ["pass", "time", "speed-up", "GFLOP/s"], [
        ["official-style (zero + D one-hot images, subtract)", f"{t_off * 1e3:.0f} ms", "1.0x",
         f"{off_flops / t_off / 1e9:.1f}"],
        ["rollnet rows (first layer from weights)", f"{t_rows * 1e3:.0f} ms", f"{t_off / t_rows:.1f}x", ""],
        ["rollnet Gram recursion (p=2, ROLL)", f"{t_gram * 1e3:.0f} ms", f"{t_off / t_gram:.1f}x", ""],
    ]))

    # 3. memory
    print("### memory: margin(p=inf) over 4,096 MNIST-sized inputs, 512 MiB budget\n")
    print((peak_memory_child(4096, 512 << 20) if device.type == "cpu" else peak_gpu_memory(4096, 512 << 20)) + "\n")

    # 4. scaling
    rows = []
    for bb in (32, 64, 128, 256):
        xs = torch.rand(bb, 1, 28, 28)
        t2 = timeit(lambda xs=xs: rollnet.margin(model, xs, p=2, rounding="none"), repeat=repeat)
        ti = timeit(lambda xs=xs: rollnet.margin(model, xs, p="inf", rounding="none"), repeat=repeat)
        rows.append([f"batch {bb}", f"{t2 * 1e3:.0f}", f"{t2 / bb * 1e3:.2f}", f"{ti * 1e3:.0f}", f"{ti / bb * 1e3:.2f}"])
    xs = torch.rand(64, 1, 28, 28)
    for w in (100, 300, 500):
        mw = PaperMLP(widths=(w,) * 4).eval()
        t2 = timeit(lambda mw=mw: rollnet.margin(mw, xs, p=2, rounding="none"), repeat=repeat)
        ti = timeit(lambda mw=mw: rollnet.margin(mw, xs, p="inf", rounding="none"), repeat=repeat)
        rows.append([f"width {w} (depth 4, batch 64)", f"{t2 * 1e3:.0f}", f"{t2 / 64 * 1e3:.2f}",
                     f"{ti * 1e3:.0f}", f"{ti / 64 * 1e3:.2f}"])
    for depth in (2, 4, 6):
        md = PaperMLP(widths=(300,) * depth).eval()
        t2 = timeit(lambda md=md: rollnet.margin(md, xs, p=2, rounding="none"), repeat=repeat)
        ti = timeit(lambda md=md: rollnet.margin(md, xs, p="inf", rounding="none"), repeat=repeat)
        rows.append([f"depth {depth} (width 300, batch 64)", f"{t2 * 1e3:.0f}", f"{t2 / 64 * 1e3:.2f}",
                     f"{ti * 1e3:.0f}", f"{ti / 64 * 1e3:.2f}"])
    print(table("scaling of margin (MLP on 28x28 inputs)",
                ["setting", "p=2 ms", "p=2 ms/example", "p=inf ms", "p=inf ms/example"], rows))


if __name__ == "__main__":
    main()
