"""gradient_distortion and max_gradient_distortion: hand-computed nets, certified balls, the ball and box."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import rollnet
from rollnet.evaluate import (
    WorstCase,
    default_explanation,
    gradient_distortion,
    max_gradient_distortion,
)
from rollnet.evaluate.ball import Ball
from rollnet.models import MLP, resnet18

NORMS = [1, 2, "inf"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kinked() -> nn.Module:
    """f(x) = relu(x) + 2 relu(x - 1) on one input: gradient 0 (x < 0), 1 (0 < x < 1), 3 (x > 1)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
        net[2].bias.zero_()
    return net


def mlp(seed: int = 0, d: int = 6, slope: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    act = "leaky_relu" if slope else "relu"
    return MLP((d,), 3, hidden=(16, 16), act=act, negative_slope=slope or 0.01).eval()


def inside(ball_x: Tensor, pts: Tensor, eps: float, p: float | str, clamp: tuple[float, float] | None) -> None:
    """Every point within the ball (exact float64 difference) and the box (tolerance 0)."""
    d = pts.double() - ball_x.double()
    q = math.inf if p == "inf" else float(p)
    norm = d.flatten(1).norm(p=q, dim=1)
    assert bool((norm <= eps).all()), (norm.max().item(), eps)
    if clamp is not None:
        assert bool((pts >= clamp[0]).all()) and bool((pts <= clamp[1]).all())


# ---------------------------------------------------------------------------
# hand-computed values


@pytest.mark.parametrize("p", NORMS)
def test_kinked_expected_by_hand(p: int | str) -> None:
    # x = 0.5, eps = 0.75: uniform on [-0.25, 1.25]; a quarter of its length of 1.5 on each side of [0, 1],
    # gradient distance 1 on the left and 2 on the right: (0.25 * 1 + 0.25 * 2) / 1.5 = 0.5 (any p in 1-D)
    d = gradient_distortion(kinked(), torch.tensor([[0.5]]), None, 0.75, p=p, n_samples=20000, generator=gen())
    assert d.shape == (1,)
    assert abs(float(d[0]) - 0.5) < 0.03


def test_kinked_with_box_by_hand() -> None:
    # clamp (0, 1.5), x = 0.2, eps = 1: uniform on [0, 1.2]; gradient 3 on (1, 1.2]: 2 * (0.2 / 1.2) = 1/3
    d = gradient_distortion(kinked(), torch.tensor([[0.2]]), None, 1.0, n_samples=20000, clamp=(0.0, 1.5),
                            generator=gen())
    assert abs(float(d[0]) - 1 / 3) < 0.03


@pytest.mark.parametrize("method", ["genetic", "surrogate"])
def test_kinked_worst_case_by_hand(method: str) -> None:
    # the largest gradient distance from x = 0.5 is 2 (points beyond 1), reachable with eps = 0.75
    net = kinked()
    w = max_gradient_distortion(net, torch.tensor([[0.5]]), None, 0.75, method=method, budget=200,
                                population=40, generations=4, chains=4, generator=gen())
    assert float(w.distortion[0]) == 2.0
    assert float(w.x[0, 0]) > 1.0
    assert not bool(w.label_changed[0])  # a single output: its sign, positive at both points


def test_l2_and_l1_in_two_dimensions_by_hand() -> None:
    # f = relu(x1): gradient changes where x1' < 0; x = (0.1, 0), radius 0.2
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        net[0].bias.zero_()
    x = torch.tensor([[0.1, 0.0]], dtype=torch.float64)
    net = net.double()
    # l2: the circular segment beyond the chord at distance 0.1: (r^2 acos(d/r) - d sqrt(r^2 - d^2)) / (pi r^2)
    r, dd = 0.2, 0.1
    seg = (r * r * math.acos(dd / r) - dd * math.sqrt(r * r - dd * dd)) / (math.pi * r * r)
    d2 = gradient_distortion(net, x, None, r, p=2, n_samples=40000, generator=gen())
    assert abs(float(d2[0]) - seg) < 0.01
    # l1: the triangle beyond x1 = -0.1 in the diamond |d1| + |d2| <= 0.2: area 0.01 of 0.08
    d1 = gradient_distortion(net, x, None, r, p=1, n_samples=40000, generator=gen())
    assert abs(float(d1[0]) - 0.125) < 0.01


def test_l2_box_draw_is_uniform_on_the_intersection() -> None:
    # f = 3 relu(x2 - 0.1): distance 3 where x2' > 0.1.  x = (0.1, 0) sits on the face x2 = 0 of [0, 1]^2 and
    # near the face x1 = 0: the oracle draws the square around x uniformly and keeps disk-and-box points
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0]]))
        net[0].bias.fill_(-0.1)
        net[2].weight.fill_(3.0)
        net[2].bias.zero_()
    x = torch.tensor([[0.1, 0.0]], dtype=torch.float64)
    r = 0.2
    u = (torch.rand(400000, 2, generator=gen(1), dtype=torch.float64) * 2 - 1) * r + x
    keep = ((u - x).norm(dim=1) <= r) & (u >= 0).all(1) & (u <= 1).all(1)
    expected = 3 * float((u[keep, 1] > 0.1).double().mean())
    got = gradient_distortion(net, x, None, r, p=2, n_samples=40000, clamp=(0.0, 1.0), generator=gen())
    assert abs(float(got[0]) - expected) < 0.03
    assert abs(expected - 3 * 0.25) > 0.1  # the box matters: a plain half-disk fraction would differ


