"""CIFAR-style ResNets (He et al. 2016, §4.2) in 1-D or 2-D, with a pluggable normalization.

Depth 6n+2: a 3×3 stem with 16 channels, three stages of n basic blocks with 16, 32 and 64
channels (strides 1, 2, 2), global average pooling and a linear classifier. ResNet-20/32/44/56/110
are n = 3, 5, 7, 9, 18. A shortcut that changes shape is a 1×1 convolution followed by the norm
("option B"), so every convolution feeds a normalization and is scale invariant (Hoffer et al. 2018, Sec. 2).

The same code builds the 1-D network for MNIST-1D (``dims=1``: Conv1d, length 40 → 10) and the
small 2-D network for 8×8 digits (:func:`resnet_digits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import NormFactory

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "resnet1d", "resnet_digits"]


class BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus the (projected) input, then ReLU."""

    expansion = 1

    def __init__(self, factory: NormFactory, dims: int, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = factory.conv(dims, in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = factory.batch_norm(planes, dims)
        self.conv2 = factory.conv(dims, planes, planes, 3, stride=1, padding=1)
        self.bn2 = factory.batch_norm(planes, dims)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                factory.conv(dims, in_planes, planes, 1, stride=stride),
                factory.batch_norm(planes, dims),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet of ``len(widths)`` stages of ``blocks`` basic blocks each.

    :param depth: 6n+2 for three stages (20, 32, 44, 56, 110, or 8 for the smallest).
    :param num_classes: classifier outputs.
    :param in_channels: input channels (3 for CIFAR, 1 for MNIST-1D and digits).
    :param dims: 1 for sequences (N, C, L), 2 for images (N, C, H, W).
    :param widths: channels of the stages; the stem has ``widths[0]``.
    :param norm: a norm name or a :class:`NormFactory`.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        dims: int = 2,
        widths: Sequence[int] = (16, 32, 64),
        norm: str | NormFactory = "l2",
        norm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        stages = len(widths)
        if (depth - 2) % (2 * stages) != 0 or depth < 2 + 2 * stages:
            raise ValueError(
                f"CifarResNet: depth must be {2 * stages}n+2 with n >= 1 for {stages} stages, got {depth}"
            )
        if dims not in (1, 2):
            raise ValueError(f"CifarResNet: dims must be 1 or 2, got {dims}")
        n = (depth - 2) // (2 * stages)
        f = norm if isinstance(norm, NormFactory) else NormFactory(norm, norm_kwargs)
        self.depth, self.dims, self.norm = depth, dims, f.name
        self.conv1 = f.conv(dims, in_channels, widths[0], 3, padding=1)
        self.bn1 = f.batch_norm(widths[0], dims)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(f, dims, in_planes, w, stride))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def get_classifier(self) -> nn.Module:
        """The last layer (kept out of the scale-invariant set; it feeds no normalization)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = x.flatten(2).mean(-1)  # global average pooling over any spatial dims, fx-traceable
        return self.fc(x)


def cifar_resnet(depth: int, *, norm="l2", num_classes=10, in_channels=3, input_dims=2, norm_kwargs=None, **kw):
    """ResNet-``depth`` for CIFAR (``input_dims=2``) or for sequences such as MNIST-1D (``1``)."""
    return CifarResNet(depth, num_classes, in_channels, input_dims, norm=norm, norm_kwargs=norm_kwargs, **kw)


def resnet1d(*, norm="l2", num_classes=10, in_channels=1, input_dims=1, norm_kwargs=None, depth=20, **kw):
    """The 1-D ResNet for MNIST-1D: ResNet-``depth`` (default 20) with Conv1d layers."""
    if input_dims != 1:
        raise ValueError(f"resnet1d: expects 1-D inputs (N, C, L), got input_dims={input_dims}")
    return CifarResNet(depth, num_classes, in_channels, 1, norm=norm, norm_kwargs=norm_kwargs, **kw)


def resnet_digits(*, norm="l2", num_classes=10, in_channels=1, input_dims=2, norm_kwargs=None, depth=8, **kw):
    """A small 2-D ResNet for 8×8 digits: ResNet-8 (one block per stage), 8×8 → 4×4 → 2×2."""
    return CifarResNet(depth, num_classes, in_channels, input_dims, norm=norm, norm_kwargs=norm_kwargs, **kw)
