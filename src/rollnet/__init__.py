"""rollnet: robust, locally linear deep networks in PyTorch.

Certify the linear region around each input of a piecewise-linear network
(how far one can move before any gradient can change), and train networks
whose regions are large with the ROLL regulariser.

>>> import torch, rollnet
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> rollnet.margin(net, torch.randn(8, 4), p=2).shape
torch.Size([8])
"""

from typing import TYPE_CHECKING, Any

from rollnet.certify import (
    LinearRegions,
    activation_pattern,
    certified_saliency,
    count_regions,
    directional_margin,
    margin,
    neuron_gradients,
    stability_bounds,
)
from rollnet.engine.padding import neuron_mask
from rollnet.errors import UnsupportedOperationError
from rollnet.evaluate.distortion import WorstCase, gradient_distortion, max_gradient_distortion
from rollnet.evaluate.plane import PlaneRegion, PlaneRegions, TooManyRegionsError, plane_regions
from rollnet.patterns import ActivationPattern, ActivationPatterns
from rollnet.regularizer import ROLLLoss
from rollnet.sharding import certify_dataset

__version__ = "0.1.0"

if TYPE_CHECKING:
    from rollnet.train.load import load_model

# Imported on first use: rollnet.train (configs, trainer, checkpoints) stays out of `import rollnet`.
_LAZY = {"load_model": "rollnet.train.load"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rollnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "ActivationPattern",
    "ActivationPatterns",
    "LinearRegions",
    "PlaneRegion",
    "PlaneRegions",
    "ROLLLoss",
    "TooManyRegionsError",
    "UnsupportedOperationError",
    "WorstCase",
    "activation_pattern",
    "certified_saliency",
    "certify_dataset",
    "count_regions",
    "directional_margin",
    "gradient_distortion",
    "load_model",
    "margin",
    "max_gradient_distortion",
    "neuron_gradients",
    "neuron_mask",
    "plane_regions",
    "stability_bounds",
]
