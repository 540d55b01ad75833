"""Exact linear regions on a plane slice: rollnet.evaluate.plane.

Oracles independent of the walk: the polygons' areas and pairwise overlaps
(by clipping one convex polygon with the other's edges), the activation
pattern at random points inside each polygon (rollnet.activation_pattern at
the point mapped back to input space), hand-computed arrangements, and the
logits evaluated by the model itself at decision-boundary points.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rollnet
from rollnet.evaluate import polygons
from rollnet.evaluate.plane import PlaneRegions, TooManyRegionsError, plane_regions
from tests import zoo, zoo_max

D = torch.float64


# ---------------------------------------------------------------------------
# oracles


def _intersection_area(p: np.ndarray, q: np.ndarray) -> float:
    """Area of the intersection of two counter-clockwise convex polygons (q clipped by p's edges)."""
    v, lab = q, np.zeros(q.shape[0], dtype=np.int64)
    n = p.shape[0]
    for i in range(n):
        a, b = p[i], p[(i + 1) % n]
        e = b - a
        length = math.hypot(*e)
        normal = np.array([-e[1], e[0]]) / length
        v, lab = polygons.clip(v, lab, normal, 0.0, a, 1, 0.0)
        if v.shape[0] == 0:
            return 0.0
    return polygons.area(v)


def _inputs(x0: Tensor, u: Tensor, v: Tensor, ab: Tensor) -> Tensor:
    """``[m, *x0.shape]`` points x0 + a u + b v."""
    shape = (-1,) + (1,) * x0.dim()
    return x0 + ab[:, 0].reshape(shape) * u + ab[:, 1].reshape(shape) * v


def check_tiling(
    model: nn.Module, x0: Tensor, u: Tensor, v: Tensor, regions: PlaneRegions, points_per_region: int = 3,
    seed: int = 0,
) -> None:
    """Areas sum to the rectangle's, no overlaps, CCW convex polygons, patterns at inner points."""
    a_min, a_max, b_min, b_max = regions.extent
    rect = (a_max - a_min) * (b_max - b_min)
    assert len(regions) >= 1
    total = 0.0
    polys = []
    for r in regions:
        vert = r.vertices
        assert vert.dtype == torch.float64 and vert.dim() == 2 and vert.shape[1] == 2 and vert.shape[0] >= 3
        p = vert.numpy()
        signed = polygons.area(p)
        assert signed > 0, "vertices must be counter-clockwise"
        assert signed == pytest.approx(r.area, rel=1e-12, abs=1e-300)
        # convex, counter-clockwise turns at every vertex
        e = np.roll(p, -1, axis=0) - p
        turn = e[:, 0] * np.roll(e, -1, axis=0)[:, 1] - e[:, 1] * np.roll(e, -1, axis=0)[:, 0]
        assert (turn >= -1e-12 * rect).all()
        span = max(a_max - a_min, b_max - b_min)
        assert (p[:, 0] >= a_min - 1e-12 * span).all() and (p[:, 0] <= a_max + 1e-12 * span).all()
        assert (p[:, 1] >= b_min - 1e-12 * span).all() and (p[:, 1] <= b_max + 1e-12 * span).all()
        assert r.edge_neurons.shape == (p.shape[0],)
        total += signed
        polys.append(p)
    assert total == pytest.approx(rect, rel=1e-9)
    # no overlaps: pairwise intersection areas (bounding boxes first)
    boxes = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polys])
    for i, j in itertools.combinations(range(len(polys)), 2):
        if boxes[i, 0] >= boxes[j, 2] or boxes[j, 0] >= boxes[i, 2]:
            continue
        if boxes[i, 1] >= boxes[j, 3] or boxes[j, 1] >= boxes[i, 3]:
            continue
        assert _intersection_area(polys[i], polys[j]) <= 1e-9 * rect, (i, j)
    # patterns at random points strictly inside each polygon, mapped to input space
    gen = np.random.default_rng(seed)
    pts, owner = [], []
    for k, p in enumerate(polys):
        for _ in range(points_per_region):
            w = gen.dirichlet(np.ones(p.shape[0]))
            pts.append(w @ p)
            owner.append(k)
        pts.append(regions[k].point.numpy())
        owner.append(k)
    ab = torch.tensor(np.array(pts), dtype=D)
    x64 = _inputs(x0.to(D), u.to(D), v.to(D), ab)
    model64 = model if all(t.dtype == D for t in model.parameters()) else _copy64(model)
    pats = rollnet.activation_pattern(model64, x64)
    for i, k in enumerate(owner):
        assert pats[i] == regions[k].pattern, f"point {pts[i]} is not in region {k}'s pattern"
    assert len({r.pattern for r in regions}) == len(regions)
    assert [r.pattern_id for r in regions] == list(range(len(regions)))


