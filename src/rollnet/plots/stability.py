"""Per-time-step stability bounds of sequences (the paper's figure 3).

For one input channel, the open interval ``lower < delta < upper`` that the
channel's value at each time step may move by alone without changing the
activation pattern (:func:`rollnet.stability_bounds`), drawn as a band over
the sequence's valid steps, one band per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BoundsCurve", "plot_stability_bounds"]


@dataclass(frozen=True)
class BoundsCurve:
    """One sequence's bounds for one channel.

    Attributes:
        label: legend entry (the model, and which sequence).
        lower: ``[T]`` lower bounds (<= 0) over the valid steps.
        upper: ``[T]`` upper bounds (>= 0).
    """

    label: str
    lower: Tensor
    upper: Tensor


def _finite(v: Tensor, cap: float) -> Tensor:
    """Bounds with infinities drawn at ``cap`` (an unbounded side reaches the frame)."""
    return v.detach().to(torch.float64).cpu().clamp(-cap, cap)


def plot_stability_bounds(
    panels: Sequence[tuple[str, Sequence[BoundsCurve]]], path: str | Path, *, channel: int = 0,
    units: str = "input units",
) -> Path:
    """Write a PNG with one panel per ``(title, curves)``: each curve a band from lower to upper.

    Args:
        panels: the panels, left to right; each a title and the curves to overlay.
        path: the PNG to write (its folder is created).
        channel: the channel shown (for the axis label).
        units: units of the bounds (for the axis label).

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> c = BoundsCurve("model", -torch.rand(5), torch.rand(5))
        >>> out = plot_stability_bounds([("P50", [c])], pathlib.Path(tempfile.mkdtemp()) / "b.png")
        >>> out.stat().st_size > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    finite = [
        float(v[torch.isfinite(v)].abs().max())
        for _, curves in panels for c in curves for v in (c.lower, c.upper) if bool(torch.isfinite(v).any())
    ]
    cap = 1.5 * max(finite, default=1.0)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.0 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels, strict=False):
        for i, c in enumerate(curves):
            steps = torch.arange(1, c.lower.shape[0] + 1).numpy()
            lo, hi = _finite(c.lower, cap).numpy(), _finite(c.upper, cap).numpy()
            color = f"C{i}"
            ax.fill_between(steps, lo, hi, step="mid", alpha=0.3, color=color, label=c.label)
            ax.step(steps, hi, where="mid", color=color, linewidth=1)
            ax.step(steps, lo, where="mid", color=color, linewidth=1)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_title(title)
        ax.set_xlabel("time step")
        ax.set_ylabel(f"stability bound of channel {channel} ({units})")
        ax.set_ylim(-cap, cap)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
