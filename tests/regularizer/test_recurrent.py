"""The fused recurrent pass (:mod:`rollnet.regularizer.recurrent`) against the generic engine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import rollnet
from rollnet.engine.gradients import unit_directions
from rollnet.models import ElmanRNN
from rollnet.regularizer.recurrent import find_recurrence, recurrent_fusable


def _elman(c: int = 3, h: int = 6, classes: int = 4, slope: float = 0.1) -> ElmanRNN:
    """A small LeakyReLU Elman net with a random (not orthogonal) recurrent matrix."""
    model = ElmanRNN(c, h, classes, nonlinearity="leaky_relu", negative_slope=slope)
    with torch.no_grad():
        model.weight_hh.copy_(torch.randn(h, h) * 0.5)
    return model


def _batch(seed: int = 0) -> tuple[ElmanRNN, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = _elman().double()
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 5, 1, 6])
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0
    return model, x, lengths


def _term_and_grads(roll: rollnet.ROLLLoss, model: nn.Module, x: Tensor, args: tuple) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    term, logits = roll(model, x, return_output=True, additional_forward_args=args)
    (term + logits.square().sum()).backward()
    return term.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("gamma", [100, 30, "max"])
@pytest.mark.parametrize("padded", [True, False])
def test_exact_term_and_gradients_match_the_engine(gamma: float | str, padded: bool) -> None:
    model, x, lengths = _batch()
    args = (lengths,) if padded else ()
    rec = find_recurrence(model)
    assert rec is not None and recurrent_fusable(rec, x, unit_directions(x.shape[1:]), args)
    fused, g_fused = _term_and_grads(rollnet.ROLLLoss(0.7, 2.0, gamma=gamma), model, x, args)
    engine, g_engine = _term_and_grads(rollnet.ROLLLoss(0.7, 2.0, gamma=gamma, fused=False), model, x, args)
    torch.testing.assert_close(fused, engine, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fused, g_engine, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["axes", "gaussian"])
def test_approximate_term_matches_the_engine_on_the_same_directions(estimator: str) -> None:
    model, x, lengths = _batch(1)
    out = []
    for fused in (True, False):
        roll = rollnet.ROLLLoss(0.5, 1.0, approx=4, estimator=estimator, fused=fused,
                                generator=torch.Generator().manual_seed(3))
        out.append(_term_and_grads(roll, model, x, (lengths,)))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_neuron_terms_of_a_padded_batch_are_those_of_each_sequence_alone() -> None:
    model, x, lengths = _batch(2)
    roll = rollnet.ROLLLoss(1.0, 3.0)
    terms = roll.neuron_terms(model, x, additional_forward_args=lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = roll.neuron_terms(model, x[i : i + 1, :n])
        torch.testing.assert_close(terms[i, : alone.shape[1]], alone[0], rtol=1e-12, atol=1e-12)
        assert bool((terms[i, alone.shape[1] :] == 0).all())
    term = roll(model, x, additional_forward_args=(lengths,))
    each = torch.stack([roll(model, x[i : i + 1, :n]) for i, n in enumerate(lengths.tolist())]).mean()
    torch.testing.assert_close(term, each, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_the_term_passes_gradcheck(fused: bool) -> None:
    """The exact term of a padded batch, differentiated in the recurrent and input weights."""
    torch.manual_seed(4)
    base = _elman(c=2, h=3, classes=2).double()
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3])
    roll = rollnet.ROLLLoss(1.0, 0.5, fused=fused)

    def term(w_hh: Tensor, w_in: Tensor) -> Tensor:
        model = copy.deepcopy(base)
        del model.weight_hh
        model.weight_hh = w_hh  # type: ignore[assignment]
        del model.input.weight
        model.input.weight = w_in  # type: ignore[assignment]
        assert (find_recurrence(model) is not None) is True
        return roll(model, x, additional_forward_args=(lengths,))

    inputs = (base.weight_hh.detach().clone().requires_grad_(True),
              base.input.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(term, inputs, eps=1e-6, atol=1e-6)


def test_batch_chunks_that_run_fewer_steps_give_the_unchunked_results() -> None:
    """With a small memory budget the engine cuts the batch; a chunk of short sequences runs
    fewer steps (fewer neuron groups) than the others, and must still match one pass."""
    model, x, lengths = _batch(5)
    order = lengths.argsort()  # short sequences first: the first chunks run the fewest steps
    x, lengths = x[order], lengths[order]
    tiny = 4096
    whole = rollnet.LinearRegions(model, x, additional_forward_args=(lengths,))
    cut = rollnet.LinearRegions(model, x, additional_forward_args=(lengths,), memory_budget=tiny)
    for p in (1, 2, "inf"):
        torch.testing.assert_close(cut.margin(p), whole.margin(p), rtol=1e-12, atol=0)
    torch.testing.assert_close(cut.stability_bounds(), whole.stability_bounds(), rtol=1e-12, atol=0)
    assert torch.equal(cut.valid, whole.valid) and cut.activation_pattern().keys() == whole.activation_pattern().keys()
    roll, roll_cut = rollnet.ROLLLoss(1.0, 2.0, fused=False), rollnet.ROLLLoss(1.0, 2.0, fused=False, memory_budget=tiny)
    torch.testing.assert_close(roll_cut(model, x, additional_forward_args=lengths),
                               roll(model, x, additional_forward_args=lengths), rtol=1e-12, atol=1e-12)


def test_a_subclass_with_its_own_forward_is_not_fused() -> None:
    class Other(ElmanRNN):
        def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
            return super().forward(x, lengths) * 2

    assert find_recurrence(Other(3, 6, 4)) is None
    model = _elman()
    model.register_forward_hook(lambda *_: None)
    assert find_recurrence(model) is None
