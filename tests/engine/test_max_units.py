"""Max units (MaxPool, adaptive MaxPool, maxout): every certificate against independent oracles.

Oracles (float64, nothing of rollnet): neuron values and gradients from the
models' own records and ``torch.autograd.grad``; window membership from
pooling one-hot planes; selected indices from ``return_indices``.  See
``tests/zoo_max.py`` and ``docs/testing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rollnet
from rollnet.engine.gradients import Request, collect, unit_directions
from rollnet.engine.rules.max_units import adaptive_windows, pool_windows
from tests.oracles import oracle_margin, sample_ball, worst_direction
from tests.zoo_max import (
    MaxoutNet,
    Recording,
    ResNet18,
    TieNet,
    make_models,
    membership,
    neurons,
    pattern,
    resnet_pattern,
)

DT = torch.float64
MODELS = make_models()
NAMES = list(MODELS)
NORMS = [1.0, 2.0, math.inf]


def _inputs(model: Recording, n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.input_shape, generator=gen, dtype=DT)  # type: ignore[arg-type]


_ORACLE: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _oracle(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, z, g, is_max)`` for three inputs of a zoo model (cached)."""
    if name not in _ORACLE:
        model = MODELS[name]
        x = _inputs(model, 3, seed=1)
        z, g, is_max = neurons(model, x)
        _ORACLE[name] = (x, z, g, is_max)
    return _ORACLE[name]


# ---------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "dilation", "ceil_mode"),
    [
        ((10, 10), (3, 3), (2, 2), (1, 1), (1, 1), False),
        ((9, 7), (3, 2), (2, 1), (1, 0), (1, 2), True),
        ((4, 4), (2, 2), (1, 1), (0, 0), (2, 2), False),
        ((12,), (4,), (3,), (2,), (1,), True),
        ((11,), (3,), (1,), (1,), (3,), False),
        ((5, 4, 6), (2, 3, 2), (2, 1, 3), (1, 1, 0), (1, 1, 2), True),
    ],
)
def test_pool_windows_match_torch(size, kernel, stride, padding, dilation, ceil_mode) -> None:
    n = len(size)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]

    def fn(v: Tensor) -> tuple[Tensor, Tensor]:
        return pool(v, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)

    expected = membership(fn, size, DT)
    outs = fn(torch.zeros(1, 1, *size, dtype=DT))[0].shape[2:]
    flat, valid = pool_windows(size, outs, kernel, stride, padding, dilation)
    got = [sorted(flat[m][valid[m]].tolist()) for m in range(flat.shape[0])]
    assert got == expected


@pytest.mark.parametrize(("size", "out"), [((7, 9), (3, 4)), ((5,), (3,)), ((6, 5, 4), (4, 2, 3)), ((3, 3), (5, 2))])
def test_adaptive_windows_match_torch(size, out) -> None:
    pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[len(size)]
    expected = membership(lambda v: pool(v, out, return_indices=True), size, DT)
    flat, valid = adaptive_windows(size, out)
    assert [sorted(flat[m][valid[m]].tolist()) for m in range(flat.shape[0])] == expected


# ---------------------------------------------------------------------------
# values, gradients, exact radii