def _copy64(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(D).eval()


def check_affine(model: nn.Module, x0: Tensor, u: Tensor, v: Tensor, regions: PlaneRegions) -> None:
    """Each region's affine map gives the model's logits at its centroid."""
    ab = torch.stack([r.point for r in regions])
    with torch.no_grad():
        out = model(_inputs(x0.to(D), u.to(D), v.to(D), ab)).reshape(len(regions), -1)
    for i, r in enumerate(regions):
        want = out[i]
        got = r.logits(float(r.point[0]), float(r.point[1]))
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max() + 1))


def _relu_net(weight: list[list[float]], bias: list[float], head: list[list[float]] | None = None) -> nn.Module:
    hidden = len(bias)
    lin = nn.Linear(2, hidden).to(D)
    out = nn.Linear(hidden, 2 if head is None else len(head)).to(D)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight, dtype=D))
        lin.bias.copy_(torch.tensor(bias, dtype=D))
        if head is not None:
            out.weight.copy_(torch.tensor(head, dtype=D))
            out.bias.zero_()
    return nn.Sequential(lin, nn.ReLU(), out).eval()


E2 = (torch.zeros(2, dtype=D), torch.tensor([1.0, 0.0], dtype=D), torch.tensor([0.0, 1.0], dtype=D))


def _vertex_set(t: Tensor) -> frozenset[tuple[float, float]]:
    return frozenset((round(float(a), 9) + 0.0, round(float(b), 9) + 0.0) for a, b in t.tolist())


def _pattern_at(model: nn.Module, a: float, b: float) -> rollnet.ActivationPattern:
    return rollnet.activation_pattern(model, torch.tensor([[a, b]], dtype=D))[0]


# ---------------------------------------------------------------------------
# hand-computed arrangements


THREE_LINES = {  # neurons x > 0, y > 0, x + y - 1 > 0 on [-1, 2]^2
    (-0.5, -0.5): {(-1, -1), (0, -1), (0, 0), (-1, 0)},
    (0.5, -0.5): {(0, -1), (2, -1), (1, 0), (0, 0)},
    (1.8, -0.5): {(2, -1), (2, 0), (1, 0)},
    (-0.5, 0.5): {(-1, 0), (0, 0), (0, 1), (-1, 2)},
    (-0.2, 1.8): {(0, 1), (0, 2), (-1, 2)},
    (0.2, 0.2): {(0, 0), (1, 0), (0, 1)},
    (1.0, 1.0): {(1, 0), (2, 0), (2, 2), (0, 2), (0, 1)},
}


def test_three_lines_give_the_known_seven_polygons() -> None:
    net = _relu_net([[1, 0], [0, 1], [1, 1]], [0, 0, -1])
    regions = plane_regions(net, *E2, (-1.0, 2.0, -1.0, 2.0))
    assert len(regions) == 7
    by_pattern = {r.pattern: r for r in regions}
    for (a, b), verts in THREE_LINES.items():
        r = by_pattern[_pattern_at(net, a, b)]
        assert _vertex_set(r.vertices) == {(float(x), float(y)) for x, y in verts}
    check_tiling(net, *E2, regions)
    # every neuron edge lies on its neuron's line: z_j = 0 at both ends
    w, c = net[0].weight.detach(), net[0].bias.detach()
    for r in regions:
        n = r.vertices.shape[0]
        for i, j in enumerate(r.edge_neurons.tolist()):
            ends = r.vertices[[i, (i + 1) % n]]
            if j >= 0:
                assert torch.allclose(ends @ w[j] + c[j], torch.zeros(2, dtype=D), atol=1e-12)
            else:  # a side of the rectangle
                sides = [(axis, side) for axis in (0, 1) for side in (-1.0, 2.0)]
                assert any(bool((ends[:, axis] == side).all()) for axis, side in sides)


