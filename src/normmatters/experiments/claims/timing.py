"""Time per training step, measured inside a run and kept in its ``metrics.jsonl``.

:class:`StepTimer` is a trainer callback: between two consecutive optimizer steps of an epoch it
reads the wall clock (``time.perf_counter``) and the process's CPU time (``time.process_time``,
every thread of the process), so a step's time covers its forward, backward, optimizer update
and the loading of the next batch, and leaves out evaluation, checkpointing and the first step of
each epoch (which follows them). Per epoch it adds ``step_time`` and ``step_cpu_time`` (seconds,
mean over the epoch's timed steps) to the epoch's metrics; :func:`run_step_times` reads them back
from a finished run, so a run reused from the cache keeps its timing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["StepTimer", "run_step_times"]


class StepTimer:
    """Trainer callback: per epoch, the mean wall and CPU seconds of a training step."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None
        self._wall: list[float] = []
        self._cpu: list[float] = []

    def on_train_begin(self, state: Any) -> None:
        self._last = None

    def on_step_end(self, state: Any) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self._wall.append(now[0] - self._last[0])
            self._cpu.append(now[1] - self._last[1])
        self._last = now

    def on_epoch_end(self, state: Any) -> None:
        if self._wall:
            state.metrics["step_time"] = sum(self._wall) / len(self._wall)
            state.metrics["step_cpu_time"] = sum(self._cpu) / len(self._cpu)
            state.metrics["timed_steps"] = len(self._wall)
        self._wall, self._cpu, self._last = [], [], None


def run_step_times(run_dir: str | Path | None) -> dict[str, float | None]:
    """``{"step_time", "step_cpu_time"}`` of a run: the median over its epochs (robust to a burst
    of other work on a shared machine); ``None`` where the run did not record them."""
    out: dict[str, float | None] = {"step_time": None, "step_cpu_time": None}
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return out
    hist = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            hist.append(json.loads(line))
        except ValueError:
            continue
    for key in out:
        vals = [float(h[key]) for h in hist if isinstance(h.get(key), (int, float))]
        out[key] = statistics.median(vals) if vals else None
    return out
