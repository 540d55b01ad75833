"""ROLLLoss against a direct per-neuron computation, gradcheck, and unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rollnet
from tests.mixed_precision import check_autocast_step
from tests.oracles import autograd_gradients
from tests.zoo import make


def _direct(name: str, lam: float, C: float, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, shape = make(name, seed=1)
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z, g = autograd_gradients(model, x)
    terms = g.flatten(2).square().sum(2) + C * torch.relu(1 - z.abs())
    per = terms.amax(1) if reduce == "max" else terms.mean(1)
    return lam * per.mean(), rollnet.ROLLLoss(lam, C, gamma="max" if reduce == "max" else 100)(model, x)


@pytest.mark.parametrize("name", ["mlp", "leaky", "conv_bn", "torchvision_block", "rnn"])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_matches_per_neuron_computation(name: str, reduce: str) -> None:
    ref, got = _direct(name, 2.0, 0.25, reduce)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)


def test_top_gamma_keeps_the_largest_terms() -> None:
    model, shape = make("mlp", seed=3)
    x = torch.randn(5, *shape, dtype=torch.float64)
    roll = rollnet.ROLLLoss(1.0, 0.5, gamma=25)
    terms = roll.neuron_terms(model, x)
    n = terms.shape[1]
    keep = math.ceil(0.25 * n)
    ref = torch.sort(terms, dim=1, descending=True).values[:, :keep].mean(1).mean()
    torch.testing.assert_close(roll(model, x), ref)
    with torch.no_grad():
        assert float(rollnet.ROLLLoss(1.0, 0.5, gamma=100)(model, x)) < float(roll(model, x))


class _FunctionalMLP(nn.Module):
    """Weights passed in as plain tensors, so gradcheck can vary them."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2, w3 = self.params
        h = F.relu(F.linear(x, w1, b1))
        h = F.leaky_relu(F.linear(h, w2, b2), 0.3)
        return F.linear(h, w3)