def test_two_layer_bent_hyperplane() -> None:
    """h = relu(x), relu(y); g = relu(h1 + h2 - 1): g's line is x = 1 below the a axis, y = 1
    left of the b axis and x + y = 1 in the first quadrant (never in the third)."""
    first = nn.Linear(2, 2).to(D)
    second = nn.Linear(2, 1).to(D)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2, dtype=D))
        first.bias.zero_()
        second.weight.fill_(1.0)
        second.bias.fill_(-1.0)
    net = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Linear(1, 2).to(D)).eval()
    regions = plane_regions(net, *E2, (-1.0, 2.0, -1.0, 2.0))
    want = {
        (-0.5, -0.5): {(-1, -1), (0, -1), (0, 0), (-1, 0)},
        (0.5, -0.5): {(0, -1), (1, -1), (1, 0), (0, 0)},
        (1.5, -0.5): {(1, -1), (2, -1), (2, 0), (1, 0)},
        (-0.5, 0.5): {(-1, 0), (0, 0), (0, 1), (-1, 1)},
        (-0.5, 1.5): {(-1, 1), (0, 1), (0, 2), (-1, 2)},
        (0.2, 0.2): {(0, 0), (1, 0), (0, 1)},
        (1.0, 1.0): {(1, 0), (2, 0), (2, 2), (0, 2), (0, 1)},
    }
    assert len(regions) == len(want)
    by_pattern = {r.pattern: r for r in regions}
    for (a, b), verts in want.items():
        assert _vertex_set(by_pattern[_pattern_at(net, a, b)].vertices) == {(float(x), float(y)) for x, y in verts}
    check_tiling(net, *E2, regions)
    check_affine(net, *E2, regions)


def test_jacobian_ids_equal_exactly_where_the_affine_map_is() -> None:
    """Neuron y > 0 feeds the output with weight 0: crossing it changes the pattern, not the map."""
    net = _relu_net([[1, 0], [0, 1]], [0, 0], head=[[1.0, 0.0], [0.0, 0.0]])
    regions = plane_regions(net, *E2, (-1.0, 1.0, -1.0, 1.0))
    assert len(regions) == 4 and regions.num_patterns == 4
    assert regions.num_jacobians == 2
    for r, s in itertools.combinations(regions, 2):
        same_map = torch.allclose(r.output_slopes, s.output_slopes) and torch.allclose(r.output_offset, s.output_offset)
        assert (r.jacobian_id == s.jacobian_id) == same_map
        same_side = bool(r.point[0] > 0) == bool(s.point[0] > 0)
        assert (r.jacobian_id == s.jacobian_id) == same_side
    check_tiling(net, *E2, regions)


def test_no_neurons_gives_the_rectangle() -> None:
    net = nn.Linear(3, 2).to(D)
    x0, u, v = torch.zeros(3, dtype=D), torch.tensor([1.0, 0, 0], dtype=D), torch.tensor([0, 1.0, 1.0], dtype=D)
    regions = plane_regions(net, x0, u, v, (-2.0, 3.0, 0.5, 1.5))
    assert len(regions) == 1
    assert _vertex_set(regions[0].vertices) == {(-2.0, 0.5), (3.0, 0.5), (3.0, 1.5), (-2.0, 1.5)}
    assert regions[0].area == pytest.approx(5.0, rel=1e-15)
    assert (regions[0].edge_neurons == -1).all()
    check_affine(net, x0, u, v, regions)


def test_duplicate_and_parallel_lines_and_lines_through_a_vertex() -> None:
    """Two copies of x > 0, a parallel x > 0.5, and three lines through the origin."""
    net = _relu_net([[1, 0], [1, 0], [1, 0], [0, 1], [1, 1], [1, -1]], [0, 0, -0.5, 0, 0, 0])
    regions = plane_regions(net, *E2, (-1.0, 1.0, -1.0, 1.0))
    # the four lines through the origin make 8 wedges; x = 0.5 crosses the 4 wedges right of
    # the b axis (each reaches the rectangle's side a = 1): 12 regions
    check_tiling(net, *E2, regions)
    assert len(regions) == 12
    assert sum(bool((r.vertices[:, 0] > 0.5 + 1e-12).any()) for r in regions) == 4
    assert sum(bool((r.vertices[:, 0] < -1e-12).any()) for r in regions) == 4


# ---------------------------------------------------------------------------
# decision boundary


