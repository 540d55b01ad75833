"""The state one traced forward pass shares with its rules.

While a model runs under :func:`rollnet.engine.capture.run_traced`, every
tensor that depends on the input is *tracked* by a :class:`Trace`: it carries

- a tangent ``[K, *shape]``, the derivative along K input directions (or
  ``None`` in a pass without directions, a :class:`MaskedTangent` pending a
  product, or a :class:`~rollnet.engine.gram.GramTangent`);
- its *batch dimension*: the dimension whose index is the example.  An
  element at index b of that dimension depends on example b of the input and
  on no other example.  Each rule declares how its op moves that dimension
  (:mod:`rollnet.engine.rules.batch`) and the dispatch enforces it, so no
  value that mixes examples can reach a certificate.

A copy cut off from the input (``detach``, ``.data``) is *tainted*: it may be
stored or logged, but its first use in the traced computation is refused.

A comparison of input-dependent values (``h > c``) gives a *mask*: a tensor
that is constant inside the linear region (its tangent is zero there), but
that still belongs to its examples.  Masks, and what is computed from masks
alone, are tracked with the marker :data:`MASK` in place of a tangent, so they
keep their batch dimension; the dispatch sends every call that reads one to
the rules that know masks and refuses the others.

Every input of a piecewise-linear operation is a *neuron*; the rules report
them as :class:`NeuronGroup` objects to a :class:`NeuronObserver`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from rollnet.engine.gram import GramTangent
from rollnet.errors import UnsupportedOperationError

__all__ = [
    "MASK",
    "MaskedTangent",
    "NeuronGroup",
    "NeuronObserver",
    "RegionConstant",
    "Trace",
    "batch_shared",
    "iter_values",
    "op_name",
]


@dataclass
class NeuronGroup:
    """The neurons of one piecewise-linear call.

    Attributes:
        index: position of the call in execution order (0, 1, ...).
        module_path: dotted path of the module that made the call.
        op: name of the operation (``"relu"``, ``"leaky_relu"``, ``"max_pool2d"``, ...).
        values: ``[B, n]`` neuron values z_j(x); a neuron is *on* when ``z_j > 0``
            for ReLU-like units; for max units it is the (non-negative)
            difference between the selected input and another input.
        tangents: ``[K, B, n]`` derivatives of the values along the K input
            directions, or ``None`` in a pass without directions.  May have
            stride 0 along the batch dimension.
        squared_norms: ``[B, n]`` squared l2 norms of the neuron gradients, when
            the pass computes them by a Gram recursion instead of tangents.
        pattern: ``[B, m]`` the group's part of the activation pattern: ``bool``
            signs for ReLU-like units, ``int64`` selected indices for max units.
        always_on: ``True`` for max-unit differences, which must stay >= 0 (a
            zero difference is a tie and flips at once); ``False`` for
            ReLU-like neurons, which are on iff ``z > 0``.
        valid: ``[B, n]`` bool, ``False`` for elements that are not neurons (padded time
            steps, see :func:`rollnet.engine.padding.neuron_mask`); ``None`` when all are.
            Their tangents and squared norms are zero and their pattern entries constant.
        window: in place of ``tangents``, a :class:`~rollnet.engine.window.WindowTangent`
            ``[K, B, C, *box]`` of the group's ``[B, C, *full]`` map (zero outside the box).
    """

    index: int
    module_path: str
    op: str
    values: Tensor
    tangents: Tensor | None
    pattern: Tensor
    always_on: bool = False
    squared_norms: Tensor | None = None
    valid: Tensor | None = None
    window: Any = None

    def signs(self) -> Tensor:
        """``[B, n]`` +1 for neurons that are on, -1 for those that are off."""
        if self.always_on:
            return torch.ones_like(self.values)
        return torch.where(self.values > 0, 1.0, -1.0).to(self.values.dtype)


class MaskedTangent:
    """The tangent ``raw * mask`` of an activation's output, formed on first use.

    ``raw`` ``[K, B, *shape]`` is the activation input's tangent, ``mask`` ``[B, *shape]``
    its slopes.  A following linear layer may instead fold the mask into its
    weight (``W diag(mask_b)`` per example), which moves fewer bytes when the
    layer has fewer outputs than there are directions; any other reader gets
    the product.
    """

    __slots__ = ("_value", "mask", "raw")

    def __init__(self, raw: Tensor, mask: Tensor) -> None:
        self.raw = raw
        self.mask = mask
        self._value: Tensor | None = None

    @property
    def formed(self) -> bool:
        return self._value is not None

    @property
    def nbytes(self) -> int:
        return self.raw.numel() * self.raw.element_size()

    def value(self) -> Tensor:
        if self._value is None:
            self._value = self.raw * self.mask
        return self._value


class RegionConstant:
    """The "tangent" of a mask: a tensor constant inside the linear region (see :data:`MASK`).

    Its tangent is zero wherever the activation pattern is x's, so it carries no
    directions; it only keeps the mask tracked (with its batch dimension).
    """

    __slots__ = ()
    nbytes = 0

    def __repr__(self) -> str:
        return "MASK"


#: The marker tracked in place of a tangent for masks (``trace.track_mask``).
MASK = RegionConstant()


class NeuronObserver(Protocol):
    """Receives the neurons and the output of one traced forward pass."""

    def neurons(self, group: NeuronGroup) -> None:
        """Called once per piecewise-linear call, in execution order."""

    def output(self, value: Tensor, tangent: Tensor | None) -> None:
        """Called once with the model's output ``[B, ...]`` and its tangent ``[K, B, ...]``."""


