"""Certificates against independent oracles: autograd, sampling, bisection, hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rollnet
from tests.oracles import (
    autograd_gradients,
    bisect_line,
    oracle_margin,
    recorded_pattern,
    sample_ball,
    worst_direction,
)
from tests.zoo import ZOO, make

NORMS = [1.0, 2.0, math.inf]


def _inputs(shape: tuple[int, ...], n: int = 3, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_neuron_gradients_match_per_neuron_autograd(name: str) -> None:
    model, shape = make(name)
    x = _inputs(shape)
    z, g = rollnet.neuron_gradients(model, x)
    z_ref, g_ref = autograd_gradients(model, x)
    assert z.shape == z_ref.shape and g.shape == g_ref.shape == (x.shape[0], z.shape[1], *shape)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("p", NORMS)
def test_margin_matches_closed_form_oracle(name: str, p: float) -> None:
    model, shape = make(name)
    x = _inputs(shape)
    z_ref, g_ref = autograd_gradients(model, x)
    got = rollnet.margin(model, x, p=p)
    torch.testing.assert_close(got, oracle_margin(z_ref, g_ref, p), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("p", NORMS)
def test_margin_is_sound_and_tight(name: str, p: float) -> None:
    """10,000 points inside each ball keep the pattern; just outside, it changes."""
    model, shape = make(name, seed=3)
    x = _inputs(shape, n=2, seed=7)
    radii = rollnet.margin(model, x, p=p)
    z_ref, g_ref = autograd_gradients(model, x)
    gen = torch.Generator().manual_seed(11)
    for b in range(x.shape[0]):
        r = float(radii[b])
        assert 0 < r < math.inf
        base = recorded_pattern(model, x[b : b + 1])
        u = sample_ball(10_000, shape, p, gen, torch.float64)
        pats = recorded_pattern(model, x[b] + (1 - 1e-6) * r * u)
        assert bool((pats == base).all()), "a point inside the certified ball changed the pattern"
        # tightness: the closest neuron's worst direction, 0.1% beyond the radius
        norms = g_ref[b].flatten(1).norm(p={1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p], dim=1)
        ratio = torch.where(norms > 0, z_ref[b].abs() / norms, torch.full_like(norms, math.inf))
        j = int(ratio.argmin())
        ustar = worst_direction(g_ref[b, j], float(z_ref[b, j]), p)
        outside = recorded_pattern(model, (x[b] + (1 + 1e-3) * r * ustar).unsqueeze(0))
        assert not bool((outside == base).all()), "the point just outside kept the pattern"


@pytest.mark.parametrize("name", ["mlp", "leaky", "conv_bn", "torchvision_block", "rnn", "concat"])
def test_directional_margin_sound_tight_and_equal_to_bisection(name: str) -> None:
    model, shape = make(name, seed=5)
    x = _inputs(shape, n=3, seed=2)
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    t = rollnet.directional_margin(model, x, d)
    for b in range(x.shape[0]):
        tb = float(t[b])
        assert 0 < tb < math.inf
        base = recorded_pattern(model, x[b : b + 1])
        s = torch.linspace(0, 1 - 1e-6, 200, dtype=torch.float64).reshape(-1, *[1] * len(shape))
        assert bool((recorded_pattern(model, x[b] + s * tb * d[b]) == base).all())
        assert not bool((recorded_pattern(model, (x[b] + (1 + 1e-3) * tb * d[b]).unsqueeze(0)) == base).all())
        assert bisect_line(model, x[b], d[b], hi=4 * tb) == pytest.approx(tb, rel=1e-9)


def test_directional_margin_shared_direction_and_infinite() -> None:
    # a single ReLU z = x1: moving along +x1 from z > 0 never flips it
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU()).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        net[0].bias.zero_()
    x = torch.tensor([[1.0, 5.0], [-2.0, 0.0]], dtype=torch.float64)
    t = rollnet.directional_margin(net, x, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert t[0] == math.inf
    assert t[1] == pytest.approx(2.0)
    t = rollnet.directional_margin(net, x, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert bool((t == math.inf).all())


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "rnn", "residual"])
def test_stability_bounds_sound_tight_and_bisection(name: str) -> None:
    model, shape = make(name, seed=8)
    x = _inputs(shape, n=2, seed=9)
    lower, upper = rollnet.stability_bounds(model, x)
    assert lower.shape == upper.shape == x.shape
    assert bool((lower <= 0).all() and (upper >= 0).all())
    d = math.prod(shape)
    for b in range(x.shape[0]):
        base = recorded_pattern(model, x[b : b + 1])
        for k in range(0, d, max(1, d // 6)):
            e = torch.zeros(d, dtype=torch.float64)
            e[k] = 1.0
            e = e.reshape(shape)
            for bound, sign in ((float(upper[b].flatten()[k]), 1.0), (-float(lower[b].flatten()[k]), -1.0)):
                if bound == math.inf:
                    far = recorded_pattern(model, (x[b] + sign * 1e3 * e).unsqueeze(0))
                    assert bool((far == base).all())
                    continue
                inside = recorded_pattern(model, (x[b] + sign * (1 - 1e-6) * bound * e).unsqueeze(0))
                outside = recorded_pattern(model, (x[b] + sign * (1 + 1e-3) * bound * e).unsqueeze(0))
                assert bool((inside == base).all())
                assert not bool((outside == base).all())
                assert bisect_line(model, x[b], sign * e, hi=4 * bound + 1e-12) == pytest.approx(bound, rel=1e-9)


# -- a 2-D net small enough to do by hand ----------------------------------------


def _hand_net(out_weights: list[float]) -> nn.Module:
    # z1 = x1 + x2 - 1, z2 = 2 x1 - x2 + 0.5, y = w . relu(z)
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([-1.0, 0.5]))
        net[2].weight.copy_(torch.tensor([out_weights]))
        net[2].bias.zero_()
    return net


def test_hand_computed_net() -> None:
    net = _hand_net([1.0, 2.0])
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float64)  # z = (0.5, 2.0)
    assert float(rollnet.margin(net, x, p=2)) == pytest.approx(0.5 / math.sqrt(2))
    assert float(rollnet.margin(net, x, p="inf")) == pytest.approx(0.25)  # 0.5 / ||(1,1)||_1
    assert float(rollnet.margin(net, x, p=1)) == pytest.approx(0.5)  # 0.5 / ||(1,1)||_inf
    lower, upper = rollnet.stability_bounds(net, x)
    # x1 up: both neurons grow -> never; x1 down: z1 hits 0 after 0.5 (z2 after 1)
    # x2 up: z2 hits 0 after 2; x2 down: z1 hits 0 after 0.5
    assert lower[0].tolist() == pytest.approx([-0.5, -0.5])
    assert upper[0, 0] == math.inf and float(upper[0, 1]) == pytest.approx(2.0)
    t = rollnet.directional_margin(net, x, torch.tensor([-1.0, 0.0], dtype=torch.float64))
    assert float(t) == pytest.approx(0.5)
    sal, radius = rollnet.certified_saliency(net, x)
    assert sal[0].tolist() == pytest.approx([1.0 + 4.0, 1.0 - 2.0])  # w1 * (1,1) + w2 * (2,-1)
    assert float(radius) == pytest.approx(0.5 / math.sqrt(2))
    # a neuron exactly on its hyperplane gives margin 0
    on_plane = torch.tensor([[0.5, 0.5]], dtype=torch.float64)  # z1 = 0
    assert float(rollnet.margin(net, on_plane, p=2)) == 0.0


def test_count_regions_on_known_points() -> None:
    # the two lines z1 = 0 and z2 = 0 cut the plane into 4 regions
    points = torch.tensor(
        [[2.0, 0.5], [3.0, 1.0], [1.0, 0.5],  # z1 > 0, z2 > 0
         [0.0, 2.0], [-0.5, 3.0], [0.1, 4.0],  # z1 > 0, z2 < 0
         [-1.0, -1.0], [-2.0, -1.5], [-1.0, -0.5],  # z1 < 0, z2 < 0
         [0.3, 0.0], [0.2, -0.1], [0.4, 0.1]],  # z1 < 0, z2 > 0
        dtype=torch.float64,
    )
    assert rollnet.count_regions(_hand_net([1.0, 2.0]), points, batch_size=5) == (4, 4)
    # with the output ignoring neuron 2, only two Jacobians remain
    assert rollnet.count_regions(_hand_net([1.0, 0.0]), points) == (4, 2)
    # a DataLoader-like iterable of (x, y) batches
    batches = [(points[:6], None), (points[6:], None)]
    assert rollnet.count_regions(_hand_net([1.0, 2.0]), batches) == (4, 4)


def test_count_regions_bounds_on_random_net() -> None:
    model, shape = make("mlp", seed=2)
    data = _inputs(shape, n=400, seed=3)
    n_pat, n_jac = rollnet.count_regions(model, data, batch_size=64)
    distinct = len({tuple(row.tolist()) for row in recorded_pattern(model, data)})
    assert n_pat == distinct
    assert 1 <= n_jac <= n_pat


def test_activation_patterns_compare_and_hash() -> None:
    model, shape = make("conv_bn")
    x = _inputs(shape, n=4)
    pats = rollnet.activation_pattern(model, torch.cat([x, x[:2]]))
    assert len(pats) == 6 and pats[0] == pats[4] and pats[1] == pats[5]
    assert len(set(pats)) == len({tuple(r.tolist()) for r in recorded_pattern(model, x)})
    assert torch.equal(pats.as_tensor().bool(), recorded_pattern(model, torch.cat([x, x[:2]])))


def test_certified_saliency_matches_autograd_and_targets() -> None:
    model, shape = make("residual")
    x = _inputs(shape, n=3)
    targets = [0, 2, 1]
    sal, radius = rollnet.certified_saliency(model, x, target=targets, p=2)
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    (ref,) = torch.autograd.grad(out[torch.arange(3), torch.tensor(targets)].sum(), xr)
    torch.testing.assert_close(sal, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(radius, rollnet.margin(model, x, p=2))
    same = rollnet.certified_saliency(model, x, target=torch.tensor(targets))[0]
    torch.testing.assert_close(same, sal)
    one = rollnet.certified_saliency(model, x, target=1)[0]
    (ref1,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(one, ref1, rtol=1e-10, atol=1e-12)


def test_linear_regions_object_agrees_with_functions() -> None:
    model, shape = make("torchvision_block")
    x = _inputs(shape, n=3)
    regions = rollnet.LinearRegions(model, x)
    for p in NORMS:
        torch.testing.assert_close(regions.margin(p), rollnet.margin(model, x, p=p))
    lo, up = regions.stability_bounds()
    lo2, up2 = rollnet.stability_bounds(model, x)
    assert torch.equal(lo, lo2) and torch.equal(up, up2)
    d = _inputs(shape, n=3, seed=5)
    torch.testing.assert_close(regions.directional_margin(d), rollnet.directional_margin(model, x, d))
    z, g = regions.neuron_gradients()
    _z2, g2 = rollnet.neuron_gradients(model, x)
    torch.testing.assert_close(g, g2)
    assert regions.jacobian().shape == (3, 3, *shape)
    torch.testing.assert_close(regions.saliency(target=[0, 1, 2]), rollnet.certified_saliency(model, x, [0, 1, 2])[0])
    assert regions.num_neurons == z.shape[1] == sum(size for _, _, size in regions.neuron_info())


@pytest.mark.parametrize("name", ["conv_bn", "torchvision_block"])
def test_several_norms_at_once_equal_one_norm_at_a_time(name: str) -> None:
    model, shape = make(name)
    x = _inputs(shape)
    got = rollnet.margin(model, x, p=(2, "inf", 1, 2))
    assert isinstance(got, tuple) and len(got) == 4
    for p, radius in zip((2.0, math.inf, 1.0, 2.0), got, strict=True):
        assert torch.equal(radius, rollnet.margin(model, x, p=p))
    assert rollnet.margin(model, x[:0], p=[1, 2])[1].shape == (0,)
    with pytest.raises(ValueError, match="at least one norm"):
        rollnet.margin(model, x, p=())
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        rollnet.margin(model, x, p=(2, 3))


@pytest.mark.parametrize("name", ["mlp_image", "conv_bn", "rnn"])
def test_tiny_memory_budget_gives_identical_results(name: str) -> None:
    """Chunking over examples and directions must not change any number."""
    model, shape = make(name)
    x = _inputs(shape, n=5)
    full = rollnet.LinearRegions(model, x)
    tiny = rollnet.LinearRegions(model, x, memory_budget=2_000)  # forces direction chunks
    for p in NORMS:
        torch.testing.assert_close(tiny.margin(p), full.margin(p), rtol=1e-12, atol=0)
    # chunks change matrix-product blocking, so allow rounding-level differences only
    for a, b in zip(tiny.stability_bounds(), full.stability_bounds(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(tiny.neuron_gradients()[1], full.neuron_gradients()[1])


def test_float32_margins_close_to_float64_and_sound_with_safety_factor() -> None:
    model64, shape = make("conv_bn", seed=4)
    model32, _ = make("conv_bn", seed=4, dtype=torch.float32)
    x = _inputs(shape, n=4, seed=6)
    r64 = rollnet.margin(model64, x, p=2)
    r32 = rollnet.margin(model32, x.float(), p=2)
    assert r32.dtype == torch.float32
    torch.testing.assert_close(r32.double(), r64, rtol=1e-3, atol=0)
    gen = torch.Generator().manual_seed(0)
    for b in range(x.shape[0]):
        base = recorded_pattern(model64, x[b : b + 1])
        u = sample_ball(2000, shape, 2.0, gen, torch.float64)
        assert bool((recorded_pattern(model64, x[b] + 0.999 * float(r32[b]) * u) == base).all())


def test_margin_on_model_without_neurons_is_infinite() -> None:
    net = nn.Sequential(nn.Linear(3, 2)).double()
    x = _inputs((3,), n=2)
    assert bool((rollnet.margin(net, x) == math.inf).all())
    assert rollnet.count_regions(net, x) == (1, 1)
