"""Certificates that rounding cannot inflate: the ``rounding=`` keyword of the certificates.

A certificate computed in float32 inherits float32's rounding: a neuron close
to its hyperplane has a float32 value ``|z|`` that is mostly rounding error,
and the radius ``|z| / ||g||_q`` can exceed the exact one (measured: for about
half of the inputs, by up to 2-7% on an untrained 784-300x4-10 MLP and 51% on
a small residual conv net; stability bounds up to 10^6 times where a
near-zero neuron's sign comes out wrong; ``benchmarks/bench_precision.py``).

``rounding="sound"`` (the default) never returns more than the reference:
the model's certificate computed in float64 (the same weights and inputs cast
to float64, which the library treats as exact).  For inputs in a lower
precision the certificate is recomputed on a float64 copy of the model and
rounded toward zero into the input's dtype, then moved one more unit in the
last place toward zero, so that it is strictly inside the float64 value
(a cushion of at least 2^-24 relative in float32 for float64's own rounding).
float64 inputs are computed as they are.  ``rounding="none"`` computes in the
input's own precision and returns what that arithmetic gives (faster; can
overclaim).

Why not a forward error bound in float32 instead?  The standard bound
``|fl(w.h) - w.h| <= gamma_n |w|.|h|`` propagated through the layers shrinks
each radius to ``(|z| - err_z)_+ / (||g||_q + err_g)``; ``err_z`` is a second
pass of the network on ``|W|`` and ``|h|`` and grows by about ``sqrt(fan-in)``
per layer over the typical ``|z|``, while the neuron that sets the radius has
one of the smallest ``|z|``.  Measured on random 784-300^k MLPs: it keeps about
half of the radius with one hidden layer (about 20% of the radii become 0) and
next to nothing with two or more (94-100% of the radii 0).  See
``docs/precision.md``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from rollnet.engine.capture import module_paths
from rollnet.engine.gradients import batch_slice

__all__ = ["REFERENCE_DTYPE", "ROUNDING_MODES", "Rounding", "Working", "check_rounding", "toward_zero", "working"]

Rounding = Literal["sound", "none"]
ROUNDING_MODES: tuple[str, ...] = ("sound", "none")
REFERENCE_DTYPE = torch.float64


def check_rounding(rounding: Any) -> Rounding:
    """``"sound"`` or ``"none"``; anything else is refused."""
    if rounding == "sound":
        return "sound"
    if rounding == "none":
        return "none"
    raise ValueError(f"rounding must be 'sound' or 'none', got {rounding!r}")


def toward_zero(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` rounded toward zero into ``dtype``, then one more ulp toward zero.

    For every finite non-zero entry ``|result| < |value|`` strictly (by at least
    one unit in the last place of ``dtype``, half of one where ``value`` lies
    at the very bottom of a binade); zeros stay zero and infinities stay
    infinite (``inf`` means that no neuron can flip).  Finite values beyond
    ``dtype``'s range become its largest finite value, minus one ulp.  When
    ``dtype`` is ``value``'s own dtype, ``value`` is returned unchanged.
    """
    if dtype == value.dtype:
        return value
    out = value.to(dtype)  # round to nearest
    top = torch.finfo(dtype).max
    overflow = torch.isinf(out) & torch.isfinite(value)
    if bool(overflow.any()):
        out = torch.where(overflow, torch.where(value > 0, top, -top).to(dtype), out)
    zero = torch.zeros((), dtype=dtype, device=out.device)
    # round to nearest moved away from zero: one step back makes it round toward zero
    away = out.to(value.dtype).abs() > value.abs()
    out = torch.where(away, torch.nextafter(out, zero.expand_as(out)), out)
    # the cushion: one more step toward zero for every finite non-zero entry
    step = (out != 0) & torch.isfinite(out)
    return torch.where(step, torch.nextafter(out, zero.expand_as(out)), out)


class LowerPrecisionInside(TypeError):
    """The float64 copy of a model computes in a lower precision somewhere."""


