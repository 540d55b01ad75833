"""Writing figures as small PNGs: rendered by Agg, stored with an adaptive 256-colour palette.

Region pictures hold tens of thousands of tiny polygons; stored as RGBA they
take hundreds of kilobytes, as an 8-bit palette (the figures use a few dozen
colours plus their anti-aliased blends) a third of that, with no visible
change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["png_figure", "save_png"]


@contextmanager
def png_figure(path: str | Path, nrows: int, ncols: int, *, figsize: tuple[float, float], dpi: int = 120,
               **subplots: Any) -> Iterator[tuple[Figure, Any]]:
    """A headless (Agg) figure of ``nrows x ncols`` axes, written to ``path`` by :func:`save_png`
    after a tight layout when the block ends without an error, and closed in every case.

    Yields:
        ``(fig, axes)`` with ``axes`` always a 2-D array (``squeeze=False``).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "f.png"
        >>> with png_figure(out, 1, 2, figsize=(4, 2), dpi=50) as (fig, axes):
        ...     _ = axes[0][1].plot([0, 1], [1, 0])
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        save_png(fig, path, dpi=dpi)
    finally:
        plt.close(fig)


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render ``fig`` at ``dpi`` and write it to ``path`` as a palette PNG (its folder is created).

    Args:
        fig: a matplotlib figure (any backend; rendered with Agg).
        path: the PNG to write.
        dpi: dots per inch (the image is ``figsize * dpi`` pixels).

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib, matplotlib
        >>> matplotlib.use("Agg", force=False)
        >>> import matplotlib.pyplot as plt
        >>> fig, ax = plt.subplots(figsize=(2, 1)); _ = ax.plot([0, 1], [0, 1])
        >>> out = save_png(fig, pathlib.Path(tempfile.mkdtemp()) / "f.png", dpi=50); plt.close(fig)
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    path = Path(path)
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = Image.fromarray(rgba[..., :3].copy(), mode="RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path
