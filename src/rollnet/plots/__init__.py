"""Pictures of certificates (matplotlib, the ``plots`` extra)."""

from rollnet.plots.margins import MarginCurve, margin_cdf, plot_margin_cdf
from rollnet.plots.plane import ImagePlane, image_plane, plot_plane
from rollnet.plots.png import save_png
from rollnet.plots.regions import (
    RegionPolygons,
    adjacency,
    colour_regions,
    draw_regions,
    plot_regions,
    region_polygons,
    toy_slice,
)
from rollnet.plots.saliency import (
    SaliencyColumn,
    plot_saliency,
    saliency_map,
    spread,
    worst_case_columns,
    worst_case_saliency,
)
from rollnet.plots.stability import BoundsCurve, plot_stability_bounds

__all__ = [
    "BoundsCurve",
    "ImagePlane",
    "MarginCurve",
    "RegionPolygons",
    "SaliencyColumn",
    "adjacency",
    "colour_regions",
    "draw_regions",
    "image_plane",
    "margin_cdf",
    "plot_margin_cdf",
    "plot_plane",
    "plot_regions",
    "plot_saliency",
    "plot_stability_bounds",
    "region_polygons",
    "saliency_map",
    "save_png",
    "spread",
    "toy_slice",
    "worst_case_columns",
    "worst_case_saliency",
]
