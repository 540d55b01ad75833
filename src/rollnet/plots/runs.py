"""The pictures of trained runs: load checkpoints, compute, draw (what ``rollnet plot`` calls).

Each function takes run directories or manifests (``best.json`` /
``last.json``; a directory means its ``best.json``), loads them with
:func:`rollnet.train.evaluation.load_run` (the model and the data it was
trained on), computes what its picture needs and writes the PNG.  Radii and
regions are computed in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rollnet.plots.margins import plot_margin_cdf
from rollnet.plots.plane import ImagePlane, image_plane, plot_plane
from rollnet.plots.regions import SliceLike, plot_regions, toy_slice
from rollnet.plots.saliency import SaliencyColumn, plot_saliency, spread, worst_case_columns
from rollnet.plots.stability import BoundsCurve

if TYPE_CHECKING:
    from rollnet.train.evaluation import LoadedRun
    from rollnet.train.factory import DataInfo

__all__ = ["margins_figure", "plane_figure", "regions_figure", "saliency_figure", "stability_panels"]

_SPLITS = ("train", "val", "test")


def _split(run: LoadedRun, split: str, limit: int | None = None) -> Any:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    return getattr(run.data, split).head(limit)


def _units(info: DataInfo) -> str:
    return f"{info.model_units} units"


def regions_figure(
    runs: Sequence[str | Path], path: str | Path, *, max_regions: int = 100000, device: str = "cpu",
) -> Path:
    """Exact regions of 2-D runs side by side over their training data's bounding box (plus 10 %),
    with the decision boundary and the test points (the paper's figure 1).

    Args:
        runs: run directories or manifests of models with 2-D input (e.g. ``configs/toy_moons.json``).
        path: the PNG to write.
        max_regions: the most regions per run (a vanilla 4 x 100 MLP on the moons has about 43,000).
        device: where the model runs.

    Raises:
        ValueError: no runs, or a run whose input is not 2-D.
        rollnet.evaluate.plane.TooManyRegionsError: a run with more than ``max_regions`` regions.
    """
    from rollnet.train.evaluation import load_run

    if not runs:
        raise ValueError("no runs given")
    panels: list[tuple[str, SliceLike]] = []
    points = labels = None
    for r in runs:
        run = load_run(r, device)
        if tuple(run.info.input_shape) != (2,):
            raise ValueError(f"{r}: the region picture needs a model with 2-D input, "
                             f"this one takes {tuple(run.info.input_shape)}")
        panels.append((run.config.name, toy_slice(run.model, run.data.train.x.to(run.device),
                                                  max_regions=max_regions)))
        points, labels = run.data.test.x, run.data.test.y
    return plot_regions(panels, path, points=points, labels=labels)


def margins_figure(
    runs: Sequence[str | Path], path: str | Path, *, norm: str = "l2", split: str = "test",
    limit: int | None = None, device: str = "cpu", batch_size: int = 250,
) -> Path:
    """The CDF of each run's per-example margins on a split, certified in float64.

    Args:
        runs: run directories or manifests (at least one; all with the same input units).
        path: the PNG to write.
        norm: ``"l1"``, ``"l2"`` or ``"linf"``.
        split: ``test`` (default), ``val`` or ``train``.
        limit: only the first ``limit`` examples.
        device: where the model runs.
        batch_size: examples per engine pass.

    Raises:
        ValueError: no runs, an unknown norm or split, runs in different input units.
    """
    from rollnet.train.evaluation import NORMS, all_margins, load_run

    if not runs:
        raise ValueError("no runs given")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    margins: dict[str, torch.Tensor] = {}
    units: set[str] = set()
    for r in runs:
        run = load_run(r, device)
        part = _split(run, split, limit)
        units.add(_units(run.info))
        model64 = copy.deepcopy(run.model).to(torch.float64)
        x, lengths = part.x, getattr(part, "lengths", None)
        got = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device=run.device, dtype=torch.float64)
            args = None if lengths is None else (lengths[i : i + batch_size].to(run.device),)
            got.append(all_margins(model64, xb, additional_forward_args=args)[norm].cpu())
        name = run.config.name
        while name in margins:
            name += "'"
        margins[name] = torch.cat(got)
    if len(units) > 1:
        raise ValueError(f"the runs' margins are in different units ({sorted(units)}): not comparable")
    return plot_margin_cdf(margins, path, norm=norm, units=units.pop(), title=f"{norm} margins, {split} split")


def _pixel_box(info: DataInfo) -> tuple[float, tuple[float, float] | None]:
    """``(factor, clamp)``: model units per pixel unit, and the valid pixels' box in model units
    (``(1.0, None)`` for data that are not images)."""
    from rollnet.train.distortion_report import pixel_box

    box = pixel_box(info)
    if box is None or info.normalization is None or info.model_units != "normalized":
        return 1.0, box
    return 1.0 / info.normalization[1], box


def saliency_figure(
    vanilla: str | Path, roll: str | Path, path: str | Path, *, eps: float = 8 / 256, examples: int = 4,
    budget: int | None = None, method: str = "genetic", split: str = "test", seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Saliency maps (input gradients of the true label's logit) of test images and of their
    worst-case perturbations, vanilla against ROLL.

    Columns: the image; vanilla at x; vanilla at its worst case; ROLL at x; ROLL at its worst
    case.  The worst case is :func:`rollnet.evaluate.max_gradient_distortion` in the l_inf
    ball of radius ``eps`` intersected with the valid pixel box; each worst-case panel is
    captioned with its distortion (the l1 distance of the two gradients) and whether the
    predicted label changed there.

    Args:
        vanilla, roll: the two runs (same data).
        path: the PNG to write.
        eps: l_inf radius in pixel units ``[0, 1]`` for image data (converted to the model's
            units), in the model's units otherwise; default 8/256 (the paper's).
        examples: how many images: ``examples`` evenly spaced through the split (indices
            ``i * n // examples``), so a split sorted by label shows several classes.
        budget: most model evaluations per example (default: the search's own sizes, 112,800
            for the paper's genetic search).
        method: ``"genetic"`` or another method of :func:`rollnet.evaluate.max_gradient_distortion`.
        split: ``test`` (default), ``val`` or ``train``.
        seed: seeds the search.
        device: where the models run.

    Raises:
        ValueError: the runs were trained on different data, ``eps <= 0``, ``examples < 1``.
    """
    from rollnet.train.evaluation import load_run

    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    runs = [load_run(vanilla, device), load_run(roll, device)]
    if runs[0].info != runs[1].info:
        raise ValueError(f"the runs were trained on different data: {runs[0].info} and {runs[1].info}")
    part = _split(runs[0], split)
    n = part.x.shape[0]
    if examples > n:
        raise ValueError(f"examples must be at most {n}, the size of the {split} split, got {examples}")
    pick = spread(n, examples)
    x, y = part.x[pick].to(runs[0].device), part.y[pick].to(runs[0].device)
    factor, clamp = _pixel_box(runs[0].info)
    columns = []
    for run in runs:
        gen = torch.Generator(device=run.device).manual_seed(seed)
        columns += worst_case_columns(run.config.name, run.model, x, y, eps * factor, method=method,
                                      budget=budget, clamp=clamp, generator=gen)
    shape = tuple(runs[0].info.input_shape)
    images = x.cpu().reshape(x.shape[0], *shape)
    if len(shape) == 1:  # flat inputs: shown as a row of pixels
        images = images.reshape(x.shape[0], 1, 1, shape[0])
        columns = [SaliencyColumn(c.title, c.attributions.reshape(images.shape), c.captions) for c in columns]
    labels = [f"{split} {int(i)}, label {int(t)}" for i, t in zip(pick, y.cpu(), strict=True)]
    return plot_saliency(images, columns, path, row_labels=labels)


def plane_figure(
    runs: Sequence[str | Path], path: str | Path, *, example: int = 0, split: str = "test", scale: float = 100.0,
    half_width: float | None = None, seed: int = 0, max_regions: int = 10000, device: str = "cpu",
) -> Path:
    """The plane through one test image of each run, spanned by its gradient and a seeded random
    direction, with its exact regions (:func:`rollnet.plots.image_plane`), side by side.

    Args:
        runs: run directories or manifests (MLP or ResNet runs; the same data for all).
        path: the PNG to write.
        example: index of the image in the split.
        split: ``test`` (default), ``val`` or ``train``.
        scale: each panel spans ``scale`` times the image's l2 margin under that run.
        half_width: a common half side in the model's input units instead (comparable panels).
        seed: seeds the random direction.
        max_regions: the most regions per panel.
        device: where the models load (the slice is computed in float64 on the CPU).

    Raises:
        ValueError: no runs, or ``example`` outside the split.
        rollnet.evaluate.plane.TooManyRegionsError: a panel with more than ``max_regions`` regions.
    """
    from rollnet.train.evaluation import load_run

    if not runs:
        raise ValueError("no runs given")
    panels: list[tuple[str, ImagePlane]] = []
    units = "model input units"
    for r in runs:
        run = load_run(r, device)
        part = _split(run, split)
        n = part.x.shape[0]
        if not 0 <= example < n:
            raise ValueError(f"example must lie in [0, {n}) for the {split} split, got {example}")
        x = part.x[example]
        label = int(part.y[example])
        p = image_plane(run.model, x, scale=scale, half_width=half_width,
                        generator=torch.Generator().manual_seed(seed), max_regions=max_regions)
        panels.append((f"{run.config.name}, {split} image {example} (label {label})", p))
        units = _units(run.info)
    return plot_plane(panels, path, units=units)


def stability_panels(
    runs: Sequence[tuple[str, nn.Module, Tensor, Tensor, Sequence[float]]], channel: int,
) -> list[tuple[str, list[BoundsCurve]]]:
    """The paper's figure 3: for each run ``(name, model, x, lengths, l2_margins)``, the stability
    bounds of ``channel`` at each time step of its sequences at the P50 and at the P75 of its l2
    margins (one panel per percentile, one curve per run), for
    :func:`rollnet.plots.plot_stability_bounds`."""
    from rollnet.train.evaluation import at_percentile, sequence_bounds

    panels: list[tuple[str, list[BoundsCurve]]] = [(f"P{q} of the l2 margin", []) for q in (50, 75)]
    for name, model, x, lengths, l2 in runs:
        for (_, curves), q in zip(panels, (50, 75), strict=True):
            i = at_percentile(l2, q)
            lower, upper = sequence_bounds(model, x, lengths, i, channel=channel)
            curves.append(BoundsCurve(f"{name} (sequence {i})", lower, upper))
    return panels
