"""Saliency maps of images and of their worst-case perturbations (the paper's figure 4).

A saliency map here is an attribution (by default the gradient of the
target logit) summed over channels, in absolute value, clipped at its 99th
percentile and scaled to ``[0, 1]``: :func:`saliency_map`.  The figure has
one row per example: the image, then one column per map (e.g. vanilla at x,
vanilla at its worst case, ROLL at x, ROLL at its worst case).
:func:`worst_case_saliency` computes a model's two columns with
:func:`rollnet.evaluate.max_gradient_distortion`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rollnet.engine.modes import eval_mode
from rollnet.plots.png import png_figure

__all__ = ["SaliencyColumn", "plot_saliency", "saliency_map", "spread", "worst_case_columns", "worst_case_saliency"]


def _as_images(t: Tensor, what: str) -> Tensor:
    """``[K, C, H, W]`` float64 from ``[K, C, H, W]`` or ``[K, H, W]``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(f"{what} must be [K, C, H, W] or [K, H, W] images, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{what} holds no examples")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or Inf")
    return t.detach().to("cpu", torch.float64)


def saliency_map(attributions: Tensor, q: float = 0.99) -> Tensor:
    """``[K, H, W]`` maps in ``[0, 1]``: ``|sum over channels|``, clipped at each map's ``q`` quantile.

    Args:
        attributions: ``[K, C, H, W]`` (or ``[K, H, W]``) attributions, e.g. input gradients.
        q: the quantile each map is clipped at (default 0.99, the paper's 99th percentile).

    Returns:
        ``[K, H, W]`` float64: each map divided by its clip value (all zeros for a zero map).

    Raises:
        ValueError: wrong shape, no examples, NaN / Inf, or ``q`` outside ``(0, 1]``.

    >>> a = torch.zeros(1, 3, 20, 20); a[0, :, 0, 0] = 100.0; a[0, 0, 1:, :] = -0.5
    >>> m = saliency_map(a)  # the outlier is clipped to the rest's level
    >>> m.shape, float(m[0, 0, 0]), float(m[0, 5, 5]), float(m[0, 0, 5])
    (torch.Size([1, 20, 20]), 1.0, 1.0, 0.0)
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    s = _as_images(attributions, "attributions").sum(dim=1).abs()
    clip = torch.quantile(s.flatten(1), q, dim=1).clamp_min(0.0)
    top = s.flatten(1).amax(dim=1)
    clip = torch.where(clip > 0, clip, top)  # a sparse map: clip at its maximum instead
    scale = torch.where(clip > 0, clip, torch.ones_like(clip))
    return (s.clamp_max(clip[:, None, None]) / scale[:, None, None]).clamp(0.0, 1.0)


@dataclass(frozen=True)
class SaliencyColumn:
    """One column of the figure.

    Attributes:
        title: column title.
        attributions: ``[K, C, H, W]`` (or ``[K, H, W]``) attributions, one per row.
        captions: optional ``K`` strings written under each panel (e.g. the distortion).
    """

    title: str
    attributions: Tensor
    captions: Sequence[str] | None = field(default=None)


def _display(images: Tensor) -> Tensor:
    """Images scaled to [0, 1] each, as ``[K, H, W]`` (one channel) or ``[K, H, W, 3]``."""
    lo = images.flatten(1).amin(dim=1)[:, None, None, None]
    hi = images.flatten(1).amax(dim=1)[:, None, None, None]
    shown = (images - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    if shown.shape[1] == 1:
        return shown[:, 0]
    if shown.shape[1] == 3:
        return shown.permute(0, 2, 3, 1)
    return shown.mean(dim=1)


def plot_saliency(
    images: Tensor, columns: Sequence[SaliencyColumn], path: str | Path, *,
    row_labels: Sequence[str] | None = None, q: float = 0.99, cmap: str = "gray",
) -> Path:
    """Write a PNG: one row per example, the image first, then one saliency map per column.

    Args:
        images: ``[K, C, H, W]`` (or ``[K, H, W]``) the examples, in any units (each is shown
            scaled to its own range; 1 channel in grey, 3 as RGB, others averaged).
        columns: the maps to show; each column's attributions must match ``images``' spatial
            size (``[K, C', H, W]``, summed over its C' channels by :func:`saliency_map`).
        path: the PNG to write (its folder is created).
        row_labels: optional ``K`` labels shown left of each row (e.g. ``"label 7"``).
        q: the clip quantile of :func:`saliency_map`.
        cmap: matplotlib colour map of the saliency maps (default ``"gray"``: white = salient).

    Returns:
        The path written.

    Raises:
        ValueError: no columns, mismatched shapes or counts, NaN / Inf values.

    Example:
        >>> import tempfile, pathlib
        >>> x = torch.rand(2, 1, 8, 8)
        >>> cols = [SaliencyColumn("gradient", torch.randn(2, 1, 8, 8), ["a", "b"])]
        >>> out = plot_saliency(x, cols, pathlib.Path(tempfile.mkdtemp()) / "s.png")
        >>> out.stat().st_size > 0
        True
    """
    shown = _display(_as_images(images, "images"))
    k, size = shown.shape[0], tuple(shown.shape[1:3])
    if not columns:
        raise ValueError("no saliency columns to draw")
    maps = []
    for col in columns:
        a = _as_images(col.attributions, f"column {col.title!r}")
        if a.shape[0] != k or tuple(a.shape[2:]) != size:
            raise ValueError(f"column {col.title!r}: attributions {tuple(a.shape)} do not match {k} images "
                             f"of size {size}")
        if col.captions is not None and len(col.captions) != k:
            raise ValueError(f"column {col.title!r}: {len(col.captions)} captions for {k} rows")
        maps.append(saliency_map(a, q))
    if row_labels is not None and len(row_labels) != k:
        raise ValueError(f"{len(row_labels)} row labels for {k} rows")

    path = Path(path)
    ncols = 1 + len(columns)
    with png_figure(path, k, ncols, figsize=(1.9 * ncols, 2.0 * k + 0.5), dpi=110) as (_, axes):
        for r in range(k):
            ax = axes[r][0]
            ax.imshow(shown[r].numpy(), cmap="gray" if shown.dim() == 3 else None, vmin=0.0, vmax=1.0)
            if row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize="small")
            for c, (col, m) in enumerate(zip(columns, maps, strict=True), start=1):
                axes[r][c].imshow(m[r].numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
                if col.captions is not None:
                    axes[r][c].set_xlabel(col.captions[r], fontsize="x-small")
        for c, title in enumerate(["image", *(col.title for col in columns)]):
            axes[0][c].set_title(title, fontsize="small")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
    return path


def worst_case_saliency(
    model: nn.Module, x: Tensor, target: Any, eps: float, *, method: str = "genetic",
    budget: int | None = None, clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    explain: Callable[[nn.Module, Tensor, Any], Tensor] | None = None, **search: Any,
) -> tuple[Tensor, Tensor, Any]:
    """A model's attributions at ``x`` and at its worst-case point in the l_inf eps-ball.

    Args:
        model: the network (its train/eval flags are restored).
        x: ``[K, *input_shape]`` examples.
        target: Captum's target rules (e.g. the labels ``[K]``).
        eps: l_inf radius, in the model's input units.
        method, budget, clamp, generator, explain, search: passed to
            :func:`rollnet.evaluate.max_gradient_distortion` (``p="inf"``).

    Returns:
        ``(at_x, at_worst, worst)``: the two ``[K, *input_shape]`` attributions and the
        :class:`rollnet.evaluate.WorstCase` (its ``.distortion`` ``[K]``, ``.x``,
        ``.label_changed``).
    """
    from rollnet.evaluate import default_explanation, max_gradient_distortion

    explanation = explain if explain is not None else default_explanation
    with eval_mode(model):
        worst = max_gradient_distortion(model, x, target, eps, method=method, budget=budget, p="inf",
                                        clamp=clamp, explain=explain, generator=generator, **search)
        at_x = explanation(model, x, target).detach()
        at_worst = explanation(model, worst.x, target).detach()
    return at_x, at_worst, worst


def spread(n: int, k: int) -> Tensor:
    """``[k]`` indices ``i * n // k``: k examples evenly spread over n (a split sorted by label
    shows several classes).

    >>> spread(500, 4).tolist()
    [0, 125, 250, 375]
    """
    if not 1 <= k <= n:
        raise ValueError(f"the number of examples must lie in [1, {n}], got {k}")
    return torch.arange(k) * n // k


def worst_case_columns(
    name: str, model: nn.Module, x: Tensor, target: Any, eps: float, **options: Any
) -> list[SaliencyColumn]:
    """One model's two columns: its saliency at x, and at the worst case of
    :func:`worst_case_saliency` (same options) captioned with the distortion found.

    The examples' own rounding of the box's ends (e.g. normalised pixels 0 and 1 one ulp
    outside the computed box) is kept inside the box.
    """
    clamp = options.pop("clamp", None)
    if clamp is not None:
        clamp = (min(float(clamp[0]), float(x.min())), max(float(clamp[1]), float(x.max())))
    at_x, at_worst, worst = worst_case_saliency(model, x, target, eps, clamp=clamp, **options)
    captions = [f"distortion {float(d):.3g}" + (", label changed" if bool(c) else "")
                for d, c in zip(worst.distortion.cpu(), worst.label_changed.cpu(), strict=True)]
    return [SaliencyColumn(f"{name} at x", at_x.cpu()), SaliencyColumn(f"{name} worst case", at_worst.cpu(), captions)]
