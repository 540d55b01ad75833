"""Training-step cost of the ROLL term on the paper's MNIST MLP (784-300x4-10), batch 64.

Measured in one run, on whatever this machine has (CPU by default):

- a vanilla step (cross-entropy only);
- ROLL exact through the engine (all 784 input axes pushed through the
  linearized network in one batched forward-mode pass);
- ROLL approximate through the engine (k = 3 random input axes per example);
- ROLL exact with every neuron's input gradient taken by its own
  back-propagation (``torch.autograd.grad`` per neuron with
  ``create_graph=True``, batched over examples), in the same loss.

A step is forward, loss, backward and an SGD update.  The two exact
variants are checked to compute the same loss and parameter gradients
before anything is timed.  Usage: ``python benchmarks/bench_training.py
[--device cuda] [--backprop-steps N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollnet import ROLLLoss
from rollnet.models import MLP

LAM, C = 2.0, 0.25


def roll_by_backprop(model: nn.Module, x: Tensor, lam: float, c: float) -> tuple[Tensor, Tensor]:
    """Logits and the exact ROLL term (gamma = 100) with one back-propagation per neuron."""
    x = x.detach().requires_grad_(True)
    recorded: list[Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: recorded.append(args[0]))
        for m in model.modules() if isinstance(m, nn.ReLU)
    ]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    z = torch.cat([r.flatten(1) for r in recorded], dim=1)  # [B, N]
    squared = []
    for j in range(z.shape[1]):
        # neuron j of example b depends on x[b] only: one backward pass gives it for the whole batch
        (g,) = torch.autograd.grad(z[:, j].sum(), x, create_graph=True)
        squared.append(g.flatten(1).square().sum(dim=1))
    terms = torch.stack(squared, dim=1) + c * torch.relu(1.0 - z.abs())
    return logits, lam * terms.mean(dim=1).mean()


def make_steps(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.5, nesterov=True)
    exact = ROLLLoss(LAM, C)
    approx = ROLLLoss(LAM, C, approx=3, estimator="axes", generator=torch.Generator().manual_seed(0))

    def update(loss: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def one_pass(roll: ROLLLoss) -> Tensor:
        term, logits = roll(model, x, return_output=True)
        return update(F.cross_entropy(logits, y) + term)

    def backprop() -> Tensor:
        logits, term = roll_by_backprop(model, x, LAM, C)
        return update(F.cross_entropy(logits, y) + term)

    return {
        "vanilla": lambda: update(F.cross_entropy(model(x), y)),
        "ROLL exact (engine, forward mode)": lambda: update(F.cross_entropy(model(x), y) + exact(model, x)),
        "ROLL approximate, k=3 axes (engine)": lambda: update(F.cross_entropy(model(x), y) + approx(model, x)),
        "ROLL approximate, k=3 axes, one pass (return_output)": lambda: one_pass(approx),
        "ROLL exact (per-neuron back-propagation)": backprop,
    }


def check_same_loss(model: nn.Module, x: Tensor) -> tuple[float, float]:
    """Relative differences of the exact term and of its parameter gradients, engine vs back-propagation."""
    # the output layer's parameters do not enter the term (logits are not neurons)
    params = [p for name, p in model.named_parameters() if not name.startswith("layers.9.")]
    engine = ROLLLoss(LAM, C)(model, x)
    g_engine = torch.autograd.grad(engine, params)
    _, reference = roll_by_backprop(model, x, LAM, C)
    g_ref = torch.autograd.grad(reference, params)
    loss_diff = abs(float(engine.detach()) - float(reference.detach())) / abs(float(reference.detach()))
    grad_diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(g_engine, g_ref, strict=True))
    return loss_diff, grad_diff


def time_step(step: Callable[[], Tensor], repeats: int, device: torch.device) -> float:
    """Median seconds per step over ``repeats`` timed steps after one warm-up step."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backprop-steps", type=int, default=3, help="timed steps of the slowest variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10).to(device)
    x = torch.randn(64, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (64,), device=device)

    started = time.perf_counter()
    loss_diff, grad_diff = check_same_loss(model, x)
    assert loss_diff < 1e-4 and grad_diff < 1e-3, (loss_diff, grad_diff)
    repeats = {"vanilla": 50, "ROLL exact (engine, forward mode)": 3, "ROLL approximate, k=3 axes (engine)": 20,
               "ROLL approximate, k=3 axes, one pass (return_output)": 20,
               "ROLL exact (per-neuron back-propagation)": args.backprop_steps}
    seconds = {name: time_step(step, repeats[name], device) for name, step in make_steps(model, x, y).items()}

    vanilla = seconds["vanilla"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"MLP 784-300x4-10 (1,200 neurons), batch 64, lambda {LAM}, C {C}; device {device}, "
          f"{torch.get_num_threads()} threads, load average {load:.2f}")
    print(f"check: exact term engine vs back-propagation: loss rel. diff {loss_diff:.1e}, "
          f"parameter-gradient rel. diff {grad_diff:.1e}\n")
    print("| step | median time (ms) | ratio to vanilla | timed steps |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s * 1e3:.1f} | {s / vanilla:.1f} | {repeats[name]} |")
    exact = seconds["ROLL exact (engine, forward mode)"]
    print(f"\nexact / approximate (k=3): {exact / seconds['ROLL approximate, k=3 axes (engine)']:.1f}x; "
          f"per-neuron back-propagation / engine (exact): "
          f"{seconds['ROLL exact (per-neuron back-propagation)'] / exact:.1f}x")
    print(f"(paper, GPU: exact about 2x vanilla, approximate about 9x faster than exact, forward mode about "
          f"12x faster than back-propagation)\ntotal benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
