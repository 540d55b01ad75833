"""Pictures of certificates (matplotlib, the ``plots`` extra)."""

from rollnet.plots.margins import MarginCurve, margin_cdf, plot_margin_cdf
from rollnet.plots.stability import BoundsCurve, plot_stability_bounds

__all__ = ["BoundsCurve", "MarginCurve", "margin_cdf", "plot_margin_cdf", "plot_stability_bounds"]
