"""The paper's Caltech-256 table: top-1 / top-5 accuracy and gradient distortion.

For each example, the explanation is the gradient of the true-class logit
with respect to the model's input.  Its l1 change is measured in an
``eps``-ball around the example (intersected with the valid pixel box for
image data):

- *expected* distortion: the mean over points drawn uniformly in the ball
  (:func:`rollnet.evaluate.distortion.gradient_distortion`);
- *worst-case* distortion: the largest a search finds
  (:func:`rollnet.evaluate.distortion.max_gradient_distortion`), with the
  number of worst-case points whose predicted label differs (label changes).

Both are reported at the P25 / P50 / P75 / P100 percentiles over examples.
``eps`` is given in any unit the data set has (the paper's 8/256 is in [0, 1]
pixel units) and converted to the model's input units with the data set's
std, as the margins are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rollnet.engine.modes import eval_mode
from rollnet.train.factory import DataInfo
from rollnet.train.metrics import percentiles

__all__ = [
    "DistortionReport",
    "describe_distortion",
    "distortion_markdown",
    "distortion_report",
    "distortion_rows",
    "pixel_box",
]

QUANTILES = ("P25", "P50", "P75", "P100")


@dataclass
class DistortionReport:
    """Gradient distortion of one model on one split.

    Attributes:
        model: label of the model (e.g. the run name).
        split: ``train``, ``val`` or ``test``.
        n: number of examples evaluated.
        p_at_1: top-1 accuracy in [0, 1].
        p_at_5: top-5 accuracy in [0, 1]; NaN with fewer than 5 classes.
        eps: radius of the ball in ``eps_units``, as given.
        eps_units: units ``eps`` was given in (``pixel``, ``normalized`` or ``raw``).
        eps_model: the same radius in the model's input units (what the model sees).
        model_units: units of the model's input.
        p: norm of the ball (``"inf"``, ``"2"`` or ``"1"``).
        clamp: the box ``(lo, hi)`` in model units points were kept in, or ``None``.
        samples: uniform samples per example for the expected distortion.
        search: worst-case search method.
        search_options: the search's settings (budget, population, generations).
        evaluations: model evaluations the search spent per example.
        seed: seed of the random draws.
        expected: ``{"P25", "P50", "P75", "P100"}`` of the expected distortion.
        worst: the same for the worst-case distortion.
        label_changes: number of examples whose worst-case point changes the predicted label.
        seconds: wall time.
        per_example: ``{"expected", "worst", "label_changed"} -> [M]``, example by example.
    """

    model: str
    split: str
    n: int
    p_at_1: float
    p_at_5: float
    eps: float
    eps_units: str
    eps_model: float
    model_units: str
    p: str
    clamp: tuple[float, float] | None
    samples: int
    search: str
    search_options: dict[str, Any]
    evaluations: int
    seed: int
    expected: dict[str, float]
    worst: dict[str, float]
    label_changes: int
    seconds: float
    per_example: dict[str, list[Any]] = field(default_factory=dict)


def pixel_box(info: DataInfo) -> tuple[float, float] | None:
    """The [0, 1] pixel range in the model's input units for image data, else ``None``.

    Image data are data with pixel units (a normalisation) and ``[C, H, W]`` inputs.

    >>> pixel_box(DataInfo("mnist", (1, 28, 28), 10, (0.5, 0.25), True, "normalized"))
    (-2.0, 2.0)
    >>> pixel_box(DataInfo("moons", (2,), 2, None, False, "raw")) is None
    True
    """
    if info.normalization is None or len(info.input_shape) != 3:
        return None
    if info.model_units == "pixel":
        return (0.0, 1.0)
    mean, std = info.normalization
    return ((0.0 - mean) / std, (1.0 - mean) / std)


def _top_k(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device | str,
           lengths: Tensor | None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (top-5 NaN with fewer than 5 logits)."""
    n = x.shape[0]
    top1 = top5 = 0
    classes = 0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, n, batch_size):
            args = () if lengths is None else (lengths[i : i + batch_size].to(device),)
            logits = model(x[i : i + batch_size].to(device), *args).cpu()
            yb = y[i : i + batch_size]
            classes = logits.shape[1]
            top1 += int((logits.argmax(dim=1) == yb).sum())
            if classes >= 5:
                top5 += int((logits.topk(5, dim=1).indices == yb[:, None]).any(dim=1).sum())
    if n == 0:
        return math.nan, math.nan
    return top1 / n, (top5 / n if classes >= 5 else math.nan)


