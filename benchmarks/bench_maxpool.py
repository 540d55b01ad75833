"""Cost of certifying max-pool nets against the same nets with average pooling.

``rollnet.margin(p=2)`` on a small CNN (batch 64, 1x28x28 inputs, float32),
once with max pooling and once with average pooling of the same geometry;
prints a markdown table with the median time of a few runs and the ratio.

Max units cost more than averages: each window contributes one neuron per
unselected member (3 for 2x2 windows, up to 8 for 3x3), whose tangents are
gathered and reduced like any other neuron's; average pooling is a linear map
with no neurons.

Run: ``.venv/bin/python benchmarks/bench_maxpool.py``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollnet
from common import add_device_argument, use_device


def small_cnn(pool: Callable[[], nn.Module]) -> nn.Module:
    """conv 8 -> ReLU -> pool -> conv 16 -> ReLU -> pool -> linear 10, for 1x28x28 inputs."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), pool(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), pool(),
        nn.Flatten(),
    )
    with torch.no_grad():
        features = body(torch.zeros(1, 1, 28, 28)).shape[1]
    return nn.Sequential(*body, nn.Linear(features, 10)).eval()


def timed(models: list[nn.Module], x: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median seconds of ``rollnet.margin(model, x, p=2)`` per model (after a warm-up run).

    The models take turns in every repeat, so that a change of machine load
    affects them alike.
    """
    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    for model in models:
        rollnet.margin(model, x, p=2, rounding="none")
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            sync()
            start = time.perf_counter()
            rollnet.margin(model, x, p=2, rounding="none")
            sync()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    device = use_device(parser.parse_args().device)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), device="cpu").to(device)
    cases = [
        ("2x2, stride 2", lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2)),
        ("3x3, stride 2, padding 1 (overlapping)",
         lambda: nn.MaxPool2d(3, 2, 1), lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    ]
    print(f"rollnet.margin(p=2), batch {x.shape[0]}, 1x28x28, float32, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    print("| pooling | neurons (max / avg) | max-pool s | avg-pool s | ratio max/avg |")
    print("|---|---|---|---|---|")
    for label, max_pool, avg_pool in cases:
        net_max, net_avg = small_cnn(max_pool), small_cnn(avg_pool)
        n_max = rollnet.LinearRegions(net_max, x[:1]).num_neurons
        n_avg = rollnet.LinearRegions(net_avg, x[:1]).num_neurons
        t_max, t_avg = timed([net_max, net_avg], x)
        print(f"| {label} | {n_max} / {n_avg} | {t_max:.3f} | {t_avg:.3f} | {t_max / t_avg:.2f} |")


if __name__ == "__main__":
    main()
