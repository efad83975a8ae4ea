"""Errors the experiment harness raises for bad input.

Every error a user can cause by what they type (a name, a config key, a path, a damaged file)
derives from :class:`InputError`, so the command line can turn exactly these into one clear line
and exit status 2, while a bug in the code still shows its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "ConfigError", "DataNotFoundError", "CheckpointError"]


class InputError(Exception):
    """Base class of the errors caused by the user's input, not by the code."""


class ConfigError(InputError, ValueError):
    """An unknown model, dataset, norm or config key, or a value of the wrong type or range."""


class DataNotFoundError(InputError, FileNotFoundError):
    """A dataset's folder or files are missing (and could not or may not be downloaded)."""


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that is missing, truncated, or not one written by this harness."""
