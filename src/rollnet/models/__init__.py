"""Reference architectures in plain ``torch.nn``, all certifiable by rollnet.

>>> import torch, rollnet
>>> from rollnet.models import build_model
>>> net = build_model("mlp", (2,), 2, hidden=[16, 16])
>>> rollnet.margin(net, torch.randn(3, 2)).shape
torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from rollnet.models.layers import InputNormalization, activation
from rollnet.models.mlp import MLP
from rollnet.models.recurrent import ElmanRNN, ScoRNN
from rollnet.models.resnet import BasicBlock, ResNet, resnet18

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "BasicBlock",
    "ElmanRNN",
    "InputNormalization",
    "ResNet",
    "ScoRNN",
    "activation",
    "build_model",
    "resnet18",
]

ARCHITECTURES = ("mlp", "resnet", "elman", "scornn")


def build_model(arch: str, input_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """Build ``"mlp"`` (:class:`MLP`), ``"resnet"`` (:class:`ResNet`), ``"elman"``
    (:class:`ElmanRNN`) or ``"scornn"`` (:class:`ScoRNN`) for inputs of ``input_shape``.

    ``options`` are the architecture's keyword arguments; a ResNet takes its
    input channels from ``input_shape[0]`` (which must be ``(C, H, W)``), a
    recurrent net from ``input_shape[-1]`` (which must be ``(T, C)``: one
    padded sequence).

    Raises:
        ValueError: unknown architecture, a ResNet on non-image inputs, or a
            recurrent net on non-sequence inputs.

    >>> type(build_model("resnet", (1, 28, 28), 10, width=4)).__name__
    'ResNet'
    >>> build_model("scornn", (29, 12), 9, hidden_size=8).recurrent_weight().shape
    torch.Size([8, 8])
    """
    if arch == "mlp":
        return MLP(input_shape, num_classes, **options)
    if arch == "resnet":
        if len(input_shape) != 3:
            raise ValueError(f"a ResNet needs image inputs (C, H, W), got input_shape={tuple(input_shape)}")
        return ResNet(int(input_shape[0]), num_classes, **options)
    if arch in ("elman", "scornn"):
        if len(input_shape) != 2:
            raise ValueError(f"a recurrent net needs sequence inputs (T, C), got input_shape={tuple(input_shape)}")
        cls = ElmanRNN if arch == "elman" else ScoRNN
        return cls(int(input_shape[1]), num_classes=num_classes, **options)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHITECTURES)}")