@pytest.mark.parametrize("name", NAMES)
def test_values_and_gradients_match_autograd(name: str) -> None:
    x, z, g, _ = _oracle(name)
    ez, eg = rollnet.neuron_gradients(MODELS[name], x)
    assert ez.shape == z.shape
    torch.testing.assert_close(ez, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eg, g, rtol=1e-10, atol=1e-12)
    # every max-unit difference is >= 0 at x
    assert bool((z[:, _oracle(name)[3]] >= 0).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("p", NORMS)
def test_margin_is_exact(name: str, p: float) -> None:
    x, z, g, _ = _oracle(name)
    got = rollnet.margin(MODELS[name], x, p=p)
    want = oracle_margin(z, g, p)
    assert bool(torch.isfinite(want).all())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0.0)
    regions = rollnet.LinearRegions(MODELS[name], x)
    torch.testing.assert_close(regions.margin(p), want, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_pattern_is_torchs_selection(name: str) -> None:
    model = MODELS[name]
    x = _inputs(model, 16, seed=2)
    pats = rollnet.activation_pattern(model, x)
    torch.testing.assert_close(pats.as_tensor(), pattern(model, x), rtol=0, atol=0)
    # same input -> same pattern, alone or in a batch
    alone = rollnet.activation_pattern(model, x[3:4])
    assert alone[0] == pats[3]
    oracle_keys = {tuple(row.tolist()) for row in pattern(model, x)}
    assert rollnet.count_regions(model, x, batch_size=5)[0] == len(oracle_keys)


# ---------------------------------------------------------------------------
# soundness and tightness


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("p", NORMS)
def test_ball_is_sound(name: str, p: float) -> None:
    model = MODELS[name]
    x, *_ = _oracle(name)
    radius = rollnet.margin(model, x, p=p)
    gen = torch.Generator().manual_seed(3)
    for i in range(2):
        base = pattern(model, x[i : i + 1])
        pts = x[i] + float(radius[i]) * (1 - 1e-6) * sample_ball(10_000, tuple(x.shape[1:]), p, gen, DT)
        same = (pattern(model, pts) == base).all(dim=1)
        assert bool(same.all()), f"{int((~same).sum())} points inside the ball change the pattern"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("p", NORMS)
def test_ball_is_tight(name: str, p: float) -> None:
    model = MODELS[name]
    x, z, g, is_max = _oracle(name)
    radius = rollnet.margin(model, x, p=p)
    norms = g.flatten(2).norm(p={1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p], dim=2)
    ratio = torch.where(norms > 0, z.abs() / norms, torch.full_like(z, math.inf))
    for i in range(x.shape[0]):
        j = int(ratio[i].argmin())
        u = worst_direction(g[i, j], float(z[i, j]), p, bool(is_max[j]))
        outside = x[i] + (1 + 1e-3) * float(radius[i]) * u
        assert not bool((pattern(model, outside.unsqueeze(0)) == pattern(model, x[i : i + 1])).all())


def test_closest_neuron_is_often_a_max_unit() -> None:
    """The max-unit constraints matter: on these nets they are frequently the binding ones."""
    binding = 0
    for name in NAMES:
        _, z, g, is_max = _oracle(name)
        ratio = torch.where(g.flatten(2).norm(dim=2) > 0, z.abs() / g.flatten(2).norm(dim=2), math.inf)
        binding += int(is_max[ratio.argmin(dim=1)].sum())
    assert binding >= 3


# ---------------------------------------------------------------------------
# directional margins and stability bounds


def _bisect(model: Recording, x: Tensor, d: Tensor, hi: float, steps: int = 60) -> float:
    base = pattern(model, x.unsqueeze(0))
    lo, up = 0.0, hi
    for _ in range(steps):
        mid = (lo + up) / 2
        if bool((pattern(model, (x + mid * d).unsqueeze(0)) == base).all()):
            lo = mid
        else:
            up = mid
    return lo


def _closed_form(z: Tensor, g: Tensor, is_max: Tensor, d: Tensor) -> Tensor:
    """``[B]`` min over neurons moving towards their hyperplane of |z| / |g . d|."""
    s = torch.where(is_max.unsqueeze(0) | (z > 0), 1.0, -1.0).to(z.dtype)
    rate = (g.flatten(2) @ d.flatten()) * s
    return torch.where(rate < 0, z.abs() / (-rate), torch.full_like(z, math.inf)).amin(1)


@pytest.mark.parametrize("name", NAMES)
def test_directional_margin(name: str) -> None:
    model = MODELS[name]
    x, z, g, is_max = _oracle(name)
    d = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(4), dtype=DT)
    t = rollnet.directional_margin(model, x, d)
    torch.testing.assert_close(t, _closed_form(z, g, is_max, d), rtol=1e-9, atol=0.0)
    for i in range(x.shape[0]):
        ti = float(t[i])
        assert math.isfinite(ti) and ti > 0
        base = pattern(model, x[i : i + 1])
        assert bool((pattern(model, (x[i] + (1 - 1e-6) * ti * d).unsqueeze(0)) == base).all())
        assert not bool((pattern(model, (x[i] + (1 + 1e-3) * ti * d).unsqueeze(0)) == base).all())
        assert _bisect(model, x[i], d, 2 * ti) == pytest.approx(ti, rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_stability_bounds(name: str) -> None:
    model = MODELS[name]
    x, z, g, is_max = _oracle(name)
    lower, upper = rollnet.stability_bounds(model, x)
    dim = math.prod(x.shape[1:])
    eye = torch.eye(dim, dtype=DT)
    want_up = torch.stack([_closed_form(z, g, is_max, eye[k]) for k in range(dim)], 1)
    want_lo = -torch.stack([_closed_form(z, g, is_max, -eye[k]) for k in range(dim)], 1)
    torch.testing.assert_close(upper.flatten(1), want_up, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(lower.flatten(1), want_lo, rtol=1e-9, atol=0.0)
    # spot check: the bound along one coordinate is where the pattern changes
    k = int(torch.argmin(upper[0].flatten()))
    e = eye[k].reshape(x.shape[1:])
    assert _bisect(model, x[0], e, 2 * float(upper[0].flatten()[k])) == pytest.approx(
        float(upper[0].flatten()[k]), rel=1e-6
    )


# ---------------------------------------------------------------------------
# ties


def _tie_input() -> Tensor:
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=DT)
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = 5.0  # a tie between the two largest of the first window
    return x


def test_tie_gives_margin_zero() -> None:
    torch.manual_seed(0)
    model = TieNet().double().eval()
    x = _tie_input()
    for p in NORMS:
        assert float(rollnet.margin(model, x, p=p)[0]) == 0.0
        assert float(rollnet.LinearRegions(model, x).margin(p)[0]) == 0.0
    # torch selects position 0; raising position 1 breaks the tie at once, raising 0 never does
    sel = F.max_pool2d(x, 2, return_indices=True)[1]
    assert int(sel[0, 0, 0, 0]) == 0
    e = torch.zeros(1, 4, 4, dtype=DT)
    e[0, 0, 1] = 1.0
    assert float(rollnet.directional_margin(model, x, e)[0]) == 0.0
    assert bool((pattern(model, x + 1e-9 * e.unsqueeze(0)) != pattern(model, x)).any())
    e0 = torch.zeros(1, 4, 4, dtype=DT)
    e0[0, 0, 0] = 1.0
    assert float(rollnet.directional_margin(model, x, e0)[0]) == math.inf
    lower, upper = rollnet.stability_bounds(model, x)
    assert float(upper[0, 0, 0, 1]) == 0.0 and float(lower[0, 0, 0, 0]) == 0.0
    assert float(upper[0, 0, 0, 0]) == math.inf


def test_tie_pattern_is_consistent() -> None:
    torch.manual_seed(0)
    model = TieNet().double().eval()
    x = _tie_input()
    batch = torch.cat([torch.randn(3, 1, 4, 4, dtype=DT), x, x.clone()])
    pats = rollnet.activation_pattern(model, batch)
    assert pats[3] == pats[4] == rollnet.activation_pattern(model, x)[0]
    torch.testing.assert_close(pats.as_tensor(), pattern(model, batch), rtol=0, atol=0)
    z, _ = rollnet.neuron_gradients(model, x)
    assert float(z.min()) == 0.0 and bool((z >= 0).all())


class _MaxoutTie(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        a = torch.max(x.view(-1, 2, 3), dim=2).values
        return torch.maximum(a[:, :1], a[:, 1:])


def test_maxout_ties_give_margin_zero() -> None:
    model = _MaxoutTie()
    x = torch.tensor([[1.0, 3.0, 3.0, -1.0, 0.0, 2.0]], dtype=DT)  # tie inside torch.max
    y = torch.tensor([[1.0, 3.0, 0.0, 3.0, 0.0, 2.0]], dtype=DT)  # tie in torch.maximum
    w = torch.tensor([[1.0, 3.0, 0.0, 2.0, 0.0, 1.0]], dtype=DT)  # no tie
    for p in NORMS:
        assert float(rollnet.margin(model, x, p=p)[0]) == 0.0
        assert float(rollnet.margin(model, y, p=p)[0]) == 0.0
        assert float(rollnet.margin(model, w, p=p)[0]) > 0.0
    # the elementwise tie keeps the first argument, consistently
    assert rollnet.activation_pattern(model, y)[0] == rollnet.activation_pattern(model, y.clone())[0]


# ---------------------------------------------------------------------------
# engine plumbing


def test_memory_budget_chunks_give_the_same_answer() -> None:
    model = MODELS["pool_cnn"]
    x, z, g, _ = _oracle("pool_cnn")
    small = rollnet.margin(model, x, p=2, memory_budget=1 << 19)  # 9 direction chunks per example
    torch.testing.assert_close(small, oracle_margin(z, g, 2.0), rtol=1e-9, atol=0.0)


def test_max_unit_memory_is_planned() -> None:
    """The differences' tangents count towards the planned peak, so budgets are respected."""
    from rollnet.engine.capture import run_traced

    class _Sink:
        def neurons(self, group: object) -> None:
            pass

        def output(self, value: Tensor, tangent: Tensor | None) -> None:
            pass

    model = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1)).double()
    x = torch.randn(1, 2, 8, 8, dtype=DT)
    t = torch.randn(4, 1, 2, 8, 8, dtype=DT)
    _, trace = run_traced(model, x, _Sink(), tangent=t)
    members = sum([2, 3, 3, 3, 3, 3, 3, 2]) ** 2  # per channel, over the 64 windows
    neurons_bytes = 4 * 2 * (members - 64) * 8
    assert trace.peak_bytes >= neurons_bytes


