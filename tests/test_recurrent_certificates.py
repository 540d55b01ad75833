"""Certificates of recurrent models (ElmanRNN relu / leaky_relu, ScoRNN) against independent oracles.

The oracle is a forward written here from the models' parameters (``input``, ``weight_hh``, or
ScoRNN's ``skew`` and ``sign`` through an explicit Cayley transform), run on each sequence
*unpadded*: its pre-activations, its pattern (``z > 0``), its autograd gradients (one backward per
neuron, :func:`tests.oracles.autograd_gradients`), and the sampling / bisection recipes of
``tests/oracles.py``.  rollnet is run on padded batches (random, not zero, padding, with
``lengths`` through ``additional_forward_args``) and on unpadded ones of several lengths.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import rollnet
from rollnet.models import ElmanRNN, ScoRNN
from tests.oracles import (
    autograd_gradients,
    bisect_line,
    dual,
    oracle_margin,
    sample_ball,
    worst_direction,
)
from tests.threads import intra_op_threads
from tests.zoo import Recording

Net = ElmanRNN | ScoRNN
C, H, L = 3, 6, 4
KINDS = ["elman_relu", "elman_leaky", "scornn"]
NORMS = [1.0, 2.0, math.inf]
# name -> (T, lengths or None): unpadded batches of several lengths and padded ones (one with
# padding past the longest sequence, which the model does not run)
SETTINGS: dict[str, tuple[int, list[int] | None]] = {
    "T1": (1, None),
    "T4": (4, None),
    "T7": (7, None),
    "padded": (7, [7, 2, 5, 1, 6]),
    "overpadded": (9, [3, 6, 1, 4]),
}


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with intra_op_threads(1):
        yield


def make(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> Net:
    """A model with generic parameters (non-zero biases, a ScoRNN A away from its block start)."""
    torch.manual_seed(seed)
    model: Net
    if kind == "elman_relu":
        model = ElmanRNN(C, H, L)
    elif kind == "elman_leaky":
        model = ElmanRNN(C, H, L, nonlinearity="leaky_relu", negative_slope=0.1)
    else:
        model = ScoRNN(C, H, L, negative_slope=0.1, num_negative=2)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        model.input.weight.copy_(torch.randn(H, C, generator=gen) * 0.7)
        model.input.bias.copy_(torch.randn(H, generator=gen) * 0.4)
        model.output.bias.copy_(torch.randn(L, generator=gen) * 0.3)
        if isinstance(model, ScoRNN):
            model.skew.add_(torch.randn(model.skew.shape, generator=gen) * 0.5)
    return model.to(dtype).eval()


def batch(setting: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor | None, list[int]]:
    """x ``[B, T, C]`` (padding random), lengths ``[B]`` or None, and each sequence's length."""
    t, lengths = SETTINGS[setting]
    gen = torch.Generator().manual_seed(seed)
    b = 4 if lengths is None else len(lengths)
    x = torch.randn(b, t, C, generator=gen, dtype=dtype)
    if lengths is None:
        return x, None, [t] * b
    return x, torch.tensor(lengths), lengths


def fwd_args(lengths: Tensor | None) -> tuple[Tensor, ...] | None:
    return None if lengths is None else (lengths,)


# -- the independent forward ------------------------------------------------------------------------


def recurrent_matrix(model: Net) -> Tensor:
    """W from the parameters: ElmanRNN's ``weight_hh``; ScoRNN's (I + A)^-1 (I - A) D, A = U - U^T
    with U's strict upper triangle filled row-major from ``skew``."""
    if isinstance(model, ScoRNN):
        skew = model.skew.detach()
        h = model.sign.shape[0]
        upper = torch.zeros(h, h, dtype=skew.dtype)
        k = 0
        for i in range(h):
            for j in range(i + 1, h):
                upper[i, j] = skew[k]
                k += 1
        a = upper - upper.T
        eye = torch.eye(h, dtype=skew.dtype)
        return torch.linalg.inv(eye + a) @ (eye - a) @ torch.diag(model.sign.to(skew.dtype))
    return model.weight_hh.detach()


