"""Data augmentation on tensors (no torchvision): random crop with padding, flips, shifts.

Each transform draws from torch's global generator, which the trainer seeds and checkpoints, so
an augmented run is reproducible and resumes exactly (with ``num_workers=0``; with workers each
worker is seeded from the loader's per-epoch generator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RandomCrop", "RandomFlip", "Compose", "Normalize"]


class Compose:
    def __init__(self, *transforms) -> None:
        self.transforms = transforms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x


class RandomCrop:
    """Zero-pad each spatial side by ``padding`` and crop back to the original size at random.

    Works on (C, L) and (C, H, W) tensors: for MNIST-1D a random shift of up to ``padding``
    samples, for CIFAR the standard 4-pixel translation.
    """

    def __init__(self, padding: int) -> None:
        self.padding = int(padding)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p <= 0:
            return x
        spatial = x.shape[1:]
        xp = F.pad(x, (p, p) * len(spatial))
        offsets = torch.randint(0, 2 * p + 1, (len(spatial),)).tolist()
        idx = tuple(slice(o, o + s) for o, s in zip(offsets, spatial))
        return xp[(slice(None),) + idx]


class RandomFlip:
    """Flip the last dimension with probability 1/2 (horizontal flip of an image)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if torch.rand(()) < 0.5 else x


class Normalize:
    """(x − mean) / std per channel."""

    def __init__(self, mean, std) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x - self.mean.view(shape)) / self.std.view(shape)
