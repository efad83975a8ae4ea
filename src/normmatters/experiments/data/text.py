"""Character- or byte-level language-model data from any UTF-8 text file.

The default corpus is text that ships with every CPython: the pydoc topic help of the standard
library (``pydoc_data.topics``, about 0.47 M characters of the language reference in English
prose with code), joined in sorted topic order. If a distribution removed ``pydoc_data``, the
sources of a fixed list of pure-Python standard-library modules are used instead. The corpus's
SHA-256 is recorded in the dataset info, so a report says exactly what it trained on.

Examples are consecutive, non-overlapping windows of ``block_size + 1`` tokens: input the first
``block_size``, target the last ``block_size`` (next-token prediction). The last
``test_fraction`` of the corpus is the test split; with ``val_fraction`` > 0 the last
``val_fraction`` of the text before it is a validation split (``split="val"``), carved from the
training text, which then ends where it begins (hyperparameters chosen on it never see the test).
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
              train_chars: int | None = None, val_fraction: float = 0.0, split: str | None = None,
              augment: bool = False, download: bool = False):
    """A :class:`TokenDataset` over a UTF-8 file (``path``, or ``root`` if it names a file) or the default corpus.

    :param level: ``"char"`` (vocabulary = the corpus's characters) or ``"byte"`` (256 ids).
    :param max_chars: use only the first ``max_chars`` characters (quick runs).
    :param test_fraction: the last part of the text held out as the test split.
    :param train_chars: instead of ``test_fraction``: the first ``train_chars`` tokens are the
        training text, everything after them the test split (a long test text is cheap to evaluate).
    :param val_fraction: the part of the training text (its end) held out as the validation split.
    :param split: ``"train"``, ``"val"`` or ``"test"``; overrides ``train`` (``None``: ``train``
        chooses between the training and the test split).
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
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"text: val_fraction must be in [0, 1), got {val_fraction}")
    which = split if split is not None else ("train" if train else "test")
    if which not in ("train", "val", "test"):
        raise ConfigError(f"text: split must be 'train', 'val' or 'test', got {split!r}")
    if which == "val" and not val_fraction:
        raise ConfigError("text: split='val' needs val_fraction > 0")
    ids, vocab = encode_text(text, level)
    if train_chars is not None:
        if not 0 < int(train_chars) < len(ids) - block_size:
            raise ConfigError(f"text: train_chars must leave a test split of more than block_size = {block_size} "
                              f"tokens in the {len(ids)} of the text, got {train_chars}")
        test_start = int(train_chars)
    else:
        test_start = int(len(ids) * (1.0 - test_fraction))
    val_start = test_start - int(test_start * val_fraction)
    bounds = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, len(ids))}
    lo, hi = bounds[which]
    ds = TokenDataset(ids[lo:hi], block_size)
    vocab_size = 256 if vocab is None else len(vocab)
    info = DatasetInfo(
        "text", "lm", vocab_size, (block_size,), 0, 0, vocab_size=vocab_size,
        train_size=(val_start - 1) // block_size, test_size=(len(ids) - test_start - 1) // block_size,
        extra={"source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "level": level,
               "characters": len(text), "tokens": len(ids), "block_size": block_size,
               "train_tokens": val_start, "val_tokens": test_start - val_start, "test_tokens": len(ids) - test_start},
    )
    return ds, info
