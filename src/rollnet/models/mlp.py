"""The paper's fully connected network (MNIST: 784-300x4-10)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from rollnet.models.layers import InputNormalization, activation

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation`` per hidden layer, then a linear output layer.

    Args:
        input_shape: shape of one example, e.g. ``(1, 28, 28)`` or ``(2,)``;
            the input is flattened to ``prod(input_shape)`` features.
        num_classes: number of logits L.
        hidden: width of each hidden layer (default: the paper's 4 x 300).
        act: ``"relu"`` or ``"leaky_relu"``.
        negative_slope: slope of LeakyReLU for negative inputs.
        dropout: dropout probability after each activation (0: none).
        normalization: ``(mean, std)`` to normalise the input inside the
            model (the model then takes pixel units), or ``None``.

    Input ``[B, *input_shape]``, output logits ``[B, L]``.

    >>> import torch
    >>> net = MLP((1, 28, 28), 10)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    [300, 300, 300, 300, 10]
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (300, 300, 300, 300),
        *,
        act: str = "relu",
        negative_slope: float = 0.01,
        dropout: float = 0.0,
        normalization: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"widths must be positive, got hidden={list(hidden)}, num_classes={num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_shape = tuple(int(s) for s in input_shape)
        layers: list[nn.Module] = []
        if normalization is not None:
            layers.append(InputNormalization(*normalization))
        layers.append(nn.Flatten())
        width = math.prod(self.input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), activation(act, negative_slope)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def plain_chain(self) -> tuple[nn.Module, ...] | None:
        """The modules :meth:`forward` applies, in order: the declaration that lets
        :class:`rollnet.ROLLLoss` take this model through its fused chain pass
        (:class:`rollnet.regularizer.chain.DeclaresChain`).  ``None`` for a subclass
        with its own ``forward``, which must declare itself again."""
        if type(self).forward is not MLP.forward:
            return None
        return (self.layers,)