def distortion_report(
    model: nn.Module, x: Tensor, y: Tensor, info: DataInfo, eps: float, *, label: str,
    split: str = "test", units: str | None = None, p: str = "inf", n_samples: int = 1000,
    method: str = "genetic", budget: int | None = None, population: int = 4800, generations: int = 30,
    seed: int = 0, batch_size: int = 50, device: torch.device | str = "cpu", lengths: Tensor | None = None,
) -> DistortionReport:
    """Top-1 / top-5 accuracy and expected and worst-case gradient distortion of ``model`` on ``x``.

    The explanation is the gradient of the true label's logit (``y``) with
    respect to the model's input, computed in the model's own precision; the
    distortion is its l1 change.  Points are drawn in the ``p``-ball of radius
    ``eps`` around each example, inside the [0, 1] pixel box (in model units)
    for image data (:func:`pixel_box`).  The model runs in eval mode and its
    train/eval flags are restored.

    Args:
        model: the classifier.
        x: ``[M, *input_shape]`` examples in the model's input units.
        y: ``[M]`` true labels (int64).
        info: the data description (units, normalisation, input shape).
        eps: ball radius, in ``units``.
        label: model label in the report.
        split: split name for the report.
        units: units of ``eps``: ``"pixel"`` (the default for data with pixel
            units, as the paper's 8/256), ``"normalized"`` or ``"raw"``
            (the default, and the only choice, for data without pixel units).
        p: norm of the ball: ``"inf"`` (default, the paper's), ``"2"`` or ``"1"``.
        n_samples: uniform samples per example for the expected distortion (default 1000).
        method: worst-case search, ``"genetic"`` (the paper's) or another
            method of :func:`rollnet.evaluate.distortion.max_gradient_distortion`.
        budget: model evaluations per example for the search (default: the method's own).
        population: genetic population (default 4800).
        generations: genetic generations (default 30).
        seed: seed of the samples and of the search (default 0).
        batch_size: examples per call (default 50).
        device: where the examples go (the model's device).
        lengths: ``[M]`` sequence lengths, passed to the model as ``model(x, lengths)``.

    Returns:
        A :class:`DistortionReport`.

    Raises:
        ValueError: a non-positive ``eps`` or ``n_samples``, units the data
            set does not have, or labels that do not match ``x``.

    Example:
        >>> from rollnet.models import MLP
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> info = DataInfo("moons", (2,), 2, None, False, "raw")
        >>> r = distortion_report(MLP((2,), 2, [8]), torch.randn(6, 2), torch.zeros(6, dtype=torch.int64),
        ...                       info, 0.1, label="tiny", n_samples=16, population=8, generations=2)
        >>> r.n, r.eps_units, sorted(r.worst), math.isnan(r.p_at_5)
        (6, 'raw', ['P100', 'P25', 'P50', 'P75'], True)
    """
    from rollnet.evaluate.distortion import gradient_distortion, max_gradient_distortion

    started = time.perf_counter()
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must hold one label per example: x has {x.shape[0]}, y has shape {tuple(y.shape)}")
    scales = info.radius_scales()
    if units is None:
        units = "pixel" if "pixel" in scales else info.model_units
    if units not in scales:
        raise ValueError(f"eps units {units!r} are not available for data set {info.name!r}; "
                         f"choose from {sorted(scales)}")
    eps_model = float(eps) / scales[units]
    clamp = pixel_box(info)
    p_at_1, p_at_5 = _top_k(model, x, y, batch_size, device, lengths)
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    expected: list[Tensor] = []
    worst: list[Tensor] = []
    changed: list[Tensor] = []
    evaluations = 0
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            args = None if lengths is None else (lengths[i : i + batch_size].to(device),)
            expected.append(gradient_distortion(
                model, xb, yb, eps_model, p=p, n_samples=n_samples, clamp=clamp, generator=generator,
                additional_forward_args=args).detach().cpu())
            found = max_gradient_distortion(
                model, xb, yb, eps_model, method=method, budget=budget, p=p, clamp=clamp,
                generator=generator, additional_forward_args=args, population=population,
                generations=generations)
            worst.append(found.distortion.detach().cpu())
            changed.append(found.label_changed.detach().cpu())
            evaluations = max(evaluations, int(torch.as_tensor(found.evaluations).max()))
    mean = torch.cat(expected) if expected else torch.zeros(0)
    top = torch.cat(worst) if worst else torch.zeros(0)
    flips = torch.cat(changed) if changed else torch.zeros(0, dtype=torch.bool)
    options: dict[str, Any] = {"budget": budget}
    if method == "genetic":
        options.update(population=population, generations=generations)
    return DistortionReport(
        model=label, split=split, n=int(x.shape[0]), p_at_1=p_at_1, p_at_5=p_at_5, eps=float(eps),
        eps_units=units, eps_model=eps_model, model_units=info.model_units, p=str(p), clamp=clamp,
        samples=n_samples, search=method, search_options=options, evaluations=evaluations, seed=seed,
        expected=percentiles(mean), worst=percentiles(top), label_changes=int(flips.sum()),
        seconds=time.perf_counter() - started,
        per_example={"expected": mean.tolist(), "worst": top.tolist(), "label_changed": flips.tolist()},
    )


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2%}"


