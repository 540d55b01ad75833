"""Piecewise-linear recurrent networks: an Elman RNN and the scaled-Cayley orthogonal RNN.

Both compute, for x ``[B, T, C]`` and optional valid ``lengths`` ``[B]``,

    h_0 = 0,   z_t = input(x_t) + W h_{t-1},   h_t = act(z_t)

with ``act`` ReLU or LeakyReLU, and return the logits ``output(h)`` of the last
valid hidden state.  With ``lengths``, steps at or past a sequence's end are
marked as not neurons (:func:`rollnet.neuron_mask`) and keep ``h``, so a padded
batch gives each sequence's own outputs, certificates and ROLL term; only
``max(lengths)`` steps are run.

Both declare their recurrence (:class:`rollnet.regularizer.recurrent.DeclaresRecurrence`),
so :class:`rollnet.ROLLLoss` takes them through its fused recurrent pass.

LSTM, GRU and tanh RNNs are not piecewise linear (sigmoid, tanh, products of
gates): rollnet refuses them with :class:`rollnet.UnsupportedOperationError`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollnet.engine.padding import neuron_mask
from rollnet.regularizer.recurrent import Recurrence

__all__ = ["ElmanRNN", "ScoRNN"]


def _check_sizes(input_size: int, hidden_size: int, num_classes: int) -> None:
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_slope(negative_slope: float) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a number, got {negative_slope!r}")
    if not (math.isfinite(negative_slope) and negative_slope >= 0):
        raise ValueError(f"negative_slope must be finite and non-negative, got {negative_slope}")
    return float(negative_slope)


class _Elman(nn.Module):
    """The shared recurrence; subclasses set ``input``, ``output``, ``negative_slope``
    and define :meth:`recurrent_weight`."""

    input: nn.Linear
    output: nn.Linear
    negative_slope: float

    def recurrent_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _act(self, z: Tensor) -> Tensor:
        return F.leaky_relu(z, self.negative_slope) if self.negative_slope else F.relu(z)

    def _check(self, x: Tensor, lengths: Tensor | None) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} takes x as a tensor [B, T, C], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} takes x of shape [B, T, C] (batch, time, channels), got {tuple(x.shape)}")
        if x.shape[2] != self.input.in_features:
            raise ValueError(f"{name} takes {self.input.in_features} channels per step, got x of shape "
                             f"{tuple(x.shape)}")
        if lengths is None:
            return
        if not isinstance(lengths, Tensor):
            raise TypeError(f"lengths must be an integer tensor [B] or None, got {type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if lengths.dim() != 1 or lengths.shape[0] != x.shape[0]:
            raise ValueError(f"lengths must have shape [B] = [{x.shape[0]}] (one per sequence), got "
                             f"{tuple(lengths.shape)}")
        if lengths.device != x.device:
            raise ValueError(f"lengths is on {lengths.device} but x is on {x.device}; put them on one device")
        if lengths.numel() and bool(((lengths < 1) | (lengths > x.shape[1])).any()):
            bad = lengths[(lengths < 1) | (lengths > x.shape[1])].tolist()
            raise ValueError(f"lengths must lie in [1, T] = [1, {x.shape[1]}], got {bad[:5]}")

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Logits ``[B, L]`` of x ``[B, T, C]`` (with lengths ``[B]``: of each sequence's
        first ``lengths[b]`` steps).

        Raises:
            TypeError: x not a tensor, or lengths not an integer tensor.
            ValueError: x not ``[B, T, C]`` with C the input size; lengths not ``[B]``,
                on another device, or outside ``[1, T]``.
        """
        self._check(x, lengths)
        w = self.recurrent_weight()
        h = x.new_zeros(x.shape[0], w.shape[0])
        steps = x.shape[1] if lengths is None or lengths.numel() == 0 else int(lengths.max())
        for t in range(steps):
            z = self.input(x[:, t]) + F.linear(h, w)
            if lengths is None:
                h = self._act(z)
            else:
                valid = (lengths > t).unsqueeze(1)
                z = neuron_mask(z, valid)
                h = torch.where(valid, self._act(z), h)
        out: Tensor = self.output(h)
        return out

    def elman_recurrence(self) -> Recurrence | None:
        """The declaration that :meth:`forward` is the Elman recurrence
        (:class:`rollnet.regularizer.recurrent.Recurrence`, W computed afresh); honoured
        only while the class defining this method also defines the ``forward`` in use."""
        return Recurrence(self.input, self.recurrent_weight(), self.negative_slope, self.output)


