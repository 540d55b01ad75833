"""An empty batch gives empty results of the right shape from every public entry point.

The oracle for each shape is the same call on a batch of two: the empty
result must be that result with its batch dimension set to 0 (same dtype,
same neuron count N, same trailing shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import rollnet
from rollnet.engine.gradients import Request, collect, unit_directions
from tests import zoo
from tests.zoo_max import make_models

# a few architectures: chain, BatchNorm conv net, residual, recurrence, max-pool, maxout
ZOO_NAMES = ["mlp", "conv_bn", "residual", "rnn"]
MAX_NAMES = ["pool_cnn", "maxout"]


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name in MAX_NAMES:
        model = make_models()[name]
        return model, tuple(model.input_shape)  # type: ignore[arg-type]
    return zoo.make(name)


ALL = ZOO_NAMES + MAX_NAMES


def _shape(r: Any) -> Any:
    """Shapes and dtypes of a nested result, with the batch dimension replaced by ``None``."""
    if isinstance(r, Tensor):
        return (None, *r.shape[1:]), r.dtype
    if isinstance(r, tuple):
        return tuple(_shape(a) for a in r)
    raise TypeError(type(r))


def _assert_empty_like(empty: Any, full: Any) -> None:
    assert _shape(empty) == _shape(full)
    for t in empty if isinstance(empty, tuple) else (empty,):
        assert t.shape[0] == 0


def _direction(shape: tuple[int, ...]) -> Tensor:
    return torch.ones(shape, dtype=torch.float64)


FUNCTIONS: dict[str, Callable[[nn.Module, Tensor, tuple[int, ...]], Any]] = {
    "margin_p1": lambda m, x, s: rollnet.margin(m, x, p=1),
    "margin_p2": lambda m, x, s: rollnet.margin(m, x, p=2),
    "margin_pinf": lambda m, x, s: rollnet.margin(m, x, p="inf"),
    "directional_margin_shared": lambda m, x, s: rollnet.directional_margin(m, x, _direction(s)),
    "directional_margin_per_example": lambda m, x, s: rollnet.directional_margin(
        m, x, torch.ones_like(x)
    ),
    "stability_bounds": lambda m, x, s: rollnet.stability_bounds(m, x),
    "neuron_gradients": lambda m, x, s: rollnet.neuron_gradients(m, x),
    "certified_saliency": lambda m, x, s: rollnet.certified_saliency(m, x, target=1),
    "certified_saliency_pinf": lambda m, x, s: rollnet.certified_saliency(
        m, x, target=torch.tensor(0), p="inf"
    ),
}

METHODS: dict[str, Callable[[rollnet.LinearRegions, tuple[int, ...]], Any]] = {
    "margin_p1": lambda r, s: r.margin(1),
    "margin_p2": lambda r, s: r.margin(2),
    "margin_pinf": lambda r, s: r.margin("inf"),
    "directional_margin": lambda r, s: r.directional_margin(_direction(s)),
    "stability_bounds": lambda r, s: r.stability_bounds(),
    "jacobian": lambda r, s: r.jacobian(),
    "saliency": lambda r, s: r.saliency(target=1),
    "neuron_gradients": lambda r, s: r.neuron_gradients(),
    "values": lambda r, s: r.values,
    "output": lambda r, s: r.output,
}


@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
@pytest.mark.parametrize("name", ALL)
def test_functions_give_empty_results(name: str, fn: str) -> None:
    model, shape = _model(name)
    x = torch.randn(2, *shape, dtype=torch.float64)
    full = FUNCTIONS[fn](model, x, shape)
    empty = FUNCTIONS[fn](model, x[:0], shape)
    _assert_empty_like(empty, full)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", ALL)
def test_linear_regions_gives_empty_results(name: str, method: str) -> None:
    model, shape = _model(name)
    x = torch.randn(2, *shape, dtype=torch.float64)
    full = METHODS[method](rollnet.LinearRegions(model, x), shape)
    regions = rollnet.LinearRegions(model, x[:0])
    empty = METHODS[method](regions, shape)
    _assert_empty_like(empty, full)
    assert regions.num_neurons == rollnet.LinearRegions(model, x).num_neurons
    assert regions.neuron_info() == rollnet.LinearRegions(model, x).neuron_info()


@pytest.mark.parametrize("name", ALL)
def test_activation_patterns_of_an_empty_batch(name: str) -> None:
    model, shape = _model(name)
    x = torch.randn(2, *shape, dtype=torch.float64)
    full = rollnet.activation_pattern(model, x)
    for pats in (rollnet.activation_pattern(model, x[:0]), rollnet.LinearRegions(model, x[:0]).activation_pattern()):
        assert len(pats) == 0 and list(pats) == [] and pats.keys() == []
        assert pats.num_neurons == full.num_neurons > 0
        assert pats.as_tensor().shape == (0, full.as_tensor().shape[1])
        assert [p.shape[1:] for p in pats.parts] == [p.shape[1:] for p in full.parts]
        assert len(pats[0:0]) == 0
        with pytest.raises(IndexError):
            pats[0]


@pytest.mark.parametrize("name", ALL)
def test_count_regions_of_empty_data(name: str) -> None:
    model, shape = _model(name)
    x = torch.randn(0, *shape, dtype=torch.float64)
    assert rollnet.count_regions(model, x) == (0, 0)
    assert rollnet.count_regions(model, [x, x[:0]], batch_size=4) == (0, 0)
    # empty batches among real ones are skipped
    y = torch.randn(3, *shape, dtype=torch.float64)
    assert rollnet.count_regions(model, [x, y, x]) == rollnet.count_regions(model, y)


@pytest.mark.parametrize("method", ["gram", "rows"])
def test_engine_collects_an_empty_batch(method: str) -> None:
    """The engine itself (also the Gram path and a tiny budget), not only the public guards."""
    model, shape = zoo.make("mlp")
    x = torch.randn(0, *shape, dtype=torch.float64)
    n = rollnet.LinearRegions(model, torch.randn(1, *shape, dtype=torch.float64)).num_neurons
    for budget in (None, 1):
        got = collect(model, x, unit_directions(shape), Request(norms=(2.0,), squared_l2=True),
                      method=method, memory_budget=budget)
        assert got.values.shape == got.norms[2.0].shape == (0, n)
        assert got.squared_l2 is not None and got.squared_l2.shape == (0, n)
        assert got.output.shape == (0, 3)
    got = collect(model, x, unit_directions(shape), Request(norms=(1.0, math.inf), crossings=True,
                                                            rows=True, output=True))
    assert got.norms[1.0].shape == got.norms[math.inf].shape == (0, n)
    assert got.cross_plus is not None and got.cross_plus.shape == (0, math.prod(shape))
    assert got.rows is not None and got.rows.shape == (0, n, math.prod(shape))
    assert got.output_rows is not None and got.output_rows.shape == (0, 3, math.prod(shape))
    values_only = collect(model, x, None, Request())
    assert values_only.values.shape == (0, n)
