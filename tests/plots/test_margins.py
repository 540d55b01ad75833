"""plot_margin_cdf: the CDF it draws, the PNG it writes, and the input it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from rollnet.plots import margin_cdf, plot_margin_cdf
from tests.plots.helpers import distinct_colours, png_size


def test_cdf_counts_every_example_and_its_median() -> None:
    v = torch.tensor([3.0, 0.0, 1.0, math.inf, 2.0])
    c = margin_cdf(v)
    assert c.n == 5 and c.zeros == 1 and c.infinite == 1
    assert c.x.tolist() == [1.0, 2.0, 3.0]
    assert c.y.tolist() == pytest.approx([0.4, 0.6, 0.8])  # fractions of all 5, zeros below, inf above
    assert c.p50 == 2.0


def test_cdf_of_many_margins_is_the_empirical_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1000, generator=g, dtype=torch.float64)
    c = margin_cdf(v)
    for q in (0.1, 0.5, 0.9):
        i = int((c.x <= q).sum()) - 1
        assert float(c.y[i]) == pytest.approx(float((v <= q).double().mean()))
    assert c.p50 == pytest.approx(float(v.median()), abs=2e-3)


def test_writes_a_png_with_one_line_per_run(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    runs = {f"run{i}": torch.rand(200, generator=g) * 10.0 ** (-i) for i in range(3)}
    runs["with zeros"] = [0.0, 0.0, 1e-3, math.inf]
    out = plot_margin_cdf(runs, tmp_path / "sub" / "margins.png", norm="linf", units="pixel")
    assert out == tmp_path / "sub" / "margins.png"
    assert png_size(out) == (768, 480)
    assert distinct_colours(out) > 20


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ({}, "no runs"),
        ({"a": torch.zeros(0)}, "run 'a': no margins"),
        ({"a": torch.tensor([1.0, math.nan])}, "NaN"),
        ({"a": torch.tensor([1.0, -1e-3])}, ">= 0"),
    ],
)
def test_refuses_bad_margins(tmp_path, runs, message) -> None:
    with pytest.raises(ValueError, match=message):
        plot_margin_cdf(runs, tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()
