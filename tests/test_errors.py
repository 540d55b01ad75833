"""Bad input and unsupported models: clear errors, never a wrong certificate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rollnet
from tests import zoo


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


@pytest.mark.parametrize(
    ("factory", "path", "op"),
    [
        (zoo.with_sigmoid, "2.1", "sigmoid"),
        (zoo.with_gelu, "1", "gelu"),
        (zoo.with_softmax, "3", "softmax"),
    ],
)
def test_non_piecewise_linear_layers_are_refused_with_their_path(factory, path: str, op: str) -> None:
    model = factory()
    with pytest.raises(rollnet.UnsupportedOperationError) as info:
        rollnet.margin(model, torch.randn(2, 3))
    assert info.value.module_path == path
    assert op in str(info.value).lower()
    assert f"'{path}'" in str(info.value)


def test_lstm_is_refused() -> None:
    with pytest.raises(rollnet.UnsupportedOperationError) as info:
        rollnet.margin(zoo.WithLSTM(), torch.randn(2, 5, 3))
    assert info.value.module_path == "lstm"


class _Bad(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        if self.kind == "product":
            return h * h
        if self.kind == "divide":
            return 1.0 / (h + 1.0)
        if self.kind == "detach":
            return F.relu(self.fc(h.detach()))
        if self.kind == "item":
            return h * float(h[:, 0].item())  # (one example: any scalar of a larger batch mixes examples)
        if self.kind == "branch":
            return h if bool(h.sum() > 0) else -h
        if self.kind == "batch_stats":
            return F.batch_norm(h, None, None, training=True)
        if self.kind == "dropout":
            return F.dropout(h, 0.5)  # training=True by default, even in eval mode
        if self.kind == "batch_mix":
            return F.relu(h.sum(0, keepdim=True))
        raise AssertionError(self.kind)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("product", "product of two"),
        ("divide", "dividing by"),
        ("detach", "detached copy"),
        ("item", "python data"),
        ("branch", ""),
        ("batch_stats", "batch statistics"),
        ("dropout", "random"),
        ("batch_mix", "mixes the examples"),
    ],
)
def test_operations_that_would_break_a_certificate_are_refused(kind: str, words: str) -> None:
    with pytest.raises(rollnet.UnsupportedOperationError) as info:
        rollnet.margin(_Bad(kind), torch.randn(1 if kind == "item" else 4, 3))
    assert words.lower() in str(info.value).lower()


def test_batchnorm_without_running_stats_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU())
    with pytest.raises(rollnet.UnsupportedOperationError, match="batch statistics"):
        rollnet.margin(model, torch.randn(4, 3))


def test_nan_and_inf_inputs() -> None:
    x = torch.randn(3, 4)
    x[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        rollnet.margin(_mlp(), x)
    x[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"examples \[1\]"):
        rollnet.stability_bounds(_mlp(), x)
    x[1, 2] = -math.inf
    x[0, 0] = math.inf  # inf - inf: the quick sum check sees NaN, the full check names both examples
    with pytest.raises(ValueError, match=r"examples \[0, 1\]"):
        rollnet.margin(_mlp(), x)


def test_huge_finite_inputs_are_accepted() -> None:
    """Finite entries whose sum overflows are valid input (the quick check must fall back)."""
    x = torch.full((2, 4), 3e38)
    assert not torch.isfinite(x.sum())
    assert rollnet.margin(_mlp(), x).shape == (2,)


def test_wrong_shapes_name_the_expected_shape() -> None:
    with pytest.raises(ValueError, match="last dimension is 4"):
        rollnet.margin(_mlp(), torch.randn(3, 5))
    with pytest.raises(ValueError, match="batched"):
        rollnet.margin(_mlp(), torch.randn(4))
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"per-example shape \(1, 8, 8\)"):
        rollnet.margin(conv, torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"direction must have shape"):
        rollnet.directional_margin(_mlp(), torch.randn(3, 4), torch.randn(5))
    with pytest.raises(TypeError):
        rollnet.margin(_mlp(), [[1.0, 2.0, 3.0, 4.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating point"):
        rollnet.margin(_mlp(), torch.ones(2, 4, dtype=torch.int64))


def test_empty_batch_gives_empty_results() -> None:
    x = torch.randn(0, 4)
    assert rollnet.margin(_mlp(), x).shape == (0,)
    assert rollnet.directional_margin(_mlp(), x, torch.ones(4)).shape == (0,)
    lo, up = rollnet.stability_bounds(_mlp(), x)
    assert lo.shape == up.shape == (0, 4)
    assert rollnet.count_regions(_mlp(), x) == (0, 0)


def test_zero_direction_and_bad_norm() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="zero"):
        rollnet.directional_margin(_mlp(), x, torch.zeros(4))
    d = torch.randn(3, 4)
    d[2] = 0
    with pytest.raises(ValueError, match=r"examples \[2\]"):
        rollnet.directional_margin(_mlp(), x, d)
    for p in (3, 0.5, "two", True, None):
        with pytest.raises(ValueError, match="p must be"):
            rollnet.margin(_mlp(), x, p=p)  # type: ignore[arg-type]
    ref = rollnet.margin(_mlp(), x, p=float("inf"))
    assert torch.equal(rollnet.margin(_mlp(), x, p="inf"), ref)


def test_train_mode_is_certified_as_eval_and_restored() -> None:
    model = zoo.ConvBN().double()
    model.train()
    model.bn2.eval()  # mixed flags must come back exactly
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    flags = [m.training for m in model.modules()]
    r_train = rollnet.margin(model, x)
    assert [m.training for m in model.modules()] == flags
    running = model.bn1.running_mean.clone()
    model.eval()
    r_eval = rollnet.margin(model, x)
    assert torch.equal(r_train, r_eval)
    assert torch.equal(model.bn1.running_mean, running)


def test_mode_restored_after_an_error() -> None:
    model = zoo.with_sigmoid().train()
    with pytest.raises(rollnet.UnsupportedOperationError):
        rollnet.margin(model, torch.randn(2, 3))
    assert all(m.training for m in model.modules())


def test_target_errors() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="one entry per example"):
        rollnet.certified_saliency(_mlp(), x, target=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        rollnet.certified_saliency(_mlp(), x, target=2)
    with pytest.raises(ValueError, match="target is required"):
        rollnet.certified_saliency(_mlp(), x)


def test_model_returning_a_tuple_is_refused() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return F.relu(x), x

    with pytest.raises(TypeError, match="one tensor"):
        rollnet.margin(Pair(), torch.randn(2, 3))
