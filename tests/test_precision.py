"""rounding="sound": certificates of float32 models never exceed the float64 ones (issue 11, section 5).

The reference for a float32 model is the same model with its weights and
input cast to float64, certified by an oracle that does not use rollnet's
engine (batched autograd over the zoo models' own records of their
pre-activations, explicit Jacobian products for random MLPs and a conv net).
The sweep also counts the plain float32 certificates (``rounding="none"``)
above the reference and asserts that there are many, so the comparison can
fail.  The models are tiny, so the tests run on one intra-op thread (two
threads only add synchronisation on such small tensors).
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rollnet
from rollnet.rounding import toward_zero
from tests import zoo, zoo_max
from tests.threads import intra_op_threads

NORMS = [1.0, 2.0, math.inf]
DUAL = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}
# sound radii sit within two float32 ulps (plus float64 noise) of the reference
TIGHT = 1e-6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with intra_op_threads(1):
        yield


# ---------------------------------------------------------------------------
# oracles: everything from float64 values z [B, N] and gradients g [B, N, D]


def _signs(z: Tensor, always_on: Tensor | None) -> Tensor:
    s = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
    return s if always_on is None else torch.where(always_on, torch.ones_like(s), s)


def _oracle_margin(z: Tensor, g: Tensor, p: float) -> Tensor:
    norms = g.flatten(2).norm(p=DUAL[p], dim=2)
    ratio = torch.where(norms > 0, z.abs() / norms, torch.full_like(z, math.inf))
    return ratio.amin(1) if z.shape[1] else torch.full((z.shape[0],), math.inf, dtype=z.dtype)


def _oracle_crossings(z: Tensor, slope: Tensor, always_on: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``[B, K]`` distances along +d_k and -d_k to the first flip; ``slope`` ``[B, N, K]`` is g . d_k."""
    if z.shape[1] == 0:
        inf = torch.full((z.shape[0], slope.shape[2]), math.inf, dtype=z.dtype)
        return inf, inf
    speed = slope * _signs(z, always_on).unsqueeze(-1)  # < 0: moving towards the hyperplane along +d
    t = z.abs().unsqueeze(-1) / slope.abs()
    inf = torch.full_like(t, math.inf)
    return torch.where(speed < 0, t, inf).amin(1), torch.where(speed > 0, t, inf).amin(1)


class Tally:
    """Counts of plain float32 certificates above the reference, and the sound radii's shrink."""

    def __init__(self) -> None:
        self.compared = 0
        self.plain_over = 0
        self.plain_worst = 0.0
        self.worst_by_kind: dict[str, float] = {}
        self.shrink: list[Tensor] = []

    def check(self, sound: Tensor, plain: Tensor | None, ref: Tensor, what: str) -> None:
        assert sound.dtype == torch.float32
        s, r = sound.double().flatten(), ref.flatten()
        # zero overclaims: |sound| <= |ref| (stability lower bounds are negative)
        over = s.abs() > r.abs()
        assert not bool(over.any()), f"{what}: {int(over.sum())} sound certificates exceed float64, e.g. " \
            f"{s[over][:3].tolist()} > {r[over][:3].tolist()}"
        assert bool(((s == 0) == (r == 0)).all() and (s.isinf() == r.isinf()).all()), what
        finite = torch.isfinite(r) & (r != 0)
        shrink = 1 - s[finite] / r[finite]
        worst = float(shrink.max()) if shrink.numel() else 0.0
        assert worst < TIGHT, f"{what}: sound certificate needlessly loose ({worst})"
        self.shrink.append(shrink)
        if plain is None:
            return
        assert plain.dtype == torch.float32
        rel = plain.double().flatten()[finite] / r[finite] - 1
        self.compared += int(finite.sum())
        self.plain_over += int((rel > 0).sum())
        worst = float(rel.max()) if rel.numel() else 0.0
        self.plain_worst = max(self.plain_worst, worst)
        kind = what.split()[-1]
        self.worst_by_kind[kind] = max(self.worst_by_kind.get(kind, 0.0), worst)


