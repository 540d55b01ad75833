"""Property-based checks over random architectures (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rollnet
from tests.oracles import autograd_gradients, oracle_margin, recorded_pattern, sample_ball
from tests.zoo import MLP, ElmanRNN

architectures = st.fixed_dictionaries(
    {
        "d": st.integers(1, 6),
        "widths": st.lists(st.integers(1, 10), min_size=1, max_size=3),
        "out": st.integers(1, 4),
        "slope": st.sampled_from([0.0, 0.0, 0.1, -0.5, 2.0]),
        "seed": st.integers(0, 10_000),
        "p": st.sampled_from([1.0, 2.0, math.inf]),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures)
def test_random_mlps_exact_and_sound(arch: dict) -> None:
    torch.manual_seed(arch["seed"])
    model = MLP([arch["d"], *arch["widths"], arch["out"]], slope=arch["slope"]).double().eval()
    x = torch.randn(3, arch["d"], dtype=torch.float64)
    z, g = autograd_gradients(model, x)
    _z2, g2 = rollnet.neuron_gradients(model, x)
    torch.testing.assert_close(g2, g, rtol=1e-10, atol=1e-12)
    radii = rollnet.margin(model, x, p=arch["p"])
    torch.testing.assert_close(radii, oracle_margin(z, g, arch["p"]), rtol=1e-9, atol=0)
    gen = torch.Generator().manual_seed(arch["seed"])
    for b in range(3):
        r = float(radii[b])
        if not 0 < r < math.inf:
            continue
        base = recorded_pattern(model, x[b : b + 1])
        u = sample_ball(1000, (arch["d"],), arch["p"], gen, torch.float64)
        assert bool((recorded_pattern(model, x[b] + (1 - 1e-6) * r * u) == base).all())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 6), hidden=st.integers(1, 6))
def test_random_recurrences_directional_margin_sound(seed: int, steps: int, hidden: int) -> None:
    torch.manual_seed(seed)
    model = ElmanRNN(channels=2, hidden=hidden, out=2).double().eval()
    x = torch.randn(2, steps, 2, dtype=torch.float64)
    d = torch.randn(2, steps, 2, dtype=torch.float64)
    t = rollnet.directional_margin(model, x, d)
    for b in range(2):
        tb = float(t[b])
        base = recorded_pattern(model, x[b : b + 1])
        if tb == math.inf:
            s = torch.linspace(0, 100, 50, dtype=torch.float64).reshape(-1, 1, 1)
            assert bool((recorded_pattern(model, x[b] + s * d[b]) == base).all())
            continue
        s = torch.linspace(0, 1 - 1e-6, 100, dtype=torch.float64).reshape(-1, 1, 1)
        assert bool((recorded_pattern(model, x[b] + s * tb * d[b]) == base).all())
        assert not bool((recorded_pattern(model, (x[b] + (1 + 1e-3) * tb * d[b]).unsqueeze(0)) == base).all())
