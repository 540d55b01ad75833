"""Pictures of certificates (matplotlib, the ``plots`` extra)."""

from rollnet.plots.stability import BoundsCurve, plot_stability_bounds

__all__ = ["BoundsCurve", "plot_stability_bounds"]
