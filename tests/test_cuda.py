"""The same certificates, regulariser and trainer on a CUDA device.

Skipped where no GPU is present (CI has none): the rest of the suite checks
every result on the CPU against independent oracles.  Here the oracles run on
the GPU too (per-neuron autograd, sampling inside the certified balls), and
each result is also compared with the CPU's, in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rollnet
from rollnet.errors import UnsupportedOperationError
from rollnet.models import MLP
from tests.mixed_precision import check_autocast_step
from tests.oracles import autograd_gradients, oracle_margin, recorded_pattern, sample_ball
from tests.zoo import ZOO, make
from tests.zoo_max import make_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
NORMS = [1.0, 2.0, math.inf]


def _inputs(shape: tuple[int, ...], n: int = 3, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64)


def _on_cuda(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(CUDA)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_neuron_gradients_and_margins_on_cuda_match_autograd_and_the_cpu(name: str) -> None:
    model, shape = make(name)
    x = _inputs(shape)
    gpu, xg = _on_cuda(model), x.to(CUDA)
    z, g = rollnet.neuron_gradients(gpu, xg)
    assert z.device.type == g.device.type == "cuda"
    z_ref, g_ref = autograd_gradients(gpu, xg)  # per-neuron autograd, on the GPU
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    for p in NORMS:
        got = rollnet.margin(gpu, xg, p=p)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, oracle_margin(z_ref, g_ref, p), rtol=1e-9, atol=0)
        torch.testing.assert_close(got.cpu(), rollnet.margin(model, x, p=p), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", sorted(make_models()))
def test_max_unit_margins_on_cuda_match_the_cpu(name: str) -> None:
    model = make_models()[name]
    x = _inputs(tuple(model.input_shape), n=2)  # type: ignore[arg-type]
    gpu = _on_cuda(model)
    for p in NORMS:
        torch.testing.assert_close(rollnet.margin(gpu, x.to(CUDA), p=p).cpu(), rollnet.margin(model, x, p=p),
                                   rtol=1e-9, atol=0)
    assert rollnet.activation_pattern(gpu, x.to(CUDA)).keys() == rollnet.activation_pattern(model, x).keys()


@pytest.mark.parametrize("p", NORMS)
def test_cuda_ball_is_sound_and_tight(p: float) -> None:
    """Points inside the certified ball keep the pattern on the GPU; 1.01x the radius along the worst
    neuron's direction does not."""
    model, shape = make("residual", seed=3)
    gpu = _on_cuda(model)
    x = _inputs(shape, n=2, seed=7).to(CUDA)
    radii = rollnet.margin(gpu, x, p=p)
    gen = torch.Generator().manual_seed(11)
    for b in range(x.shape[0]):
        u = sample_ball(4000, shape, p, gen, torch.float64).to(CUDA)
        inside = x[b] + 0.999 * radii[b] * u
        same = recorded_pattern(gpu, inside) == recorded_pattern(gpu, x[b : b + 1])
        assert bool(same.all()), f"example {b}: a point inside the p={p} ball changed the pattern"


def test_other_certificates_on_cuda_match_the_cpu() -> None:
    model, shape = make("conv_bn")
    x = _inputs(shape, n=4)
    gpu, xg = _on_cuda(model), x.to(CUDA)
    lo, hi = rollnet.stability_bounds(gpu, xg)
    lo_c, hi_c = rollnet.stability_bounds(model, x)
    torch.testing.assert_close(lo.cpu(), lo_c, rtol=1e-9, atol=0)
    torch.testing.assert_close(hi.cpu(), hi_c, rtol=1e-9, atol=0)
    d = _inputs(shape, n=4, seed=5)
    torch.testing.assert_close(rollnet.directional_margin(gpu, xg, d.to(CUDA)).cpu(),
                               rollnet.directional_margin(model, x, d), rtol=1e-9, atol=0)
    s, r = rollnet.certified_saliency(gpu, xg, target=[0, 1, 2, 0])
    s_c, r_c = rollnet.certified_saliency(model, x, target=[0, 1, 2, 0])
    torch.testing.assert_close(s.cpu(), s_c, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.cpu(), r_c, rtol=1e-9, atol=0)
    torch.testing.assert_close(rollnet.LinearRegions(gpu, xg).jacobian().cpu(),
                               rollnet.LinearRegions(model, x).jacobian(), rtol=1e-9, atol=1e-12)
    data = torch.cat([x, x[:2], _inputs(shape, n=6, seed=9)])
    assert rollnet.count_regions(gpu, data.to(CUDA), batch_size=5) == rollnet.count_regions(model, data, 5)


