"""The Gram recursion gives the same squared norms (and parameter gradients) as gradient rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rollnet
from rollnet.engine.gradients import Request, collect, unit_directions
from rollnet.engine.gram import GramUnsupported
from tests.oracles import autograd_gradients
from tests.zoo import MLP


def _chain(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP([40, 12, 9, 7, 3]).double().eval()
    if kind == "leaky":
        return MLP([40, 12, 9, 3], slope=0.3).double().eval()
    layers = [nn.Flatten(), nn.Linear(36, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.3),
              nn.Linear(10, 8), nn.LeakyReLU(0.1), nn.Linear(8, 2)]
    net = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        net[2].running_mean.uniform_(-1, 1)
        net[2].running_var.uniform_(0.5, 2)
        net[2].weight.uniform_(-2, 2)
    return net


SHAPES = {"mlp": (40,), "leaky": (40,), "bn_dropout": (1, 6, 6)}


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_gram_equals_rows_and_autograd(kind: str) -> None:
    net = _chain(kind)
    x = torch.randn(5, *SHAPES[kind], dtype=torch.float64)
    dirs = unit_directions(x.shape[1:])
    gram = collect(net, x, dirs, Request(norms=(2.0,)), method="gram").norms[2.0]
    rows = collect(net, x, dirs, Request(norms=(2.0,)), method="rows").norms[2.0]
    torch.testing.assert_close(gram, rows, rtol=1e-10, atol=1e-14)
    if kind == "mlp":
        _, g = autograd_gradients(net, x)
        torch.testing.assert_close(gram, g.flatten(2).norm(dim=2), rtol=1e-10, atol=1e-14)


def test_roll_loss_gradients_agree_between_methods_in_training_mode() -> None:
    net = _chain("bn_dropout").train()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    grads = []
    for method in ("gram", "rows"):
        torch.manual_seed(3)  # same dropout masks
        net.zero_grad()
        got = collect(net, x, unit_directions(x.shape[1:]), Request(squared_l2=True),
                      allow_batch_statistics=True, method=method)
        assert got.squared_l2 is not None
        (got.squared_l2.sum() + got.values.abs().sum()).backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
    assert sum(g is not None for g in grads[0]) >= 6
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_non_chain_models_fall_back_or_refuse() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(30, 5)
            self.b = nn.Linear(5, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return torch.relu(h + self.b(h))

    net = Skip().double()
    x = torch.randn(3, 30, dtype=torch.float64)
    with pytest.raises(GramUnsupported):
        collect(net, x, unit_directions((30,)), Request(norms=(2.0,)), method="gram")
    auto = collect(net, x, unit_directions((30,)), Request(norms=(2.0,)))  # falls back to rows
    _, g = rollnet.neuron_gradients(net, x)
    torch.testing.assert_close(auto.norms[2.0], g.norm(dim=2))


def _sparse_mlp() -> MLP:
    """A ReLU MLP whose neurons are mostly off, so the Gram pass works on active columns only."""
    torch.manual_seed(1)
    net = MLP([40, 16, 14, 12, 3]).double().eval()
    with torch.no_grad():
        for layer in net.layers[:-1]:
            layer.bias.sub_(1.5)  # most pre-activations negative
    return net


def test_active_column_gram_matches_autograd_with_dead_examples() -> None:
    net = _sparse_mlp()
    x = torch.randn(7, 40, dtype=torch.float64)
    x[3] = -100.0 * net.layers[0].weight.sum(0).sign()  # drives a whole example's first layer off or far on
    x[5] = 0.0  # every first-layer neuron off (biases < 0): all later gradients vanish
    z, g = autograd_gradients(net, x)
    active = (z > 0).reshape(7, -1)
    assert active.double().mean() < 0.5 and not active[5].any()
    gram = collect(net, x, unit_directions((40,)), Request(norms=(2.0,)), method="gram").norms[2.0]
    torch.testing.assert_close(gram, g.flatten(2).norm(dim=2), rtol=1e-10, atol=1e-14)


def test_active_column_gram_with_every_neuron_off() -> None:
    net = _sparse_mlp()
    with torch.no_grad():
        net.layers[1].bias.fill_(-1e6)  # layer 2 is off for every example: nothing reaches layers 3 and 4
    x = torch.randn(4, 40, dtype=torch.float64)
    _, g = autograd_gradients(net, x)
    gram = collect(net, x, unit_directions((40,)), Request(norms=(2.0,)), method="gram").norms[2.0]
    torch.testing.assert_close(gram, g.flatten(2).norm(dim=2), rtol=1e-10, atol=1e-14)
    assert gram[:, 16 + 14 :].abs().max() == 0


def test_active_column_gram_gradcheck() -> None:
    """The ROLL squared norms from active columns are differentiable in the weights (finite differences)."""
    net = _sparse_mlp()
    x = torch.randn(5, 40, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())

    def squared(*ps: torch.Tensor) -> torch.Tensor:
        state = dict(zip(names, ps, strict=True))

        class Call(nn.Module):
            def forward(self, inp: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(net, state, (inp,))

        got = collect(Call(), x, unit_directions((40,)), Request(squared_l2=True), method="gram")
        assert got.squared_l2 is not None
        return got.squared_l2

    assert torch.autograd.gradcheck(squared, params, eps=1e-6, atol=1e-6)


def test_gram_chunks_agree() -> None:
    """A tiny budget forces one-example chunks, then re-chunking from the first chunk's memory."""
    net = _sparse_mlp()
    x = torch.randn(9, 40, dtype=torch.float64)
    dirs = unit_directions((40,))
    whole = collect(net, x, dirs, Request(norms=(2.0,)), method="gram")
    for budget in (1, 20_000, 200_000):
        part = collect(net, x, dirs, Request(norms=(2.0,)), method="gram", memory_budget=budget)
        torch.testing.assert_close(part.norms[2.0], whole.norms[2.0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(part.values, whole.values, rtol=1e-12, atol=1e-14)
