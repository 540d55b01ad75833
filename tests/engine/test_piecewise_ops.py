"""Every piecewise-linear elementwise op is a neuron: clamp/clip, hardtanh, relu6, abs, PReLU,
comparisons and the masks they give (``h * (h > c)``, ``torch.where``, ``masked_fill``, ``& | ~``).

Each op is checked against independent oracles: the model records every kink's neuron itself
(``h - k``, oriented as the rule documents), per-neuron autograd gives the gradients, sampling
gives soundness (nothing changes inside the certified ball, and the output is affine there with
the Jacobian rollnet reports), the worst direction gives tightness, and the ROLL term is
recomputed neuron by neuron.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rollnet
from rollnet.engine.gradients import Request, collect, unit_directions
from tests.oracles import (
    autograd_gradients,
    dual,
    oracle_margin,
    recorded_neurons,
    recorded_pattern,
    sample_ball,
    worst_direction,
)
from tests.zoo import Recording

D, W = 4, 6


class Lambda(Recording):
    """``head(fn(self, inp(x)))`` with a few parameters the ops may use."""

    def __init__(self, fn: Callable[[Lambda, Tensor], Tensor], d: int = D, w: int = W) -> None:
        super().__init__()
        self.fn = fn
        self.inp = nn.Linear(d, w)
        self.aux = nn.Linear(d, w)
        self.head = nn.Linear(w, 3)
        self.prelu = nn.PReLU(w)
        self.prelu1 = nn.PReLU()
        with torch.no_grad():
            self.prelu.weight.copy_(torch.linspace(-0.7, 1.6, w))
            self.prelu1.weight.fill_(0.3)
        self.register_buffer("lo", torch.linspace(-0.6, -0.1, w))
        self.register_buffer("hi", torch.linspace(0.1, 0.5, w))
        self.x: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.x = x
        return self.head(self.fn(self, self.inp(x)))

    def other(self) -> Tensor:
        """A second affine function of the input (for comparisons of two input-dependent tensors)."""
        assert self.x is not None
        return self.aux(self.x)


def recording(m: Recording) -> bool:
    """Whether the model records (the oracle's arithmetic must not run under the tracer)."""
    return getattr(m, "_root", m).record is not None


def kinks(m: Recording, h: Tensor, *ks: float | Tensor) -> Tensor:
    """Record the neurons h - k (in the rule's order) and pass h on."""
    if recording(m):
        for k in ks:
            m.rec(h - k)
    return h


def neg(m: Recording, h: Tensor, k: float | Tensor) -> Tensor:
    """Record k - h (comparisons whose strict side is h < k)."""
    if recording(m):
        m.rec(k - h)
    return h


OPS: dict[str, Callable[[Lambda, Tensor], Tensor]] = {
    # clamp / clip: one neuron per bound
    "clamp_both": lambda m, h: kinks(m, h, -0.3, 0.4).clamp(-0.3, 0.4),
    "torch_clamp_kwargs": lambda m, h: torch.clamp(kinks(m, h, -0.2, 0.5), min=-0.2, max=0.5),
    "clip_tensor_bounds": lambda m, h: torch.clip(kinks(m, h, m.lo, m.hi), m.lo, m.hi),
    "clip_method_min_only": lambda m, h: kinks(m, h, 0.1).clip(min=0.1),
    "clamp_max_only_tensor": lambda m, h: kinks(m, h, m.hi).clamp(max=m.hi),
    "clamp_min": lambda m, h: torch.clamp_min(kinks(m, h, 0.1), 0.1),
    "clamp_max_method": lambda m, h: kinks(m, h, 0.2).clamp_max(0.2),
    "clamp_in_place": lambda m, h: kinks(m, h * 1.0, -0.3, 0.3).clamp_(-0.3, 0.3),
    "clip_in_place": lambda m, h: kinks(m, h * 1.0, -0.1, 0.2).clip_(-0.1, 0.2),
    "clamp_min_in_place": lambda m, h: kinks(m, h * 1.0, 0.0).clamp_min_(0.0),
    "clamp_max_in_place": lambda m, h: torch.clamp_max_(kinks(m, h * 1.0, 0.1), 0.1),
    # hardtanh, relu6
    "hardtanh_default": lambda m, h: F.hardtanh(kinks(m, 3 * h, -1.0, 1.0)),
    "hardtanh_module_in_place": lambda m, h: nn.Hardtanh(-0.5, 0.7, inplace=True)(kinks(m, h * 1.0, -0.5, 0.7)),
    "hardtanh_functional_in_place": lambda m, h: F.hardtanh_(kinks(m, h * 1.0, -0.4, 0.3), -0.4, 0.3),
    "relu6_functional": lambda m, h: F.relu6(kinks(m, 8 * h, 0.0, 6.0)),
    "relu6_module": lambda m, h: nn.ReLU6()(kinks(m, 8 * h, 0.0, 6.0)),
    "relu6_in_place": lambda m, h: F.relu6(kinks(m, 8 * h, 0.0, 6.0), inplace=True),
    # abs
    "abs": lambda m, h: torch.abs(kinks(m, h - 0.1, 0.0)),
    "abs_method": lambda m, h: kinks(m, h, 0.0).abs(),
    "abs_builtin": lambda m, h: abs(kinks(m, h + 0.2, 0.0)),
    "absolute": lambda m, h: torch.absolute(kinks(m, h, 0.0)),
    "abs_in_place": lambda m, h: kinks(m, h * 1.0, 0.0).abs_(),
    # PReLU
    "prelu_module": lambda m, h: m.prelu(kinks(m, h, 0.0)),
    "prelu_single_weight": lambda m, h: m.prelu1(kinks(m, h, 0.0)),
    "prelu_functional": lambda m, h: F.prelu(kinks(m, h, 0.0), m.prelu.weight),
    "prelu_then_clamp": lambda m, h: kinks(m, m.prelu(kinks(m, h, 0.0)), -0.2, 0.3).clamp(-0.2, 0.3),
    # comparisons with a constant: a mask
    "mask_gt": lambda m, h: h * (kinks(m, h, 0.1) > 0.1),
    "mask_gt_reflected": lambda m, h: (neg(m, h, 0.2) < 0.2) * h,
    "mask_ge_tensor": lambda m, h: h * (neg(m, h, m.hi) >= m.hi),
    "mask_lt_float": lambda m, h: h * (neg(m, h, -0.1) < -0.1).float(),
    "mask_le_to": lambda m, h: h * torch.le(kinks(m, h, 0.05), 0.05).to(h.dtype),
    "mask_greater": lambda m, h: h * torch.greater(kinks(m, h, 0.0), 0.0),
    "mask_less_equal_method": lambda m, h: h * kinks(m, h, 0.3).less_equal(0.3).double(),
    "mask_greater_equal_constant_first": lambda m, h: h * torch.ge(m.hi, kinks(m, h, m.hi)),
    # comparisons of two input-dependent tensors: the difference is the neuron
    "mask_two_inputs": lambda m, h: h * (kinks(m, h, m.other()) > m.other()),
    "mask_two_inputs_ge": lambda m, h: torch.where(neg(m, h, m.other()) >= m.other(), h, m.other()),
    # using masks
    "where_both_affine": lambda m, h: torch.where(kinks(m, h, 0.0) > 0, h, 0.1 * h),
    "where_constant_side": lambda m, h: torch.where(neg(m, h, 0.2) < 0.2, h, 0.5),
    "where_constant_first": lambda m, h: torch.where(kinks(m, h, 0.1) > 0.1, m.hi, h),
    "where_method": lambda m, h: h.where(kinks(m, h, -0.2) > -0.2, -h),
    "where_constant_condition": lambda m, h: torch.where(m.hi > 0.3, F.relu(kinks(m, h, 0.0)), -h),
    "masked_fill": lambda m, h: h.masked_fill(neg(m, h, -0.1) < -0.1, 0.7),
    "masked_fill_torch": lambda m, h: torch.masked_fill(h, kinks(m, h, 0.2) > 0.2, -1.0),
    "masked_fill_in_place": lambda m, h: (h * 2).masked_fill_(kinks(m, h, 0.0) > 0, 0.0),
    "masked_fill_constant_mask": lambda m, h: F.relu(kinks(m, h, 0.0)).masked_fill(m.hi > 0.3, 0.0),
    "logic_and_not": lambda m, h: h * ((kinks(m, h, 0.0) > 0) & ~(kinks(m, h, 0.4) > 0.4)),
    "logic_or_xor": lambda m, h: h * ((kinks(m, h, 0.3) > 0.3) | (neg(m, h, -0.3) < -0.3)).float()
    + h * ((kinks(m, h, 0.0) > 0) ^ (m.hi > 0.3)).float(),
    "logic_functions": lambda m, h: h * torch.logical_and(
        kinks(m, h, 0.0) > 0, torch.logical_not(kinks(m, h, 0.25) > 0.25)
    ),
    "mask_arithmetic": lambda m, h: h * (1 - (kinks(m, h, 0.1) > 0.1).float()) + (kinks(m, h, 0.2) > 0.2).float() * 2
    - h * 0.5,
    "mask_divides": lambda m, h: h / (1 + (kinks(m, h, 0.0) > 0).double()),
    "mask_reshaped_and_flipped": lambda m, h: h
    * (kinks(m, h, 0.0) > 0).view(h.shape[0], 2, 3).flip(2).reshape(h.shape[0], 6),
    "mask_broadcast": lambda m, h: (h.unsqueeze(1) * (kinks(m, h, 0.1) > 0.1).unsqueeze(2)).sum(1),
    "mask_of_mask": lambda m, h: h * ((kinks(m, h, 0.0) > 0).float() > 0.5),
    "mask_in_place_product": lambda m, h: _imul(h * 1.0, kinks(m, h, 0.0) > 0),
    "mask_then_relu": lambda m, h: F.relu(kinks(m, h * (kinks(m, h, -0.2) > -0.2), 0.0)),
    "input_updated_in_place_after_relu": lambda m, h: _relu_then_update(m, h),
}


def _relu_then_update(m: Lambda, h: Tensor) -> Tensor:
    y = F.relu(kinks(m, h, 0.0))
    h += 1.0  # the reported neuron values are those the relu saw
    return y + h


def _imul(h: Tensor, mask: Tensor) -> Tensor:
    h *= mask
    return h


def make(name: str, seed: int = 0, **kw: int) -> Lambda:
    torch.manual_seed(seed)
    return Lambda(OPS[name], **kw).double().eval()


def inputs(n: int = 3, seed: int = 1, d: int = D) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------
# (1) values and gradients


@pytest.mark.parametrize("name", sorted(OPS))
def test_neuron_values_and_gradients_match_per_neuron_autograd(name: str) -> None:
    model = make(name)
    x = inputs()
    z, g = rollnet.neuron_gradients(model, x)
    z_ref, g_ref = autograd_gradients(model, x)
    assert z.shape == z_ref.shape and z.shape[1] > 0
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    # the output and its Jacobian too
    regions = rollnet.LinearRegions(model, x)
    # (per example: vmap(jacrev(...)) of F.prelu is wrong in torch 2.13)
    jac = torch.stack([
        torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), x[i]) for i in range(x.shape[0])
    ])
    torch.testing.assert_close(regions.jacobian(), jac, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(regions.output, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(OPS))
def test_activation_pattern_is_the_sign_of_every_recorded_neuron(name: str) -> None:
    model = make(name)
    x = inputs(n=4, seed=5)
    pats = rollnet.activation_pattern(model, x)
    ref = recorded_pattern(model, x)
    got = torch.cat([p.reshape(x.shape[0], -1) for p in pats.parts], 1) if pats.parts else ref
    assert torch.equal(got, ref)


def test_group_names_and_order() -> None:
    model = make("clamp_both")
    info = rollnet.LinearRegions(model, inputs()).neuron_info()
    assert [op for _, op, _ in info] == ["clamp.min", "clamp.max"]
    model = make("relu6_module")
    assert [op for _, op, _ in rollnet.LinearRegions(model, inputs()).neuron_info()] == ["hardtanh.min", "hardtanh.max"]
    model = make("relu6_functional")
    assert [op for _, op, _ in rollnet.LinearRegions(model, inputs()).neuron_info()] == ["relu6.min", "relu6.max"]
    for name, op in [("abs", "abs"), ("prelu_module", "prelu"), ("mask_gt", "gt"), ("mask_ge_tensor", "ge"),
                     ("mask_lt_float", "lt"), ("mask_le_to", "le")]:
        assert [o for _, o, _ in rollnet.LinearRegions(make(name), inputs()).neuron_info()] == [op], name


def test_a_conv_net_with_prelu_clamp_and_masks() -> None:
    class ConvNet(Recording):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv1d(2, 3, 3, padding=1)
            self.act = nn.PReLU(3, init=0.2)
            self.head = nn.Linear(3 * 5, 2)
            with torch.no_grad():
                self.act.weight.copy_(torch.tensor([0.2, -0.5, 1.5]))

        def forward(self, x: Tensor) -> Tensor:
            h = self.act(kinks(self, self.conv(x), 0.0))
            h = torch.clamp(kinks(self, h, -0.3, 0.6), -0.3, 0.6)
            h = torch.where(kinks(self, h, 0.05) > 0.05, h, -h)
            return self.head(F.relu6(kinks(self, 7 * h, 0.0, 6.0)).flatten(1))

    model = ConvNet().double()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    z, g = rollnet.neuron_gradients(model, x)
    z_ref, g_ref = autograd_gradients(model, x)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# (2) soundness and tightness


@pytest.mark.parametrize("p", [2.0, math.inf])
@pytest.mark.parametrize("name", sorted(OPS))
def test_certified_ball_is_sound_and_tight(name: str, p: float) -> None:
    """Inside the ball no kink changes side and the output is affine with the reported
    Jacobian; 0.1% beyond it along the closest neuron's worst direction, a kink changes side."""
    model = make(name, seed=3)
    x = inputs(n=2, seed=7)
    regions = rollnet.LinearRegions(model, x)
    radii = regions.margin(p)
    jac = regions.jacobian()  # [B, L, D]
    z_ref, g_ref = autograd_gradients(model, x)
    torch.testing.assert_close(radii, oracle_margin(z_ref, g_ref, p), rtol=1e-9, atol=0)
    gen = torch.Generator().manual_seed(11)
    for b in range(x.shape[0]):
        r = float(radii[b])
        if r == math.inf:
            continue
        assert r > 0
        base = recorded_pattern(model, x[b : b + 1])
        u = sample_ball(2000, (D,), p, gen, torch.float64)
        pts = x[b] + (1 - 1e-6) * r * u
        assert bool((recorded_pattern(model, pts) == base).all()), "a kink changed side inside the ball"
        with torch.no_grad():
            out = model(pts)
        torch.testing.assert_close(out, model(x[b : b + 1]).detach() + (pts - x[b]) @ jac[b].t(), rtol=1e-9, atol=1e-9)
        norms = g_ref[b].flatten(1).norm(p=dual(p), dim=1)
        ratio = torch.where(norms > 0, z_ref[b].abs() / norms, torch.full_like(norms, math.inf))
        j = int(ratio.argmin())
        ustar = worst_direction(g_ref[b, j], float(z_ref[b, j]), p)
        outside = recorded_pattern(model, (x[b] + (1 + 1e-3) * r * ustar).unsqueeze(0))
        assert not bool((outside == base).all()), "the point just outside kept every kink's side"


@pytest.mark.parametrize("name", ["clamp_both", "hardtanh_default", "abs", "prelu_module", "mask_ge_tensor",
                                  "mask_two_inputs_ge", "where_both_affine", "masked_fill", "logic_and_not"])
def test_directional_margin_and_stability_bounds_are_sound(name: str) -> None:
    model = make(name, seed=5)
    x = inputs(n=2, seed=2)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = rollnet.directional_margin(model, x, d)
    lower, upper = rollnet.stability_bounds(model, x)
    for b in range(x.shape[0]):
        base = recorded_pattern(model, x[b : b + 1])
        tb = float(t[b])
        assert tb > 0
        if tb == math.inf:  # every neuron moves away from its kink along d
            far = torch.linspace(0, 100, 50, dtype=torch.float64).unsqueeze(1)
            assert bool((recorded_pattern(model, x[b] + far * d[b]) == base).all())
            continue
        s = torch.linspace(0, 1 - 1e-6, 300, dtype=torch.float64).unsqueeze(1)
        assert bool((recorded_pattern(model, x[b] + s * tb * d[b]) == base).all())
        assert not bool((recorded_pattern(model, (x[b] + (1 + 1e-3) * tb * d[b]).unsqueeze(0)) == base).all())
        for k in range(D):
            e = torch.zeros(D, dtype=torch.float64)
            e[k] = 1.0
            for bound in (float(upper[b, k]), float(lower[b, k])):
                if math.isinf(bound):
                    continue
                inside = recorded_pattern(model, (x[b] + (1 - 1e-6) * bound * e).unsqueeze(0))
                outside = recorded_pattern(model, (x[b] + (1 + 1e-3) * bound * e).unsqueeze(0))
                assert bool((inside == base).all()) and not bool((outside == base).all())


# ---------------------------------------------------------------------------
# (3) ties at a kink

# (model of h = x itself, the coordinate that sits on a kink, its value there)
TIES: dict[str, tuple[Callable[[Lambda, Tensor], Tensor], float]] = {
    "clamp_lower": (lambda m, h: kinks(m, h, -0.3, 0.4).clamp(-0.3, 0.4), -0.3),
    "clamp_upper": (lambda m, h: kinks(m, h, -0.3, 0.4).clamp(-0.3, 0.4), 0.4),
    "clamp_min_only": (lambda m, h: kinks(m, h, 0.25).clamp(min=0.25), 0.25),
    "hardtanh_upper": (lambda m, h: F.hardtanh(kinks(m, h, -1.0, 1.0)), 1.0),
    "relu6_lower": (lambda m, h: F.relu6(kinks(m, h, 0.0, 6.0)), 0.0),
    "relu6_upper": (lambda m, h: nn.ReLU6()(kinks(m, h, 0.0, 6.0)), 6.0),
    "abs": (lambda m, h: torch.abs(kinks(m, h, 0.0)), 0.0),
    "prelu": (lambda m, h: m.prelu(kinks(m, h, 0.0)), 0.0),
    "gt": (lambda m, h: h * (kinks(m, h, 0.5) > 0.5), 0.5),
    "ge": (lambda m, h: h * (neg(m, h, 0.5) >= 0.5), 0.5),
    "lt": (lambda m, h: torch.where(neg(m, h, 0.5) < 0.5, h, 2 * h), 0.5),
    "le": (lambda m, h: h.masked_fill(kinks(m, h, 0.5) <= 0.5, 0.0), 0.5),
    "two_inputs": (lambda m, h: h * (kinks(m, h, h.flip(1)) > h.flip(1)), None),  # type: ignore[dict-item]
}


def _identity_model(fn: Callable[[Lambda, Tensor], Tensor]) -> Lambda:
    torch.manual_seed(0)
    model = Lambda(fn, d=W, w=W).double()
    with torch.no_grad():
        model.inp.weight.copy_(torch.eye(W))
        model.inp.bias.zero_()
    return model


@pytest.mark.parametrize("name", sorted(TIES))
def test_a_tie_at_a_kink_gives_margin_zero_and_consistent_one_sided_directions(name: str) -> None:
    fn, kink = TIES[name]
    model = _identity_model(fn)
    x = torch.tensor([[0.13, -0.71, 0.42, 0.9, -0.2, 0.05]] * 2, dtype=torch.float64)
    x[0, 2] = kink if kink is not None else 0.9  # two_inputs: x2 == x3 (h vs h.flip(1))
    for p in (1, 2, "inf"):
        r = rollnet.margin(model, x, p=p)
        assert float(r[0]) == 0.0 and float(r[1]) > 0.0, (p, r)
    regions = rollnet.LinearRegions(model, x)
    jac = regions.jacobian()[0]
    base = recorded_pattern(model, x[:1])
    e = torch.zeros(W, dtype=torch.float64)
    e[2] = 1.0
    zero_sides = 0
    for sign in (1.0, -1.0):
        t = float(rollnet.directional_margin(model, x[:1], sign * e)[0])
        if t == 0.0:
            zero_sides += 1
            # the pattern changes at once that way
            assert not bool((recorded_pattern(model, (x[0] + sign * 1e-9 * e).unsqueeze(0)) == base).all())
            continue
        # the other way the pattern holds, and the output follows the Jacobian reported at the tie
        s = torch.linspace(0, min(t, 1.0) * (1 - 1e-6), 50, dtype=torch.float64).unsqueeze(1)
        pts = x[0] + s * sign * e
        assert bool((recorded_pattern(model, pts) == base).all())
        with torch.no_grad():
            torch.testing.assert_close(model(pts), model(x[:1]) + (pts - x[0]) @ jac.t(), rtol=1e-12, atol=1e-12)
    # one side flips at once; comparing h with its own flip puts two neurons on the tie, one per side
    assert zero_sides == (2 if name == "two_inputs" else 1)


# ---------------------------------------------------------------------------
# (4) the ROLL term


def _oracle_terms(model: Lambda, x: Tensor, C: float, axes: Tensor | None = None) -> Tensor:
    """``[B, N]`` ||g_j||^2 + C relu(1 - |z_j|) by one backward per neuron (differentiable)."""
    x = x.detach().clone().requires_grad_(True)
    model.record = []
    try:
        model(x)
        z = torch.cat([r.reshape(x.shape[0], -1) for r in model.record], dim=1)
    finally:
        model.record = None
    squared = []
    for j in range(z.shape[1]):
        (g,) = torch.autograd.grad(z[:, j].sum(), x, create_graph=True)
        g = g.flatten(1)
        if axes is None:
            squared.append(g.square().sum(1))
        else:  # the sampled axes estimator: D/k sum over the k sampled axes of each example
            picked = g.gather(1, axes.t())
            squared.append(picked.square().sum(1) * g.shape[1] / axes.shape[0])
    return torch.stack(squared, 1) + C * torch.relu(1 - z.abs())


ROLL_CASES = ["clamp_both", "clip_tensor_bounds", "hardtanh_module_in_place", "relu6_functional", "abs",
              "prelu_module", "prelu_then_clamp", "mask_gt", "mask_two_inputs", "where_both_affine", "masked_fill", "logic_and_not",
              "mask_lt_float"]


@pytest.mark.parametrize("approx", [None, 3])
@pytest.mark.parametrize("name", ROLL_CASES)
def test_roll_term_and_its_parameter_gradients_match_a_per_neuron_computation(name: str, approx: int | None) -> None:
    model = make(name, seed=2)
    x = inputs(n=4, seed=3)
    C, lam = 0.7, 1.5
    gen = torch.Generator().manual_seed(5) if approx else None
    roll = rollnet.ROLLLoss(lam=lam, C=C, approx=approx, generator=gen)
    axes = None
    if approx:
        axes = torch.randint(0, D, (approx, x.shape[0]), generator=torch.Generator().manual_seed(5))
    params = [p for p in model.parameters() if p.requires_grad]
    got = roll(model, x)
    grads = torch.autograd.grad(got, params, allow_unused=True)
    ref = lam * _oracle_terms(model, x, C, axes).mean(1).mean()
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert a is None or bool((a == 0).all())
            continue
        assert a is not None
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    if name == "prelu_then_clamp":  # the learned slope gets the gradient of the later squared norms
        slope = grads[next(i for i, p in enumerate(params) if p is model.prelu.weight)]
        assert slope is not None and bool((slope != 0).any())


GRAM_OPS: dict[str, Callable[[Lambda, Tensor], Tensor]] = {
    "clamp": lambda m, h: h.clamp(-0.3, 0.4),
    "clip_tensor_bounds": lambda m, h: torch.clip(h, m.lo, m.hi),
    "hardtanh": lambda m, h: F.hardtanh(h, -0.5, 0.5),
    "relu6_module": lambda m, h: nn.ReLU6()(h),
    "abs": lambda m, h: h.abs(),
    "prelu_then_clamp": lambda m, h: m.prelu(h).clamp(-0.2, 0.3),
    "mask_gt": lambda m, h: h * (h > 0.1),
    "where_constant_side": lambda m, h: torch.where(h < 0.2, h, 0.5),
    "masked_fill": lambda m, h: h.masked_fill(h < -0.1, 0.7),
    "logic_and_not": lambda m, h: h * ((h > 0) & ~(h > 0.4)),
    "mask_reshaped_and_flipped": lambda m, h: h * (h > 0).view(h.shape[0], 2, 3).flip(2).reshape(h.shape[0], 6),
}


@pytest.mark.parametrize("name", sorted(GRAM_OPS))
def test_the_gram_recursion_agrees_with_gradient_rows(name: str) -> None:
    """Wide inputs, narrow layers: the Gram path handles these ops and gives the rows' norms."""
    torch.manual_seed(0)
    model = Lambda(GRAM_OPS[name], d=32).double()
    x = inputs(n=3, d=32)
    req = Request(norms=(2.0,), squared_l2=True)
    gram = collect(model, x, unit_directions(x.shape[1:]), req, method="gram")
    rows = collect(model, x, unit_directions(x.shape[1:]), req, method="rows")
    assert gram.squared_l2 is not None and rows.squared_l2 is not None
    torch.testing.assert_close(gram.squared_l2, rows.squared_l2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gram.values, rows.values, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# tracked clamp bounds are max / min units


def test_a_clamp_bound_that_depends_on_the_input_is_a_max_unit() -> None:
    class Clamped(Recording):
        def __init__(self, both: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.head = nn.Linear(D, W), nn.Linear(D, W), nn.Linear(W, 2)
            self.both = both

        def forward(self, x: Tensor) -> Tensor:
            h, m = self.a(x), self.b(x)
            if recording(self):  # the max (min) unit's neuron is |h - m|
                self.rec((h - m).abs())
                if self.both:
                    self.rec(torch.maximum(h, m) - 0.5)
            if self.both:  # min = m (a max unit), max = 0.5 (a constant kink)
                return self.head(torch.clamp(h, min=m, max=torch.tensor(0.5, dtype=h.dtype)))
            return self.head(h.clamp(max=m))

    for both in (False, True):
        model = Clamped(both).double()
        x = inputs(n=3, seed=4)
        z, g = rollnet.neuron_gradients(model, x)
        z_ref, g_ref = autograd_gradients(model, x)
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
        ops = [op for _, op, _ in rollnet.LinearRegions(model, x).neuron_info()]
        assert ops == (["maximum", "clamp.max"] if both else ["minimum"])


def test_a_model_whose_output_is_a_mask_has_a_zero_jacobian() -> None:
    model = nn.Sequential(nn.Linear(D, 3)).double()
    net = nn.Sequential(model, _Fn(lambda h: (h > 0).double()))
    x = inputs()
    regions = rollnet.LinearRegions(net, x)
    assert regions.num_neurons == 3
    assert torch.equal(regions.jacobian(), torch.zeros(3, 3, D, dtype=torch.float64))
    assert torch.equal(regions.output, (model(x) > 0).double())


# ---------------------------------------------------------------------------
# (5) refusals: masks across examples, unknown readers of masks, non-piecewise comparisons


class _Fn(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _net(fn: Callable[[Tensor], Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, W), _Fn(fn), nn.Linear(W, 3)).double()


_PERM = torch.tensor([2, 0, 1, 4, 3])

ACROSS_EXAMPLES: dict[str, Callable[[Tensor], Tensor]] = {
    "flip": lambda h: h * (h > 0).flip(0),
    "roll": lambda h: h * torch.roll(h > 0, 1, 0),
    "permuted": lambda h: h * (h > 0)[_PERM],
    "first_example": lambda h: h * (h > 0)[0:1],
    "where_flipped": lambda h: torch.where((h > 0).flip(0), h, 0.0),
    "masked_fill_rolled": lambda h: h.masked_fill((h < 0).roll(1, 0), 0.0),
    "float_flipped": lambda h: h * (h > 0).float().flip(0),
    "logic_across": lambda h: h * ((h > 0) & (h > 0).flip(0)),
    "any_over_batch": lambda h: h * (h > 0).any(0),
    "sum_over_batch": lambda h: h * (h > 0).sum(0),
    "cat_rotated": lambda h: h * torch.cat([(h > 0)[1:], (h > 0)[:1]]),
    "transposed_reshape": lambda h: h * (h > 0).t().reshape(h.shape[0], -1),
}


@pytest.mark.parametrize("name", sorted(ACROSS_EXAMPLES))
def test_a_mask_used_across_examples_is_refused(name: str) -> None:
    model = _net(ACROSS_EXAMPLES[name])
    x = inputs(n=5)
    for run in (lambda: rollnet.margin(model, x), lambda: rollnet.activation_pattern(model, x),
                lambda: rollnet.ROLLLoss(lam=1.0, C=1.0)(model, x),
                lambda: rollnet.ROLLLoss(lam=1.0, C=1.0, approx=2)(model, x)):
        with pytest.raises(rollnet.UnsupportedOperationError, match=r"mixes the examples|examples along"):
            run()


UNKNOWN_READERS: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "all": (lambda h: h * (h > 0).all(1, keepdim=True), "Tensor.all"),
    "control_flow": (lambda h: h if bool((h > 0)[:, 0]) else -h, "Tensor.__bool__"),
    "item": (lambda h: h * float((h > 0).double()[:, 0].item()), "Tensor.item"),
    "boolean_index": (lambda h: h[h > 0].reshape(h.shape[0], -1), "Tensor.__getitem__"),
    "nonzero": (lambda h: h * (h > 0).nonzero().shape[0], "Tensor.nonzero"),
    "matmul": (lambda h: h * ((h > 0).double() @ torch.ones(W, W, dtype=h.dtype)), "Tensor.matmul"),
    "maximum_with_mask": (lambda h: torch.maximum(h, (h > 0).double()), "torch.maximum"),
    "setitem": (lambda h: _setitem(h), "Tensor.__setitem__"),
    "integer_mask_reshaped": (lambda h: h * (h > 0).long().flip(1), "Tensor.flip"),
    "equality_of_values": (lambda h: h * (h == 0.5), "Tensor.__eq__"),
    "logic_on_values": (lambda h: h * (h.bool() & (h > 0)), "Tensor.bool"),
    "product_of_two_tracked_after_a_mask": (lambda h: h * torch.cat([h > 0, h[:, :0] > 0], 1).double() * h, "Tensor.mul"),
    "mask_in_place_product_into_mask": (lambda h: _imul_mask(h), "Tensor.mul_"),
    "in_place_clamp_to_tracked_bound": (lambda h: (h * 1.0).clamp_(min=h.flip(1)), "Tensor.clamp_"),
    "hardtanh_bounds_tracked": (lambda h: F.hardtanh(h, h.flip(1), 1.0), "torch.nn.functional.hardtanh"),
}


def _setitem(h: Tensor) -> Tensor:
    buf = torch.zeros_like(h)
    buf[h > 0] = 1.0
    return h * buf


def _imul_mask(h: Tensor) -> Tensor:
    m = (h > 0).double()
    m *= h
    return m


@pytest.mark.parametrize("name", sorted(UNKNOWN_READERS))
def test_an_unknown_reader_of_a_mask_is_refused_naming_the_op(name: str) -> None:
    fn, op = UNKNOWN_READERS[name]
    model = _net(fn)
    with pytest.raises((rollnet.UnsupportedOperationError, TypeError, RuntimeError)) as err:
        rollnet.margin(model, inputs(n=5))
    assert isinstance(err.value, rollnet.UnsupportedOperationError), err.value
    assert err.value.op == op, err.value


def test_masks_keep_each_example_to_itself() -> None:
    """Change example 1: example 0's neurons, gradients, output and Jacobian stay bit for bit."""
    for name in ("mask_reshaped_and_flipped", "mask_broadcast", "logic_or_xor", "where_both_affine",
                 "mask_two_inputs", "clip_tensor_bounds", "prelu_module"):
        model = make(name)
        x = inputs(n=4)
        req = Request(rows=True, output=True)
        before = collect(model, x, unit_directions(x.shape[1:]), req, method="rows")
        moved = x.clone()
        moved[1] = torch.randn(D, dtype=torch.float64) * 3
        after = collect(model, moved, unit_directions(x.shape[1:]), req, method="rows")
        for got, ref in [(after.values, before.values), (after.rows, before.rows),
                         (after.output, before.output), (after.output_rows, before.output_rows)]:
            assert got is not None and ref is not None
            assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]), name


def test_a_mask_updated_in_place_after_its_product_does_not_change_the_product() -> None:
    class Later(nn.Module):
        def __init__(self, in_place: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(D, W), nn.Linear(W, 2)
            self.in_place = in_place

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            m = (h > 0).double()
            y = h * m
            if self.in_place:
                m += 1
            else:
                m = m + 1
            return self.b(F.relu(y - 0.1) + m)

    x = inputs()
    got, ref = rollnet.LinearRegions(Later(True).double(), x), rollnet.LinearRegions(Later(False).double(), x)
    torch.testing.assert_close(got.jacobian(), ref.jacobian(), rtol=0, atol=0)
    torch.testing.assert_close(got.margin(), ref.margin(), rtol=0, atol=0)


def test_a_pass_without_directions_and_float32() -> None:
    model = make("logic_or_xor").float()
    x = inputs().float()
    r = rollnet.margin(model, x)
    r64 = rollnet.margin(make("logic_or_xor"), inputs())
    torch.testing.assert_close(r.double(), r64, rtol=1e-5, atol=1e-7)
    assert len(rollnet.activation_pattern(model, x)) == 3


# ---------------------------------------------------------------------------
# random nets mixing the ops


_BLOCKS: dict[str, Callable[[Lambda, Tensor], Tensor]] = {
    "clamp": lambda m, h: kinks(m, h, -0.4, 0.3).clamp(-0.4, 0.3),
    "hardtanh": lambda m, h: F.hardtanh(kinks(m, h, -1.0, 1.0)),
    "relu6": lambda m, h: F.relu6(kinks(m, 4 * h, 0.0, 6.0)),
    "abs": lambda m, h: kinks(m, h, 0.0).abs(),
    "prelu": lambda m, h: m.prelu(kinks(m, h, 0.0)),
    "mask": lambda m, h: h * (kinks(m, h, 0.2) > 0.2),
    "where": lambda m, h: torch.where(neg(m, h, 0.1) >= 0.1, h, -0.5 * h),
    "masked_fill": lambda m, h: h.masked_fill(kinks(m, h, -0.3) <= -0.3, 0.2),
    "relu": lambda m, h: F.relu(kinks(m, h, 0.0)),
}


class Mixed(Recording):
    def __init__(self, blocks: list[str], d: int, w: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, w)
        self.mids = nn.ModuleList(nn.Linear(w, w) for _ in blocks)
        self.head = nn.Linear(w, 2)
        self.prelu = nn.PReLU(w, init=0.1)
        self.blocks = blocks

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for name, lin in zip(self.blocks, self.mids, strict=True):
            h = lin(_BLOCKS[name](self, h))  # type: ignore[arg-type]
        return self.head(h)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(sorted(_BLOCKS)), min_size=1, max_size=3),
    d=st.integers(1, 5),
    w=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    p=st.sampled_from([1.0, 2.0, math.inf]),
)
def test_random_nets_mixing_the_ops_are_exact_and_sound(blocks: list[str], d: int, w: int, seed: int, p: float) -> None:
    torch.manual_seed(seed)
    model = Mixed(blocks, d, w).double()
    x = torch.randn(3, d, dtype=torch.float64)
    z_ref, g_ref = autograd_gradients(model, x)
    z, g = rollnet.neuron_gradients(model, x)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    radii = rollnet.margin(model, x, p=p)
    torch.testing.assert_close(radii, oracle_margin(z_ref, g_ref, p), rtol=1e-9, atol=0)
    gen = torch.Generator().manual_seed(seed)
    for b in range(3):
        r = float(radii[b])
        if not 0 < r < math.inf:
            continue
        base = recorded_neurons(model, x[b : b + 1]) > 0
        u = sample_ball(500, (d,), p, gen, torch.float64)
        assert bool((recorded_pattern(model, x[b] + (1 - 1e-6) * r * u) == base).all())
