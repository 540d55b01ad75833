"""Worst-case gradient distortion: the smoothed-surrogate search against the paper's genetic search.

Run: .venv/bin/python benchmarks/bench_distortion.py [--examples 8] [--population 480] [--generations 10] [--quick] [--paper]

Trains, in this run, an MLP (784-300-300-10) on the bundled MNIST subset and a
small ResNet-18 (width 8) on Fashion-MNIST (the MNIST subset when the Debian
package is missing; said in the output), both on [0, 1] pixels, a few epochs
each.  Then, for ``--examples`` test images per model, both searches look for
the point of the l_inf ball of radius 8/256 (the paper's), clamped to [0, 1],
whose target-logit gradient is farthest (l1) from the one at the image, at the
same number of evaluations: the genetic search's own cost, ``population +
generations * (population - kept)`` (4080 at the default 480 / 10 / 0.25, the
paper's 4800 / 30 scaled down by 10 and 3 to fit the CPU; 112,800 at the
paper's sizes) for the MLP, 160 / 6 (880) for the ResNet; the surrogate has
32 chains on the MLP, 16 on the ResNet.  Then the genetic search runs again,
with its population enlarged by the ratio of the two times, so that it runs
about as long as the surrogate did (a surrogate step, counted as 2
evaluations, costs more time than 2 exact ones); more generations instead
would not help, since without mutation the kept points collapse within about
10 rounds.  ``--paper`` adds a row with the genetic search at the paper's
sizes (112,800 evaluations) on the MLP.  Prints per
model: mean and median worst distortion of each method, how often the
surrogate's is higher (win rate, ties counted half), the ratio of medians,
label changes, seconds and time per evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollnet
from common import add_device_argument, machine, table, use_device
from rollnet.data import DataSetMissingError, load_dataset
from rollnet.models import MLP, resnet18


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int = 64) -> float:
    """A plain Adam loop; returns the seconds it took."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def models(device: torch.device, quick: bool) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    mnist = load_dataset("mnist_subset", normalize=False)
    out = []
    mlp = MLP((1, 28, 28), 10, hidden=(300, 300)).to(device)
    secs = train(mlp, mnist.train.x.to(device), mnist.train.y.to(device), epochs=2 if quick else 5, lr=1e-3)
    acc = accuracy(mlp, mnist.test.x.to(device), mnist.test.y.to(device))
    print(f"MLP 784-300-300-10 on MNIST subset (4,000 images): {secs:.0f} s training, test accuracy {acc:.3f}")
    out.append(("MLP (MNIST)", mlp, mnist.test.x.to(device), mnist.test.y.to(device)))
    try:
        data = load_dataset("fashion_mnist", normalize=False, train_size=4000)
        name = "Fashion-MNIST"
    except DataSetMissingError as e:
        print(f"Fashion-MNIST missing ({e}); the ResNet trains on the MNIST subset")
        data, name = mnist, "MNIST"
    net = resnet18(in_channels=1, num_classes=10, width=8).to(device)
    secs = train(net, data.train.x.to(device), data.train.y.to(device), epochs=1 if quick else 2, lr=2e-3)
    acc = accuracy(net, data.test.x[:1000].to(device), data.test.y[:1000].to(device))
    print(f"ResNet-18 width 8 on {name} (4,000 images): {secs:.0f} s training, test accuracy {acc:.3f}")
    out.append((f"ResNet-18 w8 ({name})", net, data.test.x.to(device), data.test.y.to(device)))
    return out


def search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, budget: int,
           **kw: object) -> tuple[rollnet.WorstCase, float]:
    t0 = time.perf_counter()
    w = rollnet.max_gradient_distortion(model, x, y, eps, method=method, budget=budget, p="inf", clamp=(0.0, 1.0),
                                        generator=torch.Generator(x.device).manual_seed(1), **kw)  # type: ignore[arg-type]
    return w, time.perf_counter() - t0


