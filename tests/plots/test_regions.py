"""The region picture: one exact polygon per region, neighbours coloured apart, the PNG it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollnet.plots import adjacency, colour_regions, draw_regions, plot_regions, region_polygons
from tests.plots.arrangement import Region, Slice, arrangement
from tests.plots.helpers import distinct_colours, png_size


def _square(x: float, y: float) -> np.ndarray:
    return np.array([[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1]], dtype=np.float64)


def test_adjacency_of_a_grid_with_a_t_junction() -> None:
    # a 2 x 1 block on top of two unit squares: the block's bottom edge holds the squares'
    # shared corner (a T-junction, not a vertex of the block)
    polys = [_square(0, 0), _square(1, 0), np.array([[0, 1], [2, 1], [2, 2], [0, 2]], dtype=np.float64),
             _square(5, 5)]
    assert adjacency(polys, 1e-9) == [{1, 2}, {0, 2}, {0, 1}, set()]


def test_corners_alone_do_not_make_neighbours() -> None:
    assert adjacency([_square(0, 0), _square(1, 1)], 1e-9) == [set(), set()]


def test_neighbours_get_different_colours_on_random_arrangements() -> None:
    for seed in range(3):
        s = arrangement(25, seed)
        got = region_polygons(s)
        neighbours = adjacency(got.polygons, 1e-9)
        assert sum(map(len, neighbours)) > len(s)  # the test can fail: there are neighbours
        for i, ns in enumerate(neighbours):
            assert all(got.colours[i] != got.colours[j] for j in ns)
        assert len(set(got.colours.tolist())) > 10  # the palette is spread, not 4 colours


def test_colouring_reuses_colours_when_the_palette_runs_out() -> None:
    star = [set(range(1, 6))] + [{0} for _ in range(5)]
    colours = colour_regions(star, n_colours=3)
    assert colours.shape == (6,) and colours.min() >= 0 and colours.max() < 3
    assert all(colours[0] != colours[j] for j in range(1, 6))
    with pytest.raises(ValueError, match="n_colours"):
        colour_regions(star, n_colours=0)


def test_draw_regions_draws_exactly_one_polygon_per_region() -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = arrangement(15, 3)
    fig, ax = plt.subplots()
    polys, boundary = draw_regions(ax, s, points=torch.rand(20, 2), labels=torch.arange(20) % 2)
    assert len(polys.get_paths()) == len(s)
    for path, region in zip(polys.get_paths(), s, strict=True):
        np.testing.assert_allclose(path.vertices[: len(region.vertices)], region.vertices.numpy())
    assert len(boundary.get_segments()) == 1
    assert len(ax.collections) == 2 + 2  # regions, boundary, one scatter per class
    plt.close(fig)


def test_plot_regions_side_by_side(tmp_path) -> None:
    out = plot_regions([("vanilla", arrangement(30, 0)), ("ROLL", arrangement(5, 1))], tmp_path / "a" / "r.png",
                       points=torch.rand(50, 2), labels=(torch.rand(50) > 0.5).long())
    assert png_size(out) == (1152, 684)  # 4.8 in per panel, square axes plus titles, 120 dpi
    assert distinct_colours(out) > 30


def test_refuses_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="no panels"):
        plot_regions([], tmp_path / "r.png")
    bad = Slice([Region(torch.zeros(2, 2, dtype=torch.float64), 0)])
    with pytest.raises(ValueError, match=r"region 0: vertices must be \[n >= 3, 2\]"):
        plot_regions([("bad", bad)], tmp_path / "r.png")
    nan = Slice([Region(torch.full((3, 2), float("nan"), dtype=torch.float64), 0)])
    with pytest.raises(ValueError, match="non-finite"):
        plot_regions([("nan", nan)], tmp_path / "r.png")
    empty = Slice(arrangement(2).regions, extent=(1.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="extent"):
        plot_regions([("empty", empty)], tmp_path / "r.png")
    with pytest.raises(ValueError, match=r"points must be \[P, 2\]"):
        plot_regions([("ok", arrangement(2))], tmp_path / "r.png", points=torch.zeros(3))
    assert not (tmp_path / "r.png").exists()