# ---------------------------------------------------------------------------
# certified balls


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("model", ["mlp", "leaky", "resnet"])
def test_zero_inside_certified_linf_radius(p: int | str, model: str) -> None:
    torch.manual_seed(3)
    if model == "resnet":
        net: nn.Module = resnet18(in_channels=1, num_classes=4, width=2).eval()
        x = torch.rand(2, 1, 8, 8)
    else:
        net = mlp(1, slope=0.1 if model == "leaky" else 0.0)
        x = torch.randn(3, 6)
    r = rollnet.margin(net, x, p="inf")
    eps = 0.9 * float(r.min())
    assert eps > 0
    d = gradient_distortion(net, x, 0, eps, p=p, n_samples=200, generator=gen())
    assert d.tolist() == [0.0] * x.shape[0]
    # a ball well past the margin crosses boundaries: positive
    # (the lp ball of radius r D^(1/p) holds the l_inf ball of radius r)
    far = 5 * float(r.max()) * x[0].numel() ** (1 / (math.inf if p == "inf" else p))
    big = gradient_distortion(net, x, 0, far, p=p, n_samples=200, generator=gen())
    assert bool((big > 0).all())


def test_zero_inside_certified_radius_with_box_and_target_list() -> None:
    net = mlp(2)
    x = torch.rand(3, 6) * 0.5 + 0.25
    eps = 0.5 * float(rollnet.margin(net, x, p="inf").min())
    d = gradient_distortion(net, x, [0, 2, 1], eps, n_samples=100, clamp=(0.0, 1.0), generator=gen())
    assert d.tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------
# the ball and box


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
@pytest.mark.parametrize("method", ["genetic", "surrogate"])
def test_searches_stay_in_ball_and_box(p: int | str, clamp: tuple[float, float] | None, method: str) -> None:
    net = mlp(4, d=8)
    x = torch.rand(3, 8)
    x[:, :2] = 0.0  # on the box's faces
    x[:, 2] = 1.0
    x[0, 3] = 1e-3  # close to a face
    eps = 0.3
    w = max_gradient_distortion(net, x, 1, eps, method=method, p=p, clamp=clamp, population=60, generations=5,
                                chains=8, budget=300, step_size=0.5, generator=gen())
    assert w.x.shape == x.shape and w.x.dtype == x.dtype
    inside(x, w.x, eps, p, clamp)
    assert bool((w.distortion >= 0).all())
    assert bool((w.distortion > 0).any())


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_sampler_and_projection_exact(p: int | str, clamp: tuple[float, float] | None) -> None:
    x = torch.rand(4, 30)
    x[:, :5] = 0.0
    x[:, 5:8] = 1.0
    q = math.inf if p == "inf" else float(p)
    box = None if clamp is None else (torch.zeros_like(x), torch.ones_like(x))
    eps = 0.37
    ball = Ball(x, eps, q, box)
    pts = ball.sample(500, gen())
    for i in range(x.shape[0]):
        inside(x[i : i + 1].expand(500, -1), pts[i], eps, p, clamp)
    far = x.unsqueeze(1) + torch.randn(4, 50, 30, generator=gen(2)) * 3
    proj = ball.project(far)
    for i in range(x.shape[0]):
        inside(x[i : i + 1].expand(50, -1), proj[i], eps, p, clamp)
    assert torch.equal(ball.project(pts), pts)  # points already inside are unchanged


