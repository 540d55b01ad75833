"""Cost of the ROLL term and of margins on the paper's recurrent net (Japanese Vowels).

The model is the paper's: a scaled-Cayley orthogonal RNN (``rollnet.models.ScoRNN``),
12 channels, 512 hidden LeakyReLU units, 9 classes; sequences of up to 29 steps
(D = 348 input coordinates, about 15,000 neurons per sequence).  The batch is the
first 32 training sequences of ``load_dataset("japanese_vowels")`` (lengths as they
come; ``--full-length`` pads every sequence to 29 valid steps instead).

Measured in one run, on whatever this machine has (CPU by default):

- training steps (forward, loss, backward, AMSGrad update), against a vanilla step:
  ROLL exact as ``ROLLLoss`` runs it here (the fused recurrent pass, which uses
  causality: a step's neurons do not depend on later inputs), the same term
  through the generic engine (``fused=False``: every input axis through every
  step), and the approximate term (k = 3 axes per example), fused and generic;
- margins (l2) of 8 test sequences: ``rollnet.margin`` (``rounding="none"``, and
  the default ``"sound"``, which certifies on a float64 copy), against
  ``torch.func`` (jacfwd of all pre-activations of each unpadded sequence) and
  against per-neuron autograd (one backward pass per neuron; timed on 256 neurons
  of one sequence and scaled to all neurons of the 8 sequences).

The exact terms (fused and generic) are checked to agree before anything is
timed.  Usage: ``python benchmarks/bench_recurrent.py [--device cuda] [--full-length]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollnet
from common import add_device_argument, machine, table, timeit, use_device
from rollnet.data import load_dataset
from rollnet.models import ScoRNN

LAM, C = 2.0**-5, 2.0**4


def neurons(model: ScoRNN, x: Tensor) -> Tensor:
    """All pre-activations of one unpadded sequence ``[T, C]``, written out (the oracle's forward)."""
    w = model.recurrent_weight()
    h = x.new_zeros(w.shape[0])
    zs = []
    for t in range(x.shape[0]):
        z = model.input(x[t]) + w @ h
        zs.append(z)
        h = F.leaky_relu(z, model.negative_slope)
    return torch.cat(zs)


def margins_jacfwd(model: ScoRNN, xs: list[Tensor]) -> Tensor:
    out = []
    with torch.no_grad():
        for x in xs:
            jac = torch.func.jacfwd(lambda v: neurons(model, v))(x)  # [N, T, C]
            z = neurons(model, x)
            n = jac.flatten(1).norm(dim=1)
            out.append(torch.where(n > 0, z.abs() / n, math.inf).amin())
    return torch.stack(out)


def autograd_time(model: ScoRNN, x: Tensor, limit: int) -> float:
    """Seconds for ``limit`` per-neuron backward passes on one sequence."""
    xg = x.detach().requires_grad_(True)

    def run() -> None:
        z = neurons(model, xg)
        for j in range(limit):
            torch.autograd.grad(z[j], xg, retain_graph=True)

    return timeit(run, repeat=1, warmup=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--full-length", action="store_true", help="every sequence 29 valid steps")
    args = parser.parse_args()
    device = use_device(args.device)
    torch.manual_seed(0)
    data = load_dataset("japanese_vowels")
    x = data.train.x[: args.batch].to(device)
    lengths = data.train.lengths[: args.batch].to(device)
    y = data.train.y[: args.batch].to(device)
    if args.full_length:
        x = torch.randn(args.batch, 29, 12, device=device)
        lengths = torch.full((args.batch,), 29, device=device)
    model = ScoRNN(12, 512, 9).to(device)
    print(f"machine: {machine()}")
    print(f"batch {x.shape[0]}, lengths {int(lengths.min())}..{int(lengths.max())} "
          f"(mean {float(lengths.float().mean()):.1f}), hidden 512, D = {x.shape[1] * x.shape[2]}\n")

    exact = rollnet.ROLLLoss(LAM, C)
    exact_engine = rollnet.ROLLLoss(LAM, C, fused=False)
    a = exact(model, x, additional_forward_args=(lengths,))
    b = exact_engine(model, x, additional_forward_args=(lengths,))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    opt = torch.optim.Adam(model.parameters(), lr=0.0, amsgrad=True)  # lr 0: every step sees the same model

    def step(roll: rollnet.ROLLLoss | None) -> None:
        opt.zero_grad()
        if roll is None:
            loss = F.cross_entropy(model(x, lengths), y)
        else:
            term, logits = roll(model, x, return_output=True, additional_forward_args=(lengths,))
            loss = F.cross_entropy(logits, y) + term
        loss.backward()
        opt.step()

    variants: list[tuple[str, rollnet.ROLLLoss | None, int]] = [
        ("vanilla step", None, 5),
        ("ROLL exact, fused recurrent pass (default)", exact, 2),
        ("ROLL exact, generic engine (fused=False)", exact_engine, 1),
        ("ROLL approximate k=3, fused recurrent pass", rollnet.ROLLLoss(LAM, C, approx=3), 5),
        ("ROLL approximate k=3, generic engine", rollnet.ROLLLoss(LAM, C, approx=3, fused=False), 3),
    ]
    times = {name: timeit(lambda r=roll: step(r), repeat=rep) for name, roll, rep in variants}
    base = times["vanilla step"]
    rows = [[name, f"{t * 1e3:.0f}", f"{t / base:.1f}x"] for name, t in times.items()]
    rows.append(["(fused exact against generic exact)", "",
                 f"{times[variants[2][0]] / times[variants[1][0]]:.2f}x faster"])
    print(table("Training step, ScoRNN 512 on Japanese Vowels", ["variant", "ms", "vs vanilla"], rows))

    xt, lt = data.test.x[:8].to(device), data.test.lengths[:8].to(device)
    alone = [xt[i, : int(lt[i])] for i in range(8)]
    model.eval()
    model64 = copy.deepcopy(model).double()  # (agreement checked in float64: float32 rounding moves margins)
    ours = rollnet.margin(model64, xt.double(), 2, additional_forward_args=(lt,))
    ref = margins_jacfwd(model64, [a.double() for a in alone])
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)
    n_neurons = int(lt.sum()) * 512
    t_ours = timeit(lambda: rollnet.margin(model, xt, 2, additional_forward_args=(lt,), rounding="none"))
    t_sound = timeit(lambda: rollnet.margin(model, xt, 2, additional_forward_args=(lt,)), repeat=2)
    t_jac = timeit(lambda: margins_jacfwd(model, alone), repeat=2)
    limit = 256
    t_auto = autograd_time(model, alone[0], limit) / limit * n_neurons
    rows = [
        ["rollnet.margin, rounding='none'", f"{t_ours * 1e3:.0f}", "1.0x"],
        ["rollnet.margin, rounding='sound' (float64 copy)", f"{t_sound * 1e3:.0f}", f"{t_sound / t_ours:.1f}x"],
        ["torch.func jacfwd per sequence", f"{t_jac * 1e3:.0f}", f"{t_jac / t_ours:.1f}x"],
        [f"per-neuron autograd ({n_neurons} backward passes, from {limit})", f"{t_auto * 1e3:.0f}",
         f"{t_auto / t_ours:.0f}x"],
    ]
    print(table(f"l2 margins of 8 test sequences ({n_neurons} neurons)", ["method", "ms", "vs ours"], rows))


if __name__ == "__main__":
    main()

