"""Reference models: layouts, and that the engine certifies them soundly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rollnet
from rollnet.models import MLP, InputNormalization, ResNet, build_model, resnet18


def _pattern_keys(model: nn.Module, x: torch.Tensor) -> list[bytes]:
    return rollnet.activation_pattern(model, x).keys()


def _assert_l2_ball_sound_and_tight(model: nn.Module, x: torch.Tensor, samples: int = 300) -> None:
    """Points inside the certified l2 ball keep x's pattern; one just past the closest hyperplane does not."""
    radius = rollnet.margin(model, x, p=2)
    assert bool(torch.isfinite(radius).all()) and bool((radius > 0).all())
    z, grads = rollnet.neuron_gradients(model, x)
    gen = torch.Generator().manual_seed(0)
    for i in range(x.shape[0]):
        base = _pattern_keys(model, x[i : i + 1])[0]
        u = torch.randn(samples, *x.shape[1:], generator=gen, dtype=x.dtype)
        u = u / u.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        scale = torch.ones(samples, dtype=x.dtype)
        scale[samples // 2 :] = torch.rand(samples - samples // 2, generator=gen, dtype=x.dtype)
        points = x[i] + (radius[i] * (1 - 1e-6) * scale).view(-1, *[1] * (x.dim() - 1)) * u
        assert all(k == base for k in _pattern_keys(model, points)), f"example {i}: pattern changed inside the ball"
        g = grads[i].flatten(1)
        norms = g.norm(dim=1)
        ratio = torch.where(norms > 0, z[i].abs() / norms, torch.inf)
        j = int(ratio.argmin())
        worst = (-torch.sign(z[i, j]) * g[j] / norms[j]).view(x.shape[1:])
        outside = x[i] + (1 + 1e-3) * radius[i] * worst
        assert _pattern_keys(model, outside.unsqueeze(0))[0] != base, f"example {i}: not tight"


def test_mlp_default_is_the_papers_network():
    net = MLP((1, 28, 28), 10)
    widths = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]
    assert widths == [(784, 300), (300, 300), (300, 300), (300, 300), (300, 10)]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_options():
    net = MLP((2,), 3, [5, 7], act="leaky_relu", negative_slope=0.2, dropout=0.1)
    kinds = [type(m).__name__ for m in net.layers]
    assert kinds == ["Flatten", "Linear", "LeakyReLU", "Dropout", "Linear", "LeakyReLU", "Dropout", "Linear"]
    with pytest.raises(ValueError):
        MLP((2,), 3, [0])
    with pytest.raises(ValueError):
        MLP((2,), 3, [4], act="tanh")


def test_mlp_is_certified_soundly_in_float64():
    torch.manual_seed(0)
    net = MLP((6,), 3, [12, 12, 12], act="leaky_relu").double()
    _assert_l2_ball_sound_and_tight(net, torch.randn(4, 6, dtype=torch.float64))


def test_normalisation_inside_the_model_gives_radii_in_pixel_units():
    torch.manual_seed(0)
    mean, std = 0.13, 0.31
    inside = MLP((1, 5, 5), 4, [16, 16], normalization=(mean, std)).double()
    outside = MLP((1, 5, 5), 4, [16, 16]).double()
    for a, b in zip(inside.layers[1:], outside.layers, strict=True):
        b.load_state_dict(a.state_dict())
    mean, std = float(inside.layers[0].mean), float(inside.layers[0].std)  # as stored (float32)
    pixels = torch.rand(6, 1, 5, 5, dtype=torch.float64)
    normalised = (pixels - mean) / std
    assert torch.allclose(inside(pixels), outside(normalised))
    for p in (1, 2, "inf"):
        r_pixel = rollnet.margin(inside, pixels, p=p)
        r_norm = rollnet.margin(outside, normalised, p=p)
        assert torch.allclose(r_pixel, r_norm * std, rtol=1e-9)


def test_input_normalization_layer():
    layer = InputNormalization(0.5, 0.25)
    assert torch.equal(layer(torch.tensor([0.5, 1.0])), torch.tensor([0.0, 2.0]))
    assert set(dict(layer.named_buffers())) == {"mean", "std"}
    with pytest.raises(ValueError):
        InputNormalization(0.0, -1.0)


def test_resnet18_layout_uses_average_pooling():
    net = resnet18(in_channels=1, num_classes=10, width=4)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) for m in net.modules())
    assert isinstance(net.stem[3], nn.AvgPool2d)
    assert [len(stage) for stage in net.stages] == [2, 2, 2, 2]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1 and convs[-1].out_channels == 32
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    rgb = ResNet(3, 5, width=4, blocks=(1, 1))
    assert rgb(torch.zeros(1, 3, 16, 16)).shape == (1, 5)


def _trained_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """Give BatchNorm non-default running statistics and affine parameters (defaults hide bugs)."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x + 0.3 * torch.randn_like(x))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()


def test_resnet_is_certified_soundly_in_float64():
    torch.manual_seed(0)
    net = ResNet(1, 3, width=2, blocks=(1, 1)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    _trained_batchnorm(net, x)
    _assert_l2_ball_sound_and_tight(net, x, samples=200)


def test_resnet18_is_certifiable_on_28x28_grayscale():
    torch.manual_seed(0)
    net = resnet18(in_channels=1, num_classes=10, width=4)
    x = torch.randn(2, 1, 28, 28)
    _trained_batchnorm(net, x)
    net.train()
    r = rollnet.margin(net, x, p=2)
    assert r.shape == (2,) and bool((r > 0).all()) and bool(torch.isfinite(r).all())
    assert net.training, "certification must restore the train/eval mode"
    assert torch.equal(rollnet.margin(net.eval(), x, p=2), r)


def test_build_model():
    assert isinstance(build_model("mlp", (2,), 2, hidden=[4]), MLP)
    assert isinstance(build_model("resnet", (1, 8, 8), 2, width=2, blocks=[1]), ResNet)
    with pytest.raises(ValueError, match="image inputs"):
        build_model("resnet", (2,), 2)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg", (2,), 2)
