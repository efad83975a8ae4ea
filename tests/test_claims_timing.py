"""The per-step timer of the claims' runs and how a finished run's step times are read back."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from normmatters.experiments.claims.timing import StepTimer, run_step_times


def test_step_timer_times_steps_within_an_epoch_only():
    timer = StepTimer()
    state = SimpleNamespace(metrics={})
    timer.on_train_begin(state)
    for _ in range(4):
        time.sleep(0.01)
        timer.on_step_end(state)
    timer.on_epoch_end(state)
    # 4 steps: the first of the epoch follows evaluation and checkpointing and is not timed
    assert state.metrics["timed_steps"] == 3
    assert state.metrics["step_time"] >= 0.009
    assert 0.0 <= state.metrics["step_cpu_time"] < state.metrics["step_time"]  # sleeping costs no CPU
    # the next epoch starts afresh: the gap across the evaluation is not a step
    state.metrics = {}
    time.sleep(0.05)
    timer.on_step_end(state)
    timer.on_step_end(state)
    timer.on_epoch_end(state)
    assert state.metrics["timed_steps"] == 1 and state.metrics["step_time"] < 0.05


def test_run_step_times_is_the_median_over_epochs(tmp_path):
    lines = [{"epoch": 1, "step_time": 0.5, "step_cpu_time": 0.4}, {"epoch": 2, "step_time": 0.1, "step_cpu_time": 0.09},
             {"epoch": 3, "step_time": 0.12, "step_cpu_time": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run_step_times(tmp_path) == {"step_time": pytest.approx(0.12), "step_cpu_time": pytest.approx(0.1)}
    assert run_step_times(tmp_path / "nothing") == {"step_time": None, "step_cpu_time": None}
    assert run_step_times(None) == {"step_time": None, "step_cpu_time": None}
