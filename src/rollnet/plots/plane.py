"""A plane slice through a real input with its exact linear regions.

The plane passes through an example ``x`` and is spanned by the unit
gradient ``u`` of the target logit at ``x`` and a seeded random unit
direction ``v`` orthogonal to it: ``{x + a u + b v}``.  Since u and v are
orthonormal, ``(a, b)`` are distances in the model's input space (l2), and
the disk of radius ``m`` (the l2 margin of x, :func:`rollnet.margin`) about the
origin lies inside x's region.  :func:`image_plane` computes the slice (with
:func:`rollnet.evaluate.plane.plane_regions`), :func:`plot_plane` draws it.
Works for any network the engine certifies (MLPs, conv and residual nets).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rollnet.engine.modes import eval_mode
from rollnet.plots.png import png_figure
from rollnet.plots.regions import SliceLike, count_label, draw_regions

__all__ = ["ImagePlane", "image_plane", "plot_plane"]


@dataclass(frozen=True)
class ImagePlane:
    """A slice through one example.

    Attributes:
        regions: the :class:`rollnet.evaluate.plane.PlaneRegions` of the slice.
        u: unit gradient of the ``target`` logit at the example, shaped like it.
        v: unit random direction orthogonal to ``u``.
        target: the class whose logit gave ``u``.
        margin: the example's l2 margin (model input units), certified in float64.
        extent: ``(a_min, a_max, b_min, b_max)`` of the slice.
    """

    regions: SliceLike
    u: Tensor
    v: Tensor
    target: int
    margin: float
    extent: tuple[float, float, float, float]


def image_plane(
    model: nn.Module, x: Tensor, *, target: int | None = None, scale: float = 100.0,
    half_width: float | None = None, generator: torch.Generator | None = None, max_regions: int = 10000,
) -> ImagePlane:
    """The exact regions of the plane through ``x`` spanned by its gradient and a random direction.

    Args:
        model: a piecewise-linear classifier (its train/eval flags are restored).
        x: one example, ``[*input_shape]`` (e.g. ``[1, 28, 28]``).
        target: the logit whose gradient spans the plane (default: the predicted class).
        scale: the slice is the square ``[-s m, s m]^2`` with ``m`` the l2 margin of ``x``
            (default 100: in a random plane the hyperplanes lie much farther than the margin,
            the distance to the nearest one in the worst direction of the whole input space;
            an MNIST MLP shows about 100 regions at 100 margins, 2 at 8).
        half_width: a fixed half side of the square in model input units instead (e.g. to
            compare models at the same scale); overrides ``scale``.
        generator: seeds the random direction (default: a generator seeded with 0).
        max_regions: passed to :func:`rollnet.evaluate.plane.plane_regions`.

    Returns:
        :class:`ImagePlane`.

    Raises:
        ValueError: ``x`` not finite, a zero gradient, a non-positive ``scale`` or
            ``half_width``, an infinite margin without ``half_width``, or ``target`` out of range.
        rollnet.evaluate.plane.TooManyRegionsError: more than ``max_regions`` regions.

    Example:
        >>> from rollnet.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> net = MLP((1, 4, 4), 3, [8])
        >>> p = image_plane(net, torch.rand(1, 4, 4))
        >>> len(p.regions) >= 1, abs(float((p.u * p.v).sum())) < 1e-12, round(float(p.u.norm()), 12)
        (True, True, 1.0)
    """
    from rollnet.certify import margin
    from rollnet.evaluate.plane import plane_regions

    if not isinstance(x, Tensor) or not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise ValueError("x must be a finite floating-point tensor shaped like one example")
    if half_width is None and not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if half_width is not None and not (half_width > 0 and math.isfinite(half_width)):
        raise ValueError(f"half_width must be a positive finite number, got {half_width}")
    model64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    x64 = x.detach().to("cpu", torch.float64)
    with eval_mode(model64):
        leaf = x64[None].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model64(leaf)
            if logits.dim() != 2:
                raise ValueError(f"the model must return [1, classes] logits, got shape {tuple(logits.shape)}")
            t = int(logits.argmax(dim=1)) if target is None else int(target)
            if not 0 <= t < logits.shape[1]:
                raise ValueError(f"target must lie in [0, {logits.shape[1]}), got {t}")
            (grad,) = torch.autograd.grad(logits[0, t], leaf)
        m = float(margin(model64, x64[None], p=2)[0])
    g = grad[0]
    if float(g.norm()) == 0.0:
        raise ValueError(f"the gradient of logit {t} at x is zero: it spans no plane")
    u = g / g.norm()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    r = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
    r = r - (r * u).sum() * u
    v = r / r.norm()
    if half_width is None:
        if not math.isfinite(m) or m <= 0:
            raise ValueError(f"the l2 margin of x is {m}: pass half_width to size the slice")
        half_width = scale * m
    extent = (-half_width, half_width, -half_width, half_width)
    regions = plane_regions(model64, x64, u, v, extent, max_regions=max_regions)
    return ImagePlane(regions, u, v, t, m, extent)


def plot_plane(
    panels: Sequence[tuple[str, ImagePlane]], path: str | Path, *, units: str = "model input units",
) -> Path:
    """Write a PNG with one panel per ``(title, slice)``: the exact regions of the plane through an
    example, the decision boundary in black, the example (a star) and its certified l2 disk.

    Args:
        panels: the panels, left to right; each title gets the number of regions.
        path: the PNG to write (its folder is created).
        units: units of ``a`` and ``b``, for the axis labels.

    Returns:
        The path written.

    Raises:
        ValueError: no panels, or a malformed slice.

    Example:
        >>> import tempfile, pathlib
        >>> from rollnet.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> net = MLP((1, 4, 4), 3, [8])
        >>> out = plot_plane([("MLP", image_plane(net, torch.rand(1, 4, 4)))],
        ...                  pathlib.Path(tempfile.mkdtemp()) / "p.png")
        >>> out.stat().st_size > 0
        True
    """
    if not panels:
        raise ValueError("no panels to draw")
    from matplotlib.patches import Circle
    from matplotlib.ticker import FormatStrFormatter

    path = Path(path)
    with png_figure(path, 1, len(panels), figsize=(4.8 * len(panels), 4.6)) as (_, axes):
        for ax, (title, p) in zip(axes[0], panels, strict=True):
            draw_regions(ax, p.regions)
            if math.isfinite(p.margin) and p.margin > 0:
                ax.add_patch(Circle((0.0, 0.0), p.margin, fill=False, edgecolor="black", linestyle="--",
                                    linewidth=0.9, label=f"l2 margin {p.margin:.3g}"))
            ax.plot([0.0], [0.0], marker="*", markersize=12, color="gold", markeredgecolor="black",
                    linestyle="none", label=f"the example (class {p.target} gradient)")
            ax.set_title(f"{title}: {count_label(len(p.regions))}", fontsize="medium")
            ax.set_xlabel(f"a: along the gradient ({units})")
            ax.set_ylabel(f"b: random direction ({units})")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.legend(fontsize="x-small", loc="upper right", framealpha=0.85)
    return path