def _boundary_checks(model: nn.Module, x0: Tensor, u: Tensor, v: Tensor, regions: PlaneRegions) -> None:
    seg = regions.decision_boundary
    assert seg.dim() == 3 and seg.shape[1:] == (2, 2) and seg.dtype == torch.float64
    assert seg.shape[0] > 0
    mids = seg.mean(dim=1)
    with torch.no_grad():
        out = model(_inputs(x0.to(D), u.to(D), v.to(D), mids)).reshape(mids.shape[0], -1)
    e = regions.extent
    corners = torch.tensor([[e[0], e[2]], [e[1], e[2]], [e[0], e[3]], [e[1], e[3]]], dtype=D)
    with torch.no_grad():
        scale = float(model(_inputs(x0.to(D), u.to(D), v.to(D), corners)).abs().max())
    if out.shape[1] == 1:
        assert (out[:, 0].abs() <= 1e-9 * scale).all()
    else:
        top = out.topk(2, dim=1).values
        assert ((top[:, 0] - top[:, 1]) <= 1e-9 * scale).all()
    # once each
    keys = {tuple(sorted((round(float(a), 9), round(float(b), 9)) for a, b in s.tolist())) for s in seg}
    assert len(keys) == seg.shape[0]
    # complete: two nearby points with different predictions have a segment between them
    gen = torch.Generator().manual_seed(3)
    a_min, a_max, b_min, b_max = regions.extent
    lo = torch.tensor([a_min, b_min], dtype=D)
    span = torch.tensor([a_max - a_min, b_max - b_min], dtype=D)
    p = lo + torch.rand(400, 2, generator=gen, dtype=D) * span
    q = (p + 0.05 * span * torch.randn(400, 2, generator=gen, dtype=D)).clamp(lo, lo + span)
    with torch.no_grad():
        op = model(_inputs(x0.to(D), u.to(D), v.to(D), p)).reshape(400, -1)
        oq = model(_inputs(x0.to(D), u.to(D), v.to(D), q)).reshape(400, -1)
    cls_p = (op[:, 0] > 0).long() if op.shape[1] == 1 else op.argmax(1)
    cls_q = (oq[:, 0] > 0).long() if oq.shape[1] == 1 else oq.argmax(1)
    differ = (cls_p != cls_q).nonzero().flatten().tolist()
    assert differ, "the test needs point pairs on both sides of the boundary"
    for i in differ:
        assert _crosses_any(p[i].numpy(), q[i].numpy(), seg.numpy()), f"no decision segment between {p[i]} and {q[i]}"
    # labels: the class at each region's centroid is among them; several iff a segment is inside
    ab = torch.stack([r.point for r in regions])
    with torch.no_grad():
        oc = model(_inputs(x0.to(D), u.to(D), v.to(D), ab)).reshape(len(regions), -1)
    at_centroid = (oc[:, 0] > 0).long() if oc.shape[1] == 1 else oc.argmax(1)
    for r, c in zip(regions, at_centroid.tolist(), strict=True):
        assert c in r.labels
        assert (len(r.labels) > 1) == (r.decision_segments.shape[0] > 0)


def _crosses_any(p: np.ndarray, q: np.ndarray, seg: np.ndarray) -> bool:
    a, b = seg[:, 0], seg[:, 1]

    def orient(o: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        return (s[..., 0] - o[..., 0]) * (t[..., 1] - o[..., 1]) - (s[..., 1] - o[..., 1]) * (t[..., 0] - o[..., 0])

    d1, d2 = orient(a, b, p), orient(a, b, q)
    d3, d4 = orient(p, q, a), orient(p, q, b)
    return bool(((d1 * d2 <= 0) & (d3 * d4 <= 0)).any())


def test_decision_boundary_three_classes() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).to(D).eval()
    extent = (-3.0, 3.0, -3.0, 3.0)
    regions = plane_regions(net, *E2, extent)
    check_tiling(net, *E2, regions, points_per_region=1)
    _boundary_checks(net, *E2, regions)
    assert len({c for r in regions for c in r.labels}) >= 2


def test_decision_boundary_one_logit() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 1)).to(D).eval()
    regions = plane_regions(net, *E2, (-3.0, 3.0, -3.0, 3.0))
    _boundary_checks(net, *E2, regions)
    assert {c for r in regions for c in r.labels} == {0, 1}


# ---------------------------------------------------------------------------
# real architectures


def _gradient_plane(model: nn.Module, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen, dtype=D)
    x = x0.unsqueeze(0).clone().requires_grad_()
    out = model(x).reshape(1, -1)
    (g,) = torch.autograd.grad(out[0, int(out.argmax())], x)
    u = g[0] / g.norm()
    v = torch.randn(shape, generator=gen, dtype=D)
    v = v - (v * u).sum() * u
    return x0, u, v / v.norm()


