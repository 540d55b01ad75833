"""Batch independence: no example's certificate may depend on another example.

Three layers of evidence:

1. models that mix examples (the issue's list and more) are refused by every
   entry point, naming the module path and the op;
2. models that only *move* the batch dimension (time-major loops, transposed
   products, per-example centring) are accepted and stay exact;
3. a property over the whole registry: for every rule, changing example 1
   changes nothing of example 0 (values, neuron gradients, output, output
   Jacobian).  A deliberately mixing rule makes it fail.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rollnet
from rollnet.engine.gradients import Collected, Request, collect, unit_directions
from rollnet.engine.rules import RULES, RuleEntry
from rollnet.engine.rules.batch import ELEMENTWISE
from tests.oracles import autograd_gradients
from tests.zoo import Recording

B, D, H = 5, 4, 6


class Net(Recording):
    """``head(relu(mid(inp(x))))`` with an arbitrary middle function."""

    def __init__(self, mid: Callable[[Tensor], Tensor], d: int = D, h: int = H) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, h)
        self.head = nn.Linear(h, 3)
        self.mid = mid

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.rec(self.mid(self.inp(x)))))


_PERM = torch.tensor([2, 0, 1, 4, 3])
_M = torch.randn(B, B, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

MIXING: dict[str, Callable[[Tensor], Tensor]] = {
    "centre_over_batch": lambda h: h - h.mean(0, keepdim=True),
    "flip": lambda h: h.flip(0),
    "roll": lambda h: torch.roll(h, 1, 0),
    "roll_flat": lambda h: torch.roll(h, 1),
    "cumsum": lambda h: h.cumsum(0),
    "permutation_index": lambda h: h[_PERM],
    "index_select": lambda h: h.index_select(0, _PERM),
    "gather": lambda h: h.gather(0, torch.zeros(B, H, dtype=torch.long)),
    "cat_rotated": lambda h: torch.cat([h[1:], h[:1]]),
    "minus_first": lambda h: h - h[0:1],
    "einsum_batch_sum": lambda h: h + torch.einsum("bi->i", h),
    "sum_over_batch": lambda h: h + h.sum(0),
    "max_over_batch": lambda h: h + h.amax(0),
    "matrix_on_batch": lambda h: _M.to(h.dtype) @ h,
    "tensordot_batch": lambda h: torch.tensordot(_M.to(h.dtype), h, dims=([1], [0])),
    "flatten_all": lambda h: h.reshape(-1).reshape(B, H),
    "pairs_merged": lambda h: h.reshape(1, B * H).reshape(B, H),
    "stack_then_sum": lambda h: torch.stack([h, h.flip(0)]).sum(0),
    "linear_across_batch": lambda h: F.linear(h.t(), torch.ones(B, B, dtype=h.dtype)).t(),
    "pool_along_batch": lambda h: F.avg_pool1d(h.t().unsqueeze(0), 3, 1, 1).squeeze(0).t(),
    "transpose_mismatch": lambda h: h + h.t().reshape(B, H),
    "repeat_batch": lambda h: h.repeat(2, 1)[1 : B + 1],
    "pad_batch": lambda h: F.pad(h.t(), (1, 0))[:, :B].t(),
    "int_index": lambda h: h + h[0],
    "product_over_batch": lambda h: (h.t() @ _M.to(h.dtype)).t(),
    "ellipsis_slice": lambda h: torch.cat([h[..., 1:, :], h[..., :1, :]]),
}

MOVING: dict[str, Callable[[Tensor], Tensor]] = {
    "centre_per_example": lambda h: h - h.mean(1, keepdim=True),
    "transposed_product": lambda h: (torch.eye(H, dtype=h.dtype) * 2 @ h.t()).t(),
    "time_major_stack": lambda h: torch.stack([h, 2 * h, -h], 0).transpose(0, 1).sum(1),
    "flip_features": lambda h: h.flip(1),
    "permute_features": lambda h: h[:, torch.tensor([1, 0, 2, 3, 5, 4])],
    "cumsum_features": lambda h: h.cumsum(1),
    "per_example_constant": lambda h: h * torch.arange(1.0, B + 1, dtype=h.dtype).unsqueeze(1),
    "einsum_per_example": lambda h: torch.einsum("bi,ij->bj", h, torch.eye(H, dtype=h.dtype)),
    "unsqueeze_broadcast": lambda h: (h.unsqueeze(0) + torch.zeros(2, 1, H, dtype=h.dtype)).sum(0),
}


def _entry_points(model: nn.Module, x: Tensor) -> dict[str, Callable[[], object]]:
    direction = torch.ones_like(x[0])
    return {
        "margin": lambda: rollnet.margin(model, x),
        "directional_margin": lambda: rollnet.directional_margin(model, x, direction),
        "stability_bounds": lambda: rollnet.stability_bounds(model, x),
        "neuron_gradients": lambda: rollnet.neuron_gradients(model, x),
        "certified_saliency": lambda: rollnet.certified_saliency(model, x, target=0),
        "activation_pattern": lambda: rollnet.activation_pattern(model, x),
        "count_regions": lambda: rollnet.count_regions(model, x),
        "LinearRegions": lambda: rollnet.LinearRegions(model, x).margin(),
        "ROLLLoss_exact": lambda: rollnet.ROLLLoss(lam=1.0, C=1.0)(model, x),
        "ROLLLoss_approx": lambda: rollnet.ROLLLoss(lam=1.0, C=1.0, approx=2)(model, x),
    }


@pytest.mark.parametrize("name", sorted(MIXING))
def test_batch_mixing_models_are_refused_by_every_entry_point(name: str) -> None:
    model = Net(MIXING[name]).double()
    x = torch.randn(B, D, dtype=torch.float64)
    for entry, run in _entry_points(model, x).items():
        with pytest.raises(rollnet.UnsupportedOperationError) as err:
            run()
        assert err.value.module_path == "", (entry, err.value)
        assert "batch" in str(err.value) or "examples" in str(err.value), (entry, err.value)


def test_the_issue_model_is_refused_with_the_module_path_and_the_op() -> None:
    class Centered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            return self.b(torch.relu(h - h.mean(0, keepdim=True)))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Centered()

        def forward(self, x: Tensor) -> Tensor:
            return self.block(x)

    with pytest.raises(rollnet.UnsupportedOperationError, match="mixes the examples") as err:
        rollnet.margin(Outer().double(), torch.randn(6, 4, dtype=torch.float64))
    assert err.value.module_path == "block"
    assert err.value.op == "Tensor.mean"


@pytest.mark.parametrize("name", sorted(MOVING))
def test_models_that_move_the_batch_dimension_are_accepted_and_exact(name: str) -> None:
    model = Net(MOVING[name]).double()
    x = torch.randn(B, D, dtype=torch.float64)
    z, g = rollnet.neuron_gradients(model, x)
    z_ref, g_ref = autograd_gradients(model, x)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    # one example at a time gives the same certificates
    alone = torch.cat([rollnet.margin(Net(MOVING[name], d=D).double(), x[i : i + 1]) for i in range(B)]) \
        if name != "per_example_constant" else None
    if alone is not None:
        torch.testing.assert_close(rollnet.margin(model, x), alone, rtol=1e-12, atol=0)


def test_a_time_major_recurrent_loop_is_accepted() -> None:
    class TimeMajor(Recording):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.rec_w, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x: Tensor) -> Tensor:  # x: [B, T, C]
            h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
            for xt in x.transpose(0, 1):  # [T, B, C]: iterate over time
                h = torch.relu(self.rec(self.inp(xt) + self.rec_w(h)))
            return self.out(h)

    model = TimeMajor().double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    z, g = rollnet.neuron_gradients(model, x)
    z_ref, g_ref = autograd_gradients(model, x)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(g, g_ref)


def test_one_example_is_its_own_batch() -> None:
    """With one example nothing can mix; the reduction's value is the example's own."""
    model = Net(MOVING["centre_per_example"]).double()
    x = torch.randn(1, D, dtype=torch.float64)
    assert rollnet.margin(model, x).shape == (1,)


def test_an_unbatched_image_to_a_conv_net_says_what_shape_was_expected() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*unsqueeze\(0\)"):
        rollnet.margin(net, torch.randn(1, 28, 28, dtype=torch.float64))


# ---------------------------------------------------------------------------
# copies cut off from the input: refuse what is used, not what is seen


def _hooked_mlp(hook: Callable[[nn.Module, object, Tensor], None]) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 3)).double()
    net[0].register_forward_hook(hook)
    return net


def test_a_logging_hook_that_detaches_is_fine() -> None:
    store: list[object] = []
    net = _hooked_mlp(lambda m, i, o: store.append(o.detach()))
    x = torch.randn(B, D, dtype=torch.float64)
    plain = nn.Sequential(*net)  # same layers, no hook
    net[0]._forward_hooks.clear()
    expected = rollnet.margin(plain, x)
    net[0].register_forward_hook(lambda m, i, o: store.append(o.detach()))
    net[0].register_forward_hook(lambda m, i, o: store.append(o.detach().cpu().numpy()))
    net[0].register_forward_hook(lambda m, i, o: store.append(o.detach().norm().item()))
    net[0].register_forward_hook(lambda m, i, o: store.append(o.data.clone()))
    torch.testing.assert_close(rollnet.margin(net, x), expected, rtol=0, atol=0)
    assert isinstance(store[-3], np.ndarray) and isinstance(store[-2], float)
    loss = rollnet.ROLLLoss(lam=1.0, C=1.0)(net, x)
    assert torch.isfinite(loss)


class _UsesCopy(nn.Module):
    def __init__(self, use: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(D, H), nn.Linear(H, 3)
        self.use = use
        self.register_buffer("buf", torch.zeros(B, H))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.use(self.a(x))))


COPY_USES: dict[str, Callable[[_UsesCopy], Callable[[Tensor], Tensor]]] = {
    "detach_plus": lambda m: lambda h: h + h.detach(),
    "data_times": lambda m: lambda h: h * h.data.abs(),
    "detached_scale_chain": lambda m: lambda h: h - 2 * h.detach().mean(1, keepdim=True),
    "written_into_buffer": lambda m: lambda h: (m.buf.copy_(h.detach()), h * m.buf)[1],
    "output_from_copy": lambda m: lambda h: h.detach() * 1.0,
    "branch_on_copy": lambda m: lambda h: h if bool(h.detach().sum() > 0) else -h,
    "max_indices_across_examples": lambda m: lambda h: h.gather(1, h.max(1, keepdim=True).indices.flip(0)),
}


def test_an_input_dependent_tensor_cannot_become_an_integer_or_bool_tensor() -> None:
    model = _UsesCopy(lambda h: h.to(torch.bool).double()).double()
    with pytest.raises(rollnet.UnsupportedOperationError, match=r"torch\.bool"):
        rollnet.margin(model, torch.randn(B, D, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(COPY_USES))
def test_a_detached_copy_is_refused_at_its_first_use(name: str) -> None:
    model = _UsesCopy(lambda h: h).double()
    model.use = COPY_USES[name](model)
    x = torch.randn(B, D, dtype=torch.float64)
    with pytest.raises(rollnet.UnsupportedOperationError, match=r"detached|control flow|without a tangent"):
        rollnet.margin(model, x)


# ---------------------------------------------------------------------------
# the registry-wide property


def _lam(fn: Callable[[Tensor], Tensor], shape: tuple[int, ...] = (D,)) -> tuple[Callable[[Tensor], Tensor], tuple[int, ...]]:
    return fn, shape


_W = torch.randn(D, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
_CONV = nn.Conv1d(2, 3, 3, padding=1).double()
_BN = nn.BatchNorm1d(D).double().eval()

#: one small model per rule (by ``module.rule``): every rule of the registry must appear here
RULE_CASES: dict[str, tuple[Callable[[Tensor], Tensor], tuple[int, ...]]] = {
    "activations.relu": _lam(lambda x: torch.relu(x @ _W)),
    "activations.leaky_relu": _lam(lambda x: F.leaky_relu(x @ _W, 0.2)),
    "activations.absolute": _lam(lambda x: torch.abs(x @ _W - 0.1)),
    "activations.clamp": _lam(lambda x: (x @ _W).clamp(-0.5, 0.5)),
    "activations.clamp_by_units": _lam(lambda x: (x @ _W).clamp(min=x.flip(1) @ _W * 0.5)),
    "activations.compare": _lam(lambda x: (x @ _W) * ((x @ _W) > x.sum(1, keepdim=True))),
    "activations.hardtanh": _lam(lambda x: F.hardtanh(x @ _W, -0.5, 0.5)),
    "activations.masked_fill": _lam(lambda x: (x @ _W).masked_fill((x @ _W < 0.2) & (x[:, :1] > 0), 0.3)),
    "activations.mask_flow": _lam(lambda x: x * (x > 0).view(x.shape[0], 2, 2).flip(2).flatten(1).float()),
    "activations.prelu": _lam(lambda x: F.prelu(x @ _W, torch.full((H,), 0.2, dtype=x.dtype))),
    "activations.relu6": _lam(lambda x: F.relu6(4 * (x @ _W))),
    "activations.where": _lam(lambda x: torch.where(x @ _W > 0.1, x @ _W, -2 * (x @ _W))),
    "affine.add": _lam(lambda x: F.relu(x + x.flip(1) - 0.3)),
    "affine.add_product": _lam(lambda x: F.relu(torch.addmm(_W[0], x, _W))),
    "affine.average_pool": _lam(lambda x: F.relu(F.avg_pool1d(x, 2)).flatten(1), (2, 4)),
    "affine.batch_norm": _lam(lambda x: F.relu(_BN(x))),
    "affine.conv": _lam(lambda x: F.relu(_CONV(x)).flatten(1), (2, 4)),
    "affine.dropout": _lam(lambda x: F.relu(F.dropout(x, 0.5, training=False))),
    "affine.linear": _lam(lambda x: F.relu(F.linear(x, _W.t()))),
    "affine.scale": _lam(lambda x: F.relu((2.0 * x) @ _W / 3.0)),
    "max_units.adaptive_max_pool": _lam(lambda x: F.adaptive_max_pool1d(x, 2).flatten(1), (2, 4)),
    "max_units.elementwise_max": _lam(lambda x: torch.maximum(x, x.flip(1) * 0.5)),
    "max_units.max_pool": _lam(lambda x: F.max_pool1d(x, 2).flatten(1), (2, 4)),
    "max_units.reduce_max": _lam(lambda x: x.view(x.shape[0], 2, 2).amax(2)),
    "padding.mark_neurons": _lam(
        lambda x: F.relu(rollnet.neuron_mask(x @ _W, torch.tensor([[True], [False], [True], [True]])))
    ),
    "structural.convert": _lam(lambda x: F.relu(x.float().double())),
    "structural.pad": _lam(lambda x: F.relu(F.pad(x, (1, 1), value=0.5))),
    "structural.reshape": _lam(lambda x: F.relu(x.reshape(x.shape[0], 2, 2).flatten(1))),
    "structural.structural": _lam(lambda x: F.relu(torch.cat([x[:, 1:], -x[:, :1]], 1).cumsum(1)[..., None, :][:, 0, 1:])),
    "matrix_product": _lam(lambda x: F.relu(torch.relu(x @ _W) @ _W.t() @ _W)),
}


def _rule_names() -> set[str]:
    return {f"{e.rule.__module__.rsplit('.', 1)[-1]}.{e.rule.__name__}" for e in RULES.values()}


def test_every_rule_has_a_case() -> None:
    missing = _rule_names() - set(RULE_CASES)
    assert not missing, f"add a case to RULE_CASES for {sorted(missing)}"


class _Fn(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _collect(model: nn.Module, x: Tensor) -> Collected:
    request = Request(rows=True, output=True)
    return collect(model, x, unit_directions(x.shape[1:]), request, method="rows")


def assert_example_zero_ignores_example_one(model: nn.Module, x: Tensor) -> None:
    """Change example 1 only: example 0's neurons, their gradients, the output and its Jacobian
    must not move."""
    before = _collect(model, x)
    moved = x.clone()
    moved[1] = torch.randn_like(moved[1]) * 3
    after = _collect(model, moved)
    for got, ref, what in [
        (after.values, before.values, "neuron values"),
        (after.rows, before.rows, "neuron gradients"),
        (after.output, before.output, "output"),
        (after.output_rows, before.output_rows, "output Jacobian"),
    ]:
        assert got is not None and ref is not None
        assert torch.equal(got[0], ref[0]), f"example 0's {what} changed with example 1"
        assert torch.equal(got[2], ref[2]), f"example 2's {what} changed with example 1"


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_no_rule_lets_one_example_depend_on_another(rule: str) -> None:
    fn, shape = RULE_CASES[rule]
    torch.manual_seed(3)
    x = torch.randn(4, *shape, dtype=torch.float64)
    assert_example_zero_ignores_example_one(_Fn(fn), x)


def test_the_property_catches_a_rule_that_mixes_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that declares itself elementwise but mixes examples in its tangent passes every
    shape check; the property must still catch it."""
    real = RULES[torch.Tensor.neg]

    def leaky_neg(trace, func, args, kwargs):  # type: ignore[no-untyped-def]
        x = args[0]
        result = func(*args, **kwargs)
        t = trace.tangent(x)
        trace.track(result, None if t is None else -(t + 0.5 * t.roll(1, dims=1)))
        return result

    monkeypatch.setitem(RULES, torch.Tensor.neg, RuleEntry(leaky_neg, ELEMENTWISE))
    x = torch.randn(4, D, dtype=torch.float64)
    w2 = torch.randn(H, H, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = _Fn(lambda v: F.relu(F.relu(v @ _W).neg() @ w2))
    with pytest.raises(AssertionError, match="changed with example 1"):
        assert_example_zero_ignores_example_one(model, x)
    monkeypatch.setitem(RULES, torch.Tensor.neg, real)
    assert_example_zero_ignores_example_one(model, x)


def test_a_rule_cannot_be_registered_without_a_batch_role() -> None:
    from rollnet.engine.rules import register

    with pytest.raises(TypeError, match="batch"):
        register(torch.Tensor.neg)  # type: ignore[call-arg]
