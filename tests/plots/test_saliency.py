"""The saliency figure: the maps it shows, the PNG it writes, and the worst cases it computes."""

from __future__ import annotations

import pytest
import torch

from rollnet.models import MLP
from rollnet.plots import (
    SaliencyColumn,
    plot_saliency,
    saliency_map,
    spread,
    worst_case_columns,
    worst_case_saliency,
)
from tests.plots.helpers import distinct_colours, png_size


def test_saliency_map_sums_channels_takes_abs_and_clips_at_p99() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 20, 20, generator=g, dtype=torch.float64)
    m = saliency_map(a)
    s = a.sum(dim=1).abs()
    for k in range(2):
        clip = torch.quantile(s[k].flatten(), 0.99)
        torch.testing.assert_close(m[k], s[k].clamp_max(clip) / clip)
        assert float((m[k] == 1.0).double().mean()) == pytest.approx(0.01, abs=0.006)
    # opposite channels cancel before the absolute value
    assert float(saliency_map(torch.stack([a[0, 0], -a[0, 0]])[None]).abs().max()) == 0.0


def test_saliency_map_of_a_sparse_map_keeps_its_peak() -> None:
    a = torch.zeros(1, 1, 10, 10)
    a[0, 0, 3, 4] = -5.0  # P99 is 0: clipped at the maximum instead
    m = saliency_map(a)
    assert float(m[0, 3, 4]) == 1.0 and float(m.sum()) == 1.0


def test_writes_rows_and_columns(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 12, 12, generator=g)
    cols = [SaliencyColumn(f"map {i}", torch.randn(3, 1, 12, 12, generator=g), [f"d={i}"] * 3) for i in range(4)]
    out = plot_saliency(x, cols, tmp_path / "s" / "sal.png", row_labels=["a", "b", "c"])
    assert png_size(out) == (1045, 715)  # 5 columns of 1.9 in, 3 rows of 2 in + 0.5, 110 dpi
    assert distinct_colours(out) > 50
    rgb = plot_saliency(torch.rand(1, 3, 12, 12, generator=g), cols[:1] and
                        [SaliencyColumn("rgb", torch.randn(1, 3, 12, 12, generator=g))], tmp_path / "rgb.png")
    assert png_size(rgb) == (418, 275)


def test_refuses_bad_input(tmp_path) -> None:
    x = torch.rand(2, 1, 8, 8)
    ok = SaliencyColumn("ok", torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="no saliency columns"):
        plot_saliency(x, [], tmp_path / "s.png")
    with pytest.raises(ValueError, match=r"column 'small'.*do not match 2 images of size \(8, 8\)"):
        plot_saliency(x, [SaliencyColumn("small", torch.randn(2, 1, 4, 4))], tmp_path / "s.png")
    with pytest.raises(ValueError, match="1 captions for 2 rows"):
        plot_saliency(x, [SaliencyColumn("c", torch.randn(2, 1, 8, 8), ["one"])], tmp_path / "s.png")
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        plot_saliency(x, [ok], tmp_path / "s.png", row_labels=["one"])
    with pytest.raises(ValueError, match="NaN or Inf"):
        plot_saliency(x, [SaliencyColumn("nan", torch.full((2, 1, 8, 8), float("nan")))], tmp_path / "s.png")
    with pytest.raises(ValueError, match=r"images must be \[K, C, H, W\]"):
        plot_saliency(torch.rand(8, 8), [ok], tmp_path / "s.png")
    with pytest.raises(ValueError, match="q must lie"):
        saliency_map(torch.rand(1, 1, 4, 4), q=0.0)
    assert not (tmp_path / "s.png").exists()


def test_worst_case_saliency_is_the_gradient_at_x_and_at_the_worst_point() -> None:
    torch.manual_seed(0)
    model = MLP((1, 6, 6), 3, [16, 16]).train()
    x = torch.rand(2, 1, 6, 6)
    target = model.eval()(x).argmax(dim=1)
    model.train()
    g = torch.Generator().manual_seed(0)
    at_x, at_worst, worst = worst_case_saliency(model, x, target, 0.05, clamp=(0.0, 1.0), generator=g,
                                                population=32, generations=3)
    assert model.training  # mode restored
    assert at_x.shape == at_worst.shape == worst.x.shape == x.shape
    assert bool(((worst.x - x).abs() <= 0.05 + 1e-7).all()) and bool((worst.x >= 0).all() and (worst.x <= 1).all())
    for k in range(2):
        xi = x[k : k + 1].clone().requires_grad_(True)
        model.eval()(xi)[0, target[k]].backward()
        torch.testing.assert_close(at_x[k], xi.grad[0])
    torch.testing.assert_close((at_worst - at_x).abs().flatten(1).sum(1), worst.distortion.to(at_x.dtype),
                               rtol=1e-5, atol=1e-6)
    assert float(worst.distortion.max()) > 0  # a ball that wide crosses a boundary of this net


def test_worst_case_columns_caption_the_distortion_and_hold_examples_on_the_box_edge() -> None:
    torch.manual_seed(0)
    model = MLP((1, 6, 6), 3, [16, 16])
    x = torch.rand(2, 1, 6, 6)
    x[0, 0, 0, 0] = -1e-7  # an example a rounding error outside the box it is clamped to
    target = model.eval()(x).argmax(dim=1)
    g = torch.Generator().manual_seed(0)
    at, worst = worst_case_columns("net", model, x, target, 0.05, clamp=(0.0, 1.0), generator=g,
                                   population=32, generations=3)
    assert (at.title, worst.title) == ("net at x", "net worst case")
    assert at.captions is None and worst.captions is not None and len(worst.captions) == 2
    d = (worst.attributions - at.attributions).abs().flatten(1).sum(1)
    assert [c.split(",")[0] for c in worst.captions] == [f"distortion {float(v):.3g}" for v in d]


def test_spread_picks_evenly_and_refuses_too_many() -> None:
    assert spread(10, 3).tolist() == [0, 3, 6]
    assert spread(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        spread(4, 5)
