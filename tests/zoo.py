"""Shared test models.  Each records the input of every activation it applies.

``model.record`` is ``None`` normally; set it to a list and every forward
appends each neuron tensor (the input of a ReLU-like call, cloned before any
in-place activation) in execution order.  Tests use these records as an
oracle that is independent of rollnet's tracer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Recording(nn.Module):
    """Base: ``self.rec(z)`` stores z when recording is on, returns z."""

    def __init__(self) -> None:
        super().__init__()
        self.record: list[Tensor] | None = None

    def rec(self, z: Tensor) -> Tensor:
        root = getattr(self, "_root", self)
        if root.record is not None:
            root.record.append(z.clone())
        return z

    def adopt(self, *children: Recording) -> None:
        for c in children:
            object.__setattr__(c, "_root", self)


class MLP(Recording):
    def __init__(self, sizes: list[int], slope: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                self.rec(h)
                h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return h


class LeakyNet(Recording):
    """Module LeakyReLU with one slope, functional leaky_relu with another."""

    def __init__(self, d: int = 5, width: int = 12, out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, width)
        self.act1 = nn.LeakyReLU(0.2)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.rec(self.fc1(x)))
        h = F.leaky_relu(self.rec(self.fc2(h)), negative_slope=1.7)
        return self.fc3(h)


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)  # type: ignore[union-attr]
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.3)  # type: ignore[union-attr]
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.3)


class ConvBN(Recording):
    """Conv, BatchNorm with non-default statistics, avg-pool, flatten, linear."""

    def __init__(self, channels: int = 1, size: int = 8, width: int = 4, out: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(width * (size // 4) ** 2, 6)
        self.bn3 = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, out)
        for bn in (self.bn1, self.bn2, self.bn3):
            _randomize_bn(bn, gen)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.rec(self.bn1(self.conv1(x))))
        h = F.relu(self.rec(self.bn2(self.conv2(h))))
        h = self.flat(self.pool(h))
        h = self.rec(self.bn3(self.fc(h))).relu()
        return self.head(self.drop(h))


class ResidualNet(Recording):
    """Two residual blocks (identity and 1x1-projection skips), adaptive avg-pool."""

    def __init__(self, channels: int = 1, width: int = 4, out: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.c1 = nn.Conv2d(width, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, out)
        _randomize_bn(self.b1, gen)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.rec(self.stem(x)))
        h = F.relu(self.rec(h + self.b1(self.c1(h))))
        h = F.relu(self.rec(self.c2(h) + self.proj(h)))
        return self.fc(torch.flatten(self.gap(h), 1))


class BasicBlock(Recording):
    """torchvision-style: in-place ReLU modules and ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(self.rec(out))
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(self.rec(out))
        return out


class TorchvisionStyle(Recording):
    def __init__(self, channels: int = 1, width: int = 4, out: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, out)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                _randomize_bn(m, gen)
        self.adopt(*[m for m in self.modules() if isinstance(m, BasicBlock)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.rec(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class ElmanRNN(Recording):
    """A recurrence written as a Python loop over time: h_t = relu(W x_t + U h_{t-1} + b)."""

    def __init__(self, channels: int = 3, hidden: int = 6, out: int = 4, slope: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(channels, hidden)
        self.rec_w = nn.Parameter(torch.randn(hidden, hidden) * 0.4)
        self.head = nn.Linear(hidden, out)
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, C]
        h = x.new_zeros(x.shape[0], self.rec_w.shape[0])
        for t in range(x.shape[1]):
            z = self.inp(x[:, t]) + h @ self.rec_w.t()
            self.rec(z)
            h = F.leaky_relu(z, self.slope) if self.slope else torch.relu(z)
        return self.head(h)


class ConcatNet(Recording):
    """Two branches joined with torch.cat, a scaled skip, subtraction and mean."""

    def __init__(self, d: int = 4, width: int = 5, out: int = 2) -> None:
        super().__init__()
        self.a = nn.Linear(d, width)
        self.b = nn.Linear(d, width)
        self.c = nn.Linear(2 * width, width)
        self.out = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        ha = F.relu(self.rec(self.a(x)))
        hb = F.relu(self.rec(0.5 * self.b(x) - x.mean(1, keepdim=True)))
        h = torch.cat([ha, hb], dim=1)
        h = F.relu(self.rec(self.c(h) + 2.0 * ha))
        return self.out(h)


# -- models that must be refused ---------------------------------------------


def with_sigmoid() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), nn.Linear(4, 2))


def with_gelu() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))


def with_softmax() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(dim=1))


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


# -- registry used by parametrised tests -----------------------------------------

# name -> (factory, input shape without batch)
ZOO: dict[str, tuple[Callable[[], Recording], tuple[int, ...]]] = {
    "mlp": (lambda: MLP([5, 10, 8, 6, 3]), (5,)),
    "mlp_image": (lambda: MLP([16, 7, 7, 2]), (1, 4, 4)),
    "leaky": (lambda: LeakyNet(), (5,)),
    "conv_bn": (lambda: ConvBN(), (1, 8, 8)),
    "residual": (lambda: ResidualNet(), (1, 6, 6)),
    "torchvision_block": (lambda: TorchvisionStyle(), (1, 6, 6)),
    "rnn": (lambda: ElmanRNN(), (5, 3)),
    "leaky_rnn": (lambda: ElmanRNN(slope=0.1), (4, 3)),
    "concat": (lambda: ConcatNet(), (4,)),
}


def make(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Recording, tuple[int, ...]]:
    """A zoo model in eval mode and its per-example input shape."""
    factory, shape = ZOO[name]
    torch.manual_seed(seed)
    model = factory().to(dtype).eval()
    return model, shape
