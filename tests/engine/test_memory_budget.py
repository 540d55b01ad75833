"""``memory_budget`` bounds memory: a smaller budget never holds more.

The Gram path (squared l2 norms over all axes: ``margin(p=2)``, the exact
ROLL term) used to plan its chunks with the first layer's factors, which are
the same for every example (views of the weight), counted once per example:
under a small budget that gave chunks of one example, thousands of passes,
and a resident set that grew with every pass (4.8 GiB at a 16 MiB budget over
5,000 inputs, against 0.67 GiB at the default).  These tests fail on that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rollnet.engine.gradients import _GRAM_TEMPORARIES, Collected, Request, collect, unit_directions
from rollnet.engine.gram import GramTangent
from tests.threads import intra_op_threads
from tests.zoo import MLP

MIB = 2**20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_threads() -> Iterator[None]:
    with intra_op_threads(2):
        yield


def _mlp(dtype: torch.dtype) -> MLP:
    """The 784-300x3-10 ReLU MLP of the issue."""
    torch.manual_seed(0)
    return MLP([784, 300, 300, 300, 10]).to(dtype).eval()


def _gram(net: MLP, x: torch.Tensor, budget: int | None) -> Collected:
    with torch.no_grad():
        return collect(net, x, unit_directions(x.shape[1:]), Request(norms=(2.0,)), method="gram",
                       memory_budget=budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_chunks_fill_a_small_budget(two_threads: None, dtype: torch.dtype) -> None:
    """Chunks hold as many examples as the per-example factors allow, and never more."""
    net = _mlp(dtype)
    x = torch.rand(40, 784, dtype=dtype)
    default = _gram(net, x, None)
    assert len(default.chunk_sizes) <= 3  # the default fits far more than a few examples per chunk
    # per-example bytes of the factors, as the tracer counts them (shared factors excluded)
    per_example = default.peak_bytes / max(default.chunk_sizes) * _GRAM_TEMPORARIES
    previous = default
    for mib in (64, 16, 8, 4):
        budget = mib * MIB
        got = _gram(net, x, budget)
        middle = got.chunk_sizes[1:-1]  # the first is the rows plan's; the last takes what is left
        fits = int(budget // per_example)
        if middle and fits >= 2:  # two examples' factors fit: never one example per chunk
            assert min(middle) >= max(2, fits // 2), (mib, fits, got.chunk_sizes)
        # within the budget (a quarter over at most: later chunks may pad to more active neurons
        # than the first one measured, and shrink the chunks after them)
        assert got.peak_bytes * _GRAM_TEMPORARIES <= 1.25 * budget
        # a smaller budget never holds more (but for the even split of a rest that fits anyway)
        assert got.peak_bytes <= 1.25 * previous.peak_bytes
        previous = got
        # the same results, up to rounding: not bit for bit, as even the model's own forward
        # (a [b, 784] x [784, 300] product) rounds differently for different b
        rtol, atol = (1e-12, 1e-15) if dtype == torch.float64 else (1e-5, 1e-6)
        torch.testing.assert_close(got.norms[2.0], default.norms[2.0], rtol=rtol, atol=atol)
        torch.testing.assert_close(got.values, default.values, rtol=rtol, atol=atol)
        assert all(torch.equal(a, b) for a, b in zip(got.patterns, default.patterns, strict=True))


def test_shared_first_layer_factors_are_not_counted_per_example() -> None:
    """The first layer's factors are views of its weight: the same bytes for 1 or 100 examples."""
    net = _mlp(torch.float32)
    identity = GramTangent(identity=True, width=784)
    first = identity.linear(net.layers[0].weight)
    assert first.shared and first.nbytes == 0
    relu = first.scaled(torch.ones(5, 300))  # per-example slopes: only they grow with the batch
    assert relu.nbytes == 5 * 300 * 4
    second = relu.linear(net.layers[1].weight)
    assert not second.shared and second.nbytes > 0
    # the same weight again (the next chunk): the same tangent, so W1 W1^T is formed once per batch
    assert identity.linear(net.layers[0].weight) is first
    with torch.no_grad():
        net.layers[0].weight.mul_(1.0)  # an in-place change: formed again
    assert identity.linear(net.layers[0].weight) is not first


def test_one_first_layer_gram_per_batch_is_exact() -> None:
    """Chunks sharing W1 W1^T give the same norms as chunks that each form it."""
    net = _mlp(torch.float64)
    x = torch.rand(12, 784, dtype=torch.float64)
    whole = _gram(net, x, None)
    for i in range(0, 12, 3):
        part = _gram(net, x[i : i + 3], None)
        torch.testing.assert_close(part.norms[2.0], whole.norms[2.0][i : i + 3], rtol=1e-12, atol=0)


_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from rollnet.engine.gradients import Request, collect, unit_directions
    from tests.zoo import MLP

    def hwm():
        return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = MLP([784, 300, 300, 300, 10]).eval()
    x = torch.rand({n}, 784)
    run = lambda xs, budget: collect(net, xs, unit_directions((784,)), Request(norms=(2.0,)),
                                     method="gram", memory_budget=budget)
    with torch.no_grad():
        run(x[:8], None)  # warm-up
        before = hwm()
        got = run(x, {budget})
    print(json.dumps(dict(added=hwm() - before, chunks=len(got.chunk_sizes))))
    """
)


def _peak_added(n: int, budget: int | None) -> dict[str, float]:
    code = _CHILD.format(root=str(ROOT), n=n, budget=budget)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_tiny_budget_holds_no_more_resident_memory_than_the_default() -> None:
    """In fresh processes: the resident peak a Gram pass adds at 16 MiB stays near the default's."""
    default = _peak_added(600, None)
    tiny = _peak_added(600, 16 * MIB)
    assert tiny["chunks"] > default["chunks"]
    assert tiny["added"] <= 1.1 * default["added"] + 32, (tiny, default)


def test_parameter_gradients_through_chunks_sharing_the_first_layer_gram() -> None:
    """The ROLL term's squared norms over several chunks (one W1 W1^T for all of them) give the
    same parameter gradients as one chunk."""
    net = _mlp(torch.float64)
    x = torch.rand(10, 784, dtype=torch.float64)
    grads = []
    for budget in (None, 4 * MIB):
        net.zero_grad()
        got = collect(net, x, unit_directions((784,)), Request(squared_l2=True), method="gram",
                      memory_budget=budget)
        assert got.squared_l2 is not None
        assert (len(got.chunk_sizes) > 2) == (budget is not None)
        (got.squared_l2.sum() + got.values.abs().sum()).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) == 6  # the hidden layers' weights and biases
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
