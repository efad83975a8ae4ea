"""CIFAR-10 and CIFAR-100 from the standard "python version" pickle archives in a local folder.

Layout under ``root`` (as the published archives unpack):

* CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
* CIFAR-100: ``cifar-100-python/{train, test, meta}``

Each batch file is a pickle of a dict with ``b"data"`` (N × 3072 uint8, channel-major 32×32) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). The pickles are read with a restricted
unpickler that accepts only the numpy array reconstruction they need, so a tampered file cannot
run code. With ``download=True`` the archive is fetched from the authors' site and its MD5
verified; otherwise a missing folder is a :class:`DataNotFoundError` naming the folder and files.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataNotFoundError
from .base import ArrayDataset, DatasetInfo, cache_dir
from .download import download_and_extract
from .transforms import Compose, Normalize, RandomCrop, RandomFlip

__all__ = ["load_cifar", "CIFAR_SPECS", "read_cifar_batch"]

CIFAR_SPECS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}

# What the CIFAR pickles may reference: numpy's array reconstruction (numpy 1 and 2 module
# names) and the codec Python 3 uses for bytes in protocol-2 pickles. Nothing else is loaded.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR batch references {module}.{name}, which a CIFAR file never does")


def read_cifar_batch(path: str | os.PathLike) -> dict:
    """Read one CIFAR batch pickle (bytes keys) with the restricted unpickler."""
    with open(path, "rb") as f:
        try:
            return _SafeUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise DataNotFoundError(f"{path}: not a readable CIFAR batch file ({exc})") from exc


def _folder(name: str, root) -> Path:
    return cache_dir(root, "data") if root is None else Path(root)


def load_cifar(name: str, root=None, *, train: bool = True, download: bool = False, augment: bool = True):
    """CIFAR-10/100 as an :class:`ArrayDataset` of ((3, 32, 32) normalized tensors, labels).

    :param root: the folder that contains (or will contain) the archive's folder; default
        ``$NORMMATTERS_CACHE_DIR/data`` (``~/.cache/normmatters/data``).
    :param download: fetch and verify the archive if files are missing.
    :param augment: 4-pixel random crop and horizontal flip for training (He et al. 2016).
    """
    spec = CIFAR_SPECS[name]
    base = _folder(name, root)
    folder = base / spec["folder"]
    needed = spec["train"] + spec["test"] + [spec["meta"]]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and download:
        download_and_extract(spec["url"], base, spec["md5"], what=name)
        missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        what = "not found" if len(missing) == len(needed) else f"incomplete (missing {', '.join(missing)})"
        raise DataNotFoundError(
            f"{name}: data folder {folder} {what}; expected {', '.join(needed)} from "
            f"{spec['url'].rsplit('/', 1)[-1]}; pass --download (download=True), or --data-root "
            f"(root=) naming the folder that holds {spec['folder']}/"
        )
    xs, ys = [], []
    for fname in spec["train"] if train else spec["test"]:
        d = read_cifar_batch(folder / fname)
        try:
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d[spec["label_key"]], dtype=np.int64)
        except KeyError as exc:
            raise DataNotFoundError(f"{folder / fname}: CIFAR batch without key {exc}") from exc
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataNotFoundError(
                f"{folder / fname}: expected data of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}"
            )
        xs.append(data)
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32)).float().div_(255.0)
    y = torch.from_numpy(np.concatenate(ys))
    norm = Normalize(spec["mean"], spec["std"])
    x = norm(x.transpose(0, 1)).transpose(0, 1).contiguous()  # normalize once, in memory
    transform = Compose(RandomCrop(4), RandomFlip()) if (augment and train) else None
    info = DatasetInfo(name, "classification", spec["num_classes"], (3, 32, 32), 2, 3,
                       train_size=len(y) if train else 0, test_size=0 if train else len(y),
                       extra={"folder": str(folder)})
    return ArrayDataset(x, y, transform), info
