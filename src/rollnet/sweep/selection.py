"""Choosing models from a sweep: the Pareto front and the paper's selection, on validation only.

The paper (Lee et al., 2019, section 4) reports, from its grid, the model with the
largest validation median l2 margin among those at the vanilla model's validation
accuracy, and the same one accuracy point lower.  :func:`select` does exactly that;
test figures are computed afterwards, for the chosen models only.

>>> rows = [Row("vanilla", {}, "done", 0.98, 1e-4, reference=True, trial=0),
...         Row("a", {}, "done", 0.98, 9e-4, trial=1), Row("b", {}, "done", 0.975, 3e-3, trial=2),
...         Row("c", {}, "done", 0.95, 9e-3, trial=3)]
>>> s = select(rows)
>>> s.reference.key, s.chosen[0].key, s.chosen[1].key
('vanilla', 'a', 'b')
>>> [r.key for r in pareto_front(rows)]
['a', 'b', 'c']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rollnet.sweep.study import SweepError

__all__ = ["DROPS", "MissingReferenceError", "Row", "Selection", "pareto_front", "select"]

DROPS = (0.0, 0.01)
"""The paper's two selections: at the vanilla run's validation accuracy, and one point (0.01) below."""

_TOLERANCE = 1e-9  # accuracies are ratios of counts: equal ones may differ by rounding


class MissingReferenceError(SweepError):
    """The sweep has no finished vanilla run to select against."""


@dataclass(frozen=True)
class Row:
    """One point of a sweep.

    Attributes:
        key: the point's run name (``vanilla`` for the reference).
        settings: the grid's settings of the point.
        status: ``done``, ``diverged``, ``error``, ``running``, ``queued``, ``killed`` ...
        val_acc: validation accuracy of the run's best checkpoint (``None`` unless done).
        margin: its validation median l2 margin (``None`` unless done).
        reference: whether this is the vanilla run (``roll.lam = 0``).
        trial: the Optuna trial number that ran it.
        scores: everything the trial recorded (percentiles in every unit, epochs, seconds).
    """

    key: str
    settings: dict[str, Any]
    status: str
    val_acc: float | None
    margin: float | None
    reference: bool = False
    trial: int = -1
    scores: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def done(self) -> bool:
        return self.status == "done" and self.val_acc is not None and self.margin is not None


@dataclass(frozen=True)
class Selection:
    """The paper's choice.

    Attributes:
        reference: the vanilla run.
        drops: the accuracy drops allowed, ``(0.0, 0.01)``.
        chosen: per drop, the ROLL run with the largest validation median margin among those
            with validation accuracy at least the reference's minus the drop (``None``: none is).
    """

    reference: Row
    drops: tuple[float, ...]
    chosen: tuple[Row | None, ...]


def _rank(row: Row) -> tuple[float, float, int]:
    """Larger margin first, then larger accuracy, then the earlier trial (a total order)."""
    assert row.margin is not None and row.val_acc is not None
    return (-row.margin, -row.val_acc, row.trial)


def select(rows: Sequence[Row], drops: Sequence[float] = DROPS) -> Selection:
    """The paper's selection from a sweep's rows, on validation figures only.

    Ties: of runs with equal margins, the one with the higher validation accuracy, then
    the earlier trial.

    Raises:
        MissingReferenceError: no finished vanilla run among ``rows`` (or several).
    """
    references = [r for r in rows if r.reference]
    if len(references) > 1:
        raise MissingReferenceError(f"the sweep has {len(references)} vanilla runs "
                                    f"({', '.join(r.key for r in references)}); selection needs exactly one")
    if not references or not references[0].done:
        state = f" (it is {references[0].status})" if references else ""
        raise MissingReferenceError(
            f"no finished vanilla run (roll.lam = 0) in the sweep{state}: the selection compares against its "
            "validation accuracy; let the sweep add it (drop --no-reference) or finish it")
    reference = references[0]
    assert reference.val_acc is not None
    candidates = sorted((r for r in rows if r.done and not r.reference), key=_rank)
    chosen = []
    for drop in drops:
        floor = reference.val_acc - drop - _TOLERANCE
        chosen.append(next((r for r in candidates if r.val_acc is not None and r.val_acc >= floor), None))
    return Selection(reference, tuple(drops), tuple(chosen))


def pareto_front(rows: Sequence[Row]) -> list[Row]:
    """The finished runs no other beats in both validation accuracy and margin, by accuracy
    (descending); runs with equal scores are all on the front."""
    done = [r for r in rows if r.done]

    def beaten(r: Row) -> bool:
        assert r.val_acc is not None and r.margin is not None
        return any(o.val_acc is not None and o.margin is not None
                   and o.val_acc >= r.val_acc and o.margin >= r.margin
                   and (o.val_acc > r.val_acc or o.margin > r.margin) for o in done)

    return sorted((r for r in done if not beaten(r)), key=lambda r: (-(r.val_acc or 0.0), r.trial))
