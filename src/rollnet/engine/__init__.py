"""The network, linearized at x: capture, rules and all-neuron gradients."""

from rollnet.engine.capture import NeuronGroup, NeuronObserver, run_traced
from rollnet.engine.gradients import (
    DEFAULT_MEMORY_BUDGET,
    Collected,
    Directions,
    Request,
    collect,
    given_directions,
    unit_directions,
)
from rollnet.engine.modes import eval_mode
from rollnet.engine.padding import neuron_mask
from rollnet.engine.rules import RULES, register

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "RULES",
    "Collected",
    "Directions",
    "NeuronGroup",
    "NeuronObserver",
    "Request",
    "collect",
    "eval_mode",
    "given_directions",
    "neuron_mask",
    "register",
    "run_traced",
    "unit_directions",
]
