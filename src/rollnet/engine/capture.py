"""Run a model once and linearize it on the fly.

While the model's own ``forward`` runs, a :class:`torch.overrides.TorchFunctionMode`
sees every torch call.  A call that involves a tensor depending on the input
goes to the rules' :func:`~rollnet.engine.rules.dispatch` (passed to the mode,
not looked up per call), which computes the result and its tangent, checks
that no example's values depend on another example, and reports neurons; a
call with no rule is refused with the module path that made it, so nothing
unknown can slip into a certificate.  The state of one pass lives in a
:class:`~rollnet.engine.tracing.Trace`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from rollnet.engine.rules import Dispatch, dispatch
from rollnet.engine.tracing import (
    MaskedTangent,
    NeuronGroup,
    NeuronObserver,
    Trace,
    batch_shared,
    iter_values,
)

__all__ = ["MaskedTangent", "NeuronGroup", "NeuronObserver", "Trace", "batch_shared", "module_paths", "run_traced"]


class _TracingMode(TorchFunctionMode):
    def __init__(self, trace: Trace, dispatch: Dispatch) -> None:
        super().__init__()
        self.trace = trace
        self.dispatch = dispatch

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if not _involves_input(self.trace, args, kwargs):
            return func(*args, **kwargs)
        return self.dispatch(self.trace, func, args, kwargs)


def _involves_input(trace: Trace, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call reads a tracked tensor, or a copy cut off from one."""
    tainted = trace.any_tainted
    for value in iter_values((*args, *kwargs.values())):
        if trace.is_tracked(value) or (tainted and trace.is_tainted(value)):
            return True
    return False


@contextmanager
def module_paths(model: nn.Module, stack: list[str]) -> Iterator[None]:
    """While active, ``stack[-1]`` is the dotted path of the innermost module running."""
    handles = []
    for name, module in model.named_modules():

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            stack.append(name)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_traced(
    model: nn.Module,
    x: Tensor,
    observer: NeuronObserver,
    *,
    tangent: Any,
    unit: Tensor | None = None,
    allow_batch_statistics: bool = False,
    update_running_stats: bool = False,
    forward_args: tuple[Any, ...] = (),
) -> tuple[Tensor, Trace]:
    """Run ``model(x, *forward_args)`` once, reporting neurons and the output to ``observer``.

    Args:
        model: the network; called as ``model(x, *forward_args)``.
        x: ``[B, *input_shape]`` input.
        observer: receives :class:`NeuronGroup` objects and the output.
        tangent: ``[K, B, *input_shape]`` input directions (may have stride 0
            along B), or ``None`` to record values and patterns only.
        unit: when the directions are unit vectors e_k shared by all examples,
            the ``[K]`` indices k (lets the first affine layer read its
            Jacobian off its weights).
        allow_batch_statistics: see :class:`Trace`.
        forward_args: further arguments of the model (sequence lengths, ...): never
            perturbed, so nothing computed from them alone is input-dependent.

    Returns:
        The model's output ``[B, ...]`` and the finished :class:`Trace`
        (its ``peak_bytes`` says how much tangent memory the pass held).
    """
    trace = Trace(
        x.shape[0], observer, allow_batch_statistics=allow_batch_statistics,
        update_running_stats=update_running_stats,
    )
    trace.track(x, tangent, unit=unit)
    if x.dim() == 0:
        raise ValueError("the input must have a batch dimension first: [B, *input_shape]")
    trace.set_batch_dim(x, 0)
    try:
        with module_paths(model, trace.module_stack), _TracingMode(trace, dispatch):
            out = model(x, *forward_args)
        _report_output(trace, observer, out, tangent)
    finally:
        trace.release()
    return out, trace


def _report_output(trace: Trace, observer: NeuronObserver, out: Any, tangent: Any) -> None:
    if hasattr(tangent, "dense"):  # a WindowTangent: only its K and dtype matter here
        tangent = tangent.data
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model must return one tensor of logits [B, L]; it returned {type(out).__name__}"
        )
    if trace.is_tainted(out):
        raise trace.refuse(
            "the model's output", "it is computed from a detached copy of an input-dependent tensor "
            "(detach, .data or a NumPy copy), so its dependence on the input is unknown",
        )
    if trace.is_tracked(out):
        if trace.batch_dim(out) != 0:
            raise trace.refuse(
                "the model's output",
                f"its examples lie along dimension {trace.batch_dim(out)}, not the first; return "
                "[B, ...] logits",
            )
        t_out = trace.tangent(out)
        if trace.is_mask(out):  # constant inside the region: a zero Jacobian
            t_out = tangent.new_zeros((tangent.shape[0], *out.shape)) if isinstance(tangent, Tensor) else None
        observer.output(out, t_out if isinstance(t_out, Tensor) else None)
    else:
        observer.output(out, out.new_zeros((tangent.shape[0], *out.shape)) if isinstance(tangent, Tensor) else None)