def _pair(model64: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A float32 model and its reference: the float32 weights cast back to float64."""
    model32 = copy.deepcopy(model64).float().eval()
    return model32, copy.deepcopy(model32).double().eval()


# ---------------------------------------------------------------------------
# the directed rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_toward_zero_is_strictly_inside_and_at_most_two_ulps_away(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    mags = torch.exp(torch.empty(20_000, dtype=torch.float64).uniform_(-745.0, 709.0, generator=gen))
    signs = torch.where(torch.rand(20_000, generator=gen) < 0.5, -1.0, 1.0).double()
    special = torch.tensor([0.0, -0.0, 1.0, -1.5, 2.0**-30, info.max, -info.max, 10.0 * info.max,
                            float(info.tiny), float(info.smallest_normal) / 3, 1e-300, math.inf, -math.inf],
                           dtype=torch.float64)
    v = torch.cat([mags * signs, special, torch.randn(1000, generator=gen, dtype=torch.float64).to(dtype).double()])
    out = toward_zero(v, dtype)
    assert out.dtype == dtype
    o = out.double()
    finite = torch.isfinite(v) & (v != 0)
    assert bool((o[finite].abs() < v[finite].abs()).all())  # strictly inside
    assert bool((torch.sign(o[finite]) * torch.sign(v[finite]) >= 0).all())  # never crosses zero
    assert bool((o[~finite] == v[~finite]).all())  # 0 and +-inf stay
    # tight: two steps back away from zero overshoot v
    away = torch.where(v > 0, math.inf, -math.inf).to(dtype)
    back = torch.nextafter(torch.nextafter(out, away), away).double()
    assert bool((back[finite].abs() > v[finite].abs()).all())
    assert toward_zero(v, torch.float64) is v  # the reference dtype is returned as it is


# ---------------------------------------------------------------------------
# the zoo against batched autograd in float64


ZOO_MAX_NAMES = ["adaptive", "maxout", "pool1d", "pool3d", "pool_cnn"]
ZOO_CASES = [("zoo", name) for name in sorted(zoo.ZOO)] + [("zoo_max", name) for name in ZOO_MAX_NAMES]


def _zoo_model(kind: str, name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "zoo":
        model, shape = zoo.make(name, seed=3)
        return model, shape
    pooled = zoo_max.make_models()[name]
    return pooled, tuple(pooled.input_shape)  # type: ignore[arg-type]


def _recorded_gradients(model: zoo.Recording, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(z [B, N], g [B, N, D])`` from the model's own record, by batched backward passes."""
    x = x.detach().clone().requires_grad_(True)
    model.record = []
    try:
        model(x)
        record = model.record
    finally:
        model.record = None
    z = torch.cat([r.reshape(x.shape[0], -1) for r in record], 1).detach()
    g = torch.cat([zoo_max._jacobian(r, x).flatten(2) for r in record], 1)
    return z, g


def _zoo_oracle(kind: str, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    if kind == "zoo":
        z, g = _recorded_gradients(model, x)  # type: ignore[arg-type]
        return z, g, None
    z, g, is_max = zoo_max.neurons(model, x)  # type: ignore[arg-type]
    return z.detach(), g.detach().flatten(2), is_max.unsqueeze(0).expand_as(z)


@pytest.mark.parametrize(("kind", "name"), ZOO_CASES)
def test_zoo_sound_certificates_never_exceed_float64(kind: str, name: str) -> None:
    model64, shape = _zoo_model(kind, name)
    model32, ref = _pair(model64)
    gen = torch.Generator().manual_seed(11)
    x32 = torch.randn(12, *shape, generator=gen)
    x64 = x32.double()
    z, g, always_on = _zoo_oracle(kind, ref, x64)
    tally = Tally()
    for p in NORMS:
        sound = rollnet.margin(model32, x32, p=p)
        plain = rollnet.margin(model32, x32, p=p, rounding="none")
        tally.check(sound, plain, _oracle_margin(z, g, p), f"{name} margin p={p}")
    lower, upper = rollnet.stability_bounds(model32, x32)
    plus, minus = _oracle_crossings(z, g, always_on)
    tally.check(upper, None, plus, f"{name} upper")
    tally.check(lower, None, -minus, f"{name} lower")
    d = torch.randn(x32.shape, generator=gen)
    along = _oracle_crossings(z, torch.einsum("bnk,bk->bn", g, d.double().flatten(1)).unsqueeze(-1), always_on)[0]
    tally.check(rollnet.directional_margin(model32, x32, d), None, along[:, 0], f"{name} directional")
    _, radius = rollnet.certified_saliency(model32, x32, target=0, p=math.inf)
    tally.check(radius, None, _oracle_margin(z, g, math.inf), f"{name} certified_saliency")
    # one pass, many answers: the same guarantee
    regions = rollnet.LinearRegions(model32, x32[:4])
    assert regions.rounding == "sound"
    for p in NORMS:
        tally.check(regions.margin(p), None, _oracle_margin(z[:4], g[:4], p), f"{name} LinearRegions p={p}")
    tally.check(regions.directional_margin(d[:4]), None, along[:4, 0], f"{name} LinearRegions directional")
    assert tally.compared > 0


# ---------------------------------------------------------------------------
# the sweep: 10^5 inputs through random MLPs and a conv net


def _mlp(sizes: list[int], slope: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope) if slope else nn.ReLU())
    return nn.Sequential(*layers).eval()


def _mlp_oracle(model: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(z [B, N], g [B, N, D])`` in float64 by explicit Jacobian products W_l diag(slope) J_{l-1}."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts = [m for m in model if not isinstance(m, nn.Linear)]
    h, jac = x, None
    zs, gs = [], []
    for i, lin in enumerate(linears[:-1]):
        w, b = lin.weight.detach().double(), lin.bias.detach().double()
        z = h @ w.t() + b
        jac = w.expand(x.shape[0], *w.shape) if jac is None else torch.einsum("ij,bjk->bik", w, jac)
        zs.append(z)
        gs.append(jac)
        slope = float(getattr(acts[i], "negative_slope", 0.0))
        m = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))  # (the slope in float64)
        h = z * m
        jac = jac * m.unsqueeze(-1)
    return torch.cat(zs, 1), torch.cat(gs, 1)


