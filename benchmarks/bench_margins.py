"""margin(p) against per-neuron autograd and torch.func, with the achieved FLOP rate.

Run: .venv/bin/python benchmarks/bench_margins.py [--batch 64] [--quick]

Prints, per model and norm, times measured in this run and their ratios, and
the gradient pass's achieved GFLOP/s next to a same-run 1024x1024 matmul.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollnet
from common import (
    PaperMLP,
    SmallResNet,
    add_device_argument,
    forward_flops,
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
from rollnet.engine.gram import GramUnsupported


def takes_gram(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether margin(p=2) takes the Gram recursion on this model (then the rows FLOP count overstates its work)."""
    try:
        collect(model, x[:2], unit_directions(x.shape[1:]), Request(norms=(2.0,)), method="gram")
    except GramUnsupported:
        return False
    return max(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)) <= x[0].numel() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    add_device_argument(parser)
    args = parser.parse_args()
    device = use_device(args.device)
    torch.manual_seed(0)
    repeat = 1 if args.quick else 3
    ceiling = matmul_rate(1024, 1024, 1024, device=str(device))
    print(f"machine: {machine()}")
    print(f"same-run 1024x1024 float32 matmul: {ceiling / 1e9:.1f} GFLOP/s\n")
    rows = []
    notes: list[str] = []
    models = {
        "MLP 784-300x4-10": (PaperMLP().eval(), torch.rand(args.batch, 1, 28, 28)),
        "residual conv (28x28)": (SmallResNet().eval(), torch.rand(args.batch, 1, 28, 28)),
    }
    for name, (model, x) in models.items():
        flops = gradient_pass_flops(model, x)
        # second ceiling: the model's own forward on as many images as one example has tangents
        d = x[0].numel()
        images = torch.rand(d, *x.shape[1:])
        with torch.no_grad():
            t_fwd = timeit(lambda m=model, im=images: m(im), repeat=repeat)
        forward_rate = d * sum(forward_flops(model, x)) / t_fwd
        n = int(model.neurons(x[0]).numel())  # type: ignore[operator]
        sample = min(n, 2000)
        # per-neuron autograd grows linearly in the neuron count: time a sample, scale up
        t_auto = timeit(lambda m=model, xx=x, s=sample: margins_by_autograd(m, xx, limit=s), repeat=1, warmup=0)
        t_auto *= n / sample
        if sample < n:
            notes.append(f"{name}: per-neuron autograd timed on {sample} of {n} neurons, scaled by {n / sample:.1f}")
        t_jac = timeit(lambda m=model, xx=x: margins_by_jacfwd(m, xx), repeat=repeat)
        for p in (2, 1, math.inf):
            t_ours = timeit(lambda m=model, xx=x, pp=p: rollnet.margin(m, xx, p=pp, rounding="none"), repeat=repeat)
            rate = flops / t_ours
            gram = p == 2 and takes_gram(model, x)
            rows.append([
                name, str(p) + (" (Gram)" if gram else ""), f"{t_ours * 1e3:.0f} ms",
                f"{t_auto / t_ours:.1f}x" if p == 2 else "",
                f"{t_jac / t_ours:.2f}x" if p == 2 else "",
                f"{rate / 1e9:.1f}" + (" rows-equiv." if gram else ""), f"{rate / ceiling:.0%}",
                f"{rate / forward_rate:.0%}",
            ])
        # agreement check, so the table never times a wrong answer (float32: a neuron within
        # rounding of its hyperplane can move a radius by a few percent, so compare most of them)
        ref = margins_by_jacfwd(model, x)
        got = rollnet.margin(model, x, p=2)
        close = ((ref - got).abs() <= 1e-2 * ref.abs()).float().mean()
        assert close >= 0.9, f"margins disagree with torch.func ({close:.0%} agree)"
        rows.append([name, "2 (autograd)", f"{t_auto * 1e3:.0f} ms", "1.0x", "", "", "", ""])
        rows.append([name, "2 (jacfwd+vmap)", f"{t_jac * 1e3:.0f} ms", "", "1.00x", "", "", ""])
        notes.append(f"{name}: its own forward on {d} images runs at {forward_rate / 1e9:.1f} GFLOP/s")
    # max units: the same residual net with max-pooling instead of average pooling
    avg = SmallResNet(pool="avg").eval()
    mx = SmallResNet(pool="max").eval()
    mx.load_state_dict(avg.state_dict())
    x = torch.rand(args.batch, 1, 28, 28)
    t_avg = timeit(lambda: rollnet.margin(avg, x, p=2, rounding="none"), repeat=repeat)
    t_max = timeit(lambda: rollnet.margin(mx, x, p=2, rounding="none"), repeat=repeat)
    n_avg = rollnet.LinearRegions(avg, x[:1]).num_neurons
    n_max = rollnet.LinearRegions(mx, x[:1]).num_neurons
    rows.append(["residual conv, avg-pool head", "2", f"{t_avg * 1e3:.0f} ms", "", "", "", "",
                 f"{n_avg} neurons"])
    rows.append(["residual conv, max-pool head", "2", f"{t_max * 1e3:.0f} ms", "", "", "", "",
                 f"{n_max} neurons, {t_max / t_avg:.2f}x the avg-pool time"])
    print(table(
        f"rollnet.margin, batch {args.batch}, float32",
        ["model", "p", "time", "speed-up vs per-neuron autograd", "speed-up vs jacfwd", "GFLOP/s",
         "of 1024^2 matmul", "of same-shape forward"],
        rows,
    ))
    for note in notes:
        print(note)
    print("FLOPs counted: every affine layer on D tangents per example (2*fan_in*fan_out each), "
          "the first layer once per batch; masks and norms not counted. (Gram): the Gram recursion does "
          "far less work than that count, so its rate is rows-equivalent, not achieved.")


if __name__ == "__main__":
    main()
