"""Explanations at many points, chunked: the shared engine of the distortion measures.

An *evaluation* is one explanation computed at one point (for the default
explanation: one forward and one backward pass of one example).
:class:`Scorer` computes the explanation at x once (not counted), then the l1
distance to it of the explanation at any number of other points, and counts
each point it scores as one evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rollnet.certify import Target, _resolve_target

__all__ = ["Explanation", "Scorer", "default_explanation", "expand_args", "points_per_chunk", "predicted_labels"]

Explanation = Callable[[nn.Module, Tensor, Any], Tensor]

DEFAULT_MEMORY_BUDGET = 256 << 20  # bytes of activations held by one chunk of points


def default_explanation(model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
    """The gradient of the ``target`` logit with respect to the inputs (the plain saliency map).

    Args:
        model: the network, called as ``model(inputs)``; its mode is left as it is.
        inputs: ``[n, *shape]`` points.  If ``inputs.requires_grad``, the gradient is
            built with ``create_graph=True`` and can itself be differentiated with
            respect to ``inputs`` (what the surrogate search does); otherwise it is detached.
        target: Captum's rules: an int, a list or ``[n]`` tensor of indices, or ``None``
            for a model with a single output (``[n]`` or ``[n, 1]``).

    Returns:
        ``[n, *shape]`` gradients, one per point.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> g = default_explanation(net, torch.randn(4, 3), target=1)
        >>> torch.equal(g, net.weight[1].detach().expand(4, 3))
        True
    """
    higher = inputs.requires_grad
    leaf = inputs if higher else inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(leaf)
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != inputs.shape[0]:
            raise ValueError(f"the model must return a [n, ...] tensor of outputs for n = {inputs.shape[0]} inputs")
        idx = _resolve_target(target, out)
        picked = out.reshape(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1).gather(1, idx[:, None])
        (grad,) = torch.autograd.grad(picked.sum(), leaf, create_graph=higher)
    return grad


# Differences this many units in the last place of a row's largest entry are rounding, not
# distortion: the same region's gradient computed in batches of another size goes through other
# matrix-product kernels and can differ in its last bits (seen on a 2-core AMD EPYC: 1.4e-8 in
# float32 between a point and x itself, for an MLP whose gradient entries are about 0.1).
_ROUNDING_ULPS = 16


def _distance(got: Tensor, ref: Tensor) -> Tensor:
    """``[n]`` l1 distances between explanation rows, rounding-level entries counted as equal."""
    diff = (got - ref).abs()
    if got.is_floating_point():
        scale = torch.maximum(got.abs().amax(1, keepdim=True), ref.abs().amax(1, keepdim=True))
        diff = torch.where(diff <= _ROUNDING_ULPS * torch.finfo(got.dtype).eps * scale, 0.0, diff)
    return diff.sum(dim=1)


def predicted_labels(out: Tensor) -> Tensor:
    """``[n]`` labels: the argmax of ``[n, L]`` logits, or for a single output its sign (``out > 0``)."""
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        return (out.reshape(-1) > 0).to(torch.int64)
    return out.reshape(out.shape[0], -1).argmax(dim=1)


def expand_args(args: tuple[Any, ...], batch: int, repeats: int) -> tuple[Any, ...]:
    """Per-example tensors (first dimension ``batch``) repeated ``repeats`` times each, in example order."""
    return tuple(
        a.repeat_interleave(repeats, dim=0) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else a
        for a in args
    )


class _Bound(nn.Module):
    """``model(inputs, *args)`` as a one-argument module, for a custom ``explain``.

    An ``explain`` that stacks ``k`` copies of the batch (Captum's integrated
    gradients) gets the per-example arguments tiled ``k`` times, as Captum does.
    """

    def __init__(self, model: nn.Module, args: tuple[Any, ...], batch: int) -> None:
        super().__init__()
        self.model = model
        self.args = args
        self.batch = batch

    def forward(self, inputs: Tensor) -> Any:
        n = inputs.shape[0]
        if n == self.batch or n % self.batch:
            return self.model(inputs, *self.args)
        k = n // self.batch
        tiled = tuple(
            a.repeat(k, *([1] * (a.dim() - 1))) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == self.batch
            else a
            for a in self.args
        )
        return self.model(inputs, *tiled)


def points_per_chunk(model: nn.Module, x: Tensor, args: tuple[Any, ...], memory_budget: int | None,
                     factor: float = 3.0) -> int:
    """How many points one explanation call may take within ``memory_budget`` bytes.

    The cost of a point is estimated from one forward pass of ``x[:1]``: the
    bytes of its input and of every leaf module's output, times ``factor``
    (saved activations, their gradients, and slack).
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    total = [x[:1].numel() * x.element_size()]

    def hook(module: nn.Module, inputs: Any, out: Any) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x[:1], *tuple(a[:1] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == x.shape[0] else a
                                for a in args))
    finally:
        for h in handles:
            h.remove()
    return max(1, int(budget // max(1.0, factor * total[0])))


class Scorer:
    """The l1 distance between the explanation at each x and at other points of its ball, chunked.

    Args:
        model: the network, already in eval mode (the caller's job).
        x: ``[B, *shape]`` centres.
        target: Captum's rules, resolved against ``model(x)``.
        explain: ``(model, inputs, target) -> attributions`` or None for :func:`default_explanation`.
        args: additional forward arguments (checked), per-example tensors with ``B`` entries.
        chunk: points per explanation call.
    """

    def __init__(self, model: nn.Module, x: Tensor, target: Target, explain: Explanation | None,
                 args: tuple[Any, ...], chunk: int) -> None:
        self.model = model
        self.x = x
        self.args = args
        self.chunk = chunk
        self.explain: Explanation = explain if explain is not None else default_explanation
        self.evaluations = 0
        with torch.no_grad():
            out = model(x, *args)
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"the model must return a [B, ...] tensor of outputs for B = {x.shape[0]} inputs")
        self.single = out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)
        self.target = _resolve_target(target, out)
        self.labels = predicted_labels(out)
        self.reference = self.attributions(x, self.target, args, x.shape[0]).flatten(1)

    def attributions(self, inputs: Tensor, target: Tensor, args: tuple[Any, ...], batch: int) -> Tensor:
        """The explanation at ``inputs`` ``[n, *shape]`` whose targets are ``target`` ``[n]``."""
        model: nn.Module = self.model if not args else _Bound(self.model, args, batch)
        tgt: Any = None if self.single else target
        got = self.explain(model, inputs, tgt)
        if not isinstance(got, Tensor) or got.dim() == 0 or got.shape[0] != inputs.shape[0]:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(
                f"explain must return one attribution per input, a [{inputs.shape[0]}, ...] tensor; got {shape}"
            )
        return got if inputs.requires_grad else got.detach()

    def point_args(self, index: Tensor) -> tuple[Any, ...]:
        """The additional arguments of points belonging to examples ``index`` ``[n]``."""
        return tuple(
            a[index] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == self.x.shape[0] else a
            for a in self.args
        )

    def score(self, pts: Tensor, rows: Tensor | None = None) -> Tensor:
        """``[b, n]`` l1 distances for points ``[b, n, *shape]`` of examples ``rows`` (default: all B)."""
        b, n = pts.shape[:2]
        rows = torch.arange(b, device=self.x.device) if rows is None else rows
        owner = rows.repeat_interleave(n)
        flat = pts.reshape(b * n, *pts.shape[2:])
        out = []
        with torch.no_grad():
            ref = self.reference[owner]
        for start in range(0, b * n, self.chunk):
            stop = min(start + self.chunk, b * n)
            idx = owner[start:stop]
            args = self.point_args(idx)
            got = self.attributions(flat[start:stop], self.target[idx], args, stop - start)
            out.append(_distance(got.flatten(1).detach(), ref[start:stop]))
        self.evaluations += n
        return torch.cat(out).reshape(b, n) if out else pts.new_zeros(b, n)

    def changed(self, pts: Tensor) -> Tensor:
        """``[B]`` whether the model's predicted label at ``pts`` ``[B, *shape]`` differs from that at x."""
        with torch.no_grad():
            out = self.model(pts, *self.args)
        return predicted_labels(out) != self.labels

