"""Download an archive, verify its MD5 checksum and unpack it — only when asked to."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from ..errors import DataNotFoundError

__all__ = ["md5sum", "download_and_extract"]

log = logging.getLogger(__name__)


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file (the checksum the CIFAR archives are published with)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_and_extract(url: str, root: str | os.PathLike, md5: str, *, what: str = "dataset") -> None:
    """Fetch ``url`` into ``root``, check its MD5 against ``md5``, and unpack the tar archive.

    The archive is downloaded to a temporary file in ``root``; a wrong checksum removes it and
    raises. Members are unpacked with tarfile's ``"data"`` filter (no absolute paths, no links
    out of ``root``).

    :raises DataNotFoundError: when the download fails or the checksum does not match.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".download.", suffix=".tmp")
    os.close(fd)
    try:
        log.info("downloading %s from %s", what, url)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as exc:
            raise DataNotFoundError(f"{what}: could not download {url} into {root}: {exc}") from exc
        got = md5sum(tmp)
        if got != md5:
            raise DataNotFoundError(f"{what}: checksum mismatch for {url}: expected md5 {md5}, got {got}")
        with tarfile.open(tmp) as tar:
            try:
                tar.extractall(root, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(root)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