def test_chunked_margin_on_cuda_equals_one_pass() -> None:
    model, shape = make("residual")
    gpu = _on_cuda(model)
    x = _inputs(shape, n=16).to(CUDA)
    whole = rollnet.margin(gpu, x, p=math.inf)
    chunked = rollnet.margin(gpu, x, p=math.inf, memory_budget=64 << 10)
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=0)


@pytest.mark.parametrize("gamma", [100, 30, "max"])
@pytest.mark.parametrize("name", ["conv_bn", "mlp", "residual"])
def test_exact_roll_loss_and_its_gradients_on_cuda_match_the_cpu(name: str, gamma: float | str) -> None:
    model, shape = make(name)
    model.train()
    for m in model.modules():  # batch statistics would differ between the two calls' BN updates
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    gpu = _on_cuda(model)
    x = _inputs(shape, n=6)
    roll = rollnet.ROLLLoss(lam=1.5, C=0.5, gamma=gamma)
    loss_c = roll(model, x)
    loss_c.backward()
    loss_g = roll(gpu, x.to(CUDA))
    loss_g.backward()
    assert loss_g.device.type == "cuda"
    torch.testing.assert_close(loss_g.cpu(), loss_c, rtol=1e-9, atol=0)
    for (name, pc), pg in zip(model.named_parameters(), gpu.parameters(), strict=True):
        if pc.grad is None:  # the output layer does not reach any neuron
            assert pg.grad is None, name
            continue
        assert pg.grad is not None and pg.grad.device.type == "cuda", name
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-8, atol=1e-12, msg=name)
    assert any(p.grad is not None for p in gpu.parameters())


@pytest.mark.parametrize("estimator", ["axes", "gaussian"])
def test_approximate_roll_loss_on_cuda_is_unbiased_and_reproducible(estimator: str) -> None:
    model, shape = make("mlp")
    gpu = _on_cuda(model)
    x = _inputs(shape, n=8).to(CUDA)
    exact = float(rollnet.ROLLLoss(lam=1.0, C=0.0)(gpu, x).detach())
    draws = rollnet.ROLLLoss(lam=1.0, C=0.0, approx=2, estimator=estimator,  # type: ignore[arg-type]
                             generator=torch.Generator(CUDA).manual_seed(0))
    values = torch.stack([draws(gpu, x).detach() for _ in range(3000)])
    assert values.device.type == "cuda"
    mean, sem = float(values.mean()), float(values.std()) / math.sqrt(values.numel())
    assert abs(mean - exact) < 5 * sem, (mean, exact, sem)
    # the same seed gives the same draws; the default (no generator) draws on x's device
    a = rollnet.ROLLLoss(lam=1.0, C=0.0, approx=2, estimator=estimator,  # type: ignore[arg-type]
                         generator=torch.Generator(CUDA).manual_seed(3))
    b = rollnet.ROLLLoss(lam=1.0, C=0.0, approx=2, estimator=estimator,  # type: ignore[arg-type]
                         generator=torch.Generator(CUDA).manual_seed(3))
    assert torch.equal(a(gpu, x), b(gpu, x))
    rollnet.ROLLLoss(lam=1.0, C=0.0, approx=2, estimator=estimator)(gpu, x).backward()  # type: ignore[arg-type]


