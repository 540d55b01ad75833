"""Small building blocks shared by the reference models."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["InputNormalization", "activation"]


class InputNormalization(nn.Module):
    """``(x - mean) / std`` with scalar constants, as a first layer.

    Put it in a model that takes pixel units, so that radii certified on the
    model are in pixel units while the rest of the network sees normalised
    inputs.  Affine, so certifiable.

    >>> InputNormalization(0.5, 0.25)(torch.tensor([[1.0]]))
    tensor([[2.]])
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def input_normalization(self) -> tuple[Tensor, Tensor] | None:
        """``(mean, std)``, 0-dim: the declaration that :meth:`forward` is ``(x - mean) / std``
        (:class:`rollnet.regularizer.chain.DeclaresNormalization`).  ``None`` for a subclass
        with its own ``forward``, which must declare itself again."""
        if type(self).forward is not InputNormalization.forward:
            return None
        return self.mean, self.std

    def extra_repr(self) -> str:
        return f"mean={float(self.mean):g}, std={float(self.std):g}"


def activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    """A piecewise-linear activation by name: ``"relu"`` or ``"leaky_relu"``.

    >>> activation("leaky_relu", 0.1)
    LeakyReLU(negative_slope=0.1)
    """
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {name!r}")
