"""How each torch operation passes a tangent: one module per op family.

- :mod:`~rollnet.engine.rules.registry`: :data:`RULES`, :func:`register` and the one
  :func:`dispatch` every traced call goes through (nothing unknown, batch independence,
  detached copies, Gram awareness);
- :mod:`~rollnet.engine.rules.batch`: how a rule declares its treatment of the batch dimension;
- :mod:`~rollnet.engine.rules.structural`: reshapes, indexing, concatenation, sums, padding;
- :mod:`~rollnet.engine.rules.affine`: additions, products with constants, Linear, Conv,
  BatchNorm, average pools, Dropout;
- :mod:`~rollnet.engine.rules.activations`: piecewise-linear activations (each input a neuron);
- :mod:`~rollnet.engine.rules.max_units`: MaxPool, adaptive MaxPool, maxout;
- :mod:`~rollnet.engine.rules.padding`: :func:`~rollnet.engine.padding.neuron_mask` (padded steps).

Adding an operation is one :func:`register` call in its family's module, with a batch role.
"""

from rollnet.engine.rules import activations, affine, max_units, padding, structural
from rollnet.engine.rules.batch import BatchRole
from rollnet.engine.rules.registry import RULES, Dispatch, Rule, RuleEntry, dispatch, register

__all__ = [
    "RULES",
    "BatchRole",
    "Dispatch",
    "Rule",
    "RuleEntry",
    "activations",
    "affine",
    "dispatch",
    "max_units",
    "padding",
    "register",
    "structural",
]
