"""Recurrent reference models (ElmanRNN, ScoRNN): shapes, padding, orthogonality, gradients, errors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rollnet
from rollnet.models import ARCHITECTURES, ElmanRNN, ScoRNN, build_model
from rollnet.regularizer.recurrent import find_recurrence
from tests.threads import intra_op_threads


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with intra_op_threads(1):
        yield


def _models(c: int = 3, h: int = 6, classes: int = 4) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "elman_relu": ElmanRNN(c, h, classes),
        "elman_leaky": ElmanRNN(c, h, classes, nonlinearity="leaky_relu", negative_slope=0.1),
        "scornn": ScoRNN(c, h, classes, negative_slope=0.1, num_negative=2),
    }


MODELS = list(_models())


def _padded(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """x ``[5, 7, 3]`` with lengths; the padding is random, not zeros (it must not matter)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, 3, generator=gen, dtype=dtype)
    return x, torch.tensor([7, 2, 5, 1, 6])


def _spread(model: nn.Module) -> nn.Module:
    """Move a ScoRNN's A away from its block-diagonal start (so tests see a generic W)."""
    if isinstance(model, ScoRNN):
        with torch.no_grad():
            model.skew.add_(0.3 * torch.randn(model.skew.shape, generator=torch.Generator().manual_seed(1),
                                              dtype=model.skew.dtype))
    return model


# -- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_and_the_required_structure(name: str) -> None:
    model = _models()[name]
    x, lengths = _padded(dtype=torch.float32)
    assert model(x).shape == (5, 4)
    assert model(x, lengths).shape == (5, 4)
    assert isinstance(model.input, nn.Linear) and (model.input.in_features, model.input.out_features) == (3, 6)
    assert isinstance(model.output, nn.Linear) and (model.output.in_features, model.output.out_features) == (6, 4)
    assert model.recurrent_weight().shape == (6, 6)
    assert isinstance(model.negative_slope, float)
    assert model.negative_slope == (0.0 if name == "elman_relu" else 0.1)


def test_build_model_by_name() -> None:
    assert {"elman", "scornn"} <= set(ARCHITECTURES)
    net = build_model("scornn", (29, 12), 9, hidden_size=8, num_negative=3)
    assert isinstance(net, ScoRNN) and net.input.in_features == 12 and net.output.out_features == 9
    assert int((net.sign < 0).sum()) == 3
    elman = build_model("elman", (29, 12), 9, hidden_size=8, nonlinearity="leaky_relu")
    assert isinstance(elman, ElmanRNN) and elman.negative_slope == 0.01
    with pytest.raises(ValueError, match=r"sequence inputs \(T, C\)"):
        build_model("scornn", (1, 28, 28), 10, hidden_size=8)


def test_elman_weight_starts_orthogonal() -> None:
    w = ElmanRNN(3, 16, 2).recurrent_weight().detach()
    torch.testing.assert_close(w.T @ w, torch.eye(16), atol=1e-5, rtol=0)