class ElmanRNN(_Elman):
    """Elman RNN with a ReLU or LeakyReLU cell and a linear read-out of the last valid state.

    Args:
        input_size: channels C per time step.
        hidden_size: hidden units H.
        num_classes: logits L.
        nonlinearity: ``"relu"`` or ``"leaky_relu"``.
        negative_slope: LeakyReLU's slope for negative inputs (unused, and the
            attribute ``negative_slope`` 0.0, for ``"relu"``).

    Parameters: ``input`` (``nn.Linear(C, H)``, input weights and the bias),
    ``weight_hh`` ``[H, H]`` (W, see :meth:`recurrent_weight`), ``output``
    (``nn.Linear(H, L)``).  ``weight_hh`` starts orthogonal (``nn.init.orthogonal_``):
    norm-preserving, so a ReLU recurrence neither explodes nor vanishes at the
    start; the linear layers keep PyTorch's default initialisation.

    Input x ``[B, T, C]`` and optional ``lengths`` ``[B]`` (integers in ``[1, T]``);
    output logits ``[B, L]``.

    >>> import torch
    >>> net = ElmanRNN(12, 32, 9)
    >>> net(torch.zeros(2, 29, 12), torch.tensor([29, 7])).shape
    torch.Size([2, 9])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        nonlinearity: str = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size, num_classes)
        if nonlinearity not in ("relu", "leaky_relu"):
            raise ValueError(f"nonlinearity must be 'relu' or 'leaky_relu' (piecewise linear), got {nonlinearity!r}")
        slope = _check_slope(negative_slope)
        self.nonlinearity = nonlinearity
        self.negative_slope = slope if nonlinearity == "leaky_relu" else 0.0
        self.input = nn.Linear(input_size, hidden_size)
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        nn.init.orthogonal_(self.weight_hh)
        self.output = nn.Linear(hidden_size, num_classes)

    def recurrent_weight(self) -> Tensor:
        """W ``[H, H]``: the parameter ``weight_hh`` itself (``z_t = input(x_t) + h_{t-1} W^T``)."""
        return self.weight_hh

    def extra_repr(self) -> str:
        act = "relu" if self.nonlinearity == "relu" else f"leaky_relu({self.negative_slope:g})"
        return f"hidden={self.weight_hh.shape[0]}, act={act}"


class ScoRNN(_Elman):
    """Scaled-Cayley orthogonal RNN (Helfrich, Willmott and Ye, ICML 2018) with a LeakyReLU cell.

    The recurrent matrix is ``W = (I + A)^-1 (I - A) D``, recomputed from A at
    every forward (so it stays orthogonal whatever the optimiser does to A):

    - A is skew-symmetric, ``A = U - U^T`` with U strictly upper triangular; the
      trained parameter ``skew`` is U's ``H (H - 1) / 2`` entries (row-major, as
      ``torch.triu_indices(H, H, 1)``).  Gradients reach it by autograd through
      ``torch.linalg.solve`` (the reference's closed-form Cayley derivative is
      that gradient); :meth:`recurrent_parameters` returns it, for the reference's
      separate optimiser (RMSprop, lr 1e-4).
    - D is a fixed diagonal of +-1 (the buffer ``sign``), ``num_negative`` entries
      -1, placed last as in the reference.  The default ``hidden_size // 10`` is the
      reference's classification setting (17 of 170 for sequential MNIST,
      ``scoRNN_mnist.py``); its adding and copying tasks use half, and its
      ``scoRNNCell`` without D uses none.  ScoRNN 512 gets 51.
    - A starts as the reference's: 2x2 blocks ``[[0, s], [-s, 0]]`` on the diagonal,
      ``s = -sqrt((1 - cos t) / (1 + cos t))`` with t uniform in (0, pi/2) (for odd H
      the last unit has none), so W starts with eigenvalues spread over the unit
      circle's right half.

    The input weights start uniform in (-0.01, 0.01) with a zero bias (the
    reference's), the read-out Glorot-uniform with a zero bias (TensorFlow's
    dense default, as the reference used).

    The activation is LeakyReLU(``negative_slope``), not the reference's modReLU
    ``sign(z) relu(|z| + b)``: that is not a continuous piecewise-linear function
    of one threshold per unit (it jumps at z = 0 when b > 0, and has two kinks, at
    ``z = +-b``, when b < 0), so its units are not the ReLU-like neurons whose
    kinks bound a linear region, and rollnet could certify nothing for it.  The
    bias is the input layer's, added before the activation.

    Args:
        input_size: channels C per time step.
        hidden_size: hidden units H.
        num_classes: logits L.
        negative_slope: LeakyReLU's slope for negative inputs (0: ReLU).
        num_negative: number of -1 entries of D, in ``[0, H]`` (default ``H // 10``).

    Input x ``[B, T, C]`` and optional ``lengths`` ``[B]`` (integers in ``[1, T]``);
    output logits ``[B, L]``.

    >>> import torch
    >>> net = ScoRNN(12, 16, 9)
    >>> w = net.recurrent_weight()
    >>> bool(torch.allclose(w.T @ w, torch.eye(16), atol=1e-5)), int((net.sign < 0).sum())
    (True, 1)
    >>> net(torch.zeros(3, 29, 12), torch.tensor([7, 29, 12])).shape
    torch.Size([3, 9])
    """

    sign: Tensor
    _rows: Tensor
    _cols: Tensor

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        negative_slope: float = 0.01,
        num_negative: int | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size, num_classes)
        self.negative_slope = _check_slope(negative_slope)
        h = hidden_size
        if num_negative is None:
            num_negative = h // 10
        if isinstance(num_negative, bool) or not isinstance(num_negative, int) or not 0 <= num_negative <= h:
            raise ValueError(f"num_negative must be an integer in [0, hidden_size] = [0, {h}], got {num_negative!r}")
        self.num_negative = num_negative
        self.input = nn.Linear(input_size, h)
        nn.init.uniform_(self.input.weight, -0.01, 0.01)
        nn.init.zeros_(self.input.bias)
        rows, cols = torch.triu_indices(h, h, 1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        sign = torch.ones(h)
        sign[h - num_negative :] = -1.0
        self.register_buffer("sign", sign)
        self.skew = nn.Parameter(self._initial_skew(h))
        self.output = nn.Linear(h, num_classes)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @staticmethod
    def _initial_skew(h: int) -> Tensor:
        """The strict upper triangle of the reference's initial A (angles from the global RNG)."""
        theta = torch.rand(h // 2, dtype=torch.float64) * (math.pi / 2)
        s = -torch.sqrt((1 - torch.cos(theta)) / (1 + torch.cos(theta)))
        upper = torch.zeros(h, h, dtype=torch.float64)
        idx = torch.arange(h // 2) * 2
        upper[idx, idx + 1] = s
        rows, cols = torch.triu_indices(h, h, 1)
        return upper[rows, cols].to(torch.get_default_dtype())

    def skew_matrix(self) -> Tensor:
        """A ``[H, H]``, skew-symmetric, built from ``skew`` (differentiable)."""
        h = self.sign.shape[0]
        upper = self.skew.new_zeros(h, h).index_put((self._rows, self._cols), self.skew)
        return upper - upper.t()

    def recurrent_weight(self) -> Tensor:
        """W ``[H, H]`` ``= (I + A)^-1 (I - A) D``, orthogonal (``z_t = input(x_t) + h_{t-1} W^T``)."""
        a = self.skew_matrix()
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return torch.linalg.solve(eye + a, (eye - a) * self.sign.to(a.dtype))

    def recurrent_parameters(self) -> list[nn.Parameter]:
        """The parameters the reference trains with their own optimiser: ``[skew]`` (A's triangle)."""
        return [self.skew]

    def extra_repr(self) -> str:
        return f"hidden={self.sign.shape[0]}, num_negative={self.num_negative}, act=leaky_relu({self.negative_slope:g})"
