"""Training-step cost of the ROLL term on the paper's MNIST MLP (784-300x4-10), batch 64 (``--batch``).

Measured in one run, on whatever this machine has (CPU by default):

- a vanilla step (cross-entropy only);
- ROLL exact through the engine (all 784 input axes pushed through the
  linearized network in one batched forward-mode pass);
- ROLL approximate (k = 3 random input axes per example) as ``ROLLLoss`` runs
  it by default on this MLP (one fused autograd node for plain Linear/ReLU
  chains, :mod:`rollnet.regularizer.chain`), and through the generic engine
  (``fused=False``, what any other architecture gets);
- ROLL exact with every neuron's input gradient taken by its own
  back-propagation (``torch.autograd.grad`` per neuron with
  ``create_graph=True``, batched over examples), in the same loss;
- ROLL exact the way the official implementation computes it (its
  ``fc_margin.py``, re-expressed here): a fixed template of the zero image and
  the D one-hot images per example goes through every layer, first layer
  included, with the example's ReLU masks, and the zero image's output is
  subtracted; plus that gradient pass alone (forward and backward of the term)
  against ours alone;
- ROLL approximate (k = 3 axes) hand-written in plain torch for this MLP: what
  a specialised implementation reaches, against the engine's generic pass;
  and the same function under ``torch.compile`` (skip with ``--no-compile``);
- a measured floor for the approximate step: a vanilla step followed by the
  term's tangent matmuls alone (forward, weight and input gradients of k
  tangents per example through each hidden layer after the first, on random
  data of the same shapes: no masks, norms, autograd or Python overhead).

A step is forward, loss, backward and an SGD update.  The three exact
variants are checked to compute the same loss and parameter gradients
before anything is timed.  Usage: ``python benchmarks/bench_training.py
[--device cuda] [--backprop-steps N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_argument
from rollnet import ROLLLoss
from rollnet.models import MLP

LAM, C = 2.0, 0.25
HAND = "ROLL approximate, k=3 axes, hand-written plain torch for this MLP"
COMPILED = "ROLL approximate, k=3 axes, hand-written, torch.compile"
FLOOR = "floor: vanilla step + the k=3 term's tangent matmuls alone"
APPROX_FUSED = "ROLL approximate, k=3 axes, one pass (ROLLLoss default here: fused chain pass)"
APPROX_ENGINE = "ROLL approximate, k=3 axes, one pass, generic engine (fused=False)"


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


class OfficialStyle:
    """The official implementation's exact ROLL term (MIT-licensed ``fc_margin.py``), re-expressed.

    Per example it pushes a template of D + 1 images (zero, then the D one-hot
    images), built once, through every Linear layer, multiplies by the
    example's ReLU masks, and takes the differences to the zero image's output
    as the neurons' input gradients.
    """

    def __init__(self, model: nn.Module, batch: int, d: int, device: torch.device) -> None:
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        template = torch.zeros(batch, d + 1, d, device=device)
        template[:, 1:, :] = torch.eye(d, device=device)
        self.template = template.view(-1, d)
        self.batch, self.d = batch, d

    def __call__(self, x: Tensor, lam: float, c: float) -> tuple[Tensor, Tensor]:
        """Logits and the exact ROLL term (gamma = 100)."""
        hidden, last = self.linears[:-1], self.linears[-1]
        h, zs, masks = x.flatten(1), [], []
        for layer in hidden:
            z = layer(h)
            zs.append(z)
            masks.append(z > 0)
            h = F.relu(z)
        logits = last(h)
        squared = []
        t = self.template
        for i, layer in enumerate(hidden):
            t = layer(t.view(-1, t.shape[-1])).view(self.batch, self.d + 1, -1)
            squared.append((t[:, 1:, :] - t[:, :1, :]).square().sum(dim=1))
            if i < len(hidden) - 1:
                t = t * masks[i].view(self.batch, 1, -1).float()
        terms = torch.cat(squared, dim=1) + c * F.relu(1.0 - torch.cat(zs, dim=1).abs())
        return logits, lam * terms.mean(dim=1).mean()


def roll_approx_by_hand(model: nn.Module, x: Tensor, lam: float, c: float, k: int,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Logits and the approximate ROLL term (k axes per example, scaled by D / k), in plain torch.

    Written for this MLP only: the first layer's tangents are weight columns,
    each hidden layer pushes k tangents per example in one matmul.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    h = x.flatten(1)
    b, d = h.shape
    axes = torch.randint(0, d, (b, k), generator=generator).to(x.device)
    z = linears[0](h)
    tangent = linears[0].weight.t()[axes]  # [B, k, F]
    zs, squared = [], []
    for i, layer in enumerate(linears[1:]):
        zs.append(z)
        squared.append(tangent.square().sum(dim=1))
        mask = (z > 0).to(z.dtype)
        z = layer(z * mask)
        if i < len(linears) - 2:
            tangent = (tangent * mask.unsqueeze(1)) @ layer.weight.t()
    terms = torch.cat(squared, dim=1) * (d / k) + c * F.relu(1.0 - torch.cat(zs, dim=1).abs())
    return z, lam * terms.mean(dim=1).mean()


def tangent_matmuls(model: nn.Module, batch: int, k: int, device: torch.device) -> Callable[[], None]:
    """The approximate term's matmul work alone, on random data of the same shapes."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)][1:-1]
    rows = k * batch
    data = [(w, torch.randn(rows, w.shape[1], device=device), torch.randn(rows, w.shape[0], device=device))
            for w in weights]

    def run() -> None:
        for w, u, g in data:
            torch.mm(u, w.t())  # tangents forward
            torch.mm(g.t(), u)  # weight gradient
            torch.mm(g, w)  # input gradient
    return run


