"""Timing helpers of ``normmatters bench``; the suites (layers, host overhead, training steps)
are in :mod:`normmatters.experiments.bench_steps`.

Every comparison alternates the timed functions within each repetition, so that ours and torch's
see the same machine load, and reports medians; ``clock="cpu"`` measures the process's CPU time,
which on a shared machine does not count the time other processes hold the cores (use it with one
thread). :func:`saved_bytes` measures what autograd keeps for backward.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["saved_bytes", "time_interleaved", "machine", "format_table", "write_json", "CLOCKS"]

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of distinct storages that autograd keeps for backward while ``fn()`` runs forward."""
    storages: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[(s.data_ptr(), str(t.device))] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(fns: Sequence[Callable[[], Any]], repeat: int, warmup: int,
               device: torch.device, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median seconds of each of ``fns``, interleaved within each repetition.

    The clock is wall time, or with ``--clock cpu`` the process's CPU time, which on a shared
    machine does not count the time other processes hold the cores (use it with one thread).
    """
    for _ in range(warmup):
        for f in fns:
            f()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            _sync(device)
            t0 = clock()
            f()
            _sync(device)
            times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "device": device,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table: ``columns`` are (header, row key, format spec)."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(key) is None else format(r[key], spec)) for _, key, spec in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(columns)))
             for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