def row(name: str, gen: rollnet.WorstCase, t_gen: float, sur: rollnet.WorstCase, t_sur: float) -> list[str]:
    g, s = gen.distortion.double().tolist(), sur.distortion.double().tolist()
    wins = sum(1.0 if b > a else 0.5 if b == a else 0.0 for a, b in zip(g, s, strict=True)) / len(g)
    mg, ms = statistics.median(g), statistics.median(s)
    b = len(g)
    return [
        name, f"{gen.evaluations} / {sur.evaluations}", f"{statistics.fmean(g):.3g}", f"{mg:.3g}",
        f"{statistics.fmean(s):.3g}", f"{ms:.3g}", f"{wins:.0%}", f"{ms / mg:.2f}" if mg > 0 else "-",
        f"{int(gen.label_changed.sum())} / {int(sur.label_changed.sum())}",
        f"{t_gen:.1f} / {t_sur:.1f}",
        f"{t_gen / (b * gen.evaluations) * 1e3:.2f} / {t_sur / (b * sur.evaluations) * 1e3:.2f}",
    ]


def compare(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, population: int, generations: int,
            chains: int, eps: float, paper: bool = False) -> list[list[str]]:
    """Both searches at the genetic search's cost, then the genetic search again at the surrogate's wall time."""
    kept = round(0.25 * population)
    budget = population + generations * (population - kept)
    gen, t_gen = search(model, x, y, eps, "genetic", budget, population=population, generations=generations)
    sur, t_sur = search(model, x, y, eps, "surrogate", budget, chains=chains)
    rows = [row(name, gen, t_gen, sur, t_sur)]
    print(" | ".join(rows[-1]), flush=True)
    # equal time: a population larger by the ratio of the times, the same generations (more generations
    # do not help: without mutation the kept points collapse within about 10 rounds)
    if t_sur > t_gen:
        bigger = round(population * t_sur / t_gen)
        big_kept = round(0.25 * bigger)
        longer = bigger + generations * (bigger - big_kept)
        gen2, t_gen2 = search(model, x, y, eps, "genetic", longer, population=bigger, generations=generations)
    else:
        gen2, t_gen2 = gen, t_gen
    rows.append(row(f"{name}, genetic at the surrogate's time", gen2, t_gen2, sur, t_sur))
    print(" | ".join(rows[-1]), flush=True)
    if paper:
        gen3, t_gen3 = search(model, x, y, eps, "genetic", 112800, population=4800, generations=30)
        rows.append(row(f"{name}, genetic at the paper's sizes", gen3, t_gen3, sur, t_sur))
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=8, help="test images for the MLP (half for the ResNet)")
    parser.add_argument("--population", type=int, default=480, help="genetic population, MLP")
    parser.add_argument("--generations", type=int, default=10, help="genetic generations, MLP")
    parser.add_argument("--resnet-population", type=int, default=160)
    parser.add_argument("--resnet-generations", type=int, default=6)
    parser.add_argument("--chains", type=int, default=32, help="surrogate chains, MLP (half for the ResNet)")
    parser.add_argument("--eps", type=float, default=8 / 256, help="l_inf radius in pixel units")
    parser.add_argument("--quick", action="store_true", help="shorter training")
    parser.add_argument("--paper", action="store_true", help="also the genetic search at the paper's sizes (MLP)")
    add_device_argument(parser)
    args = parser.parse_args()
    device = use_device(args.device)
    print(f"machine: {machine()}\n")
    rows = []
    for i, (name, model, xs, ys) in enumerate(models(device, args.quick)):
        n = args.examples if i == 0 else max(1, args.examples // 2)
        with torch.no_grad():
            right = (model(xs[:200]).argmax(1) == ys[:200]).nonzero().flatten()[:n]
        x, y = xs[right], ys[right]  # correctly classified test images, the true class as target
        pop, gens = (args.population, args.generations) if i == 0 else (args.resnet_population, args.resnet_generations)
        chains = args.chains if i == 0 else max(1, args.chains // 2)
        rows += compare(f"{name}, {n} images", model, x, y, pop, gens, chains, args.eps, args.paper and i == 0)
    header = ["model", "evaluations (gen / sur)", "genetic mean", "genetic median", "surrogate mean",
              "surrogate median", "surrogate wins", "median ratio (sur / gen)", "label changes (gen / sur)",
              "seconds (gen / sur)", "ms per evaluation (gen / sur)"]
    print()
    print(table(f"worst-case l1 gradient distortion, l_inf eps = {args.eps:.4g}, clamp [0, 1]", header, rows))


if __name__ == "__main__":
    main()
