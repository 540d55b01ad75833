"""The paper's selection and the Pareto front, from hand-made tables."""

from __future__ import annotations

import pytest

from rollnet.sweep.selection import MissingReferenceError, Row, pareto_front, select


def row(key: str, acc: float | None, margin: float | None, trial: int, *, status: str = "done",
        reference: bool = False) -> Row:
    return Row(key, {}, status, acc, margin, reference=reference, trial=trial)


TABLE = [
    row("vanilla", 0.982, 6e-4, 0, reference=True),
    row("a", 0.984, 9e-3, 1),     # above vanilla's accuracy
    row("b", 0.982, 9.2e-3, 2),   # exactly vanilla's accuracy, larger margin: the first pick
    row("c", 0.976, 3e-2, 3),     # 0.6 points below: the second pick
    row("d", 0.971, 8e-2, 4),     # 1.1 points below: too low for both
    row("e", None, None, 5, status="diverged"),
    row("f", 0.99, None, 6, status="running"),
]


def test_picks_the_largest_margin_at_vanilla_accuracy_and_one_point_below() -> None:
    s = select(TABLE)
    assert s.reference.key == "vanilla"
    assert [r.key if r else None for r in s.chosen] == ["b", "c"]


def test_ties_in_margin_go_to_higher_accuracy_then_the_earlier_trial() -> None:
    rows = [row("vanilla", 0.98, 1e-4, 0, reference=True), row("late", 0.98, 5e-3, 9),
            row("early", 0.98, 5e-3, 3), row("better", 0.985, 5e-3, 7), row("low", 0.975, 5e-3, 1)]
    assert select(rows).chosen[0].key == "better"  # type: ignore[union-attr]
    rows = [r for r in rows if r.key != "better"]
    s = select(rows)
    assert [r.key if r else None for r in s.chosen] == ["early", "early"]


def test_accuracy_equal_up_to_rounding_counts_as_equal() -> None:
    rows = [row("vanilla", 0.1 + 0.2, 1e-4, 0, reference=True), row("x", 0.3, 2e-3, 1)]
    assert select(rows).chosen[0].key == "x"  # type: ignore[union-attr]


def test_no_roll_run_good_enough_gives_none() -> None:
    rows = [row("vanilla", 0.99, 1e-4, 0, reference=True), row("x", 0.97, 2e-3, 1)]
    assert select(rows).chosen == (None, None)


def test_selection_never_picks_the_reference_itself() -> None:
    rows = [row("vanilla", 0.99, 1e-2, 0, reference=True), row("x", 0.99, 2e-3, 1)]
    assert select(rows).chosen[0].key == "x"  # type: ignore[union-attr]


@pytest.mark.parametrize("rows", [
    [row("a", 0.98, 1e-3, 1)],
    [row("vanilla", None, None, 0, status="running", reference=True), row("a", 0.98, 1e-3, 1)],
])
def test_a_missing_or_unfinished_vanilla_run_is_a_clear_error(rows: list[Row]) -> None:
    with pytest.raises(MissingReferenceError, match=r"no finished vanilla run \(roll.lam = 0\)"):
        select(rows)


def test_pareto_front_keeps_the_undominated_and_equal_points() -> None:
    rows = [*TABLE, row("twin", 0.976, 3e-2, 8), row("dominated", 0.975, 1e-2, 9)]
    assert [r.key for r in pareto_front(rows)] == ["a", "b", "c", "twin", "d"]
