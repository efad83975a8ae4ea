"""The statistics and verdict rules of ``normmatters reproduce``: t quantiles against tabulated values,
the paired interval, and each rule's outcomes on hand-made rows."""

from __future__ import annotations

import math
import statistics

import pytest

from normmatters.experiments.claims import stats, verdicts as vd

# Two-sided 95 % (q = 0.975) and other quantiles of Student's t, from standard tables.
T_TABLE = [
    (0.975, 1, 12.706204736), (0.975, 2, 4.302652730), (0.975, 3, 3.182446305), (0.975, 4, 2.776445105),
    (0.975, 10, 2.228138852), (0.975, 30, 2.042272456), (0.975, math.inf, 1.959963985),
    (0.95, 5, 2.015048373), (0.995, 7, 3.499483297), (0.9, 1, 3.077683537),
]


@pytest.mark.parametrize("q,df,expected", T_TABLE)
def test_t_quantile_matches_tables(q, df, expected):
    assert stats.t_quantile(q, df) == pytest.approx(expected, abs=1e-8)
    assert stats.t_quantile(1 - q, df) == pytest.approx(-expected, abs=1e-8)


def test_t_cdf_closed_forms():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 10.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_mean_interval_is_mean_plus_minus_t_sd_over_root_n():
    vals = [0.91, 0.93, 0.96]
    iv = stats.mean_interval(vals)
    sd = statistics.stdev(vals)
    half = 4.302652730 * sd / math.sqrt(3)
    assert iv.mean == pytest.approx(statistics.mean(vals))
    assert (iv.lo, iv.hi) == (pytest.approx(iv.mean - half), pytest.approx(iv.mean + half))
    assert iv.sd == pytest.approx(sd) and iv.n == 3
    one = stats.mean_interval([0.5])
    assert one.lo is None and one.hi is None and one.mean == 0.5
    assert math.isnan(stats.mean_interval([1.0, float("nan")]).mean)


def _rows(spec: dict[str, list[float]], key: str = "test_acc", **extra) -> list[dict]:
    return [{"run": n, "seed": i, key: v, **extra} for n, vals in spec.items() for i, v in enumerate(vals)]


def test_pairing_is_by_seed_not_by_order():
    rows = [{"run": "a", "seed": 2, "test_acc": 0.9}, {"run": "b", "seed": 0, "test_acc": 0.5},
            {"run": "b", "seed": 2, "test_acc": 0.8}, {"run": "a", "seed": 0, "test_acc": 0.6}]
    c = vd.non_inferior(rows, "a", "b", "x", metric="test_acc", margin=0.01)
    assert c.seeds == [0, 2] and c.per_seed == [pytest.approx(0.1), pytest.approx(0.1)]


def test_non_inferiority_outcomes():
    ref = [0.90, 0.91, 0.92]
    # a tight interval around -0.2 points: worse end within 1 point
    ok = _rows({"a": [0.898, 0.908, 0.918], "b": ref})
    c = vd.non_inferior(ok, "a", "b", "x", metric="test_acc", margin=0.01)
    assert c.outcome == vd.SUPPORTED and c.passed is True
    assert c.diff["mean"] == pytest.approx(-0.002)
    # better than the reference by far: never a failure of "as good as"
    better = _rows({"a": [0.95, 0.97, 0.99], "b": ref})
    assert vd.non_inferior(better, "a", "b", "x", metric="test_acc", margin=0.01).outcome == vd.SUPPORTED
    # worse by 5 points every seed: the whole interval beyond the margin
    worse = _rows({"a": [0.85, 0.86, 0.87], "b": ref})
    c = vd.non_inferior(worse, "a", "b", "x", metric="test_acc", margin=0.01)
    assert c.outcome == vd.NOT_SUPPORTED and c.passed is False
    # noisy: the interval is wider than the margin
    noisy = _rows({"a": [0.88, 0.93, 0.90], "b": ref})
    c = vd.non_inferior(noisy, "a", "b", "x", metric="test_acc", margin=0.01)
    assert c.outcome == vd.AT_THIS_SCALE and c.passed is None
    # narrow but across the margin
    across = _rows({"a": [0.889, 0.901, 0.909], "b": ref})
    c = vd.non_inferior(across, "a", "b", "x", metric="test_acc", margin=0.01)
    assert c.outcome == vd.INCONCLUSIVE
    # one seed: no interval, whatever the difference
    one = _rows({"a": [0.90], "b": [0.90]})
    assert vd.non_inferior(one, "a", "b", "x", metric="test_acc", margin=0.01).outcome == vd.ONE_SEED