def run(model: Net, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Pre-activations ``[B, H]`` of every step and the logits, for unpadded sequences x ``[B, n, C]``."""
    w_in, b_in = model.input.weight.detach(), model.input.bias.detach()
    w = recurrent_matrix(model)
    slope = float(model.negative_slope)
    h = x.new_zeros(x.shape[0], w.shape[0])
    zs = []
    for t in range(x.shape[1]):
        z = x[:, t] @ w_in.T + b_in + h @ w.T
        zs.append(z)
        h = torch.where(z > 0, z, slope * z)
    return zs, h @ model.output.weight.detach().T + model.output.bias.detach()


def preactivations(model: Net, x: Tensor) -> Tensor:
    """``[B, n H]``, time-major (the engine's order: execution order, each step's group flattened)."""
    return torch.cat(run(model, x)[0], dim=1)


def pattern(model: Net, x: Tensor) -> Tensor:
    """``[B, n H]`` bool, on iff z > 0 (ReLU and LeakyReLU alike)."""
    with torch.no_grad():
        return preactivations(model, x) > 0


class Independent(Recording):
    """The independent forward as a ``Recording`` model, for the recipes of tests/oracles.py."""

    def __init__(self, model: Net) -> None:
        super().__init__()
        self.net: Net = model

    def forward(self, x: Tensor) -> Tensor:
        zs, logits = run(self.net, x)
        for z in zs:
            self.rec(z)
        return logits


def oracle(model: Net, seq: Tensor) -> tuple[Tensor, Tensor]:
    """``(z [n H], grads [n H, n, C])`` of one unpadded sequence ``[n, C]`` by autograd."""
    z, g = autograd_gradients(Independent(model), seq.unsqueeze(0))
    return z[0], g[0]


def pad_to(g: Tensor, t: int) -> Tensor:
    """Zero-pad the time axis (dim -2) of gradients ``[..., n, C]`` to ``t`` steps."""
    pad = g.new_zeros(*g.shape[:-2], t - g.shape[-2], g.shape[-1])
    return torch.cat([g, pad], dim=-2)


def rel_close(a: float, b: float, rtol: float = 1e-9) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b))


# -- 1. neuron gradients against autograd --------------------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_neuron_gradients_equal_autograd_of_each_preactivation(kind: str, setting: str) -> None:
    model = make(kind)
    x, lengths, ns = batch(setting)
    args = fwd_args(lengths)
    z, g = rollnet.neuron_gradients(model, x, additional_forward_args=args)
    valid = rollnet.LinearRegions(model, x, additional_forward_args=args).valid
    t = x.shape[1]
    steps = max(ns)  # only the longest sequence's steps are run
    assert z.shape == (x.shape[0], steps * H) and g.shape == (x.shape[0], steps * H, t, C)
    assert valid.shape == z.shape
    for i, n in enumerate(ns):
        k = n * H
        assert bool(valid[i, :k].all()) and not bool(valid[i, k:].any())
        assert bool((g[i, k:] == 0).all())  # padded-step entries: zero gradients
        z_o, g_o = oracle(model, x[i, :n])
        torch.testing.assert_close(z[i, :k], z_o, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(g[i, :k], pad_to(g_o, t), rtol=1e-12, atol=1e-13)
        if lengths is not None:
            z_a, g_a = rollnet.neuron_gradients(model, x[i : i + 1, :n])
            torch.testing.assert_close(z[i : i + 1, :k], z_a, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(g[i : i + 1, :k, :n], g_a, rtol=1e-12, atol=1e-13)
            assert bool((g[i, :, n:] == 0).all())  # nothing depends on padded coordinates


def test_the_oracle_weight_is_the_models_and_its_forward_the_models() -> None:
    """Guards the oracle itself: its W and logits are ScoRNN's / ElmanRNN's, built independently."""
    for kind in KINDS:
        model = make(kind)
        torch.testing.assert_close(recurrent_matrix(model), model.recurrent_weight().detach(), rtol=1e-12, atol=1e-13)
        x, lengths, ns = batch("padded")
        with torch.no_grad():
            out = model(x, lengths)
        for i, n in enumerate(ns):
            torch.testing.assert_close(out[i], run(model, x[i : i + 1, :n])[1][0], rtol=1e-12, atol=1e-13)


# -- 2. no point inside the certified ball changes the pattern; just outside does -------------------


def ball_points(seq: Tensor, t: int, radius: float, p: float, gen: torch.Generator,
                worst: Tensor | None, n: int = 400) -> tuple[Tensor, int]:
    """(points ``[m, n, C]`` at ``seq + radius u`` with ``||u||_p <= 1`` sampled in the full padded
    space ``[t, C]`` and cut to the sequence's steps, number of them from random sampling)."""
    u = sample_ball(n, (t, C), p, gen, seq.dtype)
    if worst is not None:
        u = torch.cat([u, worst.unsqueeze(0)])
    return seq + radius * u[:, : seq.shape[0]], n


def binding(z: Tensor, g: Tensor, p: float) -> int:
    norms = g.flatten(1).norm(p=dual(p), dim=1)
    ratio = torch.where(norms > 0, z.abs() / norms, torch.full_like(z, math.inf))
    return int(ratio.argmin())


@pytest.mark.parametrize("setting", ["T1", "T4", "padded"])
@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_sampling_inside_the_certified_ball(kind: str, p: float, setting: str) -> None:
    model = make(kind, seed=1)
    x, lengths, ns = batch(setting, seed=1)
    t = x.shape[1]
    radii = rollnet.margin(model, x, p, additional_forward_args=fwd_args(lengths))
    gen = torch.Generator().manual_seed(7)
    for i, n in enumerate(ns):
        seq = x[i, :n]
        z, g = oracle(model, seq)
        r = float(radii[i])
        assert math.isfinite(r) and r > 0
        assert rel_close(r, float(oracle_margin(z[None], g[None], p)[0]))
        j = binding(z, g, p)
        u_star = pad_to(worst_direction(g[j], float(z[j]), p), t)
        base = pattern(model, seq.unsqueeze(0))
        inside, _ = ball_points(seq, t, 0.99 * r, p, gen, 0.99 * u_star)
        assert bool((pattern(model, inside) == base).all()), f"example {i}: a point inside the ball flips"
        outside = seq + 1.01 * r * u_star[:n]
        assert not bool((pattern(model, outside.unsqueeze(0)) == base).all()), f"example {i}: not tight"
        # the binding neuron is the one that flips just outside
        assert bool(pattern(model, outside.unsqueeze(0))[0, j] != base[0, j])


@pytest.mark.parametrize("kind", KINDS)
def test_the_ball_oracle_catches_a_margin_half_again_too_large(kind: str) -> None:
    """Sanity: the same sampling, at 1.5 x the margin, finds flips, also among the random points alone."""
    model = make(kind, seed=1)
    x, lengths, ns = batch("padded", seed=1)
    gen = torch.Generator().manual_seed(7)
    caught = random_caught = 0
    for p in NORMS:
        radii = rollnet.margin(model, x, p, additional_forward_args=(lengths,)) * 1.5
        for i, n in enumerate(ns):
            seq = x[i, :n]
            z, g = oracle(model, seq)
            j = binding(z, g, p)
            u_star = pad_to(worst_direction(g[j], float(z[j]), p), x.shape[1])
            pts, m = ball_points(seq, x.shape[1], 0.99 * float(radii[i]), p, gen, 0.99 * u_star)
            flips = ~(pattern(model, pts) == pattern(model, seq.unsqueeze(0))).all(dim=1)
            caught += int(flips.any())
            random_caught += int(flips[:m].any())
    assert caught == 3 * len(ns)
    assert random_caught > len(ns)


# -- 3. directional margins against bisection --------------------------------------------------------


@pytest.mark.parametrize("setting", ["T4", "T7", "padded", "overpadded"])
@pytest.mark.parametrize("kind", KINDS)
def test_directional_margins_agree_with_bisection(kind: str, setting: str) -> None:
    model = make(kind, seed=2)
    x, lengths, ns = batch(setting, seed=2)
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(2):
        d = torch.randn(x.shape, generator=gen, dtype=x.dtype)  # non-zero also on padded steps
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1)
        got = rollnet.directional_margin(model, x, d, additional_forward_args=fwd_args(lengths))
        for i, n in enumerate(ns):
            seq, di = x[i, :n], d[i, :n]
            z, g = oracle(model, seq)
            slope = (g * di).flatten(1).sum(1)
            towards = z * slope < 0
            closed = float((z.abs() / slope.abs())[towards].min()) if bool(towards.any()) else math.inf
            t_i = float(got[i])
            assert rel_close(t_i, closed), (i, t_i, closed)
            if math.isinf(t_i):
                far = seq + 1e6 * di
                assert bool((pattern(model, far[None]) == pattern(model, seq[None])).all())
                continue
            bisected = bisect_line(Independent(model), seq, di, 2 * t_i)
            assert rel_close(t_i, bisected), (i, t_i, bisected)
            checked += 1
    assert checked >= len(ns)


# -- 4. a padded batch equals its sequences run alone ---------------------------------------------------


def _all_certificates(model: nn.Module, x: Tensor, d: Tensor, args: tuple[Tensor, ...] | None,
                      target: list[int]) -> dict[str, Tensor]:
    """Every certificate with ``rounding="sound"`` (for float64 inputs: computed as they are)."""
    kw = {"additional_forward_args": args, "rounding": "sound"}
    out = {f"margin_{p}": rollnet.margin(model, x, p, **kw) for p in NORMS}  # type: ignore[arg-type]
    out["directional"] = rollnet.directional_margin(model, x, d, **kw)  # type: ignore[arg-type]
    out["lower"], out["upper"] = rollnet.stability_bounds(model, x, **kw)  # type: ignore[arg-type]
    out["saliency"], out["saliency_radius"] = rollnet.certified_saliency(
        model, x, target, 2, **kw)  # type: ignore[arg-type]
    return out


def _padded_direction(x: Tensor, ns: list[int], gen: torch.Generator) -> Tensor:
    d = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    for i, n in enumerate(ns):
        d[i, n:] = 0
    return d


@pytest.mark.parametrize("setting", ["padded", "overpadded"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_padded_batch_gives_each_sequences_own_certificates(kind: str, setting: str) -> None:
    model = make(kind, seed=3)
    x, lengths, ns = batch(setting, seed=3)
    assert lengths is not None
    d = _padded_direction(x, ns, torch.Generator().manual_seed(4))
    target = [i % L for i in range(len(ns))]
    padded = _all_certificates(model, x, d, (lengths,), target)
    for i, n in enumerate(ns):
        alone = _all_certificates(model, x[i : i + 1, :n], d[i : i + 1, :n], None, target[i : i + 1])
        for key in ("margin_1.0", "margin_2.0", "margin_inf", "directional", "saliency_radius"):
            torch.testing.assert_close(padded[key][i : i + 1], alone[key], rtol=1e-12, atol=0, msg=key)
        for key in ("lower", "upper", "saliency"):
            torch.testing.assert_close(padded[key][i : i + 1, :n], alone[key], rtol=1e-12, atol=1e-14, msg=key)
        # padded coordinates: unbounded intervals, zero saliency
        assert bool((padded["upper"][i, n:] == math.inf).all()) and bool((padded["lower"][i, n:] == -math.inf).all())
        assert bool((padded["saliency"][i, n:] == 0).all())
        # the saliency is the autograd gradient of the target logit of the independent forward
        seq = x[i : i + 1, :n].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(run(model, seq)[1][0, target[i]], seq)
        torch.testing.assert_close(alone["saliency"], grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_sound_certificates_of_a_padded_batch_never_exceed_float64(kind: str) -> None:
    model32 = make(kind, seed=3, dtype=torch.float32)
    model64 = copy.deepcopy(model32).double()  # the same parameters, exactly
    x, lengths, ns = batch("padded", seed=3, dtype=torch.float32)
    assert lengths is not None
    d = _padded_direction(x, ns, torch.Generator().manual_seed(4))
    target = [i % L for i in range(len(ns))]
    p32 = _all_certificates(model32, x, d, (lengths,), target)
    p64 = _all_certificates(model64, x.double(), d.double(), (lengths,), target)
    assert all(v.dtype == torch.float32 for v in p32.values())
    for i, n in enumerate(ns):
        a32 = _all_certificates(model32, x[i : i + 1, :n], d[i : i + 1, :n], None, target[i : i + 1])
        a64 = _all_certificates(model64, x[i : i + 1, :n].double(), d[i : i + 1, :n].double(), None,
                                target[i : i + 1])
        for key in ("margin_1.0", "margin_2.0", "margin_inf", "directional", "saliency_radius"):
            got, ref = p32[key][i : i + 1].double(), a64[key]
            assert bool((got <= ref).all() and (got <= p64[key][i : i + 1]).all()), key
            assert bool((a32[key].double() <= ref).all()), key
            assert bool((got < ref).all()), key  # rounded toward zero, one ulp inside: strictly below
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=0, msg=key)  # ... and not by more
            torch.testing.assert_close(p32[key][i : i + 1], a32[key], rtol=1e-6, atol=0, msg=key)
        lo, up = p32["lower"][i, :n].double(), p32["upper"][i, :n].double()
        assert bool((lo >= a64["lower"][0]).all() and (up <= a64["upper"][0]).all())
        assert bool((a32["lower"][0].double() >= a64["lower"][0]).all())
        assert bool((a32["upper"][0].double() <= a64["upper"][0]).all())
        torch.testing.assert_close(up, a64["upper"][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(lo, a64["lower"][0], rtol=1e-6, atol=0)
        assert bool((p32["upper"][i, n:] == math.inf).all()) and bool((p32["lower"][i, n:] == -math.inf).all())
        torch.testing.assert_close(p32["saliency"][i, :n].double(), a64["saliency"][0], rtol=1e-6, atol=1e-7)


# -- 5. stability bounds on sequences ---------------------------------------------------------------


@pytest.mark.parametrize("setting", ["T4", "padded", "overpadded"])
@pytest.mark.parametrize("kind", KINDS)
def test_stability_bounds_of_sequences(kind: str, setting: str) -> None:
    model = make(kind, seed=4)
    x, lengths, ns = batch(setting, seed=4)
    lower, upper = rollnet.stability_bounds(model, x, additional_forward_args=fwd_args(lengths))
    assert lower.shape == x.shape and upper.shape == x.shape
    assert bool((lower <= 0).all() and (upper >= 0).all())
    for i, n in enumerate(ns):
        seq = x[i, :n]
        z, g = oracle(model, seq)  # g [nH, n, C]
        zz = z.view(-1, 1, 1)
        ratio = zz.abs() / g.abs()
        inf = torch.full_like(ratio, math.inf)
        up_o = torch.where(zz * g < 0, ratio, inf).amin(0)
        lo_o = -torch.where(zz * g > 0, ratio, inf).amin(0)
        for got, ref in ((upper[i, :n], up_o), (lower[i, :n], lo_o)):
            fin = torch.isfinite(ref)
            assert bool((torch.isfinite(got) == fin).all())
            torch.testing.assert_close(got[fin], ref[fin], rtol=1e-9, atol=0)
        assert bool((upper[i, n:] == math.inf).all()) and bool((lower[i, n:] == -math.inf).all())
        # move one coordinate alone: 0.99 x the bound keeps the pattern, 1.01 x (finite) changes it
        base = pattern(model, seq[None])
        keep, change = [], []
        for k in range(n * C):
            e = torch.zeros(n * C, dtype=x.dtype)
            e[k] = 1
            e = e.view(n, C)
            for bound in (float(lower[i].flatten()[k]), float(upper[i].flatten()[k])):
                if math.isfinite(bound):
                    keep.append(seq + 0.99 * bound * e)
                    change.append(seq + 1.01 * bound * e)
                else:
                    keep.append(seq + math.copysign(1e3, bound) * e)
        assert bool((pattern(model, torch.stack(keep)) == base).all())
        assert change, "no finite bound at all"
        assert not bool((pattern(model, torch.stack(change)) == base).all(dim=1).any())


# -- 6. patterns and region counts of padded batches -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_patterns_ignore_padding_and_count_regions_uses_the_lengths(kind: str) -> None:
    model = make(kind, seed=5)
    gen = torch.Generator().manual_seed(5)
    n = 4
    s = torch.randn(n, C, generator=gen, dtype=torch.float64)
    q = torch.randn(6, C, generator=gen, dtype=torch.float64)

    def padded(seq: Tensor, t: int, garbage: bool) -> Tensor:
        fill = torch.randn(t - seq.shape[0], C, generator=gen, dtype=seq.dtype) * 3 if garbage else \
            seq.new_zeros(t - seq.shape[0], C)
        return torch.cat([seq, fill])

    # batch A: T = 6; s zero-padded and garbage-padded, and q (length 6)
    xa = torch.stack([padded(s, 6, False), padded(s, 6, True), q])
    la = torch.tensor([n, n, 6])
    pa = rollnet.activation_pattern(model, xa, additional_forward_args=la)
    assert pa[0] == pa[1]
    # batch B: T = 9, extra padding past the longest sequence (6 steps are run): the same patterns
    xb = torch.stack([padded(q, 9, True), padded(s, 9, True)])
    lb = torch.tensor([6, n])
    pb = rollnet.activation_pattern(model, xb, additional_forward_args=(lb,))
    assert pb[1] == pa[0] and pb[0] == pa[2]
    # against the oracle: the valid part is the unpadded pattern; padded-step entries are off
    ta, tb = pa.as_tensor(), pb.as_tensor()
    expected = pattern(model, s[None])[0].to(torch.int64)
    for row in (ta[0], ta[1], tb[1]):
        assert torch.equal(row[: n * H], expected) and bool((row[n * H :] == 0).all())
    assert torch.equal(ta[2], pattern(model, q[None])[0].to(torch.int64))
    assert torch.equal(rollnet.activation_pattern(model, s[None]).as_tensor()[0], expected)
    # count_regions: the padding content never creates a region; batches cut the lengths with them
    # (and however the batches cut the lengths: see the next test)
    data = torch.stack([padded(s, 6, False), padded(s, 6, True), q, padded(s, 6, True), q.clone()])
    lengths = torch.tensor([n, n, 6, n, 6])
    for batch_size in (1, 256):
        assert rollnet.count_regions(model, data, batch_size, additional_forward_args=lengths) == (2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_count_regions_does_not_depend_on_how_the_data_is_cut(kind: str) -> None:
    model = make(kind, seed=5)
    gen = torch.Generator().manual_seed(5)
    s, q = torch.randn(2, 1, 6, C, generator=gen, dtype=torch.float64)
    data = torch.cat([s, s, q, s])
    lengths = torch.tensor([4, 4, 6, 4])  # s has 4 steps, q 6
    # batch_size 2: [s, s] runs 4 steps, [q, s] runs 6, so s's pattern has 24 entries in one, 36 in the other
    counts = {rollnet.count_regions(model, data, bs, additional_forward_args=lengths) for bs in (1, 2, 4)}
    assert counts == {(2, 2)}


def test_sequences_of_different_lengths_in_different_regions_have_different_patterns() -> None:
    model = make("elman_relu", seed=5)
    with torch.no_grad():
        model.input.weight.abs_()  # a very negative first channel turns every unit off
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(1, 4, C, generator=gen, dtype=torch.float64)
    s2 = s.clone()
    s2[0, 3] = torch.tensor([-100.0, 0.0, 0.0])
    data, lengths = torch.cat([s, s2]), torch.tensor([3, 4])
    assert not bool(pattern(model, s2)[0, 3 * H :].any())  # (the oracle: step 4 all off)
    jac = rollnet.LinearRegions(model, data, additional_forward_args=lengths).jacobian()
    assert not torch.allclose(jac[0], jac[1])  # so they are in different regions
    n_patterns, n_jacobians = rollnet.count_regions(model, data, additional_forward_args=lengths)
    assert (n_patterns, n_jacobians) == (2, 2)  # (padded entries counted as "off" gave (1, 1))
