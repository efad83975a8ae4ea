"""ImageNet (or any image classification set) as a folder of class folders, decoded with Pillow.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``; classes are the sorted
sub-folder names of ``train``. Training images get a random resized crop (scale 0.08–1, aspect
3/4–4/3) and a horizontal flip; evaluation images are resized so the short side is
``image_size / 0.875`` and centre-cropped (the usual 256 → 224).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataNotFoundError
from .base import DatasetInfo

__all__ = ["ImageFolder", "load_imagenet", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class ImageFolder(Dataset):
    """Images in ``root/<class>/*`` with labels from the sorted class names.

    :param classes: class names to use (default: the sorted sub-folders of ``root``), so that a
        validation folder shares the training folder's label numbering.
    """

    def __init__(self, root: str | Path, *, train: bool, image_size: int = 224, classes: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"imagenet: folder {self.root} not found (expected {self.root}/<class>/<images>)")
        self.classes = classes if classes is not None else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise DataNotFoundError(f"imagenet: no class folders in {self.root}")
        self.samples: list[tuple[Path, int]] = []
        for i, c in enumerate(self.classes):
            d = self.root / c
            if d.is_dir():
                self.samples += [(p, i) for p in sorted(d.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS]
        if not self.samples:
            raise DataNotFoundError(f"imagenet: no images ({', '.join(IMG_EXTENSIONS)}) under {self.root}")
        self.train, self.image_size = train, int(image_size)
        self._mean = torch.tensor(_MEAN).view(3, 1, 1)
        self._std = torch.tensor(_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def _random_resized_crop(self, img):
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * random.uniform(0.08, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
                return img.crop((x0, y0, x0 + cw, y0 + ch))
        s = min(w, h)  # fall back to a centre square
        return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        size = self.image_size
        if self.train:
            img = self._random_resized_crop(img).resize((size, size), Image.BILINEAR)
            if random.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = int(round(size / 0.875))
            w, h = img.size
            scale = short / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            x0, y0 = (w - size) // 2, (h - size) // 2
            img = img.crop((x0, y0, x0 + size, y0 + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std, label


def load_imagenet(root=None, *, train: bool = True, image_size: int = 224, augment: bool = True,
                  download: bool = False):
    """ImageNet from ``root/train`` and ``root/val`` (class folders), as an :class:`ImageFolder`."""
    if root is None:
        raise DataNotFoundError("imagenet: pass root= (--data-root) pointing at a folder with train/ and val/")
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DataNotFoundError(f"imagenet: folder {d} not found (expected {root}/train/<class>/… and {root}/val/<class>/…)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    ds = ImageFolder(train_dir if train else val_dir, train=train and augment, image_size=image_size, classes=classes)
    info = DatasetInfo("imagenet", "classification", len(classes), (3, image_size, image_size), 2, 3,
                       train_size=len(ds) if train else 0, test_size=0 if train else len(ds),
                       extra={"root": str(root), "classes": len(classes)})
    return ds, info
