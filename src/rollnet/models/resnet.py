"""A ResNet-18-style network in plain ``torch.nn``, small enough for a CPU.

As in the paper's Caltech-256 experiment, the max-pool after the first
convolution is replaced by an average pool, so the whole network is affine
layers and ReLUs and its linear regions can be certified.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from rollnet.models.layers import InputNormalization

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, the ResNet-18 block.

    The shortcut is the identity, or a strided 1x1 convolution with BatchNorm
    when the shape changes.  Input ``[B, c_in, H, W]``, output
    ``[B, c_out, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem (conv, BatchNorm, ReLU, average pool), four stages of basic blocks, global average pool, linear.

    Args:
        in_channels: channels of the input images (1 for grayscale).
        num_classes: number of logits L.
        width: channels of the first stage; stages have width x (1, 2, 4, 8).
        blocks: basic blocks per stage (ResNet-18: ``(2, 2, 2, 2)``).
        stem_kernel, stem_stride: the first convolution (ImageNet: 7 and 2;
            the default 3 and 1 suits 28x28 images).
        normalization: ``(mean, std)`` to normalise the input inside the
            model (it then takes pixel units), or ``None``.

    Input ``[B, in_channels, H, W]``, output logits ``[B, L]``.

    >>> import torch
    >>> net = resnet18(in_channels=1, num_classes=10, width=8)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
        *,
        stem_kernel: int = 3,
        stem_stride: int = 1,
        normalization: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if width < 1 or not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"width and blocks must be positive, got width={width}, blocks={list(blocks)}")
        self.normalize: nn.Module = (
            InputNormalization(*normalization) if normalization is not None else nn.Identity()
        )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, stem_kernel, stride=stem_stride, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AvgPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            layer = [BasicBlock(c_in, c_out, stride=1 if i == 0 else 2)]
            layer += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.normalize(x))
        x = self.stages(x)
        return self.fc(self.flatten(self.pool(x)))


def resnet18(
    in_channels: int = 3,
    num_classes: int = 1000,
    width: int = 64,
    *,
    stem_kernel: int = 3,
    stem_stride: int = 1,
    normalization: tuple[float, float] | None = None,
) -> ResNet:
    """ResNet-18 layout (2, 2, 2, 2 basic blocks) with an average-pool stem; see :class:`ResNet`.

    >>> net = resnet18(in_channels=1, num_classes=10, width=4)
    >>> sum(isinstance(m, BasicBlock) for m in net.modules())
    8
    """
    return ResNet(
        in_channels, num_classes, width, (2, 2, 2, 2),
        stem_kernel=stem_kernel, stem_stride=stem_stride, normalization=normalization,
    )
