"""Atomic file writing, shared by checkpoints, run logs and dataset caches.

A file is written to a temporary name in the same folder, flushed to disk, then renamed over the
target with :func:`os.replace`, which is atomic on POSIX and Windows: a reader (or a resumed run
after a crash) sees either the old file or the new one, never half of one. The temporary is
``.<name>.<random>.tmp``; a process killed between the two steps leaves it behind, and
:func:`remove_stray_temporaries` removes such leftovers.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

_TMP_SUFFIX = ".tmp"

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "append_jsonl",
           "stray_temporaries", "remove_stray_temporaries"]


def _temporary_prefix(name: str) -> str:
    return f".{name}."


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it to ``path``.

    :param path: the final file name; its folder is created if needed.
    :param write: a function that writes the whole content to the open file object it receives.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no half-written temporary behind, whatever interrupted us.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """:func:`torch.save` ``obj`` to ``path`` atomically (serialized in memory, then written)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line to ``path``.

    Appending one short line is what log readers expect (``tail -f``); the line is written with a
    single ``write`` call and flushed, so a crash loses at most the line being written.
    """
    line = json.dumps(record, sort_keys=False, allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def stray_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """The temporaries of :func:`atomic_write` for the files ``names`` in ``folder``."""
    folder = Path(folder)
    prefixes = tuple(_temporary_prefix(n) for n in names)
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p for p in entries if p.name.startswith(prefixes) and p.name.endswith(_TMP_SUFFIX) and p.is_file())


def remove_stray_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temporaries that writes of ``names`` in ``folder`` left when their process was
    killed mid-write; returns what was removed.

    Only for files one process writes at a time (a run's checkpoint): the temporary of a write in
    progress elsewhere would be removed too.
    """
    removed = []
    for p in stray_temporaries(folder, names):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
