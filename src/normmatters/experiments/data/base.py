"""Shared pieces of the datasets: the info record, in-memory datasets, the epoch sampler, caching."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ...kernels.build import cache_root
from ..io import atomic_write_bytes

__all__ = ["DatasetInfo", "ArrayDataset", "EpochSampler", "cache_dir", "load_or_build_arrays"]


@dataclass
class DatasetInfo:
    """What a model and the trainer need to know about a dataset.

    :ivar name: the dataset's name.
    :ivar task: ``"classification"`` or ``"lm"`` (next-token prediction).
    :ivar num_classes: classes (for ``"lm"``: the vocabulary size).
    :ivar input_shape: one example's shape, e.g. ``(1, 40)`` for MNIST-1D, ``(3, 32, 32)`` for
        CIFAR, ``(block_size,)`` for text.
    :ivar input_dims: spatial dimensions (1 for sequences of channels, 2 for images, 0 for tokens).
    :ivar in_channels: input channels (0 for tokens).
    :ivar vocab_size: token ids for text, else ``None``.
    :ivar train_size, test_size: numbers of examples.
    :ivar extra: dataset-specific facts (source file, checksum, vocabulary …).
    """

    name: str
    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_dims: int
    in_channels: int
    vocab_size: int | None = None
    train_size: int = 0
    test_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArrayDataset(Dataset):
    """Examples held in memory as tensors, with an optional per-example transform.

    :param x: inputs, first dimension the example index.
    :param y: integer labels (or targets of any shape).
    :param transform: applied to ``x[i]`` on every access (data augmentation).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if len(x) != len(y):
            raise ValueError(f"ArrayDataset: x has {len(x)} examples but y has {len(y)}")
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[i]


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    The order of epoch e is the same whether a run reaches e directly or after a resume, which is
    what makes resumed runs exact; :meth:`set_epoch` is called by the trainer before each epoch.
    """

    def __init__(self, num_examples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_examples, self.seed, self.shuffle, self.epoch = num_examples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_examples))
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        return iter(torch.randperm(self.num_examples, generator=g).tolist())


def cache_dir(root: str | os.PathLike | None = None, *parts: str) -> Path:
    """The cache folder ``root / parts``; without ``root`` normmatters' cache root.

    That root is ``$NORMMATTERS_CACHE_DIR`` (``$NORMMATTERS_CACHE`` is accepted as an alias), else
    ``$XDG_CACHE_HOME/normmatters`` or ``~/.cache/normmatters``; data sets live in its ``data/``
    folder, the compiled kernels in ``kernels/``.
    """
    base = Path(root) if root is not None else cache_root()
    return base.joinpath(*parts)


def load_or_build_arrays(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load arrays from the ``.npz`` cache at ``path``, or build and cache them atomically.

    A damaged cache file is rebuilt rather than trusted.
    """
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - any damage (truncated zip, bad header): rebuild below
            pass
    arrays = build()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return arrays
