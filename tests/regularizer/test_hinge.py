"""The hinge on neuron values and its derivative (rollnet.regularizer.hinge), against autograd."""

from __future__ import annotations

import pytest
import torch

from rollnet.regularizer.hinge import hinge, hinge_derivative


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_derivative_is_autograds_kinks_included(dtype: torch.dtype) -> None:
    """The fused pass's backward uses :func:`hinge_derivative` where the engine's path lets autograd
    differentiate :func:`hinge`: the two must agree everywhere, at z = 0 and |z| = 1 too."""
    z = torch.tensor([-3.0, -1.0, -0.999, -0.5, -0.0, 0.0, 1e-30, 0.5, 0.999, 1.0, 1.001, 3.0], dtype=dtype)
    z = torch.cat([z, torch.randn(64, dtype=dtype, generator=torch.Generator().manual_seed(0))])
    leaf = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(hinge(leaf).sum(), leaf)
    assert torch.equal(hinge_derivative(z), grad)
    assert hinge_derivative(z).dtype == dtype


def test_values() -> None:
    z = torch.tensor([-2.0, -1.0, -0.25, 0.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    assert torch.equal(hinge(z), torch.clamp(1 - z.abs(), min=0))
    assert hinge(z.view(7, 1, 1)).shape == (7, 1, 1)
