"""VGG11 (Simonyan & Zisserman 2015, configuration "A") for CIFAR, with a pluggable normalization.

Eight 3×3 convolutions, each followed by the norm and ReLU, five max-pools (32×32 → 1×1), then a
linear classifier: the CIFAR variant used in the paper's C1 experiments.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .norms import NormFactory

__all__ = ["VGG", "vgg11"]

_CFG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with batch-normalized convolutions.

    :param cfg: channel counts and ``"M"`` (max-pool) markers.
    :param dims: 1 or 2 spatial dimensions.
    """

    def __init__(self, cfg=_CFG_A, num_classes=10, in_channels=3, dims=2, norm="l2", norm_kwargs=None) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"VGG: dims must be 1 or 2, got {dims}")
        f = norm if isinstance(norm, NormFactory) else NormFactory(norm, norm_kwargs)
        pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(pool(2, 2))
            else:
                layers += [f.conv(dims, c, v, 3, padding=1), f.batch_norm(v, dims), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.flatten(2).mean(-1)  # 1×1 after five pools at 32×32; pools any size (fx-traceable)
        return self.classifier(x)


def vgg11(*, norm="l2", num_classes=10, in_channels=3, input_dims=2, norm_kwargs=None, **kw):
    """VGG11 for 32×32 inputs (or 1-D inputs of length ≥ 32)."""
    return VGG(_CFG_A, num_classes, in_channels, input_dims, norm=norm, norm_kwargs=norm_kwargs, **kw)