def distortion_rows(reports: Sequence[DistortionReport]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the Caltech table, as strings (for markdown and HTML).

    >>> r = DistortionReport("m", "test", 4, 0.75, math.nan, 0.03, "pixel", 0.1, "normalized", "inf",
    ...                      None, 10, "genetic", {}, 100, 0, {q: 1.0 for q in QUANTILES},
    ...                      {q: 2.0 for q in QUANTILES}, 1, 0.1)
    >>> distortion_rows([r])[1][0][:4]
    ['m', '75.00%', 'n/a', '1']
    """
    head = ["model", "P@1", "P@5"]
    head += [f"expected {q}" for q in QUANTILES] + [f"worst-case {q}" for q in QUANTILES]
    head.append("label changes")
    rows = []
    for r in reports:
        row = [r.model, _pct(r.p_at_1), _pct(r.p_at_5)]
        row += [_fmt(r.expected[q]) for q in QUANTILES] + [_fmt(r.worst[q]) for q in QUANTILES]
        row.append(f"{r.label_changes} / {r.n}")
        rows.append(row)
    return head, rows


def distortion_markdown(reports: Sequence[DistortionReport]) -> str:
    """The paper's Caltech table layout: one row per model; P@1, P@5, expected and worst-case
    gradient distortion at P25 / P50 / P75 / P100 over examples, and the label changes.

    >>> r = DistortionReport("m", "test", 4, 0.75, 1.0, 0.03, "pixel", 0.1, "normalized", "inf",
    ...                      None, 10, "genetic", {}, 100, 0, {q: 1.0 for q in QUANTILES},
    ...                      {q: 2.0 for q in QUANTILES}, 1, 0.1)
    >>> print(distortion_markdown([r]).splitlines()[-1])
    | m | 75.00% | 100.00% | 1 | 1 | 1 | 1 | 2 | 2 | 2 | 2 | 1 / 4 |
    """
    head, rows = distortion_rows(reports)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def describe_distortion(reports: Sequence[DistortionReport]) -> str:
    """A sentence saying what the distortion table holds (ball, units, box, samples, search).

    >>> r = DistortionReport("m", "test", 4, 0.03125, 1.0, 0.03125, "pixel", 0.1, "normalized", "inf",
    ...                      (-0.4, 2.8), 1000, "genetic", {"population": 48, "generations": 3}, 144, 0,
    ...                      {}, {}, 1, 0.1)
    >>> describe_distortion([r]).split(";")[0]
    'test split, 4 examples'
    """
    if not reports:
        return ""
    r = reports[0]
    ball = f"l_{r.p} ball of radius {r.eps:.6g} {r.eps_units} units"
    if r.eps_units != r.model_units:
        ball += f" (= {r.eps_model:.6g} {r.model_units} units, the model's input)"
    box = "" if r.clamp is None else (
        f", kept inside the [0, 1] pixel box ([{r.clamp[0]:.4g}, {r.clamp[1]:.4g}] in {r.model_units} units)")
    settings = ", ".join(f"{k} {v}" for k, v in r.search_options.items() if v is not None)
    return (
        f"{r.split} split, {r.n} examples; P@1 / P@5: top-1 / top-5 accuracy (n/a with fewer than 5 classes). "
        f"Gradient distortion: l1 distance between the gradients of the true-class logit (with respect to the "
        f"model's {r.model_units} input) at an example and at points of the {ball}{box}. Expected: mean over "
        f"{r.samples} uniform samples; worst case: the largest found by the {r.search} search"
        f"{' (' + settings + ')' if settings else ''}, {r.evaluations} model evaluations per example; "
        "label changes: examples whose worst-case point changes the predicted label. Seed "
        f"{r.seed}."
    )