class SmallConv(nn.Module):
    """Conv, BatchNorm (eval), ReLU, strided conv, ReLU, linear, ReLU, head: ``[1, 4, 4]`` inputs.

    Its oracle (:func:`_conv_oracle`) multiplies the layers' Jacobians out by hand.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.c2 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 2 * 2, 4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            for stat, (lo, hi) in [("running_mean", (-0.3, 0.3)), ("running_var", (0.5, 2.0)),
                                   ("weight", (0.5, 1.5)), ("bias", (-0.2, 0.2))]:
                getattr(self.bn, stat).uniform_(lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.c1(x)))
        h = F.relu(self.c2(h))
        return self.head(F.relu(self.fc(h.flatten(1))))


def _conv_oracle(model: SmallConv, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(z [B, N], g [B, N, D])`` in float64: the layers' Jacobians applied to the D unit inputs."""
    b, d = x.shape[0], x[0].numel()
    bn = model.bn
    assert bn.running_var is not None and bn.weight is not None
    with torch.no_grad():
        eye = torch.eye(d, dtype=x.dtype).reshape(d, *x.shape[1:])
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(1, -1, 1, 1)
        z1 = model.bn(model.c1(x))
        j1 = (F.conv2d(eye, model.c1.weight, padding=1) * scale).unsqueeze(0)  # [1, D, C, H, W]
        t1 = (z1 > 0).unsqueeze(1) * j1  # [B, D, C, H, W]
        z2 = model.c2(F.relu(z1))
        j2 = F.conv2d(t1.flatten(0, 1), model.c2.weight, stride=2, padding=1).unflatten(0, (b, d))
        t2 = ((z2 > 0).unsqueeze(1) * j2).flatten(2)  # [B, D, F]
        z3 = model.fc(F.relu(z2).flatten(1))
        j3 = t2 @ model.fc.weight.t()
        z = torch.cat([z1.flatten(1), z2.flatten(1), z3], 1)
        g = torch.cat([j1.expand(b, *j1.shape[1:]).flatten(2), j2.flatten(2), j3], 2)  # [B, D, N]
    return z, g.transpose(1, 2)


Case = tuple[str, nn.Module, tuple[int, ...], int, Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]]


def _sweep_cases() -> list[Case]:
    torch.manual_seed(5)
    return [
        ("mlp 6-16-16-16-3", _mlp([6, 16, 16, 16, 3], 0.0, 1), (6,), 32_000, _mlp_oracle),  # type: ignore[list-item]
        ("mlp 10-24-16-3", _mlp([10, 24, 16, 3], 0.0, 2), (10,), 32_000, _mlp_oracle),  # type: ignore[list-item]
        ("leaky mlp 4-12x4-2", _mlp([4, 12, 12, 12, 12, 2], 0.1, 3), (4,), 32_000, _mlp_oracle),  # type: ignore[list-item]
        ("conv net 1x4x4", SmallConv().eval(), (1, 4, 4), 8_000, _conv_oracle),  # type: ignore[list-item]
    ]