# -- padding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_a_padded_batch_equals_each_sequence_alone(name: str) -> None:
    model = _spread(_models()[name].double())
    x, lengths = _padded()
    batch = model(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = model(x[i : i + 1, :n])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-12)
    full = torch.full((5,), 7)
    torch.testing.assert_close(model(x, full), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_only_the_longest_sequence_is_run(name: str) -> None:
    """Steps past every sequence's end are not computed (they would cost, not change, anything)."""
    model = _models()[name].double()
    x, _ = _padded()
    lengths = torch.tensor([3, 2, 3, 1, 3])
    calls: list[int] = []
    model.input.register_forward_hook(lambda m, a, out: calls.append(1))
    model(x, lengths)
    assert len(calls) == 3


@pytest.mark.parametrize("name", MODELS)
def test_margins_and_the_roll_term_ignore_padding(name: str) -> None:
    """Certificates of a padded batch are those of each sequence alone; the fused ROLL pass
    equals the engine's on the padded batch."""
    model = _spread(_models()[name].double())
    x, lengths = _padded()
    radii = rollnet.margin(model, x, additional_forward_args=(lengths,))
    for i, n in enumerate(lengths.tolist()):
        alone = rollnet.margin(model, x[i : i + 1, :n])
        torch.testing.assert_close(radii[i : i + 1], alone, rtol=1e-10, atol=0)
    assert find_recurrence(model) is not None
    fused = rollnet.ROLLLoss(0.5, 2.0)(model, x, additional_forward_args=(lengths,))
    engine = rollnet.ROLLLoss(0.5, 2.0, fused=False)(model, x, additional_forward_args=(lengths,))
    torch.testing.assert_close(fused, engine, rtol=1e-12, atol=1e-12)


def test_a_subclass_with_its_own_forward_is_not_declared_a_recurrence() -> None:
    class Other(ScoRNN):
        def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
            return super().forward(x, lengths) * 2

    assert find_recurrence(ScoRNN(3, 4, 2)) is not None
    assert find_recurrence(Other(3, 4, 2)) is None


# -- ScoRNN: the scaled Cayley transform -----------------------------------------------------------


def test_scornn_skew_matrix_and_its_initialisation() -> None:
    torch.manual_seed(0)
    for h in (6, 7):
        model = ScoRNN(3, h, 2, num_negative=1)
        assert model.skew.shape == (h * (h - 1) // 2,)
        a = model.skew_matrix().detach()
        torch.testing.assert_close(a, -a.T, rtol=0, atol=0)
        blocks = torch.zeros(h, h)
        for i in range(h // 2):
            s = a[2 * i, 2 * i + 1]
            assert -1.0 < float(s) < 0.0  # -sqrt((1 - cos t) / (1 + cos t)) = -tan(t / 2), t in (0, pi/2)
            blocks[2 * i, 2 * i + 1], blocks[2 * i + 1, 2 * i] = s, -s
        torch.testing.assert_close(a, blocks, rtol=0, atol=0)
    assert torch.equal(model.input.bias.detach(), torch.zeros(h))
    assert float(model.input.weight.detach().abs().max()) <= 0.01


@pytest.mark.parametrize(("h", "num_negative", "expected"), [(20, None, 2), (512, None, 51), (8, 0, 0), (8, 3, 3), (8, 8, 8)])
def test_scornn_d_has_num_negative_minus_ones(h: int, num_negative: int | None, expected: int) -> None:
    model = ScoRNN(2, h, 2, num_negative=num_negative)
    assert model.num_negative == expected
    assert torch.equal(model.sign.abs(), torch.ones(h))
    assert int((model.sign == -1).sum()) == expected
    assert "sign" in model.state_dict() and "sign" not in dict(model.named_parameters())
    assert model.recurrent_parameters() == [model.skew]


def test_scornn_w_is_the_scaled_cayley_transform_and_orthogonal() -> None:
    model = _spread(ScoRNN(3, 8, 2, num_negative=3).double())
    a = model.skew_matrix().detach()
    eye = torch.eye(8, dtype=torch.float64)
    expected = torch.linalg.inv(eye + a) @ (eye - a) @ torch.diag(model.sign)
    w = model.recurrent_weight().detach()
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.T @ w, eye, rtol=0, atol=1e-12)
    assert math.isclose(float(torch.linalg.det(w)), (-1.0) ** 3, abs_tol=1e-10)


def test_scornn_stays_orthogonal_under_training() -> None:
    """100 steps (Adam on the rest, RMSprop on A) in float32: W is recomputed from A, so it stays orthogonal."""
    torch.manual_seed(0)
    model = ScoRNN(3, 16, 4, num_negative=2)
    w0 = model.recurrent_weight().detach()
    torch.testing.assert_close(w0.T @ w0, torch.eye(16), rtol=0, atol=1e-5)
    recurrent = model.recurrent_parameters()
    rest = [p for p in model.parameters() if all(p is not q for q in recurrent)]
    opts = [torch.optim.Adam(rest, lr=1e-2), torch.optim.RMSprop(recurrent, lr=1e-3)]
    x, y = torch.randn(16, 6, 3), torch.randint(0, 4, (16,))
    lengths = torch.randint(1, 7, (16,))
    for _ in range(100):
        loss = F.cross_entropy(model(x, lengths), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    w = model.recurrent_weight().detach()
    assert float((w - w0).abs().max()) > 0.05  # A moved
    assert float(torch.linalg.matrix_norm(w.T @ w - torch.eye(16))) < 1e-5


def test_scornn_gradient_through_the_solve() -> None:
    """gradcheck (float64) of W and of a loss in A's triangle; and the reference's closed form
    (scoRNN's Cayley_Transform_Deriv: V = (I + A)^-T G (D + W^T), dL/dA = V^T - V)."""
    model = _spread(ScoRNN(3, 5, 2, num_negative=2).double())
    x, lengths = torch.randn(3, 4, 3, dtype=torch.float64), torch.tensor([4, 1, 3])

    def weight(skew: Tensor) -> Tensor:
        return torch.func.functional_call(_WeightOnly(model), {"net.skew": skew}, ())

    skew = model.skew.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(weight, (skew,))

    def loss(skew: Tensor) -> Tensor:
        return torch.func.functional_call(model, {"skew": skew}, (x, lengths)).square().sum()

    assert torch.autograd.gradcheck(loss, (skew,))

    g = torch.randn(5, 5, dtype=torch.float64)
    model.zero_grad()
    (model.recurrent_weight() * g).sum().backward()
    a, w = model.skew_matrix().detach(), model.recurrent_weight().detach()
    eye = torch.eye(5, dtype=torch.float64)
    v = torch.linalg.solve((eye + a).T, g @ (torch.diag(model.sign) + w.T))
    rows, cols = torch.triu_indices(5, 5, 1)
    assert model.skew.grad is not None
    torch.testing.assert_close(model.skew.grad, (v.T - v)[rows, cols], rtol=1e-10, atol=1e-12)


class _WeightOnly(nn.Module):
    """W as a module's output, for functional_call."""

    def __init__(self, net: ScoRNN) -> None:
        super().__init__()
        self.net = net

    def forward(self) -> Tensor:
        return self.net.recurrent_weight()


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    ("x_shape", "lengths", "error", "match"),
    [
        ((5, 21), None, ValueError, r"\[B, T, C\]"),
        ((5, 7, 3, 1), None, ValueError, r"\[B, T, C\]"),
        ((5, 7, 4), None, ValueError, "3 channels"),
        ((5, 7, 3), torch.tensor([7.0, 2, 5, 1, 6]), TypeError, "integer tensor"),
        ((5, 7, 3), torch.tensor([True] * 5), TypeError, "integer tensor"),
        ((5, 7, 3), [7, 2, 5, 1, 6], TypeError, "integer tensor"),
        ((5, 7, 3), torch.tensor([7, 2, 5]), ValueError, r"shape \[B\] = \[5\]"),
        ((5, 7, 3), torch.tensor([[7, 2, 5, 1, 6]]), ValueError, r"shape \[B\]"),
        ((5, 7, 3), torch.tensor([7, 0, 5, 1, 6]), ValueError, r"\[1, T\] = \[1, 7\], got \[0\]"),
        ((5, 7, 3), torch.tensor([8, 2, 5, 1, 6]), ValueError, r"\[1, 7\], got \[8\]"),
    ],
)
def test_bad_inputs_are_refused_clearly(name, x_shape, lengths, error, match) -> None:
    model = _models()[name]
    with pytest.raises(error, match=match):
        model(torch.zeros(x_shape), lengths)


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="nonlinearity must be 'relu' or 'leaky_relu'"):
        ElmanRNN(3, 4, 2, nonlinearity="tanh")
    with pytest.raises(ValueError, match="num_negative must be an integer in"):
        ScoRNN(3, 4, 2, num_negative=5)
    with pytest.raises(ValueError, match="num_negative"):
        ScoRNN(3, 4, 2, num_negative=-1)
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        ScoRNN(3, 0, 2)
    with pytest.raises(ValueError, match="negative_slope must be finite and non-negative"):
        ScoRNN(3, 4, 2, negative_slope=-0.1)
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        ElmanRNN(3, 4, 2, negative_slope="0.1")  # type: ignore[arg-type]


class _TorchRNN(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.rnn = cell
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize(
    ("cell", "op"),
    [
        (lambda: nn.LSTM(3, 4, batch_first=True), "lstm"),
        (lambda: nn.GRU(3, 4, batch_first=True), "gru"),
        (lambda: nn.RNN(3, 4, nonlinearity="tanh", batch_first=True), "rnn_tanh"),
    ],
)
def test_lstm_gru_and_tanh_rnns_are_refused_naming_the_op(cell, op: str) -> None:
    """Not piecewise linear: refused with the module's path and the op, never certified."""
    torch.manual_seed(0)
    with pytest.raises(rollnet.UnsupportedOperationError) as info:
        rollnet.margin(_TorchRNN(cell()), torch.randn(2, 5, 3))
    assert info.value.module_path == "rnn"
    assert info.value.op.endswith(op)
    assert op in str(info.value)