def make_steps(model: nn.Module, x: Tensor, y: Tensor, compile_step: bool) -> dict[str, Callable[[], Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.5, nesterov=True)
    exact = ROLLLoss(LAM, C)
    approx = ROLLLoss(LAM, C, approx=3, estimator="axes", generator=torch.Generator().manual_seed(0))
    approx_engine = ROLLLoss(LAM, C, approx=3, estimator="axes", generator=torch.Generator().manual_seed(0),
                             fused=False)

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

    official = OfficialStyle(model, x.shape[0], x[0].numel(), x.device)

    def official_step() -> Tensor:
        logits, term = official(x, LAM, C)
        return update(F.cross_entropy(logits, y) + term)

    def official_pass() -> Tensor:
        _, term = official(x, LAM, C)
        term.backward()
        return term.detach()

    def engine_pass() -> Tensor:
        term = exact(model, x)
        term.backward()
        return term.detach()

    hand_generator = torch.Generator().manual_seed(0)

    def hand() -> Tensor:
        logits, term = roll_approx_by_hand(model, x, LAM, C, 3, hand_generator)
        return update(F.cross_entropy(logits, y) + term)

    matmuls = tangent_matmuls(model, x.shape[0], 3, x.device)

    def floor() -> Tensor:
        loss = update(F.cross_entropy(model(x), y))
        matmuls()
        return loss

    compiled_steps: dict[str, Callable[[], Tensor]] = {}
    if compile_step:
        compiled = torch.compile(roll_approx_by_hand)
        compiled_generator = torch.Generator().manual_seed(0)

        def hand_compiled() -> Tensor:
            logits, term = compiled(model, x, LAM, C, 3, compiled_generator)
            return update(F.cross_entropy(logits, y) + term)

        try:
            started = time.perf_counter()
            hand_compiled()
            print(f"torch.compile of the hand-written approximate step: {time.perf_counter() - started:.0f} s")
            compiled_steps[COMPILED] = hand_compiled
        except Exception as err:  # a platform without a working compiler: report, keep going
            print(f"torch.compile unavailable here ({type(err).__name__}: {err}); its row is left out")

    return {
        "vanilla": lambda: update(F.cross_entropy(model(x), y)),
        FLOOR: floor,
        "ROLL exact (engine, forward mode)": lambda: one_pass(exact),
        "ROLL approximate, k=3 axes, separate forward (fused chain pass)":
            lambda: update(F.cross_entropy(model(x), y) + approx(model, x)),
        APPROX_FUSED: lambda: one_pass(approx),
        APPROX_ENGINE: lambda: one_pass(approx_engine),
        HAND: hand,
        **compiled_steps,
        "ROLL exact (per-neuron back-propagation)": backprop,
        "ROLL exact (official implementation's one-hot template pass)": official_step,
        "exact term alone, forward + backward: engine": engine_pass,
        "exact term alone, forward + backward: official-style": official_pass,
    }


def check_same_loss(model: nn.Module, x: Tensor) -> dict[str, tuple[float, float]]:
    """Relative differences of the term and of its parameter gradients: engine vs each reference
    (the exact term against per-neuron back-propagation and the official-style pass; the approximate
    term against the fused chain pass)."""
    # the output layer's parameters do not enter the term (logits are not neurons)
    params = [p for name, p in model.named_parameters() if not name.startswith("layers.9.")]
    engine = ROLLLoss(LAM, C)(model, x)
    g_engine = torch.autograd.grad(engine, params)
    references = {
        "per-neuron back-propagation": roll_by_backprop(model, x, LAM, C)[1],
        "official-style template pass": OfficialStyle(model, x.shape[0], x[0].numel(), x.device)(x, LAM, C)[1],
    }
    diffs = {}
    for name, reference in references.items():
        g_ref = torch.autograd.grad(reference, params)
        loss_diff = abs(float(engine.detach()) - float(reference.detach())) / abs(float(reference.detach()))
        grad_diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                        for a, b in zip(g_engine, g_ref, strict=True))
        diffs[name] = (loss_diff, grad_diff)
    # the approximate term, fused chain pass against the generic engine, same directions
    fused, generic = (ROLLLoss(LAM, C, approx=3, generator=torch.Generator(x.device).manual_seed(0), fused=f)(model, x)
                      for f in (True, False))
    g_fused, g_generic = torch.autograd.grad(fused, params), torch.autograd.grad(generic, params)
    diffs["the fused chain pass (approximate, k=3)"] = (
        abs(float(fused.detach()) - float(generic.detach())) / abs(float(generic.detach())),
        max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(g_fused, g_generic, strict=True)),
    )
    return diffs