def test_linf_draw_is_uniform_per_coordinate() -> None:
    x = torch.tensor([[0.05, 0.5, 0.99]])
    pts = Ball(x, 0.1, math.inf, (torch.zeros_like(x), torch.ones_like(x))).sample(40000, gen())[0]
    lo = torch.tensor([0.0, 0.4, 0.89])
    hi = torch.tensor([0.15, 0.6, 1.0])
    assert torch.allclose(pts.mean(0), (lo + hi) / 2, atol=3e-3)
    assert torch.allclose(pts.var(0), (hi - lo) ** 2 / 12, rtol=0.05)


def test_rejection_sampling_refuses_thin_intersection() -> None:
    net = mlp(0, d=60)
    x = torch.full((1, 60), 1e-3)  # every coordinate 1e-3 above the box's face: almost every draw leaves it
    with pytest.raises(ValueError, match="outside the clamp box"):
        gradient_distortion(net, x, 0, 1.0, p=2, n_samples=10, clamp=(0.0, 1.0), generator=gen())


# ---------------------------------------------------------------------------
# the searches


@pytest.mark.parametrize("method", ["genetic", "surrogate"])
def test_worst_case_at_least_sampled_mean(method: str) -> None:
    net = mlp(5, d=10)
    x = torch.randn(4, 10)
    eps = 0.5
    mean = gradient_distortion(net, x, 0, eps, n_samples=300, generator=gen())
    w = max_gradient_distortion(net, x, 0, eps, method=method, budget=600, population=100, generations=10,
                                chains=10, generator=gen())
    assert bool((mean > 0).all())
    assert bool((w.distortion >= mean).all()), (w.distortion, mean)


@pytest.mark.parametrize("method", ["genetic", "surrogate"])
def test_seeded_reproducibility(method: str) -> None:
    net = mlp(6)
    x = torch.randn(3, 6)
    a = max_gradient_distortion(net, x, 2, 0.4, method=method, budget=200, population=40, generations=5, chains=5,
                                generator=gen(7))
    b = max_gradient_distortion(net, x, 2, 0.4, method=method, budget=200, population=40, generations=5, chains=5,
                                generator=gen(7))
    assert torch.equal(a.distortion, b.distortion) and torch.equal(a.x, b.x)
    m1 = gradient_distortion(net, x, 2, 0.4, n_samples=50, generator=gen(7))
    m2 = gradient_distortion(net, x, 2, 0.4, n_samples=50, generator=gen(7))
    assert torch.equal(m1, m2)
    m3 = gradient_distortion(net, x, 2, 0.4, n_samples=50, generator=gen(8))
    assert not torch.equal(m1, m3)


def test_distortion_and_point_agree_and_label_changed_direct() -> None:
    net = mlp(7)
    x = torch.randn(6, 6)
    w = max_gradient_distortion(net, x, 0, 2.0, budget=400, population=80, generations=6, generator=gen())
    direct = (default_explanation(net, w.x, 0) - default_explanation(net, x, 0)).abs().sum(1)
    assert torch.equal(w.distortion, direct)
    with torch.no_grad():
        assert torch.equal(w.label_changed, net(w.x).argmax(1) != net(x).argmax(1))
    assert w.label_changed.dtype == torch.bool and w.label_changed.shape == (6,)


def test_label_changed_can_be_true() -> None:
    # logits (relu(x), relu(-x)): crossing 0 changes the gradient of logit 0 and the label
    relu_net = nn.Sequential(nn.Linear(1, 2), nn.ReLU())
    with torch.no_grad():
        relu_net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        relu_net[0].bias.zero_()
    w = max_gradient_distortion(relu_net, torch.tensor([[0.1]]), 0, 0.5, population=30, generations=3,
                                generator=gen())
    assert float(w.x[0, 0]) < 0 and bool(w.label_changed[0])


class Counting:
    """A custom explanation (gradient times input) that counts the points it is asked about."""

    def __init__(self) -> None:
        self.points = 0

    def __call__(self, model: nn.Module, inputs: Tensor, target: Tensor | None) -> Tensor:
        self.points += inputs.shape[0]
        return default_explanation(model, inputs, target) * inputs


