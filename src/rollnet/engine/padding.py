"""Padded time steps: elements of a pre-activation that are not neurons.

A recurrent model run on a zero-padded batch of sequences computes its
cell at every step, also past a sequence's end.  Those pre-activations are
not neurons of the sequence: :func:`neuron_mask` says so, and the model keeps
its state unchanged there (``torch.where(valid, relu(z), h)``), so padded
steps change neither the output nor any certificate nor the ROLL term.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

__all__ = ["neuron_mask"]


def neuron_mask(z: Tensor, valid: Tensor) -> Tensor:
    """Declare which elements of the pre-activation ``z`` are neurons.

    Returns ``z`` itself.  Inside a rollnet pass (certificates, the ROLL
    term) the piecewise-linear activation applied to the returned tensor
    reports only the elements where ``valid`` is ``True`` as neurons; the
    others constrain no certificate, take no part in the ROLL term, and have a
    constant entry in the activation pattern.  The model must also keep them
    from reaching its output (``torch.where(valid, act(z), h)``).

    Args:
        z: ``[B, ...]`` pre-activations that depend on the input.
        valid: bool, broadcastable to ``z`` without growing it (``[B, 1]`` for a
            time step: ``(lengths > t).unsqueeze(1)``); it must not depend on
            the input (pass lengths through ``additional_forward_args``).

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
        >>> neuron_mask(z, torch.tensor([[True], [False]])) is z
        True
    """
    if has_torch_function((z, valid)):
        return handle_torch_function(neuron_mask, (z, valid), z, valid)
    if not isinstance(z, Tensor) or not isinstance(valid, Tensor):
        raise TypeError("neuron_mask(z, valid) takes two tensors")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    return z