def test_non_inferiority_on_bits_per_char_is_relative_and_lower_is_better():
    ref = [2.00, 2.00, 2.00]
    rows = _rows({"l1": [1.90, 1.88, 1.86], "l2": ref}, key="test_bpc")   # better by ~6 %
    c = vd.non_inferior(rows, "l1", "l2", "x", metric="test_bpc", margin=0.02, higher_is_better=False,
                        kind="relative")
    assert c.outcome == vd.SUPPORTED and c.diff["mean"] == pytest.approx(-0.06)
    rows = _rows({"l1": [2.10, 2.11, 2.12], "l2": ref}, key="test_bpc")   # worse by ~5.5 %
    c = vd.non_inferior(rows, "l1", "l2", "x", metric="test_bpc", margin=0.02, higher_is_better=False,
                        kind="relative")
    assert c.outcome == vd.NOT_SUPPORTED


def test_equivalence_is_two_sided():
    ref = [0.90, 0.91, 0.92]
    same = _rows({"a": [0.901, 0.909, 0.921], "b": ref})
    assert vd.equivalent(same, "a", "b", "x", metric="test_acc", margin=0.01).outcome == vd.SUPPORTED
    much_better = _rows({"a": [0.95, 0.96, 0.97], "b": ref})
    assert vd.equivalent(much_better, "a", "b", "x", metric="test_acc", margin=0.01).outcome == vd.NOT_SUPPORTED


def test_failure_is_a_count_or_an_interval_that_excludes_zero():
    ref = _rows({"b": [0.95, 0.95, 0.95]}, nonfinite=0)
    counted = ref + _rows({"a": [0.95, 0.95, 0.95]}, nonfinite=0)
    counted[3]["nonfinite"] = 12  # non-finite values in one seed, even with a fine accuracy
    c = vd.fails(counted, "a", "b", "x", metric="test_acc", margin=0.01)
    assert c.outcome == vd.FAILS and c.passed is True and c.nonfinite == 1
    diverged = ref + _rows({"a": [float("nan")] * 3}, nonfinite=0)
    assert vd.fails(diverged, "a", "b", "x", metric="test_acc", margin=0.01).passed is True
    worse = ref + _rows({"a": [0.90, 0.91, 0.90]}, nonfinite=0)
    assert vd.fails(worse, "a", "b", "x", metric="test_acc", margin=0.01).outcome == vd.FAILS
    fine = ref + _rows({"a": [0.951, 0.949, 0.950]}, nonfinite=0)
    c = vd.fails(fine, "a", "b", "x", metric="test_acc", margin=0.01)
    assert c.outcome == vd.DOES_NOT_FAIL and c.passed is False
    one = _rows({"b": [0.95], "a": [0.95]}, nonfinite=0)
    assert vd.fails(one, "a", "b", "x", metric="test_acc", margin=0.01).outcome == vd.ONE_SEED


def test_no_slower_is_non_inferiority_of_the_time_ratio():
    rows = _rows({"l1": [0.090, 0.091, 0.089], "l2": [0.100, 0.100, 0.100]}, key="step_cpu_time")
    c = vd.no_slower(rows, "l1", "l2", "x")
    assert c.outcome == vd.SUPPORTED and c.diff["mean"] == pytest.approx(0.9)
    rows = _rows({"l1": [0.120, 0.121, 0.119], "l2": [0.100, 0.100, 0.100]}, key="step_cpu_time")
    assert vd.no_slower(rows, "l1", "l2", "x").outcome == vd.NOT_SUPPORTED
    missing = _rows({"l1": [0.1]}, key="step_cpu_time")
    assert vd.no_slower(missing, "l1", "l2", "x").outcome == vd.NOT_MEASURED
    untimed = _rows({"l1": [None, None], "l2": [0.1, 0.1]}, key="step_cpu_time")  # runs from before the timer
    assert vd.no_slower(untimed, "l1", "l2", "x").outcome == vd.NOT_MEASURED


def test_decide_combines_core_checks_only():
    def check(outcome, passed, core=True):
        return vd.Check("x", "a", "b", "test_acc", "non-inferiority", 0.01, "difference", outcome, passed, core=core)

    yes, no = check(vd.SUPPORTED, True), check(vd.NOT_SUPPORTED, False)
    one, scale = check(vd.ONE_SEED, None), check(vd.AT_THIS_SCALE, None)
    assert vd.decide([yes, yes, check(vd.NOT_SUPPORTED, False, core=False)], "r").verdict == "supported"
    assert vd.decide([no, no], "r").verdict == "not supported"
    assert vd.decide([one, one], "r").verdict == vd.ONE_SEED
    assert vd.decide([one, scale], "r").verdict == vd.AT_THIS_SCALE
    assert vd.decide([yes, no], "r").verdict.startswith("partly supported")
    assert vd.decide([yes, scale], "r").verdict.startswith("partly supported")
    assert vd.decide([no, scale], "r").verdict.startswith("not supported (")
    v = vd.decide([yes, check(vd.NOT_MEASURED, None)], "r").verdict
    assert v.startswith("supported") and "1 of 2" in v
    assert vd.decide([], "r").verdict == "inconclusive"


