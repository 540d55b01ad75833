"""The fused chain pass (rollnet.regularizer.chain) against the generic engine, gradcheck and fallbacks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rollnet
from rollnet.models import MLP
from rollnet.models.layers import InputNormalization
from rollnet.regularizer import chain as chain_module
from rollnet.regularizer.chain import DeclaresChain, DeclaresNormalization, find_chain, fusable
from tests.zoo import make

Factory = Callable[[], nn.Module]


class _Standardize(nn.Module):
    """A normalization layer of its own that declares ``(x - mean) / std`` (0-dim constants)."""

    def __init__(self, mean: float, std: float, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full(shape, mean))
        self.register_buffer("std", torch.full(shape, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def input_normalization(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.mean, self.std


class _Declared(nn.Module):
    """A model of its own (not a Sequential, not an MLP) that declares itself a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = _Standardize(0.2, 1.5)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.LeakyReLU(0.1))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.norm(x)))

    def plain_chain(self) -> tuple[nn.Module, ...] | None:
        return (self.norm, self.body, self.head)


class _Wider(MLP):
    """An MLP subclass that keeps MLP's forward (its own defaults only)."""

    def __init__(self) -> None:
        super().__init__((6,), 3, hidden=(7, 4), normalization=(0.5, 2.0))


class _Rewritten(MLP):
    """An MLP subclass with its own forward (the same function, written out) that declares again."""

    def __init__(self) -> None:
        super().__init__((2, 3), 2, hidden=(5,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def plain_chain(self) -> tuple[nn.Module, ...] | None:
        return tuple(self.layers)

def _tied() -> nn.Module:
    shared = nn.Linear(5, 5)
    return nn.Sequential(shared, nn.ReLU(), shared, nn.LeakyReLU(0.2), nn.Linear(5, 2))  # one layer applied twice


CHAINS: dict[str, tuple[Factory, tuple[int, ...]]] = {
    "mlp": (lambda: MLP((1, 5, 5), 4, hidden=(9, 7, 6)), (1, 5, 5)),
    "mlp_leaky_normalized": (
        lambda: MLP((1, 5, 5), 3, hidden=(8, 8), act="leaky_relu", negative_slope=0.2, normalization=(0.3, 0.7)),
        (1, 5, 5),
    ),
    "mlp_dropout_eval": (lambda: MLP((6,), 2, hidden=(7, 5), dropout=0.5).eval(), (6,)),
    "sequential_no_bias": (
        lambda: nn.Sequential(nn.Linear(5, 6, bias=False), nn.LeakyReLU(1.5), nn.Identity(), nn.Linear(6, 3)),
        (5,),
    ),
    "nested_sequential": (
        lambda: nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(12, 6), nn.ReLU()),
                              nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))),
        (3, 4),
    ),
    "declared_model": (_Declared, (2, 3)),
    "mlp_subclass_same_forward": (_Wider, (6,)),
    "mlp_subclass_declared_again": (_Rewritten, (2, 3)),
    "tied_weights": (_tied, (5,)),
}