def test_training_gradients_flow_through_max_units() -> None:
    """The regulariser's terms (||g_j||^2 and |z_j|) are differentiable in the parameters."""
    torch.manual_seed(0)
    model = make_models()["pool1d"]
    x = _inputs(model, 2, seed=6)
    got = collect(model, x, unit_directions(x.shape[1:]), Request(squared_l2=True))
    assert got.squared_l2 is not None
    term = (got.squared_l2 + torch.relu(1.0 - got.values.abs())).sum()
    params = [p for name, p in model.named_parameters() if not name.startswith("fc2")]  # fc2: no neurons after it
    grads = torch.autograd.grad(term, params)

    xr = x.clone().requires_grad_(True)
    z, g = _differentiable_neurons(model, xr)
    want_term = ((g.flatten(2) ** 2).sum(2) + torch.relu(1.0 - z.abs())).sum()
    torch.testing.assert_close(term, want_term, rtol=1e-10, atol=1e-12)
    want = torch.autograd.grad(want_term, params)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gamma", [100, "max"])
def test_roll_loss_counts_max_unit_differences(gamma: int | str) -> None:
    """ROLLLoss treats every max-unit difference as a neuron: value and parameter gradients."""
    model = make_models()["pool1d"]
    x = _inputs(model, 2, seed=6)
    roll = rollnet.ROLLLoss(lam=0.5, C=0.25, gamma=gamma)  # type: ignore[arg-type]
    params = [p for name, p in model.named_parameters() if not name.startswith("fc2")]
    loss = roll(model, x)
    grads = torch.autograd.grad(loss, params)

    z, g = _differentiable_neurons(model, x.clone().requires_grad_(True))
    terms = (g.flatten(2) ** 2).sum(2) + 0.25 * torch.relu(1.0 - z.abs())
    per = terms.amax(1) if gamma == "max" else terms.mean(1)
    want = 0.5 * per.mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _differentiable_neurons(model: Recording, x: Tensor) -> tuple[Tensor, Tensor]:
    """Oracle neurons whose gradients keep the graph (one backward per neuron, one example at a time)."""
    z_all, _, _ = neurons(model, x.detach())
    zs, gs = [], []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        model.record = []
        try:
            model(xb)
            record = model.record
        finally:
            model.record = None
        cols: list[Tensor] = []
        for item in record:
            flat = item[1].reshape(-1)
            if item[0] == "relu":
                cols.extend(flat)
                continue
            u = item[1]
            c, plane = u.shape[1], tuple(u.shape[2:])
            p = math.prod(plane)
            sel = item[2](u.detach())[1].reshape(c, -1)
            sign = 1.0 if item[0] == "max" else -1.0
            for ci in range(c):
                for m, members in enumerate(membership(item[2], plane, u.dtype, item[0])):
                    s = int(sel[ci, m])
                    cols.extend(sign * (flat[ci * p + s] - flat[ci * p + i]) for i in members if i != s)
        grads = [torch.autograd.grad(col, xb, create_graph=True)[0][0] for col in cols]
        zs.append(torch.stack(cols))
        gs.append(torch.stack(grads))
    zz = torch.stack(zs)
    torch.testing.assert_close(zz.detach(), z_all, rtol=0, atol=1e-12)
    return zz, torch.stack(gs)


