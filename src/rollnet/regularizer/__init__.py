"""The ROLL regulariser: :class:`ROLLLoss` (``loss.py``), the hinge on neuron values written once
(``hinge.py``), and the fused pass of the approximate term for plain Linear/ReLU chains
(``chain.py``, with the protocol by which a model declares itself such a chain).

Only :class:`ROLLLoss` is re-exported here (and as ``rollnet.ROLLLoss``).
"""

from __future__ import annotations

from rollnet.regularizer.loss import ROLLLoss

__all__ = ["ROLLLoss"]
