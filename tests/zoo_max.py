"""Test models with max units, and independent oracles for them.

Each model records, in its own forward, the input of every piecewise-linear
unit, in execution order (when ``model.record`` is a list):

- ``("relu", z)``: a ReLU-like pre-activation (neurons z, on iff z > 0);
- ``("max", u, fn)`` / ``("min", u, fn)``: the input ``u`` ``[B, C, *S]`` of a
  family of max (min) units and a function ``fn(v) -> (values, indices)``
  that evaluates the same units on any ``[N, C', *S]`` tensor with torch's own
  ``return_indices`` (or ``torch.max(..., dim)``) selection.

The oracles use nothing of rollnet: window membership comes from evaluating
``fn`` on one-hot planes, selections from ``fn`` itself, gradients from
``torch.autograd.grad`` (batched over neurons).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pool = Callable[[Tensor], tuple[Tensor, Tensor]]


class Recording(nn.Module):
    """A module that can record the inputs of its piecewise-linear units."""

    def __init__(self) -> None:
        super().__init__()
        self.record: list[tuple[Any, ...]] | None = None

    def rec_relu(self, z: Tensor) -> None:
        if self.record is not None:
            self.record.append(("relu", z.clone()))

    def rec_max(self, u: Tensor, fn: Pool, kind: str = "max") -> None:
        if self.record is not None:
            self.record.append((kind, u.clone(), fn))


def _last(op: str) -> Pool:
    def fn(v: Tensor) -> tuple[Tensor, Tensor]:
        r = torch.max(v, -1, keepdim=True) if op == "max" else torch.min(v, -1, keepdim=True)
        return r.values, r.indices

    return fn


# ---------------------------------------------------------------------------
# models


class PoolCNN(Recording):
    """ReLU and overlapping 2-D max-pools (padding, dilation); input ``[1, 10, 10]``."""

    input_shape = (1, 10, 10)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)  # 10 -> 5, overlapping, padded
        self.conv2 = nn.Conv2d(3, 4, 2)  # 5 -> 4
        self.pool2 = nn.MaxPool2d(2, stride=1, dilation=2)  # 4 -> 2, dilated, overlapping
        self.fc1 = nn.Linear(16, 10)
        self.fc2 = nn.Linear(10, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: Tensor) -> Tensor:
        z = self.bn(self.conv1(x))
        self.rec_relu(z)
        h = F.relu(z)
        self.rec_max(h, lambda v: F.max_pool2d(v, 3, 2, 1, return_indices=True))
        h = self.pool1(h)
        z = self.conv2(h)
        self.rec_relu(z)
        h = torch.relu(z)
        self.rec_max(h, lambda v: F.max_pool2d(v, 2, 1, 0, 2, return_indices=True))
        h = self.pool2(h)
        z = self.fc1(h.flatten(1))
        self.rec_relu(z)
        return self.fc2(F.relu(z))


class Pool1dNet(Recording):
    """1-D max-pool with padding and ``ceil_mode``, then adaptive max-pool; input ``[2, 12]``."""

    input_shape = (2, 12)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool1d(4, stride=3, padding=2, ceil_mode=True)  # 12 -> 5
        self.adapt = nn.AdaptiveMaxPool1d(3)  # 5 -> 3, windows of 2 overlapping
        self.fc1 = nn.Linear(9, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        self.rec_relu(z)
        h = F.relu(z)
        self.rec_max(h, lambda v: F.max_pool1d(v, 4, 3, 2, ceil_mode=True, return_indices=True))
        h = self.pool(h)
        self.rec_max(h, lambda v: F.adaptive_max_pool1d(v, 3, return_indices=True))
        h = self.adapt(h)
        z = self.fc1(h.flatten(1))
        self.rec_relu(z)
        return self.fc2(F.relu(z))


class AdaptiveNet(Recording):
    """2-D adaptive max-pool with uneven, overlapping windows; input ``[1, 7, 9]``."""

    input_shape = (1, 7, 9)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d((3, 4))
        self.fc = nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        self.rec_relu(z)
        h = F.leaky_relu(z, 0.1)
        self.rec_max(h, lambda v: F.adaptive_max_pool2d(v, (3, 4), return_indices=True))
        return self.fc(self.pool(h).flatten(1))


class Pool3dNet(Recording):
    """3-D max-pool with padding and overlapping windows; input ``[1, 4, 4, 3]``."""

    input_shape = (1, 4, 4, 3)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 2, padding=1)  # 4x4x3 -> 5x5x4
        self.pool = nn.MaxPool3d((3, 2, 2), stride=(2, 1, 2), padding=(1, 0, 1))  # -> 3x4x3
        self.fc = nn.Linear(72, 2)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        self.rec_relu(z)
        h = F.relu(z)
        self.rec_max(h, lambda v: F.max_pool3d(v, (3, 2, 2), (2, 1, 2), (1, 0, 1), return_indices=True))
        return self.fc(self.pool(h).flatten(1))


class MaxoutNet(Recording):
    """Maxout with ``torch.max(dim)``, ``amax`` over two dims, ``min`` and ``torch.maximum``; input ``[6]``."""

    input_shape = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(4, 8)
        self.fc3a = nn.Linear(2, 3)
        self.fc3b = nn.Linear(2, 3)
        self.fc4 = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        u = self.fc1(x).view(-1, 4, 3)
        self.rec_max(u, _last("max"))
        h = torch.max(u, dim=2).values  # [B, 4]
        z = self.fc2(h)
        self.rec_relu(z)
        v = F.relu(z).view(-1, 2, 2, 2)
        self.rec_max(v.flatten(2), _last("max"))
        h = v.amax(dim=(2, 3))  # [B, 2]
        a, b = self.fc3a(h), self.fc3b(h)
        self.rec_max(torch.stack([a, b], -1), _last("max"))
        m = torch.maximum(a, b)
        w = torch.stack([m, -0.5 * m + 0.1], -1)  # [B, 3, 2]
        self.rec_max(w, _last("min"), "min")
        return self.fc4(w.min(dim=-1)[0])


class TieNet(Recording):
    """Max-pool directly on the input (ties are easy to make); input ``[1, 4, 4]``."""

    input_shape = (1, 4, 4)

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.rec_max(x, lambda v: F.max_pool2d(v, 2, return_indices=True))
        return self.fc(self.pool(x).flatten(1))


def make_models() -> dict[str, Recording]:
    """The zoo, in float64, eval mode, seeded."""
    torch.manual_seed(0)
    models: dict[str, Recording] = {
        "pool_cnn": PoolCNN(), "pool1d": Pool1dNet(), "adaptive": AdaptiveNet(), "pool3d": Pool3dNet(),
        "maxout": MaxoutNet(),
    }
    return {k: m.double().eval() for k, m in models.items()}


# ---------------------------------------------------------------------------
# ResNet-18, torchvision-style, in plain torch.nn


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (conv 7x7/2, max-pool 3/2/1, 4 x 2 blocks), any width."""

    def __init__(self, width: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers = []
        inplanes = width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(inplanes, w, stride), BasicBlock(w, w)))
            inplanes = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.6, 1.4)
                    m.bias.uniform_(-0.1, 0.3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_pattern(model: ResNet18, x: Tensor) -> Tensor:
    """``[B, N]`` int64 pattern of the ResNet from forward hooks: ReLU signs and max-pool indices."""
    parts: list[Tensor] = []

    def relu_hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        parts.append((args[0] > 0).flatten(1).to(torch.int64))

    def pool_hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        _, idx = F.max_pool2d(args[0], 3, 2, 1, return_indices=True)
        parts.append(idx.flatten(1))

    handles = [m.register_forward_pre_hook(relu_hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    handles.append(model.maxpool.register_forward_pre_hook(pool_hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------
# oracles


def _run_recording(model: Recording, x: Tensor) -> list[tuple[Any, ...]]:
    model.record = []
    try:
        model(x)
        return model.record
    finally:
        model.record = None


def pattern(model: Recording, x: Tensor) -> Tensor:
    """``[B, N]`` int64: ReLU signs (z > 0) and the selected index of every max unit."""
    with torch.no_grad():
        record = _run_recording(model, x)
    parts = []
    for item in record:
        if item[0] == "relu":
            parts.append((item[1] > 0).flatten(1).to(torch.int64))
        else:
            parts.append(item[2](item[1])[1].flatten(1))
    return torch.cat(parts, dim=1)


def membership(fn: Pool, plane: tuple[int, ...], dtype: torch.dtype, kind: str = "max") -> list[list[int]]:
    """For every window, its members (flat plane positions, ascending), by pooling one-hot planes
    (negated ones for min units)."""
    p = math.prod(plane)
    sign = 1.0 if kind == "max" else -1.0
    onehot = sign * torch.eye(p, dtype=dtype).reshape(p, 1, *plane)
    out = sign * fn(onehot)[0].reshape(p, -1)  # [P, M]: 1 where position i is in window m
    return [out[:, m].nonzero().flatten().tolist() for m in range(out.shape[1])]


def _jacobian(t: Tensor, x: Tensor) -> Tensor:
    """``[B, n, *input_shape]``: d t[b, j] / d x[b] by batched backward passes (examples independent)."""
    b = x.shape[0]
    flat = t.reshape(b, -1)
    n = flat.shape[1]
    if n == 0:
        return x.new_zeros((b, 0, *x.shape[1:]))
    eye = torch.eye(n, dtype=t.dtype).unsqueeze(1).expand(n, b, n)
    (g,) = torch.autograd.grad(flat, x, grad_outputs=eye, retain_graph=True, is_grads_batched=True)
    return g.transpose(0, 1)  # [B, n, *in]


def neurons(model: Recording, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z [B, N], grads [B, N, *input_shape], is_max [N])`` for every neuron: ReLU
    pre-activations and, for every max unit and every other member i of its window,
    u_sel - u_i (u_i - u_sel for min), ordered by channel, window, member position;
    ``is_max`` marks the max-unit differences."""
    x = x.detach().clone().requires_grad_(True)
    record = _run_recording(model, x)
    b = x.shape[0]
    zs, gs, kinds = [], [], []
    for item in record:
        if item[0] == "relu":
            zs.append(item[1].reshape(b, -1).detach())
            gs.append(_jacobian(item[1], x))
            kinds.append(torch.zeros(zs[-1].shape[1], dtype=torch.bool))
            continue
        kind, u, fn = item
        c, plane = u.shape[1], tuple(u.shape[2:])
        p = math.prod(plane)
        windows = membership(fn, plane, u.dtype, kind)
        with torch.no_grad():
            sel = fn(u)[1].reshape(b, c, -1)
        jac = _jacobian(u, x).reshape(b, c, p, -1)
        uf = u.detach().reshape(b, c, p)
        sign = 1.0 if kind == "max" else -1.0
        z_rows, g_rows = [], []
        chosen = sel.tolist()
        for bi in range(b):
            pairs = [
                (ci, chosen[bi][ci][m], i)
                for ci in range(c)
                for m, members in enumerate(windows)
                for i in members
                if i != chosen[bi][ci][m]
            ]
            assert all(chosen[bi][ci][m] in members for ci in range(c) for m, members in enumerate(windows))
            ci_, s_, i_ = (torch.tensor(v, dtype=torch.int64) for v in zip(*pairs, strict=True)) if pairs else (
                torch.zeros(0, dtype=torch.int64),) * 3
            z_rows.append(sign * (uf[bi, ci_, s_] - uf[bi, ci_, i_]))
            g_rows.append(sign * (jac[bi, ci_, s_] - jac[bi, ci_, i_]))
        zs.append(torch.stack(z_rows))
        gs.append(torch.stack(g_rows).reshape(b, -1, *x.shape[1:]))
        kinds.append(torch.ones(zs[-1].shape[1], dtype=torch.bool))
    return torch.cat(zs, 1), torch.cat(gs, 1), torch.cat(kinds)
