"""Evaluation helpers: loss and accuracy over a split, margin percentiles, a JSON-lines log."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollnet.certify import margin
from rollnet.data import Split
from rollnet.engine.modes import eval_mode
from rollnet.train.checkpoint import atomic_write_text

__all__ = ["PERCENTILES", "MetricsLog", "classify", "margins", "percentiles"]

PERCENTILES = (25, 50, 75, 100)


def classify(
    model: nn.Module, split: Split, batch_size: int, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode, flags restored).

    A split with ``lengths`` (sequences) is run as ``model(x, lengths)``.

    Returns:
        ``(loss, accuracy)``, accuracy in [0, 1]; ``(nan, nan)`` for an empty split.

    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> loss, acc = classify(net, Split(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)), 2)
    >>> 0.0 <= acc <= 1.0
    True
    """
    n = len(split)
    if n == 0:
        return math.nan, math.nan
    total, correct = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, n, batch_size):
            x = split.x[i : i + batch_size].to(device)
            y = split.y[i : i + batch_size].to(device)
            lengths = split.lengths
            logits = model(x) if lengths is None else model(x, lengths[i : i + batch_size].to(device))
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    return total / n, correct / n


def margins(
    model: nn.Module, x: Tensor, p: float | str = 2, *, batch_size: int = 500,
    device: torch.device | str = "cpu", memory_budget: int | None = None, lengths: Tensor | None = None,
) -> Tensor:
    """``[M]`` lp margins of ``x`` ``[M, *input_shape]``, in the model's input units, on the CPU.

    See :func:`rollnet.margin`; computed ``batch_size`` examples at a time.  For
    sequences, ``lengths`` ``[M]`` goes to the model as ``model(x, lengths)``.

    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> margins(net, torch.randn(5, 3), p=2, batch_size=2).shape
    torch.Size([5])
    """
    parts = []
    for i in range(0, x.shape[0], batch_size):
        args = None if lengths is None else (lengths[i : i + batch_size].to(device),)
        parts.append(margin(model, x[i : i + batch_size].to(device), p=p, additional_forward_args=args,
                            memory_budget=memory_budget).cpu())
    return torch.cat(parts) if parts else x.new_zeros(0)


def percentiles(values: Tensor | Sequence[float], qs: Iterable[int] = PERCENTILES) -> dict[str, float]:
    """``{"P25": ..., "P50": ..., ...}``: linear-interpolation percentiles (P100 is the maximum).

    Infinite values (no neuron can flip) are allowed: a percentile that
    would interpolate towards one is ``inf``.

    >>> percentiles(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    {'P25': 2.0, 'P50': 3.0, 'P75': 4.0, 'P100': 5.0}
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten().sort().values
    out: dict[str, float] = {}
    for q in qs:
        if v.numel() == 0:
            out[f"P{q}"] = math.nan
            continue
        pos = q / 100 * (v.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        a, b = float(v[lo]), float(v[hi])
        out[f"P{q}"] = a if lo == hi or a == b else (math.inf if math.isinf(b) else a + (b - a) * (pos - lo))
    return out


class MetricsLog:
    """One JSON object per line (``metrics.jsonl``), one line per epoch.

    >>> import tempfile
    >>> log = MetricsLog(Path(tempfile.mkdtemp()) / "metrics.jsonl")
    >>> log.rewrite([{"epoch": 1}]); log.append({"epoch": 2}); len(log.read())
    2
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def rewrite(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the file atomically with ``records`` (used when a run resumes)."""
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in records))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
