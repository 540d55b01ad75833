"""Pictures of certificates (matplotlib, the ``plots`` extra)."""

from rollnet.plots.margins import MarginCurve, margin_cdf, plot_margin_cdf
from rollnet.plots.regions import (
    RegionPolygons,
    adjacency,
    colour_regions,
    draw_regions,
    plot_regions,
    region_polygons,
    toy_slice,
)
from rollnet.plots.stability import BoundsCurve, plot_stability_bounds

__all__ = [
    "BoundsCurve",
    "MarginCurve",
    "RegionPolygons",
    "adjacency",
    "colour_regions",
    "draw_regions",
    "margin_cdf",
    "plot_margin_cdf",
    "plot_regions",
    "plot_stability_bounds",
    "region_polygons",
    "toy_slice",
]
