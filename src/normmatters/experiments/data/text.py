"""Character- or byte-level language-model data from any UTF-8 text file.

The default corpus is text that ships with every CPython: the pydoc topic help of the standard
library (``pydoc_data.topics``, about 0.47 M characters of the language reference in English
prose with code), joined in sorted topic order. If a distribution removed ``pydoc_data``, the
sources of a fixed list of pure-Python standard-library modules are used instead. The corpus's
SHA-256 is recorded in the dataset info, so a report says exactly what it trained on.

Examples are consecutive, non-overlapping windows of ``block_size + 1`` tokens: input the first
``block_size``, target the last ``block_size`` (next-token prediction). The last
``test_fraction`` of the corpus is the test split.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataNotFoundError
from .base import DatasetInfo

__all__ = ["TokenDataset", "default_corpus", "load_text", "encode_text"]

# Pure-Python standard-library modules present in every CPython 3.10+, used if pydoc_data is not.
_FALLBACK_MODULES = ("argparse", "collections", "difflib", "inspect", "pathlib", "textwrap", "typing", "unittest.case")


def default_corpus() -> tuple[str, str]:
    """Return ``(text, source description)`` of the embedded corpus."""
    try:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (CPython standard library)"
    except ImportError:
        import importlib

        parts = [inspect.getsource(importlib.import_module(m)) for m in _FALLBACK_MODULES]
        return "\n\n".join(parts), "CPython standard-library sources: " + ", ".join(_FALLBACK_MODULES)


def encode_text(text: str, level: str = "char", vocab: list[str] | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """Token ids of ``text``: UTF-8 bytes (``level="byte"``, 256 ids) or characters.

    For characters the vocabulary is the sorted set of characters of ``text`` unless given.
    :returns: (ids as int64 tensor, vocabulary or ``None`` for bytes).
    """
    if level == "byte":
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long(), None
    if level == "char":
        vocab = sorted(set(text)) if vocab is None else vocab
        stoi = {c: i for i, c in enumerate(vocab)}
        return torch.tensor([stoi[c] for c in text], dtype=torch.long), vocab
    raise ConfigError(f"text: level must be 'char' or 'byte', got {level!r}")


class TokenDataset(Dataset):
    """Non-overlapping windows of a token stream: item i is (ids[s:s+T], ids[s+1:s+T+1]), s = i·T."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        if block_size < 1:
            raise ConfigError(f"text: block_size must be >= 1, got {block_size}")
        if len(ids) < block_size + 1:
            raise ConfigError(f"text: split of {len(ids)} tokens is shorter than block_size + 1 = {block_size + 1}")
        self.ids, self.block_size = ids, int(block_size)

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, i: int):
        s = i * self.block_size
        chunk = self.ids[s: s + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def load_text(root=None, *, train: bool = True, path: str | os.PathLike | None = None, level: str = "char",
              block_size: int = 128, test_fraction: float = 0.1, max_chars: int | None = None,
              augment: bool = False, download: bool = False):
    """A :class:`TokenDataset` over a UTF-8 file (``path``, or ``root`` if it names a file) or the default corpus.

    :param level: ``"char"`` (vocabulary = the corpus's characters) or ``"byte"`` (256 ids).
    :param max_chars: use only the first ``max_chars`` characters (quick runs).
    :param augment, download: accepted for a uniform interface; text has neither.
    """
    path = path if path is not None else (root if root is not None and Path(root).is_file() else None)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DataNotFoundError(f"text: file {p} not found (pass a UTF-8 text file)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataNotFoundError(f"text: {p} is not valid UTF-8 ({exc})") from exc
        source = str(p)
    else:
        text, source = default_corpus()
    if max_chars:
        text = text[: int(max_chars)]
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"text: test_fraction must be in (0, 1), got {test_fraction}")
    ids, vocab = encode_text(text, level)
    split = int(len(ids) * (1.0 - test_fraction))
    ds = TokenDataset(ids[:split] if train else ids[split:], block_size)
    vocab_size = 256 if vocab is None else len(vocab)
    info = DatasetInfo(
        "text", "lm", vocab_size, (block_size,), 0, 0, vocab_size=vocab_size,
        train_size=(split - 1) // block_size, test_size=(len(ids) - split - 1) // block_size,
        extra={"source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "level": level,
               "characters": len(text), "tokens": len(ids), "block_size": block_size},
    )
    return ds, info
