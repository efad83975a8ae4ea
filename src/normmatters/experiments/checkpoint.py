"""Checkpoints of a run: everything needed to continue it exactly, written atomically.

A checkpoint holds the model, optimizer, scheduler and gradient-scaler states, the epoch and step
counters, the random generators' states (torch, CUDA, numpy, Python), the config and the metric
history. It is written with :func:`~normmatters.experiments.io.atomic_torch_save` and read with
``torch.load(..., weights_only=True)``: only tensors and plain containers, never code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_torch_save, remove_stray_temporaries

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

FORMAT = "normmatters-train-checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from, as weights-only-loadable data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) atomically to ``path``.

    Once the new checkpoint is in place, the temporaries an earlier, killed write of the same
    checkpoint left next to it (``.checkpoint.pt.*.tmp``) are removed: a run's checkpoint has one
    writer, so none of them is a write in progress.
    """
    path = atomic_torch_save({"format": FORMAT, "version": VERSION, **payload}, path)
    remove_stray_temporaries(path.parent, [path.name])
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    :raises CheckpointError: missing, truncated or foreign files, in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, … for damaged files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({msg})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by normmatters train")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {ckpt.get('version')}, expected {VERSION}")
    return ckpt
