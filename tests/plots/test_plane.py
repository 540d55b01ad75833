"""The plane through an image: its directions, its extent, its regions, and the PNG."""

from __future__ import annotations

import math

import pytest
import torch

import rollnet
from rollnet.models import MLP, resnet18
from rollnet.plots import image_plane, plot_plane
from tests.plots.helpers import distinct_colours, png_size


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP((1, 5, 5), 4, [12, 12])


def test_spanned_by_the_unit_gradient_and_an_orthogonal_random_direction(net) -> None:
    x = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(1))
    net.train()
    p = image_plane(net, x, scale=6.0, generator=torch.Generator().manual_seed(2))
    assert net.training  # mode restored
    leaf = x[None].clone().requires_grad_(True)
    logits = net.eval()(leaf)
    assert p.target == int(logits.argmax())
    logits[0, p.target].backward()
    torch.testing.assert_close(p.u, (leaf.grad[0] / leaf.grad[0].norm()).double())
    assert abs(float((p.u * p.v).sum())) < 1e-12 and float(p.v.norm()) == pytest.approx(1.0, abs=1e-12)
    m = float(rollnet.margin(net.double(), x[None].double(), p=2)[0])
    net.float()
    assert p.margin == pytest.approx(m, rel=1e-9)
    assert p.extent == pytest.approx((-6 * m, 6 * m, -6 * m, 6 * m))
    area = (12 * m) ** 2
    assert sum(r.area for r in p.regions) == pytest.approx(area, rel=1e-9)
    # the certified disk lies inside the example's own region: the region holding (0, 0)
    # has the pattern of x itself
    origin = [r for r in p.regions if _contains(r.vertices, 0.0, 0.0)]
    assert len(origin) == 1
    assert origin[0].pattern == rollnet.activation_pattern(net.double(), x[None].double())[0]
    net.float()
    # the same seed gives the same plane; another seed another direction
    again = image_plane(net, x, scale=6.0, generator=torch.Generator().manual_seed(2))
    other = image_plane(net, x, scale=6.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.v, p.v) and not torch.allclose(other.v, p.v)


def _contains(vertices: torch.Tensor, a: float, b: float) -> bool:
    v = vertices
    edges = v.roll(-1, dims=0) - v
    cross = edges[:, 0] * (b - v[:, 1]) - edges[:, 1] * (a - v[:, 0])
    return bool((cross > 0).all())


def test_half_width_and_target(net) -> None:
    x = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(4))
    p = image_plane(net, x, half_width=0.05, target=3)
    assert p.extent == (-0.05, 0.05, -0.05, 0.05) and p.target == 3


def test_refuses_bad_input(net) -> None:
    x = torch.rand(1, 5, 5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        image_plane(net, x, scale=0.0)
    with pytest.raises(ValueError, match="half_width must be a positive finite"):
        image_plane(net, x, half_width=math.inf)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 4\)"):
        image_plane(net, x, target=4)
    with pytest.raises(ValueError, match="finite floating-point"):
        image_plane(net, torch.full((1, 5, 5), math.nan))
    zero = MLP((1, 5, 5), 4, [12])
    with torch.no_grad():
        for w in zero.parameters():
            w.zero_()
    with pytest.raises(ValueError, match=r"gradient of logit .* is zero"):
        image_plane(zero, x)
    with pytest.raises(ValueError, match="no panels"):
        plot_plane([], "unused.png")


def test_plot_plane_side_by_side(net, tmp_path) -> None:
    x = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(5))
    panels = [("scale 8", image_plane(net, x, scale=8.0)), ("scale 3", image_plane(net, x, scale=3.0))]
    assert len(panels[0][1].regions) > len(panels[1][1].regions) >= 1
    out = plot_plane(panels, tmp_path / "p" / "plane.png")
    assert png_size(out) == (1152, 552)
    assert distinct_colours(out) > 20


@pytest.mark.slow
def test_plane_through_an_image_of_a_resnet(tmp_path) -> None:
    torch.manual_seed(0)
    res = resnet18(in_channels=1, num_classes=4, width=2)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(6))
    p = image_plane(res, x, scale=4.0)
    assert len(p.regions) > 1
    assert sum(r.area for r in p.regions) == pytest.approx((8 * p.margin) ** 2, rel=1e-9)
    assert png_size(plot_plane([("ResNet", p)], tmp_path / "r.png")) == (576, 552)
