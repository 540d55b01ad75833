"""The ROLL hinge ``max(0, 1 - |z|)`` on neuron values and its derivative, written once.

:class:`rollnet.ROLLLoss` applies :func:`hinge` to the engine's neuron values
(autograd differentiates it); the fused chain pass
(:mod:`rollnet.regularizer.chain`) applies :func:`hinge` in its forward and
:func:`hinge_derivative` in its hand-written backward.  The derivative follows
autograd's conventions for ``relu(1 - |z|)``, so both paths give the same
gradients at the kinks too: 0 at ``z = 0`` (``sign(0) = 0``) and at
``|z| = 1`` (``relu'(0) = 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hinge", "hinge_derivative"]


def hinge(z: Tensor) -> Tensor:
    """``max(0, 1 - |z|)`` elementwise: the hinge on neuron values ``z`` (any shape).

    >>> hinge(torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.0]))
    tensor([0.0000, 0.5000, 1.0000, 0.7500, 0.0000])
    """
    return torch.relu(1.0 - z.abs())


def hinge_derivative(z: Tensor) -> Tensor:
    """``d/dz max(0, 1 - |z|)`` elementwise: ``-sign(z)`` where ``|z| < 1``, else 0 (autograd's
    values at the kinks: 0 at ``z = 0`` and at ``|z| = 1``).

    >>> hinge_derivative(torch.tensor([-2.0, -0.5, 0.25, 1.0]))
    tensor([ 0.,  1., -1.,  0.])
    """
    return torch.where(z.abs() < 1, -z.sign(), 0.0)
