"""The ROLL regulariser: grow the linear regions around the training points.

Per example, with neurons I and hyper-parameters lambda, C, gamma::

    lambda / |I_gamma| * sum_{j in I_gamma} ( ||grad_x z_j||_2^2 + C * max(0, 1 - |z_j|) )

where I_gamma holds the gamma percent of neurons with the largest bracketed
term (gamma = 100: all of them; ``"max"``: the largest one).  Minimising it
pushes every neuron's hyperplane away from the data (large |z_j|) while
keeping its gradient small: a large l2 margin |z_j| / ||grad z_j||_2.
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from rollnet.certify import check_forward_args, check_input
from rollnet.engine.gradients import (
    Directions,
    Request,
    collect,
    given_directions,
    plan_chunks,
    sampled_axes,
    unit_directions,
)
from rollnet.regularizer.chain import (
    chain_terms,
    find_chain,
    fusable,
    run_through_wrapper,
    unwrap_parallel,
)
from rollnet.regularizer.hinge import hinge
from rollnet.regularizer.recurrent import find_recurrence, recurrent_fusable, recurrent_terms

__all__ = ["ROLLLoss"]

Gamma = float | int | Literal["max"]


class ROLLLoss(nn.Module):
    """The ROLL regularisation term, differentiable in the model's parameters.

    Args:
        lam: weight lambda of the term (>= 0).
        C: weight of the hinge ``max(0, 1 - |z_j|)`` against the squared
            gradient norm (>= 0).
        gamma: percentage in (0, 100] of neurons kept per example, those with
            the largest term; or ``"max"`` for the single largest.
        approx: ``None`` for the exact term (all D input axes pushed through
            the linearized network, one batched pass).  An int k for an
            unbiased estimate of the squared gradient norms from k random
            directions per example (only with ``gamma=100``, since picking the
            top neurons from noisy estimates would be biased).
        estimator: with ``approx``: ``"axes"`` (the paper's: k input axes drawn
            uniformly with replacement, scaled by D / k) or ``"gaussian"``
            (k standard normal directions v, using E (g . v)^2 = ||g||^2).
        memory_budget: bytes of tangents held at once in each pass (default 1 GiB; on a
            CUDA device a quarter of its free memory when that is more).
        generator: random generator for the approximate estimators.
        fused: with ``approx``, run plain Linear/ReLU chains (an ``nn.Sequential``
            of Linear and ReLU or LeakyReLU, a :class:`rollnet.models.MLP`, a
            model that declares itself one, see :mod:`rollnet.regularizer.chain`)
            through one fused autograd node with a hand-written backward:
            the same term and gradients in
            15-20% less time per training step on the paper's MLP.  That node
            is differentiable once; set ``False`` for higher-order gradients.
            Recurrent models that declare an Elman recurrence
            (:class:`rollnet.models.ElmanRNN`, :class:`rollnet.models.ScoRNN`, see
            :mod:`rollnet.regularizer.recurrent`) take a fused pass for the exact and the
            approximate term, which uses causality (a step's neurons do not depend on later
            inputs): about half the work of the generic engine for the exact term.
            Other models always go through the generic engine.

    Returns (when called as ``roll(model, x)``):
        A scalar tensor: the term averaged over the batch.  The model's own
        mode is used: in training mode, Dropout masks are drawn once per call
        and BatchNorm's batch statistics are treated as constants.

    Example:
        >>> import torch, torch.nn.functional as F, rollnet
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> roll = rollnet.ROLLLoss(lam=2.0, C=0.25)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> term, logits = roll(net, x, return_output=True)  # the term and the training forward, one pass
        >>> loss = F.cross_entropy(logits, y) + term
        >>> loss.backward()
    """

    def __init__(
        self,
        lam: float,
        C: float,
        gamma: Gamma = 100,
        approx: int | None = None,
        estimator: Literal["axes", "gaussian"] = "axes",
        memory_budget: int | None = None,
        generator: torch.Generator | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if lam < 0 or C < 0:
            raise ValueError(f"lam and C must be non-negative, got lam={lam}, C={C}")
        if gamma != "max" and (isinstance(gamma, str) or not 0 < float(gamma) <= 100):
            raise ValueError(f"gamma must be a percentage in (0, 100] or 'max', got {gamma!r}")
        if approx is not None:
            if isinstance(approx, bool) or not isinstance(approx, int) or approx < 1:
                raise ValueError(f"approx must be a positive number of directions, got {approx!r}")
            if gamma == "max" or float(gamma) != 100:
                raise ValueError("the approximate term is unbiased only with gamma=100 (all neurons)")
        if estimator not in ("axes", "gaussian"):
            raise ValueError(f"estimator must be 'axes' or 'gaussian', got {estimator!r}")
        self.lam = float(lam)
        self.C = float(C)
        self.gamma = gamma
        self.approx = approx
        self.estimator = estimator
        self.memory_budget = memory_budget
        self.generator = generator
        self.fused = fused
        # chunk plans per (model, input shape, batch, dtype): saves a probe pass per step
        self._plans: dict[tuple[int, tuple[int, ...], str], tuple[int, int]] = {}

    def extra_repr(self) -> str:
        extra = f", approx={self.approx}, estimator={self.estimator!r}" if self.approx else ""
        return f"lam={self.lam}, C={self.C}, gamma={self.gamma!r}{extra}"

    def _draw_on(self, x: Tensor) -> torch.device:
        """Random directions are drawn where the generator lives (by default: beside ``x``)."""
        return self.generator.device if self.generator is not None else x.device

    def _directions(self, x: Tensor) -> tuple[Directions, float]:
        in_shape = x.shape[1:]
        d = math.prod(in_shape)
        if self.approx is None:
            return unit_directions(in_shape), 1.0
        k = self.approx
        if self.estimator == "axes":
            idx = torch.randint(0, d, (k, x.shape[0]), generator=self.generator, device=self._draw_on(x))
            return sampled_axes(idx), d / k
        vectors = torch.randn(k, *x.shape, generator=self.generator, dtype=x.dtype, device=self._draw_on(x))
        return given_directions(vectors, x), 1.0 / k

    def _collect(
        self, model: nn.Module, x: Tensor, update_running_stats: bool, per_example_mean: bool = False,
        forward_args: Any = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The model's output, the ``[B, N]`` bracketed term of every neuron and which of them are
        neurons (``[B, N]`` bool, or ``None``: all); with ``per_example_mean``, the fused chain pass
        may return their ``[B]`` means instead."""
        model = unwrap_parallel(model)
        x = check_input(x)
        args = check_forward_args(forward_args, x)
        directions, scale = self._directions(x)
        if self.fused:
            rec = find_recurrence(model)
            if rec is not None and recurrent_fusable(rec, x, directions, args):
                with torch.enable_grad():
                    return recurrent_terms(rec, x, args, directions, scale, self.C)
        if self.approx is not None and self.fused and not args:
            chain = find_chain(model)
            if chain is not None and fusable(chain, x, directions, self.memory_budget):
                output, terms = chain_terms(chain, x, directions, scale, self.C, mean=per_example_mean)
                return output, terms, None
        key = (id(model), tuple(x.shape), f"{x.dtype}{x.device}{model.training}")
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_chunks(model, x, directions, self.memory_budget, allow_batch_statistics=True,
                               forward_args=args)
            self._plans = {key: plan}  # keep only the latest shape
        with torch.enable_grad():
            got = collect(model, x, directions, Request(squared_l2=True), memory_budget=self.memory_budget,
                          allow_batch_statistics=True, plan=plan, update_running_stats=update_running_stats,
                          forward_args=args)
        assert got.squared_l2 is not None
        squared = got.squared_l2 if scale == 1.0 else got.squared_l2 * scale
        terms = squared + self.C * hinge(got.values)
        if got.valid is not None:
            terms = torch.where(got.valid, terms, 0.0)
        return got.output, terms, got.valid

    def neuron_terms(self, model: nn.Module, x: Tensor, *, additional_forward_args: Any = None) -> Tensor:
        """``[B, N]`` the bracketed term of every neuron (before top-gamma selection); entries
        that are not neurons (padded steps, :func:`rollnet.neuron_mask`) are 0."""
        return self._collect(model, x, update_running_stats=False, forward_args=additional_forward_args)[1]

    @overload
    def forward(self, model: nn.Module, x: Tensor, *, additional_forward_args: Any = None) -> Tensor: ...

    @overload
    def forward(
        self, model: nn.Module, x: Tensor, return_output: Literal[False], *, additional_forward_args: Any = None
    ) -> Tensor: ...

    @overload
    def forward(
        self, model: nn.Module, x: Tensor, return_output: Literal[True], *, additional_forward_args: Any = None
    ) -> tuple[Tensor, Tensor]: ...

    def forward(
        self, model: nn.Module, x: Tensor, return_output: bool = False, *, additional_forward_args: Any = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The term for a batch ``x`` ``[B, *input_shape]``: a scalar, mean over the batch.

        ``additional_forward_args``: further arguments of the model, ``model(x, *args)``
        (Captum's convention: one value or a tuple, never perturbed), such as sequence
        ``lengths`` ``[B]``.  Padded steps that the model marks with
        :func:`rollnet.neuron_mask` are not neurons: each example's term is taken over
        its own neurons only, so padding changes nothing.

        With ``return_output=True``, also returns the model's output from the
        same pass, ``(term, logits)``, so the training loss needs no second
        forward: ``term, logits = roll(model, x, return_output=True)``.  That
        pass then counts as the training forward: BatchNorm updates its
        running statistics in it.

        A ``DistributedDataParallel`` model is computed on its ``.module`` (so
        the fused passes apply) inside the wrapper's forward, so its gradients
        are all-reduced in the backward as for ``ddp_model(x)``.
        """
        if isinstance(model, nn.parallel.DistributedDataParallel):
            forward_args = additional_forward_args
            got: Tensor | tuple[Tensor, Tensor] = run_through_wrapper(
                model, lambda inner: self._forward(inner, x, return_output, forward_args)
            )
            return got
        return self._forward(model, x, return_output, additional_forward_args)

    def _forward(
        self, model: nn.Module, x: Tensor, return_output: bool, additional_forward_args: Any
    ) -> Tensor | tuple[Tensor, Tensor]:
        """:meth:`forward` on a model that is not a DistributedDataParallel wrapper."""
        output, terms, valid = self._collect(
            model, x, update_running_stats=return_output, per_example_mean=True, forward_args=additional_forward_args
        )
        term = self._reduce(terms, valid)
        return (term, output) if return_output else term

    def _reduce_valid(self, terms: Tensor, valid: Tensor) -> Tensor:
        """:meth:`_reduce` over each example's own neurons (``valid`` ``[B, N]``), as if each
        example were run alone: its mean, its largest term or the mean of its top gamma
        percent (an example without neurons counts 0)."""
        if terms.shape[0] == 0:
            return terms.sum() * 0.0
        count = valid.sum(dim=1)
        if self.gamma == "max":
            per_example = torch.where(valid, terms, -math.inf).amax(dim=1)
            per_example = torch.where(count > 0, per_example, 0.0)
        elif float(self.gamma) == 100:
            per_example = terms.sum(dim=1) / count.clamp(min=1)
        else:
            keep = torch.ceil(count.to(torch.float64) * (float(self.gamma) / 100.0)).clamp(min=1).to(torch.int64)
            ranked = torch.where(valid, terms, -math.inf).sort(dim=1, descending=True).values
            within = torch.arange(terms.shape[1], device=terms.device) < torch.minimum(keep, count).unsqueeze(1)
            per_example = torch.where(within, ranked, 0.0).sum(dim=1) / keep
        return self.lam * per_example.mean()

    def _reduce(self, terms: Tensor, valid: Tensor | None = None) -> Tensor:
        """lambda times the batch mean of the per-example reduction of ``terms`` ``[B, N]``, or of
        ``[B]`` per-example means already taken (the fused chain pass, gamma = 100 only)."""
        if valid is not None:
            return self._reduce_valid(terms, valid)
        if terms.dim() == 1:
            return self.lam * terms.mean()
        n = terms.shape[1]
        if terms.shape[0] == 0 or n == 0:
            return terms.sum() * 0.0
        if self.gamma == "max":
            per_example = terms.amax(dim=1)
        elif float(self.gamma) == 100:
            per_example = terms.mean(dim=1)
        else:
            keep = max(1, math.ceil(float(self.gamma) / 100.0 * n))
            per_example = terms.topk(keep, dim=1).values.mean(dim=1)
        return self.lam * per_example.mean()
