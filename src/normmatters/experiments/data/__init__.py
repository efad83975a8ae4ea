"""Datasets of the experiments, as standard :mod:`torch.utils.data` datasets and loaders.

=============  ==================================================================  ===============
name           source                                                              needs network
=============  ==================================================================  ===============
``mnist1d``    generated locally by the ``mnist1d`` package (cached as .npz)       no
``digits``     scikit-learn's 8×8 handwritten digits                               no
``text``       any UTF-8 file, default: CPython's pydoc topic help                 no
``cifar10``    python pickle archive in a local folder (``download=True`` fetches)  optional
``cifar100``   python pickle archive in a local folder                              optional
``imagenet``   ``root/train/<class>/…`` and ``root/val/<class>/…``                 data on disk
=============  ==================================================================  ===============

Example::

    from normmatters.experiments.data import get_dataloaders
    train_loader, test_loader, info = get_dataloaders("mnist1d", batch_size=128)
    info.num_classes, info.input_shape, info.input_dims   # 10, (1, 40), 1
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .base import ArrayDataset, DatasetInfo, EpochSampler, cache_dir
from .cifar import load_cifar
from .embedded import load_digits, load_mnist1d
from .imagenet import ImageFolder, load_imagenet
from .text import TokenDataset, default_corpus, load_text

__all__ = [
    "get_dataset",
    "get_dataset_info",
    "get_dataloaders",
    "list_datasets",
    "set_loader_epoch",
    "DatasetInfo",
    "ArrayDataset",
    "TokenDataset",
    "ImageFolder",
    "EpochSampler",
    "ExampleSeededDataset",
    "default_corpus",
    "cache_dir",
]

_LOADERS: dict[str, Callable[..., tuple[Dataset, DatasetInfo]]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "text": load_text,
    "cifar10": partial(load_cifar, "cifar10"),
    "cifar100": partial(load_cifar, "cifar100"),
    "imagenet": load_imagenet,
}


def list_datasets() -> list[str]:
    """Names :func:`get_dataset` accepts."""
    return list(_LOADERS)


def _loader(name: str):
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _LOADERS:
        raise ConfigError(f"dataset: unknown dataset {name!r}; expected one of {', '.join(_LOADERS)}")
    return _LOADERS[key]


def _load(name, root, train, download, kwargs) -> tuple[Dataset, DatasetInfo]:
    try:
        return _loader(name)(root=root, train=train, download=download, **kwargs)
    except TypeError as exc:  # an option the dataset does not have
        raise ConfigError(f"dataset {name!r}: bad option ({exc})") from exc


def get_dataset(name: str, *, root: str | None = None, train: bool = True, download: bool = False, **kwargs: Any) -> Dataset:
    """The training or test split of dataset ``name``.

    :param root: data folder (CIFAR: the folder holding ``cifar-10-batches-py/``; ImageNet: the
        folder holding ``train/`` and ``val/``; text: a UTF-8 file; mnist1d: its cache folder).
    :param download: allow fetching CIFAR (MD5 verified).
    :param kwargs: dataset options, e.g. ``augment=``, ``block_size=``/``level=``/``path=`` (text),
        ``image_size=`` (ImageNet).
    :raises ConfigError: unknown name or option. :raises DataNotFoundError: missing files.
    """
    return _load(name, root, train, download, kwargs)[0]


def get_dataset_info(name: str, *, root: str | None = None, download: bool = False, **kwargs: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (loads the test split to count it)."""
    _, test_info = _load(name, root, False, download, kwargs)
    return test_info


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h >> 1


class ExampleSeededDataset(Dataset):
    """A dataset whose random augmentation of example ``i`` in epoch ``e`` depends only on
    ``(seed, e, i)``.

    Each access seeds torch's CPU generator and Python's :mod:`random` from
    ``(seed, epoch, index)``, reads the wrapped dataset, and puts both generators back, so the
    caller's random streams are untouched. An example is then augmented the same way whichever
    process, data-loader worker or position in the batch reads it: an N-process run that shards
    the one-process order (:func:`~normmatters.experiments.distributed.shard_loader`) sees
    exactly the augmented examples of the one-process run, and a resumed run those of an
    uninterrupted one. :func:`set_loader_epoch` sets the epoch. Other attributes are those of
    the wrapped dataset.

    Example::

        >>> ds = ExampleSeededDataset(get_dataset("mnist1d", augment=True), seed=0)
        >>> ds.set_epoch(3)
        >>> torch.equal(ds[7][0], ds[7][0])
        True
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        gen = torch.default_generator  # the CPU generator only: CUDA streams stay as they are
        torch_state, py_state = gen.get_state(), random.getstate()
        seed = _mix(self.seed, self.epoch, index)
        gen.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            gen.set_state(torch_state)
            random.setstate(py_state)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def get_dataloaders(
    name: str,
    *,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    root: str | None = None,
    download: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    **kwargs: Any,
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Training and test loaders of ``name`` and its :class:`DatasetInfo`.

    The training loader shuffles with an :class:`EpochSampler` (order a function of ``seed`` and
    the epoch; call :func:`set_loader_epoch` before each epoch); with ``augment=True`` its
    dataset is an :class:`ExampleSeededDataset`, so the augmentation of an example is a function
    of ``seed``, the epoch and the example's index alone. The test loader does not shuffle.
    """
    train_ds, info = _load(name, root, True, download, kwargs)
    if kwargs.get("augment"):
        train_ds = ExampleSeededDataset(train_ds, seed)
    test_ds, test_info = _load(name, root, False, download, {k: v for k, v in kwargs.items() if k != "augment"})
    info.train_size, info.test_size = len(train_ds), len(test_ds)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)
    train_loader = DataLoader(train_ds, batch_size=batch_size, sampler=EpochSampler(len(train_ds), seed),
                              drop_last=drop_last, generator=gen, **common)
    test_loader = DataLoader(test_ds, batch_size=eval_batch_size or batch_size, shuffle=False, **common)
    return train_loader, test_loader, info


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Make a loader's next pass the one of ``epoch``: its sampler's order, its dataset's
    augmentation (:class:`ExampleSeededDataset`) and its worker seeds.

    A sharded loader (:func:`~normmatters.experiments.distributed.shard_loader`) passes the
    epoch on to the sampler it shards, whose seed then seeds the workers as in one process.
    """
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, ExampleSeededDataset):
        dataset.set_epoch(epoch)
    base = getattr(sampler, "base", sampler)  # ShardedSampler -> the order it shards
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator) and isinstance(base, EpochSampler):
        gen.manual_seed((base.seed * 1_000_003 + epoch + 7919) % (2**63))