class Trace:
    """State shared by the rules during one traced forward pass.

    Args:
        batch_size: B, the number of examples (dim 0 of the input).
        observer: receives neuron groups and the output.
        allow_batch_statistics: accept BatchNorm with batch statistics and
            train-mode Dropout (used by the regulariser during training);
            when ``False`` they are refused, as a certificate needs a fixed
            function of each example.
    """

    def __init__(
        self,
        batch_size: int,
        observer: NeuronObserver,
        *,
        allow_batch_statistics: bool = False,
        update_running_stats: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.observer = observer
        self.allow_batch_statistics = allow_batch_statistics
        self.update_running_stats = update_running_stats
        self.module_stack: list[str] = []
        self.num_groups = 0
        # id(tensor) -> (weak reference to the tensor, tangent or None)
        self._entries: dict[int, tuple[weakref.ref[Tensor], Tensor | None]] = {}
        # id(tensor) -> indices of the unit directions its tangent holds
        self._unit: dict[int, Tensor] = {}
        # bytes held by live tangents (dense count, so views are over-counted), and the peak
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        # id(tensor) -> its batch dimension, set by the dispatch once the rule's declaration is checked
        self._batch_dims: dict[int, int] = {}
        # id(tensor) -> bool mask (broadcastable to it): the elements that are neurons (neuron_mask)
        self._valid: dict[int, Tensor] = {}
        # id(value) -> weak reference: copies cut off from the input (detach, .data, NumPy views)
        self._tainted: dict[int, weakref.ref[Any]] = {}
        self._probe_generator: torch.Generator | None = None
        #: whether any mask was tracked in this pass (keeps the dispatch's check cheap without)
        self.any_masks = False

    # -- tracking -----------------------------------------------------------
    def is_tracked(self, value: Any) -> bool:
        if not isinstance(value, Tensor):
            return False
        entry = self._entries.get(id(value))
        return entry is not None and entry[0]() is value

    def tangent(self, value: Tensor) -> Any:
        """Tangent ``[K, *value.shape]`` of a tracked tensor (None in a pass without directions;
        :data:`MASK` for a mask)."""
        entry = self._entries.get(id(value))
        if entry is None or entry[0]() is not value:
            raise KeyError("tensor is not tracked")
        t = entry[1]
        if isinstance(t, MaskedTangent):
            return t.value()
        dense = getattr(t, "dense", None)  # a WindowTangent: rules that know boxes ask window()
        return dense() if dense is not None else t

    def window(self, value: Tensor) -> Any:
        """The :class:`~rollnet.engine.window.WindowTangent` of a tracked tensor, or ``None`` when its
        tangent is not one."""
        entry = self._entries.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        return entry[1] if hasattr(entry[1], "dense") else None

    def boxed_tangent(self, value: Tensor) -> Any:
        """The tangent as :meth:`tangent` gives it, but a window stays a window (for rules that
        pass it on or scale it: :func:`rollnet.engine.tangents.scale`)."""
        box = self.window(value)
        return self.tangent(value) if box is None else box

    def is_gram(self, value: Tensor) -> bool:
        """Whether a tracked tensor carries the Gram recursion's factors."""
        entry = self._entries.get(id(value))
        t = None if entry is None else entry[1]
        if isinstance(t, MaskedTangent):
            t.value()  # (as reading the tangent does)
        return isinstance(t, GramTangent)

    def masked(self, value: Tensor) -> MaskedTangent | None:
        """The pending ``raw * mask`` of a tracked tensor whose product nobody has formed yet."""
        entry = self._entries.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        t = entry[1]
        return t if isinstance(t, MaskedTangent) and not t.formed else None

    def unit_indices(self, value: Tensor) -> Tensor | None:
        """If ``value`` is the input (or a batch-first reshape of it) and its tangents are unit
        vectors e_k, their indices k (flat per-example coordinates)."""
        if self.is_tracked(value):
            return self._unit.get(id(value))
        return None

    def track(self, value: Tensor, tangent: Any, *, unit: Tensor | None = None) -> None:
        """Mark ``value`` as depending on the input, with the given tangent.

        ``tangent`` is a ``[K, *value.shape]`` tensor, ``None`` in a pass
        without directions, or a :class:`~rollnet.engine.gram.GramTangent`.
        """
        if isinstance(tangent, Tensor) and tangent.shape[1:] != value.shape:
            raise RuntimeError(
                f"internal error: tangent {tuple(tangent.shape)} for a tensor {tuple(value.shape)}"
            )
        key = id(value)
        entries = self._entries
        units = self._unit
        sizes = self._sizes

        batch_dims = self._batch_dims
        valid = self._valid

        def _forget(_: object, key: int = key) -> None:
            entries.pop(key, None)
            units.pop(key, None)
            batch_dims.pop(key, None)
            valid.pop(key, None)
            self.live_bytes -= sizes.pop(key, 0)

        self.live_bytes -= sizes.pop(key, 0)
        batch_dims.pop(key, None)  # (re)set by the dispatch from the rule's declaration
        valid.pop(key, None)
        self._tainted.pop(key, None)
        if tangent is not None:
            nbytes = (
                tangent.numel() * tangent.element_size() if isinstance(tangent, Tensor) else int(tangent.nbytes)
            )
            sizes[key] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._entries[key] = (weakref.ref(value, _forget), tangent)
        if unit is not None:
            self._unit[key] = unit
        else:
            self._unit.pop(key, None)

    def track_mask(self, value: Tensor) -> None:
        """Track ``value`` as a *mask*: constant inside the region, with a batch dimension."""
        self.track(value, MASK)
        self.any_masks = True

    def is_mask(self, value: Any) -> bool:
        """Whether ``value`` is a tracked mask (its tangent is the :data:`MASK` marker)."""
        if not isinstance(value, Tensor):
            return False
        entry = self._entries.get(id(value))
        return entry is not None and entry[1] is MASK and entry[0]() is value

    def batch_dim(self, value: Tensor) -> int:
        """The batch dimension of a tracked tensor (where the example index lives)."""
        d = self._batch_dims.get(id(value)) if self.is_tracked(value) else None
        if d is None:
            raise RuntimeError("internal error: a tracked tensor without a batch dimension")
        return d

    def set_batch_dim(self, value: Tensor, dim: int) -> None:
        """Record ``value``'s batch dimension (the dispatch does this for every tracked result)."""
        if not 0 <= dim < value.dim() or value.shape[dim] != self.batch_size:
            raise RuntimeError(
                f"internal error: batch dimension {dim} for a tensor of shape {tuple(value.shape)} "
                f"and a batch of {self.batch_size}"
            )
        self._batch_dims[id(value)] = dim

    def has_batch_dim(self, value: Tensor) -> bool:
        return id(value) in self._batch_dims

    def set_validity(self, value: Tensor, valid: Tensor) -> None:
        """Record which elements of the tracked ``value`` are neurons (``valid`` bool, broadcastable)."""
        self._valid[id(value)] = valid

    def validity(self, value: Tensor) -> Tensor | None:
        """The bool mask of ``value``'s elements that are neurons, or ``None`` (all of them)."""
        return self._valid.get(id(value)) if self.is_tracked(value) else None

    def probe_generator(self) -> torch.Generator:
        """The pass's own seeded generator for batch-dimension probes (the global RNG is untouched)."""
        if self._probe_generator is None:
            self._probe_generator = torch.Generator().manual_seed(0)
        return self._probe_generator

    # -- copies cut off from the input ---------------------------------------
    def taint(self, value: Any) -> None:
        """Mark ``value`` (a tensor or a NumPy array) as computed from the input without a tangent."""
        key = id(value)
        if isinstance(value, Tensor) and self.is_tracked(value):  # detach_(): the tensor itself is cut
            self._entries.pop(key, None)
            self._unit.pop(key, None)
            self._batch_dims.pop(key, None)
            self.live_bytes -= self._sizes.pop(key, 0)
        store = self._tainted

        def _forget(_: object, key: int = key) -> None:
            store.pop(key, None)

        store[key] = weakref.ref(value, _forget)

    def is_tainted(self, value: Any) -> bool:
        ref = self._tainted.get(id(value))
        return ref is not None and ref() is value

    @property
    def any_tainted(self) -> bool:
        return bool(self._tainted)

    def release(self) -> None:
        """Drop every tangent: tensors that outlive the pass (neuron values kept by an
        observer, the output) must not keep the pass's tangents alive."""
        self._entries.clear()
        self._unit.clear()
        self._sizes.clear()
        self._batch_dims.clear()
        self._valid.clear()
        self._tainted.clear()
        self.live_bytes = 0

    # -- reporting ----------------------------------------------------------
    @property
    def module_path(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def refuse(self, op: str, reason: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(self.module_path, op, reason)

    def emit(
        self,
        op: str,
        values: Tensor,
        tangents: Tensor | None,
        pattern: Tensor,
        *,
        always_on: bool = False,
        squared_norms: Tensor | None = None,
        valid: Tensor | None = None,
        window: Any = None,
    ) -> None:
        """Report one group of neurons (values ``[B, n]``, tangents ``[K, B, n]``, or a ``window``).

        ``valid`` ``[B, n]`` bool marks the elements that are neurons; the others get zero
        tangents and squared norms (they constrain nothing) and a constant pattern entry.
        """
        if valid is not None:
            valid = valid.to(device=values.device, dtype=torch.bool)
            if tangents is not None:
                tangents = tangents * valid.to(tangents.dtype)
            if squared_norms is not None:
                squared_norms = squared_norms * valid.to(squared_norms.dtype)
            if pattern.dtype == torch.bool:
                pattern = pattern & valid
            else:
                pattern = torch.where(valid, pattern, -1)
        group = NeuronGroup(
            index=self.num_groups,
            module_path=self.module_path,
            op=op,
            values=values,
            tangents=tangents,
            pattern=pattern,
            always_on=always_on,
            squared_norms=squared_norms,
            valid=valid,
            window=window,
        )
        self.num_groups += 1
        self.observer.neurons(group)


def batch_shared(t: Tensor) -> bool:
    """True if a tangent ``[K, B, ...]`` is the same for every example (stride 0 along B)."""
    return t.dim() >= 2 and t.shape[1] > 1 and t.stride(1) == 0


def op_name(func: Callable[..., Any]) -> str:
    """A readable name for a torch callable (``torch.nn.functional.gelu``, ``Tensor.sigmoid``)."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    qual = getattr(func, "__qualname__", name)
    if qual.startswith("TensorBase.") or qual.startswith("Tensor."):
        return "Tensor." + qual.split(".", 1)[1]
    module = getattr(func, "__module__", None) or "torch"
    if module.startswith("torch._C"):
        module = "torch.nn.functional" if "_nn" in module else "torch"
    return f"{module}.{name}"




def iter_values(values: tuple[Any, ...] | list[Any]) -> Iterator[Any]:
    """The leaves of nested tuples and lists of arguments (``torch.cat([a, b])``)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from iter_values(v)
        else:
            yield v
