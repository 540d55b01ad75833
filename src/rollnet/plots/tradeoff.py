"""The accuracy-margin trade-off of a sweep (the paper's figure 2): validation accuracy against
median l2 margin, on a log scale, with the Pareto front and the selected models marked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rollnet.plots.png import png_figure

__all__ = ["plot_tradeoff"]


def plot_tradeoff(points: Sequence[tuple[float, float]], path: str | Path, *, front: Sequence[int] = (),
                  marks: Mapping[int, str] | None = None, units: str = "model",
                  title: str = "validation") -> Path:
    """Draw ``points`` ``(median l2 margin, accuracy)`` of every run and write a PNG.

    Args:
        points: one ``(margin, accuracy)`` per run; margins must be positive (log axis),
            accuracy in [0, 1].
        path: the PNG to write.
        front: indices of the Pareto front (joined by a step line).
        marks: ``index -> label`` of runs to name (the reference and the selected ones).
        units: the margins' units, for the axis label.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "t.png"
        >>> _ = plot_tradeoff([(1e-4, 0.98), (1e-3, 0.97)], out, front=[0, 1], marks={0: "reference"})
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    marks = dict(marks or {})
    bad = [p for p in points if not p[0] > 0]
    if bad:
        raise ValueError(f"margins must be positive for the log axis, got {bad[0][0]}")
    with png_figure(path, 1, 1, figsize=(6.4, 4.4)) as (_, axes):
        ax = axes[0][0]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, [100 * y for y in ys], s=22, color="0.55", label="runs", zorder=2)
        on_front = sorted((points[i] for i in front), key=lambda p: p[0])
        if on_front:
            fx, fy = zip(*on_front, strict=True)
            ax.step(fx, [100 * y for y in fy], where="post", color="tab:blue", lw=1.2, zorder=1)
            ax.scatter(fx, [100 * y for y in fy], s=34, facecolors="none", edgecolors="tab:blue",
                       label="Pareto front", zorder=3)
        for i, label in marks.items():
            x, y = points[i]
            colour = "black" if label == "reference" else "tab:red"
            ax.scatter([x], [100 * y], s=70, marker="*", color=colour, zorder=4)
            ax.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(6, 4), fontsize=8, color=colour)
        ax.set_xscale("log")
        ax.set_xlabel(f"median l2 margin ({units} units, log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)  # the corner a trade-off leaves empty
    return Path(path)