CHUNK = 16_000


def test_sweep_of_100k_inputs_has_no_overclaim_and_plain_float32_has_many() -> None:
    total = 0
    tally = Tally()
    gen = torch.Generator().manual_seed(7)
    for name, model64, shape, n, oracle in _sweep_cases():
        model32, ref = _pair(model64)
        for start in range(0, n, CHUNK):
            b = min(CHUNK, n - start)
            x32 = torch.randn(b, *shape, generator=gen)
            z, g = oracle(ref, x32.double().flatten(1) if oracle is _mlp_oracle else x32.double())
            # one pass per mode gives all three norms and the stability bounds
            sound = rollnet.LinearRegions(model32, x32)
            plain = rollnet.LinearRegions(model32, x32, rounding="none")
            for p in NORMS:
                tally.check(sound.margin(p), plain.margin(p), _oracle_margin(z, g, p), f"{name} p={p}")
            (lower, upper), (lower_n, upper_n) = sound.stability_bounds(), plain.stability_bounds()
            plus, minus = _oracle_crossings(z, g)
            tally.check(upper, upper_n, plus, f"{name} upper")
            tally.check(lower, lower_n, -minus, f"{name} lower")
            d = torch.randn(b, *shape, generator=gen)
            along = _oracle_crossings(z, torch.einsum("bnk,bk->bn", g, d.double().flatten(1)).unsqueeze(-1))[0]
            tally.check(rollnet.directional_margin(model32, x32, d),
                        rollnet.directional_margin(model32, x32, d, rounding="none"), along[:, 0], f"{name} directional")
            total += b
    assert total >= 100_000
    shrink = torch.cat(tally.shrink)
    # the demonstration: without the sound rounding, float32 exceeds float64 on many inputs
    assert tally.plain_over > 0.2 * tally.compared, (tally.plain_over, tally.compared)
    assert tally.plain_worst > 1e-6
    print(f"\n{total} inputs, {tally.compared} certificates: plain float32 above float64 for "
          f"{tally.plain_over} (worst relative excess: "
          + ", ".join(f"{k} +{v:.2g}" for k, v in sorted(tally.worst_by_kind.items()))
          + f"); sound: none above, shrink median {float(shrink.median()):.2e}, max {float(shrink.max()):.2e}")


# ---------------------------------------------------------------------------
# the API


def test_float64_inputs_are_computed_as_they_are() -> None:
    model, shape = zoo.make("conv_bn", seed=1)
    x = torch.randn(6, *shape, dtype=torch.float64)
    for p in NORMS:
        assert torch.equal(rollnet.margin(model, x, p=p), rollnet.margin(model, x, p=p, rounding="none"))
    regions = rollnet.LinearRegions(model, x)
    assert torch.equal(regions.margin(2), rollnet.LinearRegions(model, x, rounding="none").margin(2))