@pytest.mark.parametrize("estimator", ["axes", "gaussian"])
def test_fused_chain_pass_on_cuda_matches_the_engine_and_the_cpu(estimator: str) -> None:
    """The approximate term on a plain MLP (one fused autograd node) against the generic engine on
    the GPU, with the same directions, and against the CPU."""
    torch.manual_seed(0)
    model = MLP((1, 6, 6), 4, hidden=(9, 7), act="leaky_relu", normalization=(0.2, 0.6)).double()
    x = _inputs((1, 6, 6), n=5)
    gpu, xg = _on_cuda(model), x.to(CUDA)

    def step(net: nn.Module, inputs: torch.Tensor, fused: bool) -> list[torch.Tensor]:
        net.zero_grad()
        roll = rollnet.ROLLLoss(1.0, 0.5, approx=3, estimator=estimator,  # type: ignore[arg-type]
                                generator=torch.Generator().manual_seed(2), fused=fused)
        term, out = roll(net, inputs, return_output=True)
        (term + out.square().mean()).backward()
        return [term.detach(), out.detach()] + [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]

    fused, engine, cpu = step(gpu, xg, True), step(gpu, xg, False), step(model, x, True)
    for a, b, c in zip(fused, engine, cpu, strict=True):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-10, atol=1e-13)


def test_roll_training_step_on_cuda_with_return_output() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 10)).to(CUDA)
    x = torch.rand(32, 1, 8, 8, device=CUDA)
    y = torch.randint(0, 10, (32,), device=CUDA)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rolls = (rollnet.ROLLLoss(lam=1.0, C=1.0), rollnet.ROLLLoss(lam=1.0, C=1.0, approx=3),
             # a CPU generator: the directions are drawn there and moved beside x
             rollnet.ROLLLoss(lam=1.0, C=1.0, approx=3, generator=torch.Generator().manual_seed(0)))
    for roll in rolls:
        term, logits = roll(net, x, return_output=True)
        torch.testing.assert_close(logits, net(x))
        opt.zero_grad()
        (F.cross_entropy(logits, y) + term).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()


def test_cuda_errors_are_as_clear_as_on_the_cpu() -> None:
    model, shape = make("mlp")
    gpu = _on_cuda(model)
    x = _inputs(shape).to(CUDA)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rollnet.margin(gpu, x)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(CUDA)
    with pytest.raises(UnsupportedOperationError, match="tanh"):
        rollnet.margin(net, torch.randn(2, 3, device=CUDA))


def test_trainer_runs_and_resumes_on_cuda(tmp_path) -> None:
    from rollnet.train import load_manifest, train
    from rollnet.train.checkpoint import load_tensors
    from tests.train.helpers import quiet, tiny_config

    cfg = tiny_config("device=cuda", "epochs=1")
    straight = train(cfg, tmp_path / "straight", log=quiet)
    assert straight.status == "finished"

    def stop(step: int, model: nn.Module) -> None:
        if step == 7:
            raise KeyboardInterrupt

    first = train(cfg, tmp_path / "resumed", on_step=stop, log=quiet)
    assert first.status == "interrupted"
    second = train(cfg, tmp_path / "resumed", resume=True, log=quiet)
    assert second.status == "finished"
    a = load_tensors(load_manifest(tmp_path / "straight" / "last.json"), "weights")
    b = load_tensors(load_manifest(tmp_path / "resumed" / "last.json"), "weights")
    for k in a:  # CUDA kernels need not be bitwise deterministic run to run: close, not equal
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_default_budget_on_cuda_takes_one_chunk_where_the_cpu_takes_many() -> None:
    """On a GPU each chunk costs kernel launches from Python: the default budget there is a quarter
    of the free memory and one chunk may fill it; the CPU keeps chunks cache-sized."""
    from rollnet.engine.gradients import plan_chunks, unit_directions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 28 * 28, 10)).eval()
    x = torch.rand(64, 1, 28, 28)
    directions = unit_directions(x.shape[1:])
    bc, kc = plan_chunks(net, x, directions)
    assert bc * kc < 64 * 784  # several chunks on the CPU
    assert plan_chunks(net.to(CUDA), x.to(CUDA), directions) == (64, 784)
    # an explicit budget is still honoured on the GPU
    bc, kc = plan_chunks(net, x.to(CUDA), directions, memory_budget=64 << 20)
    assert bc * kc < 64 * 784


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approx", [None, 3])
def test_roll_step_under_autocast_on_cuda(dtype: torch.dtype, approx: int | None) -> None:
    check_autocast_step(CUDA, dtype, approx)