@pytest.mark.parametrize("method", ["genetic", "surrogate"])
def test_evaluations_counted(method: str) -> None:
    net = mlp(8)
    x = torch.randn(2, 6)
    count = Counting()
    w = max_gradient_distortion(net, x, 1, 0.5, method=method, explain=count, population=40, generations=3,
                                keep=0.25, chains=6, steps=5, generator=gen())
    expected = 40 + 3 * 30 if method == "genetic" else 3 * 6 * 5  # a surrogate step counts 2, its exact score 1
    assert w.evaluations == expected
    asked = expected if method == "genetic" else 2 * 6 * 5  # the surrogate's explanation is asked once per step
    assert count.points == 2 * (asked + 1)  # + the explanation at x, per example
    cut = Counting()
    w = max_gradient_distortion(net, x, 1, 0.5, method=method, explain=cut, budget=77, population=40,
                                generations=30, chains=6, generator=gen())
    assert w.evaluations <= 77
    if method == "genetic":
        assert w.evaluations == 77 and cut.points == 2 * (77 + 1)
    else:
        assert w.evaluations == 3 * 6 * (77 // 18) and cut.points == 2 * (2 * 6 * (77 // 18) + 1)


def test_custom_explain_matches_manual_computation() -> None:
    net = mlp(9)
    x = torch.randn(3, 6)
    eps, n = 0.3, 64

    def grad_times_input(model: nn.Module, inputs: Tensor, target: Tensor | None) -> Tensor:
        return default_explanation(model, inputs, target) * inputs

    got = gradient_distortion(net, x, 1, eps, n_samples=n, explain=grad_times_input, generator=gen(3),
                              memory_budget=1 << 30)
    pts = Ball(x, eps, math.inf, None).sample(n, gen(3))
    ref = grad_times_input(net, x, torch.ones(3, dtype=torch.int64))
    manual = torch.stack([
        (grad_times_input(net, pts[i], torch.ones(n, dtype=torch.int64)) - ref[i]).abs().sum(1).double().mean()
        for i in range(3)
    ]).float()
    assert torch.allclose(got, manual, rtol=1e-5)
    plain = gradient_distortion(net, x, 1, eps, n_samples=n, generator=gen(3), memory_budget=1 << 30)
    assert not torch.allclose(got, plain)


class Scaled(nn.Module):
    """model(x, scale) = mlp(x) * scale, a per-example additional argument."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(10)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.net(x) * scale[:, None]


def test_additional_forward_args_per_example() -> None:
    model = Scaled().eval()
    x = torch.randn(3, 6)
    scale = torch.tensor([1.0, 2.0, 3.0])
    got = gradient_distortion(model, x, 0, 1.0, n_samples=100, generator=gen(), additional_forward_args=scale,
                              memory_budget=2000)
    alone = torch.stack([
        gradient_distortion(model.net, x[i : i + 1], 0, 1.0, n_samples=100, generator=gen()) for i in range(3)
    ]).flatten()
    assert float(alone.min()) > 0
    # the distortion of s * f is s times that of f; the draws differ (one batch vs one example), so compare loosely
    assert torch.allclose(got / scale, alone, rtol=0.35)
    w = max_gradient_distortion(model, x, 0, 1.0, method="surrogate", budget=60, chains=3,
                                additional_forward_args=scale, generator=gen())
    direct = (default_explanation(lambda inp: model(inp, scale), w.x, 0)  # type: ignore[arg-type]
              - default_explanation(lambda inp: model(inp, scale), x, 0)).abs().sum(1)  # type: ignore[arg-type]
    assert torch.allclose(w.distortion, direct)


# ---------------------------------------------------------------------------
# modes, model untouched, errors


def test_modes_restored_and_explanation_in_eval_mode() -> None:
    torch.manual_seed(11)
    net = MLP((6,), 3, hidden=(16, 16), dropout=0.5).train()
    net.layers[1].eval()  # a mixed set of flags
    flags = [m.training for m in net.modules()]
    x = torch.randn(2, 6)
    with torch.no_grad():
        net.eval()
        eps = 0.5 * float(rollnet.margin(net, x, p="inf").min())
        net.train()
        net.layers[1].eval()
    d = gradient_distortion(net, x, 0, eps, n_samples=50, generator=gen())
    assert d.tolist() == [0.0, 0.0]  # dropout active would make the gradients differ
    assert [m.training for m in net.modules()] == flags
    for method in ("genetic", "surrogate"):
        max_gradient_distortion(net, x, 0, eps, method=method, budget=40, population=10, chains=2,
                                generator=gen())
        assert [m.training for m in net.modules()] == flags


def test_surrogate_leaves_model_untouched() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.LeakyReLU(0.2),
                        nn.Linear(8, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mods = [type(m) for m in net.modules()]
    x = torch.randn(2, 6)
    w = max_gradient_distortion(net, x, 0, 1.0, method="surrogate", budget=80, chains=4, generator=gen())
    assert bool((w.distortion > 0).all())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [type(m) for m in net.modules()] == mods
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(net(x), net(x.clone()))


def test_surrogate_needs_something_to_smooth() -> None:
    with pytest.raises(ValueError, match="ReLU and LeakyReLU"):
        max_gradient_distortion(nn.Linear(3, 2), torch.randn(1, 3), 0, 0.1, method="surrogate", budget=10,
                                chains=2)

    def detached(model: nn.Module, inputs: Tensor, target: Tensor | None) -> Tensor:
        return default_explanation(model, inputs.detach(), target)

    with pytest.raises(ValueError, match="differentiate"):
        max_gradient_distortion(mlp(0), torch.randn(1, 6), 0, 0.1, method="surrogate", budget=10, chains=2,
                                explain=detached)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": -0.1}, ValueError, "eps must be finite and >= 0"),
        ({"eps": float("nan")}, ValueError, "eps must be finite"),
        ({"eps": "big"}, TypeError, "eps must be a number"),
        ({"p": 3}, ValueError, "p must be 1, 2 or inf"),
        ({"p": "two"}, ValueError, "p must be 1, 2 or inf"),
        ({"clamp": (1.0, 0.0)}, ValueError, "lo < hi"),
        ({"clamp": (0.0,)}, ValueError, "pair"),
        ({"clamp": (0.5, 1.0)}, ValueError, "outside the clamp box"),
        ({"clamp": (torch.zeros(5), 1.0)}, ValueError, "does not broadcast"),
        ({"target": 3}, ValueError, "target indices must lie in"),
        ({"target": [0, 1]}, ValueError, "one entry per example"),
        ({"target": None}, ValueError, "target is required"),
        ({"explain": 3}, TypeError, "explain must be a callable"),
        ({"n_samples": 0}, ValueError, "n_samples must be an int >= 1"),
        ({"x": torch.zeros(6)}, ValueError, "batched"),
        ({"memory_budget": 0}, ValueError, "memory_budget"),
    ],
)
def test_bad_inputs_distortion(kwargs: dict, error: type, match: str) -> None:
    args = {"model": mlp(0), "x": torch.rand(3, 6) * 0.2 + 0.1, "target": 0, "eps": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        gradient_distortion(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "random"}, "method must be one of"),
        ({"budget": 0}, "budget must be an int >= 1"),
        ({"population": 0}, "population must be"),
        ({"keep": 0.0}, "keep must be a fraction"),
        ({"keep": 1.5}, "keep must be a fraction"),
        ({"step_size": -1.0}, "step_size must be"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"p": 0}, "p must be"),
        ({"target": -1}, "target indices"),
    ],
)
def test_bad_inputs_search(kwargs: dict, match: str) -> None:
    args = {"model": mlp(0), "x": torch.randn(2, 6), "target": 0, "eps": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        max_gradient_distortion(**args)


def test_bad_explanation_shape() -> None:
    with pytest.raises(ValueError, match="one attribution per input"):
        gradient_distortion(mlp(0), torch.randn(2, 6), 0, 0.1, n_samples=5,
                            explain=lambda m, inp, t: default_explanation(m, inp, t)[0])


def test_empty_batch_and_zero_eps() -> None:
    net = mlp(0)
    assert gradient_distortion(net, torch.zeros(0, 6), 0, 0.1).shape == (0,)
    w = max_gradient_distortion(net, torch.zeros(0, 6), 0, 0.1)
    assert isinstance(w, WorstCase) and w.distortion.shape == (0,) and w.x.shape == (0, 6)
    x = torch.randn(2, 6)
    assert gradient_distortion(net, x, 0, 0.0, n_samples=5).tolist() == [0.0, 0.0]
    w = max_gradient_distortion(net, x, 0, 0.0, population=10, generations=1)
    assert w.distortion.tolist() == [0.0, 0.0] and torch.equal(w.x, x)


def test_exported_from_rollnet() -> None:
    assert rollnet.gradient_distortion is gradient_distortion
    assert rollnet.max_gradient_distortion is max_gradient_distortion
    assert rollnet.WorstCase is WorstCase
    assert {"gradient_distortion", "max_gradient_distortion", "WorstCase"} <= set(rollnet.__all__)


def test_smoothing_swaps_every_relu_and_leaky_relu_form() -> None:
    import torch.nn.functional as F

    from rollnet.evaluate.search import smoothed

    z = torch.linspace(-2, 2, 9)
    tau = 0.5
    soft = tau * F.softplus(z / tau)
    calls = [
        (lambda t: F.relu(t), soft),
        (lambda t: torch.relu(t), soft),
        (lambda t: t.relu(), soft),
        (lambda t: nn.ReLU(inplace=True)(t.clone()), soft),
        (lambda t: F.relu(t.clone(), inplace=True), soft),
        (lambda t: t.clone().relu_(), soft),
        (lambda t: F.leaky_relu(t, 0.2), 0.2 * z + 0.8 * soft),
        (lambda t: F.leaky_relu(t, negative_slope=0.3), 0.3 * z + 0.7 * soft),
        (lambda t: nn.LeakyReLU(0.1, inplace=True)(t.clone()), 0.1 * z + 0.9 * soft),
        (lambda t: F.leaky_relu_(t.clone(), 0.25), 0.25 * z + 0.75 * soft),
    ]
    for fn, expected in calls:
        with smoothed(tau) as mode:
            got = fn(z)
        assert mode.calls == 1
        assert torch.allclose(got, expected, atol=1e-6), fn
    assert torch.equal(F.relu(z), z.clamp_min(0))  # the mode is gone afterwards


def test_bad_generator_refused() -> None:
    with pytest.raises(ValueError, match=r"generator must be a torch\.Generator"):
        gradient_distortion(mlp(0), torch.randn(1, 6), 0, 0.1, generator=3)  # type: ignore[arg-type]
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="x's device"):
            gradient_distortion(mlp(0), torch.randn(1, 6), 0, 0.1, generator=torch.Generator("cuda"))


def test_input_that_requires_grad_is_treated_as_data() -> None:
    net = mlp(12)
    x = torch.randn(2, 6)
    plain = gradient_distortion(net, x, 0, 0.5, n_samples=40, generator=gen())
    tracked = gradient_distortion(net, x.clone().requires_grad_(True), 0, 0.5, n_samples=40, generator=gen())
    assert torch.equal(plain, tracked) and not tracked.requires_grad
    w = max_gradient_distortion(net, x.clone().requires_grad_(True), 0, 0.5, budget=50, population=20,
                                generator=gen())
    assert not w.x.requires_grad and not w.distortion.requires_grad


def test_box_widened_for_rounding_of_normalised_data() -> None:
    # MNIST's normalised black pixel, (0 - 0.1307) / 0.3081 in float32, is an ulp below the float32 of the
    # float64 bound: accepted, and no point goes below min(lo, x)
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    x = torch.full((2, 6), lo, dtype=torch.float32)
    x = torch.nextafter(x, torch.tensor(-math.inf))
    x[:, 3:] = 0.5
    assert bool((x[:, 0] < torch.tensor(lo, dtype=torch.float32)).all())
    for p in NORMS:
        w = max_gradient_distortion(mlp(0), x, 0, 0.2, p=p, clamp=(lo, hi), population=30, generations=2,
                                    generator=gen())
        assert bool((w.x >= torch.minimum(x, torch.tensor(lo))).all()) and bool((w.x <= hi).all())
        inside(x, w.x, 0.2, p, None)
    with pytest.raises(ValueError, match="outside the clamp box"):
        gradient_distortion(mlp(0), x - 1e-3, 0, 0.1, clamp=(lo, hi), n_samples=5)


def test_rounding_level_differences_are_not_distortion_but_real_ones_are() -> None:
    from rollnet.evaluate.scoring import _distance

    ref = torch.tensor([[0.1, -0.2, 0.3]])
    noisy = ref + torch.tensor([[1.5e-9, 0.0, -3e-9]])  # a few ulps of the largest entry
    assert _distance(noisy, ref).tolist() == [0.0]
    moved = ref + torch.tensor([[1e-4, 0.0, 0.0]])
    assert _distance(moved, ref).item() == pytest.approx(1e-4, rel=1e-3)
