"""The sweep's trade-off picture."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from rollnet.plots.tradeoff import plot_tradeoff


def test_draws_runs_front_and_marks(tmp_path: Path) -> None:
    out = plot_tradeoff([(1e-4, 0.98), (1e-3, 0.975), (5e-3, 0.96)], tmp_path / "t.png", front=[1, 2],
                        marks={0: "reference", 2: "1 point below"}, units="pixel")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_margin_the_log_axis_cannot_show_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="margins must be positive"):
        plot_tradeoff([(0.0, 0.9)], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