# half-sides of square slices through each model's plane (seeded below) that cross a few dozen
# regions (measured; the tests check at least 10)
SIDES = {
    "conv_bn": 1.0, "residual": 0.15, "leaky": 0.75, "mlp_image": 1.5, "torchvision_block": 0.2,
    "pool_cnn": 0.1, "pool1d": 0.1, "adaptive": 0.056, "maxout": 0.6,
}


def _slice(model: nn.Module, x0: Tensor, u: Tensor, v: Tensor, side: float) -> PlaneRegions:
    regions = plane_regions(model, x0, u, v, (-side, side, -side, side), max_regions=200)
    assert len(regions) >= 10
    return regions


@pytest.mark.parametrize("name", ["conv_bn", "residual", "leaky", "mlp_image", "torchvision_block"])
def test_zoo_models_tile_with_their_patterns(name: str) -> None:
    model, shape = zoo.make(name)
    x0, u, v = _gradient_plane(model, shape, seed=4)
    regions = _slice(model, x0, u, v, SIDES[name])
    check_tiling(model, x0, u, v, regions, points_per_region=2)
    check_affine(model, x0, u, v, regions)


@pytest.mark.parametrize("name", ["pool_cnn", "pool1d", "adaptive", "maxout"])
def test_max_unit_models_tile_with_their_patterns(name: str) -> None:
    model = zoo_max.make_models()[name]
    shape = type(model).input_shape
    x0, u, v = _gradient_plane(model, shape, seed=5)
    regions = _slice(model, x0, u, v, SIDES[name])
    check_tiling(model, x0, u, v, regions, points_per_region=2)
    check_affine(model, x0, u, v, regions)


def test_conv_net_through_a_real_digit() -> None:
    """A plane through a test image of the digits data, spanned by its gradient and a random
    direction (the issue's example), on the conv/BatchNorm zoo net."""
    from rollnet.data import load_dataset

    model, _ = zoo.make("conv_bn")
    x0 = load_dataset("digits").test.x[0].to(D)
    x = x0.unsqueeze(0).clone().requires_grad_()
    out = model(x)[0]
    (g,) = torch.autograd.grad(out[int(out.argmax())], x)
    u = g[0] / g.norm()
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=D)
    v = v - (v * u).sum() * u
    v = v / v.norm()
    regions = plane_regions(model, x0, u, v, (-2.0, 2.0, -2.0, 2.0))
    assert len(regions) >= 20
    check_tiling(model, x0, u, v, regions, points_per_region=2)
    check_affine(model, x0, u, v, regions)


@pytest.mark.slow
def test_resnet18_on_a_28x28_image() -> None:
    from rollnet.models import resnet18

    torch.manual_seed(0)
    model = resnet18(in_channels=1, num_classes=10, width=4).to(D).eval()
    x0, u, v = _gradient_plane(model, (1, 28, 28), seed=6)
    regions = plane_regions(model, x0, u, v, (-0.03, 0.03, -0.03, 0.03))
    assert 10 <= len(regions) <= 200
    check_tiling(model, x0, u, v, regions, points_per_region=1)
    check_affine(model, x0, u, v, regions)


settings.register_profile("plane", max_examples=12, deadline=None)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    d_in=st.integers(2, 5),
    slope=st.sampled_from([0.0, 0.1]),
)
def test_random_mlps_tile(seed: int, dims: list[int], d_in: int, slope: float) -> None:
    torch.manual_seed(seed)
    model = zoo.MLP([d_in, *dims, 3], slope=slope).to(D).eval()
    x0 = torch.randn(d_in, dtype=D)
    u, v = torch.randn(d_in, dtype=D), torch.randn(d_in, dtype=D)
    regions = plane_regions(model, x0, u, v, (-2.0, 2.0, -1.0, 3.0))
    check_tiling(model, x0, u, v, regions, points_per_region=1, seed=seed)
    check_affine(model, x0, u, v, regions)


# ---------------------------------------------------------------------------
# precision, shapes, modes, limits, bad input


def test_float32_model_is_sliced_in_float64() -> None:
    torch.manual_seed(7)
    net32 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    net64 = _copy64(net32)
    x0, u, v = torch.randn(4), torch.randn(4), torch.randn(4)
    r32 = plane_regions(net32, x0, u, v, (-1.0, 1.0, -1.0, 1.0))
    r64 = plane_regions(net64, x0.to(D), u.to(D), v.to(D), (-1.0, 1.0, -1.0, 1.0))
    assert [r.pattern for r in r32] == [r.pattern for r in r64]
    for a, b in zip(r32, r64, strict=True):
        assert a.vertices.dtype == torch.float64
        assert torch.equal(a.vertices, b.vertices)
    assert all(p.dtype == torch.float32 for p in net32.parameters())


