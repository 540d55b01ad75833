"""The paper's Table-1 report: accuracy, linear regions, and l1 / l2 / l_inf margin percentiles.

Radii are certified on the model's own input and reported in every unit the
data set has: for image data normalised as ``(pixel - mean) / std``, in
normalised units and in [0, 1] pixel units (``radius * std``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rollnet.certify import count_regions
from rollnet.engine.gradients import Request, collect, unit_directions
from rollnet.engine.modes import eval_mode
from rollnet.train.checkpoint import CheckpointError, load_manifest, load_tensors, load_weights_into
from rollnet.train.config import ConfigError, config_from_dict
from rollnet.train.factory import DataInfo, make_data, make_model, resolve_device
from rollnet.train.metrics import percentiles

__all__ = ["NORMS", "RegionReport", "all_margins", "evaluate_checkpoint", "region_report", "to_json", "to_markdown"]

NORMS = {"l1": 1, "l2": 2, "linf": math.inf}
SPLITS = ("train", "val", "test")


@dataclass
class RegionReport:
    """One model on one split.

    Attributes:
        model: label of the model (e.g. the run name).
        split: ``train``, ``val`` or ``test``.
        n: number of examples evaluated.
        accuracy: fraction classified correctly.
        n_patterns: distinct activation patterns among the examples (upper
            bound on the linear regions they occupy).
        n_jacobians: distinct Jacobians (lower bound).
        model_units: units of the model's input (``normalized``, ``pixel`` or ``raw``).
        scales: factor from the model's units to each reported unit.
        margins: ``units -> norm ("l1", "l2", "linf") -> {"P25", "P50", "P75", "P100"}``.
        precision: dtype the radii were certified in.
        seconds: wall time of the evaluation.
    """

    model: str
    split: str
    n: int
    accuracy: float
    n_patterns: int
    n_jacobians: int
    model_units: str
    scales: dict[str, float]
    margins: dict[str, dict[str, dict[str, float]]]
    precision: str
    seconds: float


def all_margins(model: nn.Module, x: Tensor, *, memory_budget: int | None = None) -> dict[str, Tensor]:
    """``{"l1", "l2", "linf"} -> [B]`` margins of ``x`` from one pass over the D input axes.

    Same values as :func:`rollnet.margin` for each p, for the cost of one
    call (the engine keeps the three dual norms of every neuron gradient).
    """
    duals = {"l1": math.inf, "l2": 2.0, "linf": 1.0}  # dual norm q of each p
    with torch.no_grad(), eval_mode(model):
        got = collect(model, x, unit_directions(x.shape[1:]), Request(norms=tuple(duals.values())),
                      memory_budget=memory_budget)
    out = {}
    for name, q in duals.items():
        norms = got.norms[q]
        if norms.shape[1] == 0:
            out[name] = got.values.new_full((x.shape[0],), math.inf)
            continue
        # a neuron whose gradient is zero cannot be crossed: it imposes no constraint
        ratio = torch.where(norms > 0, got.values.abs() / norms, math.inf)
        out[name] = ratio.amin(dim=1)
    return out


def region_report(
    model: nn.Module, x: Tensor, y: Tensor, info: DataInfo, *, label: str, split: str = "test",
    batch_size: int = 250, float64: bool = True, device: torch.device | str = "cpu",
) -> RegionReport:
    """Evaluate ``model`` on ``x`` ``[M, *input_shape]`` with labels ``y`` ``[M]``.

    The model runs in eval mode and its train/eval flags are restored.  With
    ``float64`` the radii are certified on a float64 copy of the model (exact
    up to float64 rounding); otherwise in the model's own precision.

    Example:
        >>> from rollnet.models import MLP
        >>> info = DataInfo("moons", (2,), 2, None, False, "raw")
        >>> r = region_report(MLP((2,), 2, [8]), torch.randn(20, 2), torch.zeros(20, dtype=torch.int64),
        ...                   info, label="tiny")
        >>> sorted(r.margins["raw"])
        ['l1', 'l2', 'linf']
    """
    started = time.perf_counter()
    n = x.shape[0]
    correct = 0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, n, batch_size):
            logits = model(x[i : i + batch_size].to(device))
            correct += int((logits.argmax(dim=1).cpu() == y[i : i + batch_size]).sum())
    n_patterns, n_jacobians = count_regions(model, x.to(device), batch_size=batch_size)
    certified = copy.deepcopy(model).to(torch.float64) if float64 else model
    dtype = torch.float64 if float64 else x.dtype
    radii: dict[str, list[Tensor]] = {name: [] for name in NORMS}
    for i in range(0, n, batch_size):
        for name, r in all_margins(certified, x[i : i + batch_size].to(device=device, dtype=dtype)).items():
            radii[name].append(r.cpu())
    scales = info.radius_scales()
    table = {
        units: {name: percentiles(torch.cat(parts) * scale) for name, parts in radii.items()}
        for units, scale in scales.items()
    }
    return RegionReport(
        model=label, split=split, n=n, accuracy=correct / max(n, 1), n_patterns=n_patterns,
        n_jacobians=n_jacobians, model_units=info.model_units, scales=scales, margins=table,
        precision=str(dtype).replace("torch.", ""), seconds=time.perf_counter() - started,
    )


def evaluate_checkpoint(
    path: str | Path, *, split: str = "test", limit: int | None = None, batch_size: int = 250,
    float64: bool = True, device: str = "cpu", label: str | None = None,
) -> RegionReport:
    """Load a checkpoint (a manifest, or a run directory: its ``best.json``) and report on a split.

    Args:
        path: ``best.json`` / ``last.json`` or the run directory.
        split: ``test`` (default), ``val`` or ``train``.
        limit: evaluate only the first ``limit`` examples of the split.
        label: model label in the report (default: the run's name).

    Raises:
        CheckpointError: missing, damaged or mismatched checkpoint (weights
            that do not fit the architecture, or data that differ from the
            ones it was trained on).
        ValueError: unknown split.

    Example:
        >>> import tempfile
        >>> from rollnet.train import TrainConfig, apply_overrides, train
        >>> cfg = apply_overrides(TrainConfig(), ["data.name=moons", "data.n=200", "model.hidden=[8]",
        ...                                       "epochs=1", "progress=false", "val_margin_samples=0"])
        >>> run = tempfile.mkdtemp()
        >>> _ = train(cfg, run, log=lambda m: None)
        >>> report = evaluate_checkpoint(run, split="test")
        >>> report.n, sorted(report.margins["raw"]["l2"])
        (30, ['P100', 'P25', 'P50', 'P75'])
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    checkpoint = load_manifest(path)
    try:
        cfg = config_from_dict(checkpoint.config)
        info = DataInfo.from_dict(checkpoint.data)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint.path} holds an invalid config or data description: {err}") from err
    dev = resolve_device(device)
    model = make_model(cfg, info).to(dev)
    load_weights_into(model, load_tensors(checkpoint, "weights", dev), checkpoint.path)
    data = make_data(cfg)
    if DataInfo.of(data) != info:
        raise CheckpointError(
            f"{checkpoint.path} was trained on data {info.to_dict()}, but its config now loads "
            f"{DataInfo.of(data).to_dict()}"
        )
    part = getattr(data, split).head(limit)
    name = label or cfg.name
    return region_report(model, part.x, part.y, info, label=name, split=split, batch_size=batch_size,
                         float64=float64, device=dev)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def to_markdown(reports: Sequence[RegionReport]) -> str:
    """Table-1 layout: one row per model and unit; columns accuracy, #patterns, #Jacobians, and
    P25 / P50 / P75 / P100 of the l1, l2 and l_inf margins.

    >>> r = RegionReport("m", "test", 2, 0.5, 2, 2, "raw", {"raw": 1.0},
    ...                  {"raw": {k: {"P25": 1, "P50": 2, "P75": 3, "P100": 4} for k in NORMS}}, "float64", 0.1)
    >>> print(to_markdown([r]).splitlines()[-1])
    | m | 50.00% | 2 | 2 | raw | 1 | 2 | 3 | 4 | 1 | 2 | 3 | 4 | 1 | 2 | 3 | 4 |
    """
    qs = ("P25", "P50", "P75", "P100")
    head = ["model", "accuracy", "patterns", "Jacobians", "units"]
    head += [f"{norm} {q}" for norm in NORMS for q in qs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        for units, table in r.margins.items():
            row = [r.model, f"{r.accuracy:.2%}", str(r.n_patterns), str(r.n_jacobians), units]
            row += [_fmt(table[norm][q]) for norm in NORMS for q in qs]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe(reports: Sequence[RegionReport]) -> str:
    """A sentence saying what the table holds (split, size, units, precision).

    >>> r = RegionReport("m", "test", 5, 1.0, 1, 1, "normalized", {"normalized": 1.0, "pixel": 0.3},
    ...                  {}, "float64", 0.0)
    >>> describe([r]).split(";")[0]
    'test split, 5 examples'
    """
    if not reports:
        return ""
    r = reports[0]
    units = ", ".join(f"{u} = {r.model_units} x {s:.4g}" for u, s in r.scales.items() if u != r.model_units)
    return (
        f"{r.split} split, {r.n} examples; margins certified in {r.precision} on the model's input "
        f"({r.model_units} units){'; ' + units if units else ''}. Patterns / Jacobians: distinct "
        "activation patterns (upper bound on linear regions) / distinct Jacobians (lower bound)."
    )


def to_json(reports: Sequence[RegionReport], extra: dict[str, Any] | None = None) -> str:
    """The reports as JSON (``{"reports": [...], ...extra}``).

    >>> r = RegionReport("m", "test", 1, 1.0, 1, 1, "raw", {"raw": 1.0}, {}, "float64", 0.0)
    >>> json.loads(to_json([r], {"note": "x"}))["reports"][0]["model"]
    'm'
    """
    return json.dumps({"reports": [asdict(r) for r in reports], **(extra or {})}, indent=1, allow_nan=True) + "\n"
