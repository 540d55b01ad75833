"""Evaluating explanations and regions: gradient distortion, exact region pictures."""

from rollnet.evaluate.distortion import (
    WorstCase,
    default_explanation,
    gradient_distortion,
    max_gradient_distortion,
)
from rollnet.evaluate.plane import PlaneRegion, PlaneRegions, TooManyRegionsError, plane_regions

__all__ = [
    "PlaneRegion",
    "PlaneRegions",
    "TooManyRegionsError",
    "WorstCase",
    "default_explanation",
    "gradient_distortion",
    "max_gradient_distortion",
    "plane_regions",
]
