"""Distributions of certified margins: one empirical CDF per run, on a log-scale x axis.

The margin of an example is the radius of the largest ball around it (in
l1, l2 or l_inf) inside which the network is linear
(:func:`rollnet.margin`, :func:`rollnet.train.evaluation.all_margins`).  A run
whose curve lies to the right has larger linear regions around its examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from rollnet.plots.png import png_figure
from rollnet.train.metrics import percentiles

__all__ = ["MarginCurve", "margin_cdf", "plot_margin_cdf"]


class MarginCurve:
    """The empirical CDF of one run's margins, as drawn.

    Attributes:
        x: ``[k]`` float64, the finite positive margins, ascending.
        y: ``[k]`` float64, the fraction of *all* ``n`` examples whose margin is at
            most ``x[i]`` (so zero margins raise the curve's start, and infinite ones,
            examples no neuron can flip, keep its end below 1).
        n: number of examples.
        zeros: examples with margin 0 (on a neuron's boundary).
        infinite: examples with infinite margin.
        p50: the median margin (:func:`rollnet.train.metrics.percentiles`), possibly 0 or inf.
    """

    def __init__(self, margins: Tensor | Sequence[float]) -> None:
        v = torch.as_tensor(margins, dtype=torch.float64).detach().flatten().cpu()
        if v.numel() == 0:
            raise ValueError("no margins to draw (empty tensor)")
        if bool(torch.isnan(v).any()):
            raise ValueError(f"margins hold {int(torch.isnan(v).sum())} NaN value(s)")
        if bool((v < 0).any()):
            raise ValueError(f"margins must be >= 0, got a minimum of {float(v.min()):.3g}")
        v = v.sort().values
        self.n = int(v.numel())
        self.zeros = int((v == 0).sum())
        self.infinite = int(torch.isinf(v).sum())
        keep = (v > 0) & torch.isfinite(v)
        self.x = v[keep]
        self.y = (torch.arange(1, self.n + 1, dtype=torch.float64) / self.n)[keep]
        self.p50 = percentiles(v, (50,))["P50"]


def margin_cdf(margins: Tensor | Sequence[float]) -> MarginCurve:
    """The empirical CDF of ``margins`` ``[M]`` (>= 0; ``inf`` allowed).

    Raises:
        ValueError: empty, NaN or negative margins.

    >>> c = margin_cdf(torch.tensor([0.0, 1.0, 2.0, math.inf]))
    >>> c.x.tolist(), c.y.tolist(), c.zeros, c.infinite, c.p50
    ([1.0, 2.0], [0.5, 0.75], 1, 1, 1.5)
    """
    return MarginCurve(margins)


def plot_margin_cdf(
    margins: Mapping[str, Tensor | Sequence[float]], path: str | Path, *, norm: str = "l2",
    units: str = "model input units", title: str | None = None,
) -> Path:
    """Write a PNG with the CDF of each run's per-example margins, log-scale x, P50 marked.

    Args:
        margins: ``run name -> [M]`` margins (any M per run, >= 0, ``inf`` allowed), e.g.
            ``RegionReport.per_example["l2"]`` or :func:`rollnet.train.evaluation.all_margins`.
            Drawn in this order, one line each.
        path: the PNG to write (its folder is created).
        norm: the norm of the margins, for the axis label (``"l1"``, ``"l2"`` or ``"linf"``).
        units: units of the margins, for the axis label.
        title: figure title (default: ``"<norm> margins"``).

    Returns:
        The path written.

    Raises:
        ValueError: no runs, or a run's margins are empty, NaN or negative.

    Example:
        >>> import tempfile, pathlib
        >>> runs = {"vanilla": torch.rand(50) * 1e-3, "roll": torch.rand(50) * 1e-2}
        >>> out = plot_margin_cdf(runs, pathlib.Path(tempfile.mkdtemp()) / "m.png")
        >>> out.stat().st_size > 0
        True
    """
    if not margins:
        raise ValueError("no runs to draw: margins is empty")
    curves = {}
    for name, values in margins.items():
        try:
            curves[name] = MarginCurve(values)
        except ValueError as err:
            raise ValueError(f"run {name!r}: {err}") from err

    path = Path(path)
    drawn = [c.x for c in curves.values() if c.x.numel()]
    lo = min((float(x[0]) for x in drawn), default=1e-3)
    hi = max((float(x[-1]) for x in drawn), default=1.0)
    lo, hi = (lo / 2, hi * 2) if hi > lo else (lo / 10, lo * 10)
    with png_figure(path, 1, 1, figsize=(6.4, 4.0)) as (_, axes):
        ax = axes[0][0]
        for i, (name, c) in enumerate(curves.items()):
            color = f"C{i % 10}"
            xs = torch.cat([torch.tensor([lo], dtype=torch.float64), c.x, torch.tensor([hi], dtype=torch.float64)])
            start = c.zeros / c.n
            end = float(c.y[-1]) if c.y.numel() else start
            ys = torch.cat([torch.tensor([start]), c.y, torch.tensor([end])])
            label = f"{name} (n={c.n}, P50 = {c.p50:.3g})"
            if c.zeros or c.infinite:
                label += f", {c.zeros} zero / {c.infinite} inf"
            ax.step(xs.numpy(), ys.numpy(), where="post", color=color, linewidth=1.6, label=label)
            if 0 < c.p50 < math.inf:
                ax.axvline(c.p50, color=color, linestyle=":", linewidth=1)
                ax.plot([c.p50], [0.5], marker="o", color=color, markersize=6, markeredgecolor="black")
        ax.axhline(0.5, color="grey", linewidth=0.5, linestyle="--")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel(f"{norm} margin ({units}, log scale)")
        ax.set_ylabel("fraction of examples with margin <= x")
        ax.set_title(title if title is not None else f"{norm} margins")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    return path