def time_steps(steps: dict[str, Callable[[], Tensor]], repeats: dict[str, int],
               device: torch.device) -> dict[str, float]:
    """Median seconds per step of each variant, timed round-robin after one warm-up step each.

    Interleaving the variants spreads load changes on a shared machine over
    all of them, so their ratios stay comparable.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(max(repeats.values())):
        for name, step in steps.items():
            if r < repeats[name]:
                sync()
                t = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def approx_flop_floor(model: nn.Module, k: int) -> float:
    """Matmul work of the approximate step over a vanilla step's (both counted per example).

    Vanilla: every layer forward, its weight gradient, and the input gradient of
    all layers but the first.  The term adds, for each hidden layer after the
    first, k tangents forward and their weight and input gradients backward
    (the first layer's tangents are weight columns: no matmul).
    """
    macs = [m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    vanilla = 2 * sum(macs) + sum(macs[1:])
    extra = 3 * k * sum(macs[1:-1])
    return (vanilla + extra) / vanilla


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--backprop-steps", type=int, default=3, help="timed steps of the slowest variant")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--batch", type=int, default=64, help="examples per step (default 64, the issue's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10).to(device)
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    started = time.perf_counter()
    checks = check_same_loss(model, x)
    for name, (loss_diff, grad_diff) in checks.items():
        assert loss_diff < 1e-4 and grad_diff < 1e-3, (name, loss_diff, grad_diff)
    steps = make_steps(model, x, y, compile_step=not args.no_compile)
    slow = {"ROLL exact (per-neuron back-propagation)": args.backprop_steps,
            "ROLL exact (official implementation's one-hot template pass)": 5,
            "exact term alone, forward + backward: official-style": 5}
    repeats = {name: slow.get(name, 50 if name in ("vanilla", FLOOR) else 20) for name in steps}
    seconds = time_steps(steps, repeats, device)

    vanilla = seconds["vanilla"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"MLP 784-300x4-10 (1,200 neurons), batch {args.batch}, lambda {LAM}, C {C}; device {device}, "
          f"{torch.get_num_threads()} threads, load average {load:.2f}")
    for name, (loss_diff, grad_diff) in checks.items():
        print(f"check: engine vs {name}: loss rel. diff {loss_diff:.1e}, "
              f"parameter-gradient rel. diff {grad_diff:.1e}")
    print("\n| step (timed round-robin) | median time (ms) | ratio to vanilla | timed steps |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s * 1e3:.1f} | {s / vanilla:.1f} | {repeats[name]} |")
    exact = seconds["ROLL exact (engine, forward mode)"]
    approx = seconds[APPROX_FUSED]
    print(f"\nexact / approximate (k=3, one pass): {exact / approx:.1f}x; "
          f"per-neuron back-propagation / engine (exact): "
          f"{seconds['ROLL exact (per-neuron back-propagation)'] / exact:.1f}x")
    print(f"official-style exact step / engine exact step: "
          f"{seconds['ROLL exact (official implementation' + chr(39) + 's one-hot template pass)'] / exact:.1f}x; "
          f"official-style gradient pass / engine gradient pass (forward + backward of the term alone): "
          f"{seconds['exact term alone, forward + backward: official-style'] / seconds['exact term alone, forward + backward: engine']:.1f}x")
    hand = seconds[HAND]
    compiled = f", compiled {seconds[COMPILED] / vanilla:.1f}x" if COMPILED in seconds else ""
    print(f"approximate step, k=3: ROLLLoss (fused chain pass) {approx / vanilla:.1f}x vanilla, generic engine "
          f"{seconds[APPROX_ENGINE] / vanilla:.1f}x, hand-written plain torch "
          f"{hand / vanilla:.1f}x{compiled}; measured floor (vanilla step + the term's matmuls alone) "
          f"{seconds[FLOOR] / vanilla:.1f}x; FLOP count of that floor at the vanilla step's rate "
          f"{approx_flop_floor(model, 3):.1f}x")
    print(f"(paper, GPU: exact about 2x vanilla, approximate about 9x faster than exact, forward mode about "
          f"12x faster than back-propagation)\ntotal benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
