"""Each rule family against autograd, through small models that exercise it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rollnet
from rollnet.engine import RULES
from tests.oracles import autograd_gradients
from tests.zoo import Recording


class Lambda(Recording):
    """A model defined by a function of (self, x) with a few parameters."""

    def __init__(self, fn: Callable[[Lambda, Tensor], Tensor], d: int = 6) -> None:
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.randn(d, d) * 0.7)
        self.b = nn.Parameter(torch.randn(d) * 0.3)
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.conv_t = nn.ConvTranspose1d(3, 2, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self, x)


def relu(m: Lambda, z: Tensor) -> Tensor:
    return F.relu(m.rec(z))


CASES: dict[str, tuple[Callable[[Lambda, Tensor], Tensor], tuple[int, ...]]] = {
    "view_batch_explicit": (lambda m, x: relu(m, x.view(x.size(0), -1) @ m.w + m.b), (2, 3)),
    "reshape_permute": (lambda m, x: relu(m, x.permute(0, 2, 1).reshape(x.shape[0], 6) @ m.w.t()), (2, 3)),
    "getitem_and_cat_constant": (
        lambda m, x: relu(m, torch.cat([x[:, 1:4], torch.ones(x.shape[0], 3, dtype=x.dtype)], 1) @ m.w), (6,)),
    "split_stack_sum": (
        lambda m, x: relu(m, torch.stack(x.split(3, dim=1), 1).sum(1) - 0.5 * x[:, :3].mean(1, keepdim=True)), (6,)),
    "addmm_and_rsub": (lambda m, x: relu(m, 1.0 - torch.addmm(m.b, x, m.w)), (6,)),
    "matmul_left_and_einsum": (
        lambda m, x: relu(m, torch.einsum("ij,bj->bi", m.w, x) + (m.w @ x.t()).t()), (6,)),
    "in_place_add_and_mul": (lambda m, x: relu(m, _inplace(m, x)), (6,)),
    "pad_nonzero_value": (lambda m, x: relu(m, F.pad(x, (1, 1), value=3.0) @ torch.ones(8, 4, dtype=x.dtype)), (6,)),
    "conv1d_avgpool_interp": (
        lambda m, x: relu(m, F.interpolate(F.avg_pool1d(m.conv(x), 2), scale_factor=2.0)).flatten(1), (2, 6)),
    "conv_transpose_adaptive": (
        lambda m, x: relu(m, F.adaptive_avg_pool1d(m.conv_t(F.relu(m.rec(m.conv(x)))), 4)).flatten(1), (2, 6)),
    "leaky_in_place_then_unbind": (
        lambda m, x: sum(F.leaky_relu_(m.rec(r @ m.w[:3, :3]), 0.3) for r in x.unbind(1)), (4, 3)),
    "dtype_round_trip": (lambda m, x: relu(m, (x.float().double() * 2) @ m.w / 3.0), (6,)),
    "divide_and_neg": (lambda m, x: relu(m, -(x / m.b.abs().add(1.0))), (6,)),
}


def _inplace(m: Lambda, x: Tensor) -> Tensor:
    h = x @ m.w
    h += m.b
    h *= 2.0
    h -= x
    return h


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_autograd(name: str) -> None:
    fn, shape = CASES[name]
    torch.manual_seed(0)
    model = Lambda(fn).double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    z, g = rollnet.neuron_gradients(model, x)
    z_ref, g_ref = autograd_gradients(model, x)
    assert z.shape[1] > 0
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    # autograd rounds the backward gradient to float32 at a .float() cast; forward mode does not
    rtol = 1e-6 if name == "dtype_round_trip" else 1e-10
    torch.testing.assert_close(g, g_ref, rtol=rtol, atol=1e-12)


def test_functional_and_method_relus_all_count() -> None:
    class Many(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            a = F.relu(x)
            b = torch.relu(x + 1)
            c = (x - 1).relu()
            d = torch.relu_(x * 2)
            e = nn.ReLU(inplace=True)(x * 3)
            f = F.leaky_relu(x - 2, 0.1)
            return a + b + c + d + e + f

    z, _ = rollnet.neuron_gradients(Many(), torch.randn(2, 3))
    assert z.shape == (2, 18)


def test_in_place_on_a_view_is_refused() -> None:
    class ViewInPlace(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            h = x * 1.0
            h[:, :2].relu_()
            return h

    with pytest.raises(rollnet.UnsupportedOperationError, match="view"):
        rollnet.margin(ViewInPlace(), torch.randn(2, 3))


def test_every_registered_rule_is_callable() -> None:
    assert len(RULES) > 100
    assert all(callable(rule) for rule in RULES.values())


@pytest.mark.parametrize("flatten", ["module", "view", "none"])
def test_first_layer_reads_unit_tangents_off_its_weight_after_flattening(flatten: str) -> None:
    """Sampled input axes reach the first Linear as weight columns, not as a one-hot matmul.

    Counted by the profiler: a dense first-layer tangent would cost 2*K*B*D*F FLOPs.
    """
    from torch.profiler import profile

    from rollnet.engine.gradients import Request, collect, sampled_axes

    torch.manual_seed(0)
    head = {"module": [nn.Flatten()], "view": [nn.Unflatten(1, (4, 49)), nn.Flatten()], "none": []}[flatten]
    net = nn.Sequential(*head, nn.Linear(196, 50), nn.ReLU(), nn.Linear(50, 3)).double()
    shape = (4, 49) if flatten == "module" else (196,)
    x = torch.randn(8, *shape, dtype=torch.float64)
    k = 5
    axes = torch.randint(0, 196, (k, 8))
    with profile(with_flops=True) as prof:
        got = collect(net, x, sampled_axes(axes), Request(squared_l2=True), plan=(8, k))
    flops = sum(event.flops for event in prof.key_averages())
    primal = 2 * 8 * (196 * 50 + 50 * 3)
    assert 0 < flops < primal + 2 * k * 8 * 196 * 50 // 10  # far below a dense first-layer tangent
    # and the result is the oracle's: the squared gradient entries at the sampled axes
    first = net[len(head)]
    grads = first.weight.detach().t()[axes]  # [K, B, 50]: first-layer neurons' gradients along the axes
    assert got.squared_l2 is not None
    torch.testing.assert_close(got.squared_l2[:, :50], grads.square().sum(0))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_first_layer_node_passes_gradcheck(bias: bool, shared: bool) -> None:
    """The fused first-layer node (the linear output and the weight columns W[:, k] in one backward)
    against finite differences, with repeated indices, and with either output left unused."""
    from rollnet.engine.rules.affine import FirstLayer as _FirstLayer

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    idx = torch.tensor([2, 0, 2] if shared else [5, 1, 1, 0, 3, 5])
    inputs = (x, w, b, idx)

    def both(*args: Tensor) -> tuple[Tensor, Tensor]:
        return _FirstLayer.apply(*args)

    assert torch.autograd.gradcheck(both, inputs)
    assert torch.autograd.gradcheck(lambda *a: both(*a)[0], inputs)
    assert torch.autograd.gradcheck(lambda *a: both(*a)[1], inputs)
    out, cols = both(*inputs)
    torch.testing.assert_close(out, F.linear(x, w, b))
    torch.testing.assert_close(cols, w[:, idx])
    (g_x,) = torch.autograd.grad(cols.sum(), x, allow_unused=True)
    assert g_x is None  # the columns do not depend on x


@pytest.mark.parametrize("slope", [0.0, 0.3])
def test_linear_after_an_activation_folds_the_slopes_into_its_weight(
    slope: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fewer outputs than directions, ``(t * m_b) W^T`` is computed as ``t (W diag(m_b))^T``.

    The path is taken (counted), and neuron gradients and the parameter
    gradients of their squared norms agree with per-neuron autograd and with
    the Gram recursion (an independent computation).
    """
    from rollnet.engine.gradients import Request, collect, unit_directions
    from tests.zoo import MLP

    calls: list[int] = []
    real_bmm = torch.bmm

    def counting_bmm(a: Tensor, b: Tensor) -> Tensor:
        calls.append(1)
        return real_bmm(a, b)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    torch.manual_seed(1)
    net = MLP([16, 12, 9, 7, 3], slope=slope).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    z, g = autograd_gradients(net, x)
    got_z, got_g = rollnet.neuron_gradients(net, x)
    torch.testing.assert_close(got_z, z)
    torch.testing.assert_close(got_g, g)
    assert len(calls) == 3  # every layer after an activation (12 -> 9, 9 -> 7, 7 -> 3; 16 directions)

    def parameter_gradients(method: str) -> list[Tensor]:
        net.zero_grad()
        got = collect(net, x, unit_directions(x.shape[1:]), Request(squared_l2=True), method=method)
        assert got.squared_l2 is not None
        (got.squared_l2 * torch.rand_like(got.squared_l2)).sum().backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    torch.manual_seed(2)
    rows = parameter_gradients("rows")
    torch.manual_seed(2)
    gram = parameter_gradients("gram")
    assert len(rows) == len(gram) == 3  # the weights of the three hidden layers (biases drop out)
    for a, b in zip(rows, gram, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
