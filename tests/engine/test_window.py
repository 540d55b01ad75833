"""Tiled passes with windowed tangents (rollnet.engine.window) against the dense forward-mode pass
and per-neuron autograd, on random conv and residual nets (strides, padding, dilation, groups,
odd sizes, 1-D and 3-D maps), in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rollnet
from rollnet.engine import window
from rollnet.engine.gradients import Request, _plan_tiles, collect, unit_directions

REQUEST = Request(norms=(1.0, 2.0, math.inf), crossings=True)


class RandomConvNet(nn.Module):
    """conv -> BN -> ReLU -> [residual block] -> pool -> ReLU -> linear, from drawn settings."""

    def __init__(self, rank: int, c_in: int, arch: dict, size: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[rank]
        w, g = arch["width"] * arch["groups"], arch["groups"]
        self.stem = conv(c_in, w, arch["kernel"], stride=arch["stride"], padding=arch["padding"],
                         dilation=arch["dilation"])
        self.bn = bn(w)
        self.a = conv(w, w, 3, padding=1, groups=g)
        self.b = conv(w, w, 3, padding="same", dilation=arch["dilation2"], groups=g)
        self.down = conv(w, w, 1, stride=2)
        self.pool = pool(arch["pool"], stride=arch["pool_stride"], padding=arch["pool"] // 2)
        self.scale = arch["scale"]
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)
        feat = self._features(torch.zeros(1, c_in, *([size] * rank))).shape[1]
        self.fc = nn.Linear(feat, 3)

    def _features(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.stem((x - 0.1) / 1.5)))
        h = F.relu(h + self.b(F.relu(self.a(h))) * self.scale)
        h = F.relu(self.pool(h) + 0.5 * self.pool(h))
        return torch.flatten(F.relu(self.down(h)), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self._features(x))


architectures = st.fixed_dictionaries(
    {
        "rank": st.sampled_from([1, 2, 2, 2, 3]),
        "c_in": st.integers(1, 3),
        "size": st.integers(5, 11),
        "width": st.integers(1, 3),
        "groups": st.sampled_from([1, 1, 2]),
        "kernel": st.integers(1, 5),
        "stride": st.integers(1, 3),
        "padding": st.integers(0, 2),
        "dilation": st.integers(1, 2),
        "dilation2": st.integers(1, 2),
        "pool": st.sampled_from([1, 2, 3]),
        "pool_stride": st.integers(1, 2),
        "scale": st.sampled_from([1.0, -0.7]),
        "budget": st.sampled_from([1 << 12, 1 << 14, 1 << 16]),
        "seed": st.integers(0, 10_000),
    }
)


def _build(arch: dict) -> tuple[nn.Module, Tensor] | None:
    rank, size = arch["rank"], arch["size"] if arch["rank"] < 3 else min(arch["size"], 7)
    torch.manual_seed(arch["seed"])
    if (size + 2 * arch["padding"] - arch["dilation"] * (arch["kernel"] - 1) - 1) // arch["stride"] + 1 < 2:
        return None
    try:
        model = RandomConvNet(rank, arch["c_in"], arch, size).double().eval()
    except RuntimeError:  # the drawn sizes leave an empty map
        return None
    x = torch.randn(2, arch["c_in"], *([size] * rank), dtype=torch.float64)
    return model, x


def _both(model: nn.Module, x: Tensor, budget: int, request: Request = REQUEST) -> tuple:
    with torch.no_grad():
        dense = collect(model, x, unit_directions(x.shape[1:]), request, memory_budget=budget, locality=False)
        tiled = collect(model, x, unit_directions(x.shape[1:]), request, memory_budget=budget)
    return dense, tiled


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures)
def test_tiled_pass_equals_dense_pass_on_random_conv_nets(arch: dict) -> None:
    built = _build(arch)
    if built is None:
        return
    model, x = built
    dense, tiled = _both(model, x, arch["budget"])
    assert len(tiled.chunk_sizes) >= 1
    torch.testing.assert_close(tiled.values, dense.values, rtol=0, atol=0)
    for q in REQUEST.norms:
        torch.testing.assert_close(tiled.norms[q], dense.norms[q], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tiled.cross_plus, dense.cross_plus, rtol=1e-12, atol=0)
    torch.testing.assert_close(tiled.cross_minus, dense.cross_minus, rtol=1e-12, atol=0)


def _autograd_rows(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Every ReLU input and its input gradient, one backward pass per neuron (the oracle)."""
    zs: list[Tensor] = []
    real = F.relu

    def recording(h: Tensor, *args: object, **kwargs: object) -> Tensor:
        zs.append(h.reshape(h.shape[0], -1))
        return real(h)

    x = x.clone().requires_grad_(True)
    F.relu = recording  # type: ignore[assignment]
    try:
        model(x)
    finally:
        F.relu = real
    z = torch.cat(zs, dim=1)
    rows = torch.stack([torch.autograd.grad(z[:, j].sum(), x, retain_graph=True)[0] for j in range(z.shape[1])], 1)
    return z.detach(), rows.flatten(2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiled_margins_match_per_neuron_autograd(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    boxes: list[tuple[int, ...]] = []
    real_conv = window.conv

    def counting(w: window.WindowTangent, *args: object) -> object:
        boxes.append(w.box)
        return real_conv(w, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(window, "conv", counting)
    arch = {"width": 2, "groups": 2, "kernel": 3, "stride": 2, "padding": 1, "dilation": 1, "dilation2": 2,
            "pool": 3, "pool_stride": 2, "scale": -0.7, "seed": seed}
    torch.manual_seed(seed)
    model = RandomConvNet(2, 2, arch, 9).double().eval()
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    z, rows = _autograd_rows(model, x)
    with torch.no_grad():
        got = collect(model, x, unit_directions(x.shape[1:]), Request(norms=(1.0, 2.0, math.inf)), memory_budget=1 << 13)
    for q in (1.0, 2.0, math.inf):
        torch.testing.assert_close(got.norms[q], rows.norm(p=q, dim=2), rtol=1e-10, atol=1e-13)
    assert boxes and min(math.prod(b) for b in boxes) < 9 * 9  # the passes did run on boxes
    radii = rollnet.margin(model, x, p=(1, 2, "inf"), memory_budget=1 << 13)
    for p, r in zip((1.0, 2.0, math.inf), radii, strict=True):
        q = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]
        n = rows.norm(p=q, dim=2)
        ref = torch.where(n > 0, z.abs() / n, math.inf).amin(1)
        torch.testing.assert_close(r, ref, rtol=1e-10, atol=0)


def test_tiles_cover_every_axis_once() -> None:
    boxes = window.tiles((7, 5), 3, 12)
    axes = torch.cat([window.tile_axes(s, n, 3, (7, 5)) for s, n in boxes])
    assert torch.equal(axes.sort().values, torch.arange(3 * 35))


def test_a_stride_that_steps_over_a_box_gives_a_zero_tangent() -> None:
    # a 1x1 convolution with stride 2 reads no odd position: a one-pixel box there moves nothing
    w = window.WindowTangent(torch.ones(1, 1, 1, 1, 1, dtype=torch.float64), (1, 1), (5, 5))
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = window.conv(w, lambda u: F.conv2d(u, weight, None, 2, 0), [1, 1], [2, 2], [0, 0], [1, 1], [3, 3])
    dense = out.dense() if isinstance(out, window.WindowTangent) else out
    assert dense.shape == (1, 1, 1, 3, 3) and not dense.any()
    ref = F.conv2d(w.dense().flatten(0, 1), weight, None, 2, 0)
    assert not ref.any()


def test_gradient_requests_stay_dense_and_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    # gradients (rows, the output Jacobian) must be bit-identical for all points of a region, so
    # they never take a box (a convolution over another extent changes the last bits)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 3 * 3, 2)).double().eval()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    calls: list[object] = []
    monkeypatch.setattr(window, "conv", lambda *a: calls.append(a))
    for request in (Request(norms=(2.0,), rows=True, crossings=True), Request(norms=(2.0,), output=True)):
        dense, tiled = _both(model, x, 1 << 12, request)
        assert not calls
        for name in ("rows", "output_rows", "cross_plus"):
            a, b = getattr(dense, name), getattr(tiled, name)
            assert (a is None and b is None) or torch.equal(a, b)


def test_tiled_crossings_come_back_in_input_order() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 3 * 3, 2)).double().eval()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    dense, tiled = _both(model, x, 1 << 12, Request(crossings=True))
    torch.testing.assert_close(tiled.cross_plus, dense.cross_plus, rtol=1e-12, atol=0)
    torch.testing.assert_close(tiled.cross_minus, dense.cross_minus, rtol=1e-12, atol=0)


def test_tiled_axes_give_dense_unit_vectors_off_the_tile_boundaries() -> None:
    x = torch.zeros(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        tiled = _plan_tiles(unit_directions(x.shape[1:]), x, 8, 1 << 20)
    assert tiled is not None and len(tiled.boxes) > 1
    k1 = tiled.bounds(0)[0][1]
    boxed, unit = tiled.chunk(0, k1, x, 0)
    assert isinstance(boxed, window.WindowTangent) and torch.equal(unit, tiled.indices[:k1])
    dense, _ = tiled.chunk(0, 1, x, 0)  # (the planner's probe: one direction)
    assert isinstance(dense, Tensor) and torch.equal(dense, boxed.dense()[:1])
