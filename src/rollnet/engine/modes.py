"""Save and restore a model's train/eval flags around a call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own flag.

    Certificates describe the function a model computes in eval mode
    (Dropout off, BatchNorm with running statistics); the modes of all
    submodules, mixed or not, are restored afterwards, also on error.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with eval_mode(net):
    ...     net[1].training
    False
    >>> net[1].training
    True
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