class _PrecisionCheck(TorchFunctionMode):
    """Records the first call that turns a float64 tensor into a lower-precision float."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = paths
        self.found: str | None = None

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.found is None and _lowers(args, kwargs, result):
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            where = self.paths[-1] if self.paths else "the model's forward"
            self.found = f"{name} in module '{where or 'the root module'}'"
        return result


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _lowers(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> bool:
    """A float64 tensor went in and a floating tensor of lower precision came out."""
    outs = [t for t in _tensors(result) if t.is_floating_point() and t.dtype != REFERENCE_DTYPE]
    if not outs:
        return False
    return any(t.dtype == REFERENCE_DTYPE for t in _tensors((args, kwargs)))


def _check_float64_forward(model: nn.Module, x: Tensor, forward_args: tuple[Any, ...] = ()) -> None:
    """Run the float64 copy on a couple of examples; refuse it if it computes in lower precision."""
    paths: list[str] = []
    check = _PrecisionCheck(paths)
    failed: Exception | None = None
    try:
        with torch.no_grad(), module_paths(model, paths), check:
            n = min(x.shape[0], 2)
            model(x[:n], *batch_slice(forward_args, 0, n, x.shape[0]))
    except Exception as err:
        if check.found is None:
            # not a precision problem (a wrong input shape, an unsupported layer): the engine runs
            # the same model next and reports it in its own words
            return
        failed = err  # (a cast inside usually makes the float64 copy fail a dtype check)
    if check.found is not None:
        raise LowerPrecisionInside(
            f"rounding='sound' certifies on a float64 copy of the model, but the copy computes in a lower "
            f"precision inside ({check.found} turns float64 into a lower-precision float), so float64 "
            "cannot bound its rounding; remove the cast (for example x.float() in forward), or pass "
            "rounding='none' to accept the model's own rounding"
        ) from failed


def float64_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every floating parameter and buffer in float64."""
    try:
        clone = copy.deepcopy(model)
    except Exception as err:
        raise TypeError(
            "rounding='sound' certifies a lower-precision model on a float64 copy of it, and "
            f"copy.deepcopy(model) failed ({type(err).__name__}: {err}); make the model deep-copyable, "
            "run the model and its inputs in float64 yourself, or pass rounding='none'"
        ) from err
    return clone.to(REFERENCE_DTYPE)


class Working:
    """Where a certificate is computed, and how its results come back.

    Attributes:
        model: the model to trace (the caller's, or its float64 copy).
        x: the input to trace (the caller's, or cast to float64).
        args: the model's further arguments (``additional_forward_args``), their floating
            tensors cast like x.
        dtype: the caller's dtype, in which results are returned.
        device: the caller's device, where results are returned.
        recomputed: whether ``model`` and ``x`` are float64 stand-ins.
    """

    def __init__(
        self, model: nn.Module, x: Tensor, dtype: torch.dtype, device: torch.device, recomputed: bool,
        args: tuple[Any, ...] = (),
    ) -> None:
        self.model = model
        self.x = x
        self.args = args
        self.dtype = dtype
        self.device = device
        self.recomputed = recomputed

    def certificate(self, value: Tensor) -> Tensor:
        """A radius, distance or bound: rounded toward zero into the caller's dtype."""
        return toward_zero(value, self.dtype).to(self.device) if self.recomputed else value

    def plain(self, value: Tensor) -> Tensor:
        """Anything else (values, gradients, outputs): rounded to nearest into the caller's dtype."""
        if not self.recomputed:
            return value
        return value.to(device=self.device, dtype=self.dtype if value.is_floating_point() else value.dtype)

    def cast(self, value: Tensor) -> Tensor:
        """A tensor of the caller's (a direction) moved to the working precision."""
        return value.to(dtype=self.x.dtype, device=self.x.device)

    @contextlib.contextmanager
    def arithmetic(self) -> Iterator[None]:
        """While tracing a float64 stand-in, autocast is off (it would undo the float64)."""
        if not self.recomputed:
            yield
            return
        with contextlib.ExitStack() as stack:
            for device_type in {"cpu", self.x.device.type}:
                with contextlib.suppress(RuntimeError, ValueError):
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield


def _moved(args: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    """Further arguments for the float64 stand-in: tensors on its device, floating ones in float64."""
    return tuple(
        a.to(device=device, dtype=REFERENCE_DTYPE if a.is_floating_point() else a.dtype)
        if isinstance(a, Tensor) else a
        for a in args
    )


def working(model: nn.Module, x: Tensor, rounding: Any, forward_args: tuple[Any, ...] = ()) -> Working:
    """The model and input to trace for ``rounding`` (see the module docstring).

    ``"sound"`` with ``x`` in a precision below float64: a float64 copy of the
    model (refused, with a clear error, if it cannot be copied or if it
    computes in a lower precision inside) and ``x`` in float64; on a device
    without float64 (Apple's MPS) both go to the CPU.  Otherwise the caller's
    own model and input.
    """
    mode = check_rounding(rounding)
    if mode == "none" or x.dtype == REFERENCE_DTYPE or not x.is_floating_point():
        return Working(model, x, x.dtype, x.device, recomputed=False, args=forward_args)
    device = torch.device("cpu") if x.device.type == "mps" else x.device
    clone = float64_copy(model).to(device)
    x64 = x.to(device=device, dtype=REFERENCE_DTYPE)
    args64 = _moved(forward_args, device)
    was_training = [m.training for m in clone.modules()]
    clone.eval()
    try:
        if x64.shape[0]:
            _check_float64_forward(clone, x64, args64)
    finally:
        for m, flag in zip(clone.modules(), was_training, strict=True):
            m.training = flag
    return Working(clone, x64, x.dtype, x.device, recomputed=True, args=args64)