@pytest.mark.parametrize("gamma", [100, 40, "max"])
def test_gradcheck_in_the_parameters(gamma: float | str) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (5,), (4, 5), (4,), (2, 4)]
    params = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    roll = rollnet.ROLLLoss(0.7, 1.3, gamma=gamma)

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        return roll(_FunctionalMLP(list(ps)), x)

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_through_conv_and_batchnorm() -> None:
    model, shape = make("conv_bn", seed=2)
    x = torch.randn(3, *shape, dtype=torch.float64)
    roll = rollnet.ROLLLoss(1.0, 0.5)
    names = ["conv1.weight", "bn1.weight", "fc.weight"]
    base = dict(model.named_parameters())

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        params = {**base, **dict(zip(names, ps, strict=True))}
        with torch.nn.utils.stateless._reparametrize_module(model, params):
            return roll(model, x)

    inputs = [base[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("approx", [None, 2])
def test_gradcheck_through_in_place_relu(approx: int | None) -> None:
    """torchvision-style blocks apply ``ReLU(inplace=True)``; the hinge's gradient must survive it
    (it was once lost: the neuron values were copied detached before the in-place op)."""
    model, shape = make("torchvision_block", seed=2)
    x = torch.randn(2, *shape, dtype=torch.float64)
    names = ["conv1.weight", "layer1.0.conv2.weight", "fc.bias"]
    base = dict(model.named_parameters())

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        roll = rollnet.ROLLLoss(1.0, 3.0, approx=approx, generator=torch.Generator().manual_seed(0))
        params = {**base, **dict(zip(names, ps, strict=True))}
        with torch.nn.utils.stateless._reparametrize_module(model, params):
            return roll(model, x)

    inputs = [base[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["axes", "gaussian"])
def test_approximate_estimators_are_unbiased(estimator: str) -> None:
    model, shape = make("conv_bn", seed=5)
    x = torch.randn(4, *shape, dtype=torch.float64)
    exact = float(rollnet.ROLLLoss(1.0, 0.0)(model, x).detach())
    gen = torch.Generator().manual_seed(1)
    roll = rollnet.ROLLLoss(1.0, 0.0, approx=3, estimator=estimator, generator=gen)  # type: ignore[arg-type]
    draws = torch.stack([roll(model, x).detach() for _ in range(1500)])
    se = float(draws.std()) / math.sqrt(draws.numel())
    rel_sd = float(draws.std()) / exact
    print(f"{estimator}: exact {exact:.5f} mean {float(draws.mean()):.5f} se {se:.5f} relative sd per draw {rel_sd:.3f}")
    assert abs(float(draws.mean()) - exact) < 4 * se
    assert se > 0


def test_hinge_part_is_exact_in_the_approximation() -> None:
    model, shape = make("mlp", seed=5)
    x = torch.randn(4, *shape, dtype=torch.float64)
    # with many axes the estimator's mean equals the exact term; with C only, every draw does
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(1e-8)
    exact = rollnet.ROLLLoss(1.0, 2.0)(model, x)
    approx = rollnet.ROLLLoss(1.0, 2.0, approx=1)(model, x)
    torch.testing.assert_close(approx, exact, rtol=1e-6, atol=1e-12)


def test_training_mode_batchnorm_running_stats_untouched_and_differentiable() -> None:
    model, shape = make("conv_bn", seed=1)
    model.train()
    x = torch.randn(8, *shape, dtype=torch.float64)
    before = model.bn1.running_mean.clone()
    loss = rollnet.ROLLLoss(1.0, 0.5)(model, x)
    loss.backward()
    assert torch.equal(model.bn1.running_mean, before)
    assert model.conv1.weight.grad is not None and float(model.conv1.weight.grad.abs().sum()) > 0
    assert model.training


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gamma"):
        rollnet.ROLLLoss(1.0, 1.0, gamma=0)
    with pytest.raises(ValueError, match="gamma"):
        rollnet.ROLLLoss(1.0, 1.0, gamma="min")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unbiased only with gamma=100"):
        rollnet.ROLLLoss(1.0, 1.0, gamma=50, approx=3)
    with pytest.raises(ValueError, match="non-negative"):
        rollnet.ROLLLoss(-1.0, 1.0)
    with pytest.raises(ValueError, match="estimator"):
        rollnet.ROLLLoss(1.0, 1.0, approx=2, estimator="sobol")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="approx"):
        rollnet.ROLLLoss(1.0, 1.0, approx=0)


def test_return_output_is_the_training_forward() -> None:
    model, shape = make("conv_bn", seed=1)
    model.train()
    x = torch.randn(8, *shape, dtype=torch.float64)
    twin, _ = make("conv_bn", seed=1)
    twin.train()
    roll = rollnet.ROLLLoss(1.0, 0.5)
    term, logits = roll(model, x, return_output=True)
    torch.manual_seed(0)
    expected_logits = twin(x)  # a plain training forward: Dropout and BatchNorm statistics
    del expected_logits
    torch.testing.assert_close(model.bn1.running_mean, twin.bn1.running_mean)  # updated once, like a forward
    torch.testing.assert_close(model.bn1.running_var, twin.bn1.running_var)
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(rollnet.ROLLLoss(1.0, 0.5)(model, x), rollnet.ROLLLoss(1.0, 0.5)(twin, x))
    assert logits.shape == (8, 3) and logits.requires_grad and term.requires_grad


@pytest.mark.parametrize("approx", [None, 3])
def test_training_step_under_bfloat16_autocast(approx: int | None) -> None:
    check_autocast_step(torch.device("cpu"), torch.bfloat16, approx)


@pytest.mark.parametrize("approx", [None, 2])
@pytest.mark.parametrize("name", ["mlp", "leaky", "conv_bn", "residual", "torchvision_block", "rnn", "concat"])
def test_empty_batch_gives_a_zero_term(name: str, approx: int | None) -> None:
    model, shape = make(name)
    roll = rollnet.ROLLLoss(1.0, 0.5, approx=approx)
    n = roll.neuron_terms(model, torch.randn(1, *shape, dtype=torch.float64)).shape[1]
    empty = torch.randn(0, *shape, dtype=torch.float64)
    assert roll.neuron_terms(model, empty).shape == (0, n)
    term, out = roll(model, empty, return_output=True)
    assert float(term.detach()) == 0.0 and out.shape[0] == 0
    term.backward()
