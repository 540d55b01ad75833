"""A ROLL training step with and without autocast, shared by the CPU and CUDA tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rollnet


def check_autocast_step(device: torch.device, dtype: torch.dtype, approx: int | None) -> None:
    """Under autocast the term and its parameter gradients run, come out in the parameters' dtype,
    and stay within 10% of the float32 step with the same directions."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 10)).to(device)
    x, y = torch.rand(16, 1, 8, 8, device=device), torch.randint(0, 10, (16,), device=device)

    def grads(autocast: bool) -> list[torch.Tensor]:
        net.zero_grad()
        roll = rollnet.ROLLLoss(1.0, 1.0, approx=approx, generator=torch.Generator(device).manual_seed(1))
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            term, logits = roll(net, x, return_output=True)
            loss = F.cross_entropy(logits, y) + term
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]

    full, mixed = grads(False), grads(True)
    for a, b in zip(mixed, full, strict=True):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - b).norm() <= 0.1 * b.norm()