def test_sound_mode_leaves_the_model_alone_and_returns_the_input_dtype() -> None:
    model = _mlp([4, 16, 16, 2], 0.0, 0).train()
    model[1].eval()  # a submodule's own flag must survive too
    before = {k: (v.dtype, v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    x = torch.randn(10, 4)
    r = rollnet.margin(model, x)
    assert r.dtype == torch.float32
    assert model.training and not model[1].training and model[0].training
    for k, v in model.state_dict().items():
        dtype, ptr, value = before[k]
        assert v.dtype == dtype and v.data_ptr() == ptr and torch.equal(v, value)
    regions = rollnet.LinearRegions(model, x)
    assert regions.values.dtype == regions.output.dtype == regions.jacobian().dtype == torch.float32
    lower, upper = regions.stability_bounds()
    assert lower.dtype == upper.dtype == torch.float32 and bool((lower <= 0).all() and (upper >= 0).all())
    s, radius = rollnet.certified_saliency(model, x, target=1)
    s64, r64 = rollnet.certified_saliency(copy.deepcopy(model).double(), x.double(), target=1)
    assert s.dtype == radius.dtype == torch.float32
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
    assert bool((radius.double() < r64).all())


def test_infinite_and_zero_certificates_stay_what_they_are() -> None:
    net = nn.Sequential(nn.Linear(3, 2))  # no neurons: no neuron can flip
    assert bool(torch.isinf(rollnet.margin(net, torch.randn(4, 3))).all())
    first = nn.Linear(1, 1)
    relu = nn.Sequential(first, nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        first.weight.fill_(1.0)
        first.bias.fill_(0.0)
    assert rollnet.margin(relu, torch.zeros(1, 1)).tolist() == [0.0]  # on the hyperplane


def test_unknown_rounding_is_refused_everywhere() -> None:
    model = _mlp([3, 4, 2], 0.0, 0)
    x = torch.randn(2, 3)
    calls: list[Callable[[], object]] = [
        lambda: rollnet.margin(model, x, rounding="fast"),  # type: ignore[arg-type]
        lambda: rollnet.margin(model, x[:0], rounding=True),  # type: ignore[arg-type]
        lambda: rollnet.stability_bounds(model, x, rounding="sound "),  # type: ignore[arg-type]
        lambda: rollnet.directional_margin(model, x, torch.ones(3), rounding=None),  # type: ignore[arg-type]
        lambda: rollnet.certified_saliency(model, x, target=0, rounding="exact"),  # type: ignore[arg-type]
        lambda: rollnet.LinearRegions(model, x, rounding="float64"),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(ValueError, match="rounding must be 'sound' or 'none'"):
            call()


class CastsInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x).float()))


def test_a_model_that_casts_to_float32_inside_is_refused_not_certified() -> None:
    model = CastsInside()
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"lower precision inside .*'fc1'|lower precision inside"):
        rollnet.margin(model, x)
    assert rollnet.margin(model, x, rounding="none").shape == (4,)


class Uncopyable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.lock = threading.Lock()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def test_a_model_that_cannot_be_copied_is_refused_with_the_way_out() -> None:
    model = Uncopyable()
    with pytest.raises(TypeError, match=r"deepcopy.*rounding='none'"):
        rollnet.margin(model, torch.randn(2, 3))
    assert rollnet.margin(model, torch.randn(2, 3), rounding="none").shape == (2,)
    assert rollnet.margin(model.double(), torch.randn(2, 3, dtype=torch.float64)).shape == (2,)  # nothing to copy


def test_autocast_cannot_undo_the_float64_reference() -> None:
    """Under bfloat16 autocast the plain certificate is bfloat16 arithmetic; the sound one stays below float64."""
    model32, ref = _pair(_mlp([10, 32, 32, 3], 0.0, 4))
    x = torch.randn(500, 10)
    z, g = _mlp_oracle(ref, x.double())  # type: ignore[arg-type]
    r64 = _oracle_margin(z, g, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sound = rollnet.margin(model32, x)
        plain = rollnet.margin(model32, x, rounding="none")
    assert bool((sound.double() < r64).all())
    assert bool((plain.double() > r64).any())


def test_half_precision_inputs_are_certified_below_float64() -> None:
    model64 = _mlp([6, 16, 16, 2], 0.0, 5)
    x = torch.randn(300, 6)
    for dtype in (torch.bfloat16, torch.float16):
        model_lo = copy.deepcopy(model64).to(dtype)
        x_lo = x.to(dtype)
        ref = copy.deepcopy(model_lo).double()
        z, g = _mlp_oracle(ref, x_lo.double())
        sound = rollnet.margin(model_lo, x_lo)
        assert sound.dtype == dtype
        assert bool((sound.double() < _oracle_margin(z, g, 2.0)).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sound_certificates_stay_below_the_cpu_float64_reference() -> None:
    """On a GPU, float32 convolutions may use TF32 (cuDNN's default); the sound mode is unaffected."""
    model32, ref = _pair(SmallConv().eval())
    x = torch.randn(2000, 1, 4, 4)
    z, g = _conv_oracle(ref, x.double())  # type: ignore[arg-type]
    cuda32 = copy.deepcopy(model32).cuda()
    tally = Tally()
    for p in NORMS:
        sound = rollnet.margin(cuda32, x.cuda(), p=p).cpu()
        plain = rollnet.margin(cuda32, x.cuda(), p=p, rounding="none").cpu()
        tally.check(sound, plain, _oracle_margin(z, g, p), f"cuda p={p}")
    print(f"\ncuda: plain float32 above float64 for {tally.plain_over} of {tally.compared}")