# ---------------------------------------------------------------------------------------------
# Power: half-width, minimum detectable difference, seeds for a target; identical differences
# ---------------------------------------------------------------------------------------------
def test_half_width_and_min_detectable_difference_against_t_tables():
    # n = 3: t_{0.975,2} = 4.302652730, t_{0.80,2} = 1.060660172 (= 1.5/√2: F_2(t) = 1/2 + t/(2√(2+t²)))
    assert stats.t_quantile(0.8, 2) == pytest.approx(1.5 / math.sqrt(2), abs=1e-10)
    assert stats.half_width(0.6, 3) == pytest.approx(4.302652730 * 0.6 / math.sqrt(3), abs=1e-9)
    assert stats.min_detectable_difference(0.6, 3) == pytest.approx((4.302652730 + 1.060660172) * 0.6 / math.sqrt(3),
                                                                    abs=1e-9)
    # n = 5: t_{0.975,4} = 2.776445105, t_{0.90,4} = 1.533206274 (power 90 %)
    assert stats.min_detectable_difference(1.0, 5, power=0.9) == pytest.approx(
        (2.776445105 + 1.533206274) / math.sqrt(5), abs=1e-8)
    assert math.isinf(stats.half_width(1.0, 1)) and math.isinf(stats.min_detectable_difference(1.0, 1))
    # the interval reports the same numbers
    iv = stats.mean_interval([0.1, 0.4, -0.2])
    assert iv.half_width == pytest.approx(stats.half_width(iv.sd, 3), rel=1e-12)
    assert iv.mdd == pytest.approx(stats.min_detectable_difference(iv.sd, 3), rel=1e-12)
    assert iv.to_dict()["mdd"] == iv.mdd and iv.to_dict()["degenerate"] is False


def test_seeds_for_half_width_is_the_smallest_n_that_reaches_the_target():
    for sd, target in ((0.0014, 0.005), (0.0077, 0.01), (1.0, 0.5), (0.3, 0.29)):
        n = stats.seeds_for_half_width(sd, target)
        assert stats.half_width(sd, n) <= target
        assert n == 2 or stats.half_width(sd, n - 1) > target
    assert stats.seeds_for_half_width(1.0, 0.5) == 18  # t_{0.975,17}/√18 = 0.4973; 17 seeds give 0.5141
    with pytest.raises(ValueError):
        stats.seeds_for_half_width(1.0, 0.0)


def test_identical_differences_are_marked_and_floored_at_the_resolution():
    # three seeds that each lost exactly 2 of 360 test images: the sample sd is 0
    d = [(350 - 352) / 360, (351 - 353) / 360, (349 - 351) / 360]
    bare = stats.mean_interval(d)
    assert bare.degenerate and bare.sd == 0.0 and bare.half_width == 0.0  # no resolution: stays zero, but marked
    iv = stats.mean_interval(d, resolution=1 / 360)
    assert iv.degenerate and iv.mean == pytest.approx(-2 / 360)
    assert iv.sd == pytest.approx(1 / 360)
    assert iv.half_width == pytest.approx(4.302652730 / 360 / math.sqrt(3), rel=1e-9)
    # a spread of one example in one seed is an ordinary interval
    iv = stats.mean_interval([-2 / 360, -2 / 360, -1 / 360], resolution=1 / 360)
    assert not iv.degenerate and iv.sd == pytest.approx(statistics.stdev([-2, -2, -1]) / 360)


def test_checks_on_identical_accuracy_differences_use_one_test_example():
    rows = []
    for s in range(3):
        rows += [{"run": "a", "seed": s, "test_acc": (350 + s - 2) / 360, "test_examples": 360},
                 {"run": "b", "seed": s, "test_acc": (350 + s) / 360, "test_examples": 360}]
    c = vd.non_inferior(rows, "a", "b", "a as good as b", metric="test_acc", margin=0.01)
    assert c.diff["degenerate"] and c.diff["sd"] == pytest.approx(1 / 360)
    assert c.diff["lo"] < c.diff["mean"] < c.diff["hi"]
    assert "identical in all 3 seeds" in vd.fmt_interval(c) and "identical" in c.text
    # worse end −0.56 − 0.69 = −1.25 pt: beyond δ = 1 pt, so not "supported" on a zero-width interval
    assert c.outcome != vd.SUPPORTED
    f = vd.fails(rows, "a", "b", "a fails", metric="test_acc", margin=0.01)
    assert f.outcome != vd.FAILS  # [−1.25, +0.13] pt includes zero
    # without test_examples the zero width is kept and said
    bare = [{k: v for k, v in r.items() if k != "test_examples"} for r in rows]
    c = vd.non_inferior(bare, "a", "b", "a as good as b", metric="test_acc", margin=0.01)
    assert c.diff["half_width"] == 0.0 and "zero-width" in vd.fmt_interval(c)
    assert vd.fmt_power(c).startswith("±0.00 pt")
