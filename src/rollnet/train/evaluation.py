"""The paper's Table-1 report: accuracy, linear regions, and l1 / l2 / l_inf margin percentiles.

Radii are certified on the model's own input and reported in every unit the
data set has: for image data normalised as ``(pixel - mean) / std``, in
normalised units and in [0, 1] pixel units (``radius * std``).

Sequence data (``[M, T, C]`` with ``lengths``) get the paper's Table-2 layout:
accuracy, l1 and l2 margin percentiles in units of 1e-6, and Spearman's rank
correlation between the l1 and l2 margins.
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

from rollnet.certify import check_forward_args, count_regions
from rollnet.engine.gradients import Request, collect, unit_directions
from rollnet.engine.modes import eval_mode
from rollnet.sharding import certify_dataset
from rollnet.train.checkpoint import CheckpointError
from rollnet.train.factory import DataInfo, make_data
from rollnet.train.load import load_checkpoint_model
from rollnet.train.metrics import percentiles

__all__ = [
    "NORMS",
    "LoadedRun",
    "RegionReport",
    "all_margins",
    "at_percentile",
    "evaluate_checkpoint",
    "load_run",
    "region_report",
    "sequence_bounds",
    "spearman",
    "table_rows",
    "to_json",
    "to_markdown",
]

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
        spearman_l1_l2: Spearman's rank correlation between the examples' l1 and l2 margins.
        sequence: whether the examples are sequences with lengths (Table-2 layout).
        per_example: ``norm -> [M]`` margins in the model's units, example by example.
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
    spearman_l1_l2: float = math.nan
    sequence: bool = False
    per_example: dict[str, list[float]] | None = None


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two ``[M]`` samples (ties get their average rank).

    >>> round(spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 40.0, 30.0])), 6)
    0.8
    """
    if a.numel() < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def _ranks(v: Tensor) -> Tensor:
    """Ranks 1..M in float64, ties sharing the mean of their ranks (infinities rank last)."""
    v = v.detach().to(torch.float64).flatten().cpu()
    order = v.argsort(stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def all_margins(
    model: nn.Module, x: Tensor, *, additional_forward_args: Any = None, memory_budget: int | None = None
) -> dict[str, Tensor]:
    """``{"l1", "l2", "linf"} -> [B]`` margins of ``x`` from one pass over the D input axes.

    Same values as :func:`rollnet.margin` for each p, for the cost of one
    call (the engine keeps the three dual norms of every neuron gradient).
    ``additional_forward_args``: as in :func:`rollnet.margin` (sequence lengths).
    """
    duals = {"l1": math.inf, "l2": 2.0, "linf": 1.0}  # dual norm q of each p
    args = check_forward_args(additional_forward_args, x)
    with torch.no_grad(), eval_mode(model):
        got = collect(model, x, unit_directions(x.shape[1:]), Request(norms=tuple(duals.values())),
                      memory_budget=memory_budget, forward_args=args)
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
    lengths: Tensor | None = None, blocks: str | Path | None = None,
) -> RegionReport:
    """Evaluate ``model`` on ``x`` ``[M, *input_shape]`` with labels ``y`` ``[M]``.

    The model runs in eval mode and its train/eval flags are restored.  With
    ``float64`` the radii are certified on a float64 copy of the model (exact
    up to float64 rounding); otherwise in the model's own precision.  For
    sequences, ``lengths`` ``[M]`` goes to the model as ``model(x, lengths)``.

    The margins go through :func:`rollnet.certify_dataset` in blocks of ``batch_size``: under
    torchrun (torch.distributed initialised) they are sharded across the processes and gathered,
    and equal one process's exactly; accuracy and region counts are computed on every process.
    With ``blocks`` a directory, finished blocks of margins are kept there and a rerun computes
    only the missing ones (see :mod:`rollnet.sharding`).

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

    def args(i: int) -> tuple[Tensor, ...]:
        return () if lengths is None else (lengths[i : i + batch_size].to(device),)

    with torch.no_grad(), eval_mode(model):
        for i in range(0, n, batch_size):
            logits = model(x[i : i + batch_size].to(device), *args(i))
            correct += int((logits.argmax(dim=1).cpu() == y[i : i + batch_size]).sum())
    n_patterns, n_jacobians = count_regions(
        model, x.to(device), batch_size=batch_size,
        additional_forward_args=None if lengths is None else (lengths.to(device),),
    )
    certified = copy.deepcopy(model).to(torch.float64) if float64 else model
    dtype = torch.float64 if float64 else x.dtype
    # the expensive part: in blocks of batch_size, sharded across torchrun's processes
    found = certify_dataset(
        certified, x.to(dtype), p=tuple(NORMS.values()), batch_size=batch_size, rounding="none",
        additional_forward_args=None if lengths is None else (lengths,), device=device, out=blocks,
    )
    assert isinstance(found, dict)
    scales = info.radius_scales()
    merged = {name: found[p] for name, p in NORMS.items()}
    table = {
        units: {name: percentiles(values * scale) for name, values in merged.items()}
        for units, scale in scales.items()
    }
    return RegionReport(
        model=label, split=split, n=n, accuracy=correct / max(n, 1), n_patterns=n_patterns,
        n_jacobians=n_jacobians, model_units=info.model_units, scales=scales, margins=table,
        precision=str(dtype).replace("torch.", ""), seconds=time.perf_counter() - started,
        spearman_l1_l2=spearman(merged["l1"], merged["l2"]), sequence=lengths is not None,
        per_example={name: values.tolist() for name, values in merged.items()},
    )


def evaluate_checkpoint(
    path: str | Path, *, split: str = "test", limit: int | None = None, batch_size: int = 250,
    float64: bool = True, device: str = "cpu", label: str | None = None, blocks: str | Path | None = None,
) -> RegionReport:
    """Load a checkpoint (a manifest, or a run directory: its ``best.json``) and report on a split.

    Args:
        path: ``best.json`` / ``last.json`` or the run directory.
        split: ``test`` (default), ``val`` or ``train``.
        limit: evaluate only the first ``limit`` examples of the split.
        label: model label in the report (default: the run's name).
        blocks: a directory for incremental margins (see :func:`region_report`).

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
    loaded = load_run(path, device)
    part = getattr(loaded.data, split).head(limit)
    name = label or loaded.config.name
    return region_report(loaded.model, part.x, part.y, loaded.info, label=name, split=split,
                         batch_size=batch_size, float64=float64, device=loaded.device,
                         lengths=getattr(part, "lengths", None), blocks=blocks)


@dataclass
class LoadedRun:
    """A checkpoint's model (eval-ready, on ``device``), its config, data and data description."""

    model: nn.Module
    config: Any
    info: DataInfo
    data: Any
    device: torch.device


def load_run(path: str | Path, device: str = "cpu") -> LoadedRun:
    """Load a checkpoint's model and the data it was trained on (checked to be the same).

    Raises:
        CheckpointError: missing, damaged or mismatched checkpoint.
    """
    loaded = load_checkpoint_model(path, device)
    checkpoint, cfg, info, model, dev = loaded.checkpoint, loaded.config, loaded.info, loaded.model, loaded.device
    data = make_data(cfg)
    if DataInfo.of(data) != info:
        raise CheckpointError(
            f"{checkpoint.path} was trained on data {info.to_dict()}, but its config now loads "
            f"{DataInfo.of(data).to_dict()}"
        )
    return LoadedRun(model, cfg, info, data, dev)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def table_rows(reports: Sequence[RegionReport]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of :func:`to_markdown`'s table, as strings (for markdown and HTML).

    Table-1 layout, or Table-2 when every report is of sequences.

    >>> r = RegionReport("m", "test", 2, 0.5, 2, 2, "raw", {"raw": 1.0},
    ...                  {"raw": {k: {"P25": 1, "P50": 2, "P75": 3, "P100": 4} for k in NORMS}}, "float64", 0.1)
    >>> head, rows = table_rows([r])
    >>> head[:5], rows[0][:5]
    (['model', 'accuracy', 'patterns', 'Jacobians', 'units'], ['m', '50.00%', '2', '2', 'raw'])
    """
    qs = ("P25", "P50", "P75", "P100")
    if reports and all(r.sequence for r in reports):
        head = ["model", "accuracy"] + [f"{norm} {q} (1e-6)" for norm in ("l1", "l2") for q in qs]
        head.append("Spearman l1/l2")
        rows = []
        for r in reports:
            table = r.margins[r.model_units]
            row = [r.model, f"{r.accuracy:.2%}"] + [_fmt(table[norm][q] * 1e6) for norm in ("l1", "l2") for q in qs]
            row.append(f"{r.spearman_l1_l2:.3f}")
            rows.append(row)
        return head, rows
    head = ["model", "accuracy", "patterns", "Jacobians", "units"]
    head += [f"{norm} {q}" for norm in NORMS for q in qs]
    rows = []
    for r in reports:
        for units, table in r.margins.items():
            row = [r.model, f"{r.accuracy:.2%}", str(r.n_patterns), str(r.n_jacobians), units]
            row += [_fmt(table[norm][q]) for norm in NORMS for q in qs]
            rows.append(row)
    return head, rows


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(reports: Sequence[RegionReport]) -> str:
    """Table-1 layout: one row per model and unit; columns accuracy, #patterns, #Jacobians, and
    P25 / P50 / P75 / P100 of the l1, l2 and l_inf margins.  When every report is of
    sequences, the Table-2 layout (:func:`_sequence_table`).

    >>> r = RegionReport("m", "test", 2, 0.5, 2, 2, "raw", {"raw": 1.0},
    ...                  {"raw": {k: {"P25": 1, "P50": 2, "P75": 3, "P100": 4} for k in NORMS}}, "float64", 0.1)
    >>> print(to_markdown([r]).splitlines()[-1])
    | m | 50.00% | 2 | 2 | raw | 1 | 2 | 3 | 4 | 1 | 2 | 3 | 4 | 1 | 2 | 3 | 4 |
    """
    return _markdown(*table_rows(reports))


def _sequence_table(reports: Sequence[RegionReport]) -> str:
    """The paper's Table-2 layout: accuracy, l1 and l2 margin percentiles in units of 1e-6 of the
    model's input, and Spearman's rank correlation between the l1 and l2 margins.

    >>> r = RegionReport("m", "test", 2, 0.5, 2, 2, "raw", {"raw": 1.0},
    ...                  {"raw": {k: {"P25": 1e-6, "P50": 2e-6, "P75": 3e-6, "P100": 4e-6} for k in NORMS}},
    ...                  "float64", 0.1, spearman_l1_l2=0.98, sequence=True)
    >>> print(_sequence_table([r]).splitlines()[-1])
    | m | 50.00% | 1 | 2 | 3 | 4 | 1 | 2 | 3 | 4 | 0.980 |
    """
    if not all(r.sequence for r in reports):
        raise ValueError("the Table-2 layout is for sequence reports only")
    return _markdown(*table_rows(reports))


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


def at_percentile(values: Sequence[float] | Tensor, q: float) -> int:
    """Index of the example whose value is nearest the ``q``-th percentile (``P{q}`` of
    :func:`rollnet.train.metrics.percentiles`), the lowest index among ties.

    >>> at_percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50)
    2
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("no examples to pick from")
    target = percentiles(v, (int(q),))[f"P{int(q)}"]
    gap = (v - target).abs()
    gap = torch.where(torch.isnan(gap), math.inf, gap)
    return int(gap.argmin())


def sequence_bounds(
    model: nn.Module, x: Tensor, lengths: Tensor, index: int, *, channel: int = 0
) -> tuple[Tensor, Tensor]:
    """Stability bounds ``(lower, upper)`` ``[length]`` of one channel of sequence ``index``,
    certified in float64 on the sequence alone (equal to its bounds in a padded batch)."""
    from rollnet.certify import stability_bounds

    n = int(lengths[index])
    xi = x[index : index + 1, :n].to(torch.float64)
    model64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    lower, upper = stability_bounds(model64, xi.cpu(), additional_forward_args=(lengths[index : index + 1].cpu(),))
    return lower[0, :, channel], upper[0, :, channel]