def test_batch_of_one_and_one_channel_images() -> None:
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).to(D).eval()
    x0, u, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    one = plane_regions(net, x0, u, v, (-1.0, 1.0, -1.0, 1.0))
    batched = plane_regions(net, x0[None], u[None], v[None], (-1.0, 1.0, -1.0, 1.0))
    assert [r.pattern for r in one] == [r.pattern for r in batched]
    model, shape = zoo.make("conv_bn")  # input [1, 8, 8]: a one-channel image, unbatched and batched
    x0, u, v = _gradient_plane(model, shape, seed=9)
    a = plane_regions(model, x0, u, v, (-0.05, 0.05, -0.05, 0.05))
    b = plane_regions(model, x0[None], u[None], v[None], (-0.05, 0.05, -0.05, 0.05))
    assert [r.pattern for r in a] == [r.pattern for r in b]


def test_modes_are_restored_and_eval_mode_is_sliced() -> None:
    model, shape = zoo.make("conv_bn")
    x0, u, v = _gradient_plane(model, shape, seed=10)
    want = plane_regions(model, x0, u, v, (-0.05, 0.05, -0.05, 0.05))
    model.train()
    model.bn2.eval()
    flags = [m.training for m in model.modules()]
    got = plane_regions(model, x0, u, v, (-0.05, 0.05, -0.05, 0.05))
    assert [m.training for m in model.modules()] == flags
    assert [r.pattern for r in got] == [r.pattern for r in want]


def test_too_many_regions_error() -> None:
    net = _relu_net([[1, 0], [0, 1], [1, 1]], [0, 0, -1])
    with pytest.raises(TooManyRegionsError, match=r"more than max_regions=3 .*found 4.*smaller extent.*larger max_regions") as info:
        plane_regions(net, *E2, (-1.0, 2.0, -1.0, 2.0), max_regions=3)
    assert isinstance(info.value, ValueError)
    assert info.value.found == 4 and info.value.limit == 3
    assert len(plane_regions(net, *E2, (-1.0, 2.0, -1.0, 2.0), max_regions=7)) == 7


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"extent": (1.0, 1.0, 0.0, 1.0)}, ValueError, "a_min < a_max"),
        ({"extent": (2.0, 1.0, 0.0, 1.0)}, ValueError, "a_min < a_max"),
        ({"extent": (0.0, 1.0, 1.0, -1.0)}, ValueError, "b_min < b_max"),
        ({"extent": (0.0, 1.0, 0.0)}, ValueError, "four numbers"),
        ({"extent": (0.0, math.inf, 0.0, 1.0)}, ValueError, "finite"),
        ({"u": torch.zeros(2, dtype=D)}, ValueError, "u is zero"),
        ({"v": torch.zeros(2, dtype=D)}, ValueError, "v is zero"),
        ({"v": torch.tensor([-2.0, 0.0], dtype=D)}, ValueError, "parallel"),
        ({"u": torch.ones(3, dtype=D)}, ValueError, "shaped like x0"),
        ({"x0": torch.zeros(2, 1, dtype=D)}, ValueError, "shaped like x0"),
        ({"x0": [0.0, 0.0]}, TypeError, "x0 must be a torch.Tensor"),
        ({"u": torch.tensor([1.0, math.nan], dtype=D)}, ValueError, "NaN"),
        ({"x0": torch.zeros(2, dtype=torch.int64)}, ValueError, "floating point"),
        ({"max_regions": 0}, ValueError, "max_regions must be a positive int"),
        ({"model": "net"}, TypeError, "torch.nn.Module"),
    ],
)
def test_bad_input(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    net = _relu_net([[1, 0], [0, 1]], [0, 0])
    call: dict[str, object] = {
        "model": net, "x0": E2[0], "u": E2[1], "v": E2[2], "extent": (-1.0, 1.0, -1.0, 1.0)
    }
    call.update(kwargs)
    extent = call.pop("extent")
    with pytest.raises(error, match=match):
        plane_regions(call["model"], call["x0"], call["u"], call["v"], extent, **{  # type: ignore[arg-type]
            k: val for k, val in call.items() if k not in ("model", "x0", "u", "v")
        })


def test_additional_forward_args_are_passed_for_every_point() -> None:
    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 4).to(D)
            self.head = nn.Linear(4, 2).to(D)

        def forward(self, x: Tensor, shift: Tensor) -> Tensor:
            return self.head(F.relu(self.fc(x) + shift[:, None]))

    torch.manual_seed(11)
    net = Shifted().eval()
    shift = torch.tensor([0.3], dtype=D)
    regions = plane_regions(net, *E2, (-2.0, 2.0, -2.0, 2.0), additional_forward_args=(shift,))
    ab = torch.stack([r.point for r in regions])
    pats = rollnet.activation_pattern(net, ab, additional_forward_args=(shift.expand(len(regions)),))
    assert [pats[i] for i in range(len(regions))] == [r.pattern for r in regions]
    plain = plane_regions(net, *E2, (-2.0, 2.0, -2.0, 2.0), additional_forward_args=(torch.zeros(1, dtype=D),))
    assert {r.pattern for r in plain} != {r.pattern for r in regions}