def _chain(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = CHAINS[name]
    torch.manual_seed(seed)
    model = factory().double()
    x = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def _step(model: nn.Module, x: torch.Tensor, fused: bool, estimator: str = "axes", k: int = 3,
          **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Term, output and parameter gradients of ``term + mean(output^2)`` with directions from seed 4."""
    model.zero_grad(set_to_none=True)
    roll = rollnet.ROLLLoss(1.3, 0.7, approx=k, estimator=estimator,  # type: ignore[arg-type]
                            generator=torch.Generator().manual_seed(4), fused=fused, **kwargs)  # type: ignore[arg-type]
    term, out = roll(model, x, return_output=True)
    (term + out.square().mean()).backward()
    return term.detach(), out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-14)
    for ga, gb in zip(a[2], b[2], strict=True):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_recognised_chains(name: str) -> None:
    model, _ = _chain(name)
    chain = find_chain(model)
    assert chain is not None
    assert len(chain.slopes) == len(chain.linears) - 1


def _hooked() -> nn.Module:
    net = MLP((4,), 2, hidden=(3,))
    net.layers[1].register_forward_hook(lambda m, i, o: o * 2)
    return net


class _MyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _Doubled(MLP):
    """Overrides forward without declaring again: MLP's declaration must not be honoured."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _DeclaredDoubled(_Declared):
    """Overrides a declared model's forward: the parent's declaration must not be honoured."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _ShiftedNormalization(InputNormalization):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


class _OwnCall(MLP):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().__call__(x) * 2


class _SaysNo(_Declared):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def plain_chain(self) -> tuple[nn.Module, ...] | None:
        return None


class _Cycle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def plain_chain(self) -> tuple[nn.Module, ...] | None:
        return (self,)


def _instance_forward() -> nn.Module:
    net = MLP((4,), 2, hidden=(3,))
    net.forward = lambda x: net.layers(x) * 2  # type: ignore[method-assign]
    return net


def _contains_itself() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    net.append(net)
    return net


def _per_feature_normalization() -> nn.Module:
    return nn.Sequential(_Standardize(0.1, 2.0, shape=(4,)), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


NOT_CHAINS: dict[str, Factory] = {
    "custom forward": lambda: make("mlp")[0],
    "an MLP subclass with its own forward": lambda: _Doubled((4,), 2, hidden=(3,)),
    "a declared model's subclass with its own forward": _DeclaredDoubled,
    "an InputNormalization subclass with its own forward": lambda: nn.Sequential(
        _ShiftedNormalization(0.0, 1.0), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
    "an MLP with normalization, subclass with its own forward": lambda: _Doubled((4,), 2, hidden=(3,),
                                                                                normalization=(0.5, 2.0)),
    "an MLP subclass with its own __call__": lambda: _OwnCall((4,), 2, hidden=(3,)),
    "a forward set on the instance": _instance_forward,
    "a declaration that says no": _SaysNo,
    "a declared cycle": _Cycle,
    "a Sequential that contains itself": _contains_itself,
    "per-feature normalization constants": _per_feature_normalization,
    "a normalization after the first Linear": lambda: nn.Sequential(
        nn.Linear(4, 4), InputNormalization(0.0, 2.0), nn.ReLU(), nn.Linear(4, 2)),
    "a forward hook": _hooked,
    "a Linear subclass": lambda: nn.Sequential(_MyLinear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
    "train-mode dropout": lambda: MLP((4,), 2, hidden=(3,), dropout=0.5).train(),
    "ends in an activation": lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU()),
    "two linears in a row": lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)),
    "two activations in a row": lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.ReLU(), nn.Linear(3, 2)),
    "no hidden layer": lambda: nn.Sequential(nn.Linear(4, 3)),
    "a partial flatten": lambda: nn.Sequential(nn.Flatten(2), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
    "a convolution": lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)),
    "a sigmoid": lambda: nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)),
    "a late flatten": lambda: nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.ReLU(), nn.Linear(3, 2)),
}


@pytest.mark.parametrize("what", sorted(NOT_CHAINS))
def test_everything_else_goes_to_the_engine(what: str) -> None:
    assert find_chain(NOT_CHAINS[what]()) is None


def test_the_reference_models_declare_themselves() -> None:
    net = MLP((4,), 2, hidden=(3,), normalization=(0.5, 2.0))
    assert isinstance(net, DeclaresChain) and net.plain_chain() == (net.layers,)
    norm = net.layers[0]
    assert isinstance(norm, DeclaresNormalization) and norm.input_normalization() == (norm.mean, norm.std)
    assert _Doubled((4,), 2, hidden=(3,)).plain_chain() is None  # a declaration tied to MLP.forward
    assert _ShiftedNormalization(0.0, 1.0).input_normalization() is None
    chain = find_chain(net)
    assert chain is not None and chain.normalization == (norm.mean, norm.std) and chain.flatten


class _Malformed(_Declared):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def plain_chain(self) -> tuple[nn.Module, ...] | None:
        return "layers"  # type: ignore[return-value]


def test_a_malformed_declaration_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"_Malformed.plain_chain\(\) must return"):
        find_chain(_Malformed())


def test_a_global_hook_sends_chains_to_the_engine() -> None:
    net = MLP((4,), 2, hidden=(3,))
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert find_chain(net) is None
    finally:
        handle.remove()
    assert find_chain(net) is not None


@pytest.mark.parametrize("estimator", ["axes", "gaussian"])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_fused_term_and_gradients_equal_the_engine(name: str, estimator: str) -> None:
    model, x = _chain(name)
    with mock.patch.object(chain_module._ChainTerms, "apply", wraps=chain_module._ChainTerms.apply) as spy:
        fused = _step(model, x, True, estimator)
        assert spy.call_count == 1  # the fused pass ran
        engine = _step(model, x, False, estimator)
        assert spy.call_count == 1  # and fused=False did not use it
    _assert_same(fused, engine)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_fused_neuron_terms_equal_the_engine(name: str) -> None:
    """Every neuron's term (the ``[B, N]`` path, not the per-example means the loss uses)."""
    model, x = _chain(name)
    got = [rollnet.ROLLLoss(1.0, 0.4, approx=2, generator=torch.Generator().manual_seed(3), fused=f)
           .neuron_terms(model, x) for f in (True, False)]
    torch.testing.assert_close(got[0], got[1], rtol=1e-12, atol=1e-14)


def test_empty_batch_goes_to_the_engine() -> None:
    model, x = _chain("mlp")
    assert _fused_calls(model, x[:0]) == 0  # (the engine gives 0: tests/regularizer/test_loss.py)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    d=st.integers(1, 8),
    out=st.integers(1, 4),
    slopes=st.lists(st.sampled_from([0.0, 0.1, 1.0, 2.5]), min_size=4, max_size=4),
    k=st.integers(1, 5),
    batch=st.integers(1, 5),
    estimator=st.sampled_from(["axes", "gaussian"]),
    seed=st.integers(0, 1000),
)
def test_random_chains_equal_the_engine(widths: list[int], d: int, out: int, slopes: list[float], k: int,
                                        batch: int, estimator: str, seed: int) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = d
    for w, slope in zip(widths, slopes, strict=False):
        layers += [nn.Linear(fan_in, w), nn.ReLU() if slope == 0 else nn.LeakyReLU(slope)]
        fan_in = w
    model = nn.Sequential(*layers, nn.Linear(fan_in, out)).double()
    x = torch.randn(batch, d, dtype=torch.float64)
    _assert_same(_step(model, x, True, estimator, k), _step(model, x, False, estimator, k))


def test_ties_at_zero_follow_the_engine() -> None:
    """A neuron at exactly z = 0 is off for ReLU (slope 0) and takes the negative slope for LeakyReLU."""
    for act in (nn.ReLU(), nn.LeakyReLU(0.3)):
        model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), copy.deepcopy(act), nn.Linear(4, 2)).double()
        with torch.no_grad():
            model[0].weight[:2] = 0.0
            model[0].bias[:2] = 0.0  # two neurons at exactly 0 for every input
        x = torch.randn(5, 3, dtype=torch.float64)
        _assert_same(_step(model, x, True), _step(model, x, False))


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("estimator", ["axes", "gaussian"])
def test_gradcheck_of_the_fused_node(estimator: str, mean: bool) -> None:
    """Both outputs (model output and neuron terms) against finite differences in every parameter."""
    torch.manual_seed(0)
    model = MLP((5,), 3, hidden=(4, 4), act="leaky_relu", negative_slope=0.3, normalization=(0.1, 0.8)).double()
    chain = find_chain(model)
    assert chain is not None
    x = torch.randn(4, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    if estimator == "axes":
        directions = rollnet.engine.gradients.sampled_axes(torch.randint(0, 5, (2, 4), generator=gen))
    else:
        directions = rollnet.engine.gradients.given_directions(torch.randn(2, 4, 5, generator=gen, dtype=torch.float64), x)
    names = [n for n, _ in model.named_parameters()]
    base = dict(model.named_parameters())
    weights = torch.randn(4, 3, dtype=torch.float64)
    term_weights = torch.randn(4, 1 if mean else 8, dtype=torch.float64).squeeze(1)

    def fn(*ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, ps, strict=True))):
            out, terms = chain_module.chain_terms(chain, x, directions, 2.5, 0.7, mean=mean)
        return out * weights, terms * term_weights

    inputs = [base[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_frozen_layers_get_no_gradient() -> None:
    model, x = _chain("mlp")
    for p in model.layers[3].parameters():
        p.requires_grad_(False)
    fused, engine = _step(model, x, True), _step(model, x, False)
    _assert_same(fused, engine)
    assert model.layers[3].weight.grad is None


def _fused_calls(model: nn.Module, x: torch.Tensor, **kwargs: object) -> int:
    with mock.patch.object(chain_module._ChainTerms, "apply", wraps=chain_module._ChainTerms.apply) as spy:
        roll = rollnet.ROLLLoss(1.0, 0.5, approx=2, generator=torch.Generator().manual_seed(0), **kwargs)  # type: ignore[arg-type]
        roll(model, x).backward()
    return spy.call_count


def test_what_falls_back_to_the_engine() -> None:
    model, x = _chain("mlp")
    assert _fused_calls(model, x) == 1
    assert _fused_calls(model, x, memory_budget=1024) == 0  # the stacked rows would not fit
    assert _fused_calls(model, x.clone().requires_grad_(True)) == 0  # x needs its own gradient
    with pytest.raises(RuntimeError, match="dtype"):  # parameters and x differ: the model's own error
        _fused_calls(model, x.float())
    assert _fused_calls(model, x, gamma=100) == 1
    assert _fused_calls(copy.deepcopy(model).float(), x.float()) == 1
    exact = rollnet.ROLLLoss(1.0, 0.5)
    with mock.patch.object(chain_module._ChainTerms, "apply") as spy:
        exact(model, x)
    assert spy.call_count == 0  # the exact term keeps the Gram recursion


def test_the_fused_node_is_differentiable_once() -> None:
    model, x = _chain("mlp")
    roll = rollnet.ROLLLoss(1.0, 0.5, approx=2, generator=torch.Generator().manual_seed(0))
    term = roll(model, x) + sum(p.square().sum() for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"differentiable once.*fused=False"):
        torch.autograd.grad(term, list(model.parameters()), create_graph=True, allow_unused=True)
    # the engine's path is differentiable twice
    roll = rollnet.ROLLLoss(1.0, 0.5, approx=2, generator=torch.Generator().manual_seed(0), fused=False)
    grads = torch.autograd.grad(roll(model, x), list(model.parameters()), create_graph=True, allow_unused=True)
    sum(g.square().sum() for g in grads if g is not None).backward()  # type: ignore[union-attr]


def test_training_step_on_the_papers_mlp_matches_the_engine() -> None:
    """float32, batch 32, k = 3: the fused path as a user's training loop runs it."""
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def step(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        roll = rollnet.ROLLLoss(2.0, 0.25, approx=3, generator=torch.Generator().manual_seed(0), fused=fused)
        term, logits = roll(model, x, return_output=True)
        loss = F.cross_entropy(logits, y) + term
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    (la, ga), (lb, gb) = step(True), step(False)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _outcome(model: nn.Module, x: torch.Tensor, fused: bool) -> tuple[str, str] | torch.Tensor:
    roll = rollnet.ROLLLoss(1.0, 0.5, approx=2, generator=torch.Generator().manual_seed(0), fused=fused)
    try:
        return roll(model, x).detach()
    except ValueError as e:  # (rollnet.errors.UnsupportedOperationError is one)
        return type(e).__name__, str(e)


BAD_SHAPES: dict[str, tuple[Factory, tuple[int, ...]]] = {
    "unbatched": (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (4,)),
    "too wide": (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (6, 5)),
    "[B, 2, 2] without a flatten": (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (6, 2, 2)),
    "flattened too wide": (lambda: MLP((4,), 2, hidden=(3,)), (6, 5, 4)),
    "flattened too narrow": (lambda: MLP((4,), 2, hidden=(3,)), (6, 3)),
}


@pytest.mark.parametrize("what", sorted(BAD_SHAPES))
def test_a_bad_shape_gets_the_engines_error(what: str) -> None:
    """Inputs that are not ``[B, D]`` rows of the first layer's width never reach the fused node:
    the same error as the engine's path, type and message (a ``ValueError``; the engine's
    ``UnsupportedOperationError`` is one too), never a wrong term."""
    factory, shape = BAD_SHAPES[what]
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(*shape, dtype=torch.float64)
    with mock.patch.object(chain_module._ChainTerms, "apply", wraps=chain_module._ChainTerms.apply) as spy:
        fused, engine = _outcome(model, x, True), _outcome(model, x, False)
    assert spy.call_count == 0
    assert isinstance(engine, tuple), f"the engine took shape {shape}"
    assert fused == engine


def test_rows_beyond_two_dimensions_go_to_the_engine() -> None:
    """A chain without a flatten applies its Linears to the last dimension of ``[B, S, D]``: the
    engine takes that (S positions per example), the fused pass (``[B, D]`` rows) must not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with mock.patch.object(chain_module._ChainTerms, "apply", wraps=chain_module._ChainTerms.apply) as spy:
        fused, engine = _outcome(model, x, True), _outcome(model, x, False)
    assert spy.call_count == 0
    assert isinstance(fused, torch.Tensor) and isinstance(engine, torch.Tensor)
    torch.testing.assert_close(fused, engine, rtol=0, atol=0)
    chain = find_chain(model)
    assert chain is not None
    directions = rollnet.engine.gradients.sampled_axes(torch.zeros(2, 5, dtype=torch.long))
    assert not fusable(chain, x, directions)
    assert not fusable(chain, x[0, 0], directions)  # 1-D: not even a batch (check_input refuses it first)
    assert fusable(chain, x[:, 0], directions)