@pytest.mark.parametrize(
    ("forward", "needle"),
    [
        (lambda x: x.max(), "whole tensor"),
        (lambda x: torch.max(x, 0).values, "batch dimension"),
        (lambda x: x.amax(dim=(0, 1)), "batch dimension"),
        (lambda x: torch.amax(x), "batch dimension"),
        (lambda x: F.max_pool1d(x[0], 2), "mixes the examples"),  # refused at x[0]
    ],
)
def test_mixing_the_batch_is_refused(forward: Callable[[Tensor], Tensor], needle: str) -> None:
    class _Net(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return forward(x).reshape(-1, 1)

    with pytest.raises(rollnet.UnsupportedOperationError, match=needle):
        rollnet.margin(_Net(), torch.randn(3, 4, 6))


def test_functional_forms() -> None:
    """Every spelling of a max unit gives the same certificate as the module."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3).double()
    x = torch.randn(2, 1, 9, 9, dtype=DT)

    def net(pool: Callable[[Tensor], Tensor]) -> nn.Module:
        class _Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = conv

            def forward(self, v: Tensor) -> Tensor:
                return pool(torch.relu(self.conv(v))).flatten(1)

        return _Net()

    spellings: list[Callable[[Tensor], Tensor]] = [
        nn.MaxPool2d(3, 2),
        lambda v: F.max_pool2d(v, 3, 2),
        lambda v: F.max_pool2d(v, 3, 2, return_indices=True)[0],
        lambda v: F.max_pool2d_with_indices(v, 3, 2)[0],
        lambda v: torch.max_pool2d(v, 3, [2, 2]),
        lambda v: nn.MaxPool2d(3, 2, return_indices=True)(v)[0],
    ]
    ref = rollnet.margin(net(spellings[0]), x, p=2)
    ref_pat = rollnet.activation_pattern(net(spellings[0]), x).as_tensor()
    assert bool(torch.isfinite(ref).all())
    for s in spellings[1:]:
        torch.testing.assert_close(rollnet.margin(net(s), x, p=2), ref, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(rollnet.activation_pattern(net(s), x).as_tensor(), ref_pat)
    adaptive = [
        nn.AdaptiveMaxPool2d((2, 3)),
        lambda v: F.adaptive_max_pool2d(v, (2, 3), return_indices=True)[0],
        lambda v: F.adaptive_max_pool2d_with_indices(v, (2, 3))[0],
    ]
    ref = rollnet.margin(net(adaptive[0]), x, p=1)
    for s in adaptive[1:]:
        torch.testing.assert_close(rollnet.margin(net(s), x, p=1), ref, rtol=1e-12, atol=0.0)


def test_maxout_ops_are_reported() -> None:
    model = MaxoutNet().double().eval()
    x = _inputs(model, 3, seed=7)
    info = [op for _, op, _ in rollnet.LinearRegions(model, x).neuron_info()]
    assert info == ["max", "relu", "amax", "maximum", "min"]


def test_keepdim_and_dim_spellings_agree() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 12).double()

    def net(unit: Callable[[Tensor], Tensor]) -> nn.Module:
        class _Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = lin

            def forward(self, v: Tensor) -> Tensor:
                return unit(self.lin(v).view(-1, 2, 2, 3)).reshape(v.shape[0], -1)

        return _Net()

    x = torch.randn(4, 5, dtype=DT)
    spellings: list[Callable[[Tensor], Tensor]] = [
        lambda h: h.amax(dim=-1),
        lambda h: h.max(dim=-1, keepdim=True).values,
        lambda h: torch.max(h, 3)[0],
        lambda h: torch.amax(h, [3], keepdim=True),
    ]
    ref = rollnet.margin(net(spellings[0]), x, p=2)
    assert bool(torch.isfinite(ref).all())
    for s in spellings[1:]:
        torch.testing.assert_close(rollnet.margin(net(s), x, p=2), ref, rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------------------
# ResNet-18


def test_resnet18_is_certifiable_unchanged() -> None:
    torch.manual_seed(0)
    model = ResNet18(width=4).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=DT, generator=torch.Generator().manual_seed(8))
    regions = rollnet.LinearRegions(model, x)
    info = regions.neuron_info()
    pools = [(path, op, n) for path, op, n in info if op == "max_pool2d"]
    # conv1: 16x16 -> 8x8; max-pool 8x8 -> 4x4, windows with 2 (first) or 3 rows/cols; 4 channels
    assert pools == [("maxpool", "max_pool2d", 4 * ((2 + 3 * 3) ** 2 - 16))]
    assert sum(1 for _, op, _ in info if op == "relu") == 17
    # the pattern is the hooks' (ReLU signs and torch's max-pool indices)
    torch.testing.assert_close(regions.activation_pattern().as_tensor(), resnet_pattern(model, x))
    gen = torch.Generator().manual_seed(9)
    for p in (2.0, math.inf):
        radius = regions.margin(p)
        assert bool((radius > 0).all() and torch.isfinite(radius).all())
        for i in range(2):
            base = resnet_pattern(model, x[i : i + 1])
            pts = x[i] + float(radius[i]) * (1 - 1e-6) * sample_ball(1000, tuple(x.shape[1:]), p, gen, DT)
            assert bool((resnet_pattern(model, pts) == base).all())
    d = torch.randn(x.shape, generator=gen, dtype=DT)
    t = rollnet.directional_margin(model, x, d)
    for i in range(2):
        base = resnet_pattern(model, x[i : i + 1])
        inside = x[i] + (1 - 1e-6) * float(t[i]) * d[i]
        outside = x[i] + (1 + 1e-3) * float(t[i]) * d[i]
        assert bool((resnet_pattern(model, inside.unsqueeze(0)) == base).all())
        assert not bool((resnet_pattern(model, outside.unsqueeze(0)) == base).all())
