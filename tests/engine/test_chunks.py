"""Chunk planning: sizes that fit the budget, and that suit the hardware."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from rollnet.engine.gradients import plan_chunks, unit_directions
from tests.threads import intra_op_threads


@pytest.fixture
def two_threads() -> Iterator[None]:
    with intra_op_threads(2):
        yield


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(),
                         nn.Linear(300, 10)).eval()


@pytest.mark.parametrize("budget_mib", [50, 60, 70, 100, 120])
def test_cpu_batch_chunks_are_a_multiple_of_the_threads(two_threads, budget_mib: int) -> None:
    """Batched matmuls split their batch over the threads: an odd chunk leaves one idle."""
    x = torch.rand(64, 1, 28, 28)
    bc, kc = plan_chunks(_mlp(), x, unit_directions(x.shape[1:]), memory_budget=budget_mib << 20)
    assert kc == 784 and 1 < bc < 64
    assert bc % 2 == 0


def test_chunks_still_fit_a_budget_too_small_for_two_examples(two_threads) -> None:
    x = torch.rand(64, 1, 28, 28)
    for mib in (2, 20, 30):  # direction chunks of one example, then one example: never rounded up
        assert plan_chunks(_mlp(), x, unit_directions(x.shape[1:]), memory_budget=mib << 20)[0] == 1
