"""ImageNet ResNet-18 and ResNet-50 (He et al. 2016) with a pluggable normalization.

The layout of torchvision's ``resnet18``/``resnet50`` (stem 7×7/2 and 3×3/2 max-pool, four stages,
stride on the 3×3 convolution of a bottleneck — "ResNet v1.5"), so parameter shapes match, with
every norm built by :class:`~normmatters.experiments.models.norms.NormFactory`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import NormFactory

__all__ = ["ImageNetResNet", "resnet18", "resnet50"]


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, f: NormFactory, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = f.conv(2, inplanes, planes, 3, stride=stride, padding=1)
        self.bn1 = f.batch_norm(planes, 2)
        self.conv2 = f.conv(2, planes, planes, 3, padding=1)
        self.bn2 = f.batch_norm(planes, 2)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + idt)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, f: NormFactory, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = f.conv(2, inplanes, planes, 1)
        self.bn1 = f.batch_norm(planes, 2)
        self.conv2 = f.conv(2, planes, planes, 3, stride=stride, padding=1)
        self.bn2 = f.batch_norm(planes, 2)
        self.conv3 = f.conv(2, planes, planes * 4, 1)
        self.bn3 = f.batch_norm(planes * 4, 2)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + idt)


class ImageNetResNet(nn.Module):
    """ResNet for 224×224 images.

    :param block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101/152).
    :param layers: blocks per stage, e.g. ``(2, 2, 2, 2)``.
    """

    def __init__(self, block="basic", layers=(2, 2, 2, 2), num_classes=1000, in_channels=3, norm="l2", norm_kwargs=None):
        super().__init__()
        f = norm if isinstance(norm, NormFactory) else NormFactory(norm, norm_kwargs)
        blk = {"basic": _Basic, "bottleneck": _Bottleneck}[block]
        self.conv1 = f.conv(2, in_channels, 64, 7, stride=2, padding=3)
        self.bn1 = f.batch_norm(64, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * blk.expansion):
                    down = nn.Sequential(
                        f.conv(2, inplanes, planes * blk.expansion, 1, stride=stride),
                        f.batch_norm(planes * blk.expansion, 2),
                    )
                blocks.append(blk(f, inplanes, planes, stride if j == 0 else 1, down))
                inplanes = planes * blk.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inplanes, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _check_2d(name, input_dims):
    if input_dims != 2:
        raise ValueError(f"{name}: expects images (N, C, H, W), got input_dims={input_dims}")


def resnet18(*, norm="l2", num_classes=1000, in_channels=3, input_dims=2, norm_kwargs=None, **kw):
    """ResNet-18 (ImageNet layout)."""
    _check_2d("resnet18", input_dims)
    return ImageNetResNet("basic", (2, 2, 2, 2), num_classes, in_channels, norm=norm, norm_kwargs=norm_kwargs, **kw)


def resnet50(*, norm="l2", num_classes=1000, in_channels=3, input_dims=2, norm_kwargs=None, **kw):
    """ResNet-50 (ImageNet layout, bottleneck blocks)."""
    _check_2d("resnet50", input_dims)
    return ImageNetResNet("bottleneck", (3, 4, 6, 3), num_classes, in_channels, norm=norm, norm_kwargs=norm_kwargs, **kw)
