"""Claim C4's experiment runs end to end on real data (digits) and reports what it promises."""

import pytest


@pytest.mark.slow
def test_c4_runs_and_reports_nonfinite_counts(tmp_path):
    from normmatters.experiments.claims import c4

    out = c4.run(tmp_path, runs=("raw-fp16-l2", "raw-fp16-l1"), epochs=1, progress=False, with_map=False)
    assert out["claim"] == "C4" and [r["run"] for r in out["rows"]] == ["raw-fp16-l2", "raw-fp16-l1"]
    l2, l1 = out["rows"]
    # The first batch norm's squares overflow fp16 at the stated input scale; |d| does not.
    assert l2["nonfinite"] > 0 and any(k.endswith("/square") for k in l2["nonfinite_by_stage"])
    assert l1["nonfinite"] == 0
    assert 0.0 <= l1["test_acc"] <= 1.0
    assert (tmp_path / "raw-fp16-l2-s0" / "nonfinite.jsonl").stat().st_size > 0
    assert (tmp_path / "c4.md").exists()

    # A second call in the same folder reuses the finished runs instead of training them again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr("normmatters.experiments.trainer.train", no_training)
        again = c4.run(tmp_path, runs=("raw-fp16-l2", "raw-fp16-l1"), epochs=1, progress=False, with_map=False)
    assert [r["test_acc"] for r in again["rows"]] == [r["test_acc"] for r in out["rows"]]
    assert again["rows"][0]["nonfinite"] == l2["nonfinite"]


@pytest.mark.slow
def test_c4_standardized_inputs_keep_l2_finite_in_fp16(tmp_path):
    from normmatters.experiments.claims import c4

    out = c4.run(tmp_path, runs=("std-fp16-l2",), epochs=1, progress=False, with_map=False)
    (row,) = out["rows"]
    assert row["regime"] == "std" and row["nonfinite"] == 0
    # the "why": |d| at the first batch norm is far below 256 at the ordinary scale, far above it raw
    assert c4.first_norm_deviation("std") < 256 < c4.first_norm_deviation("raw")