def test_an_incomplete_walk_is_an_error_not_a_picture(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the walk could not cross some edge, the missing area is reported, never returned."""
    from rollnet.evaluate import plane

    net = _relu_net([[1, 0], [0, 1], [1, 1]], [0, 0, -1])
    monkeypatch.setattr(plane._Walk, "_cover", lambda self, task, found: [])
    with pytest.raises(RuntimeError, match=r"the [1-6] regions found cover 0\.\d+ of the rectangle's area"):
        plane_regions(net, *E2, (-1.0, 2.0, -1.0, 2.0))


def test_max_pool_ties_that_persist_on_the_plane_cut_nothing() -> None:
    """Two members of a pooling window equal everywhere on the plane (a tie with equal gradients)."""
    model = zoo_max.TieNet().to(D).eval()
    x0 = torch.zeros(1, 4, 4, dtype=D)
    gen = torch.Generator().manual_seed(12)
    u = torch.zeros(1, 4, 4, dtype=D)
    u[0, 0, 0] = u[0, 0, 1] = 1.0
    u[0, 2, 2] = 1.0
    v = torch.randn(1, 4, 4, generator=gen, dtype=D)
    v[0, 0, 1] = v[0, 0, 0]
    regions = plane_regions(model, x0, u, v, (-1.0, 1.0, -1.0, 1.0))
    assert len(regions) > 1
    check_tiling(model, x0, u, v, regions, points_per_region=4)
    check_affine(model, x0, u, v, regions)


# ---------------------------------------------------------------------------
# the pieces: polygon geometry, covering an edge with several neighbours


def test_clip_keeps_labels_and_vertices_on_the_line() -> None:
    square, labels = polygons.rectangle(0.0, 1.0, 0.0, 1.0, label=-1)
    # the diagonal through two corners: no new vertex, the kept half is a triangle
    tri, lab = polygons.clip(square, labels, np.array([1.0, -1.0]) / math.sqrt(2), 0.0, np.zeros(2), 5, 1e-12)
    assert {tuple(p) for p in tri.tolist()} == {(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)}
    assert sorted(lab.tolist()) == [-1, -1, 5]
    assert polygons.area(tri) == pytest.approx(0.5)
    # a line along an edge changes nothing; a line missing the polygon keeps all or nothing
    same, lab2 = polygons.clip(square, labels, np.array([0.0, 1.0]), 0.0, np.zeros(2), 6, 1e-12)
    assert np.array_equal(same, square) and np.array_equal(lab2, labels)
    gone, _ = polygons.clip(square, labels, np.array([0.0, 1.0]), -2.0, np.zeros(2), 6, 1e-12)
    assert gone.shape == (0, 2)
    # each edge's label: the edge from vertex i to i + 1 of the cut square lies on its line
    cut, lab3 = polygons.clip(square, np.arange(4), np.array([-0.6, -0.8]), 0.7, np.zeros(2), 9, 1e-12)
    n = cut.shape[0]
    for i in range(n):
        mid = (cut[i] + cut[(i + 1) % n]) / 2
        if lab3[i] == 9:
            assert 0.7 - 0.6 * mid[0] - 0.8 * mid[1] == pytest.approx(0.0, abs=1e-15)
        else:  # the square's own sides 0 (b = 0), 1 (a = 1), 2 (b = 1), 3 (a = 0)
            axis, value = [(1, 0.0), (0, 1.0), (1, 1.0), (0, 0.0)][int(lab3[i])]
            assert mid[axis] == value


def test_contains_and_segment_inside() -> None:
    tri = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    pts = np.array([[0.5, 0.5], [1.0, 1.0], [1.5, 1.5], [0.01, 0.5]])
    assert polygons.contains(tri, pts).tolist() == [True, True, False, True]
    assert polygons.contains(tri, pts, margin=0.1).tolist() == [True, False, False, False]
    assert polygons.segment_inside(tri, np.array([3.0, 3.0]), np.array([4.0, 3.0]), 1e-12) is None
    lo, hi = polygons.segment_inside(tri, np.array([-1.0, 1.0]), np.array([3.0, 1.0]), 0.0)  # type: ignore[misc]
    assert (lo, hi) == pytest.approx((0.25, 0.5))


def test_an_edge_with_two_neighbours_is_covered_whole() -> None:
    """White box: the neighbour found at the middle of an edge covers part of it; the rest is
    crossed again (deeper lines may end on an edge when the arrangement is degenerate)."""
    from rollnet.evaluate import plane

    def region(verts: list[list[float]], labels: list[int]) -> plane._Region:
        return plane._Region(
            np.array(verts), np.array(labels, dtype=np.int64), b"", None, np.zeros(2),  # type: ignore[arg-type]
            np.zeros(1), np.zeros((1, 2)),
        )

    walk = plane._Walk(None, 10)  # type: ignore[arg-type]
    # R below b = 0.5; above it two neighbours split at a = 0.3
    walk.regions = [
        region([[0, 0], [1, 0], [1, 0.5], [0, 0.5]], [-1, -1, 0, -1]),
        region([[0.3, 0.5], [1, 0.5], [1, 1], [0.3, 1]], [0, -1, -1, 1]),
        region([[0, 0.5], [0.3, 0.5], [0.3, 1], [0, 1]], [0, 1, -1, -1]),
    ]
    walk.expanded = {0}
    (task,) = plane._edge_tasks(walk.regions[0])
    q = task.query()
    assert q[1] > 0.5 and q[0] == pytest.approx(0.5)  # stepped across the edge's middle
    rest = walk._cover(task, 1)
    # the edge runs from (1, 0.5) to (0, 0.5): region 1 covers t in [0, 0.7]
    left = [t for t in rest if t.start is task.start]
    assert len(left) == 1 and left[0].t0 == pytest.approx(0.7, abs=1e-9) and left[0].t1 == 1.0
    assert len(rest) == 1 + len(plane._edge_tasks(walk.regions[1]))  # and region 1's own edges
    assert 1 in walk.expanded
    q2 = left[0].query()
    assert q2[0] < 0.3 and q2[1] > 0.5  # the next step lands in the uncovered part, region 2
    rest2 = walk._cover(left[0], 2)
    assert not [t for t in rest2 if t.start is task.start]  # the edge is covered whole
    assert len(rest2) == len(plane._edge_tasks(walk.regions[2]))
    # a neighbour that does not reach the crossing point (a thin region stepped over): retried closer
    far = plane._Task(task.start, task.end, task.outward, 0.7, 1.0)
    far.query()
    step = far.step
    (again,) = walk._cover(far, 1)
    assert again is far and again.attempt == 1
    again.query()
    again.attempt = 2
    again.query()
    assert again.step < step


def test_padded_sequence_with_lengths() -> None:
    """A recurrent net on a padded sequence: the padded steps' neurons are not neurons (they cut
    nothing), so the slice equals the slice of the unpadded sequence."""
    from rollnet.models import ElmanRNN

    torch.manual_seed(13)
    model = ElmanRNN(3, 5, 2).to(D).eval()
    gen = torch.Generator().manual_seed(13)
    x0, u, v = (torch.randn(6, 3, generator=gen, dtype=D) for _ in range(3))
    lengths = torch.tensor([4])
    extent = (-1.0, 1.0, -1.0, 1.0)
    padded = plane_regions(model, x0, u, v, extent, additional_forward_args=(lengths,))
    alone = plane_regions(model, x0[:4], u[:4], v[:4], extent)
    assert len(padded) == len(alone) >= 5
    assert sum(r.area for r in padded) == pytest.approx(4.0, rel=1e-9)
    for p, q in zip(padded, alone, strict=True):
        assert torch.allclose(p.vertices, q.vertices, atol=1e-12)
    ab = torch.stack([r.point for r in padded])
    pats = rollnet.activation_pattern(
        model, _inputs(x0, u, v, ab), additional_forward_args=(lengths.expand(len(padded)),)
    )
    assert [pats[i] for i in range(len(padded))] == [r.pattern for r in padded]
