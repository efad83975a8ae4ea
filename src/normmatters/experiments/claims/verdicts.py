r"""Verdict rules: paired comparisons over seeds, each against a margin stated before the runs.

A claim's runs are trained with the same seeds; run *a* and its reference *b* of the same seed
share the initialization and the data order, so they are compared seed by seed. Per seed the
difference is

* accuracy (higher is better): :math:`d_s = a_s - b_s`, in points (fractions × 100 when shown);
* bits per character (lower is better): :math:`d_s = (a_s - b_s)/b_s`, relative to the reference;
* step time (lower is better): the ratio :math:`r_s = a_s / b_s`.

Over the n seeds: the mean difference and its 95 % t interval (:func:`~.stats.mean_interval`).
The *worse end* of the interval is the end that is worse for *a* (the lower end of an accuracy
difference, the upper end of a bits-per-character difference or a time ratio). The rules, with
margin δ:

* **as good as** (non-inferiority, :func:`non_inferior`): ``supported`` when the worse end is
  within δ of no difference; ``not supported`` when the whole interval is beyond δ; otherwise
  inconclusive. Better than the reference is never a failure of this rule.
* **matches** (equivalence, :func:`equivalent`): ``supported`` when the whole interval lies in
  [−δ, δ]; ``not supported`` when it lies wholly outside; otherwise inconclusive.
* **fails** (:func:`fails`): run *a* fails when it produced non-finite values or diverged in any
  seed (a count), or when it is worse than its reference with an interval that excludes zero; it
  *does not fail* when it has no non-finite values and the worse end of its interval is within δ;
  otherwise inconclusive.
* **no slower** (:func:`no_slower`): the non-inferiority rule on the time ratio, margin δ
  (e.g. 5 %: the ratio's upper end ≤ 1.05).

Identical differences. When every seed gives the same difference (an accuracy moves in steps of
one test example, so a few seeds can agree exactly), the sample standard deviation is 0 and the t
interval would have zero width. Rows that carry ``test_examples`` (N) give the step 1/N, and the
interval then uses one step as its standard deviation (:func:`~.stats.mean_interval`); the check
says so in its text and the report marks it.

Power. Every check records its interval's half-width and its minimum detectable difference (the
true difference its 95 % interval would exclude zero for four times in five, from the observed
spread, :func:`~.stats.min_detectable_difference`); the report shows both beside δ.

Inconclusive comes in three words: ``inconclusive (1 seed)`` (no interval without a second seed),
``inconclusive at this scale`` (the interval is wider than δ — 2δ for equivalence —, so the runs
could not resolve a difference of the margin's size), and ``inconclusive`` (a narrow interval that
straddles the margin). A claim's verdict combines its *core* checks (:func:`decide`); other checks
are reported beside it and do not vote.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .stats import Interval, mean_interval

__all__ = [
    "ACC_MARGIN",
    "BPC_MARGIN",
    "SPEED_MARGIN",
    "Check",
    "Verdict",
    "paired",
    "non_inferior",
    "equivalent",
    "fails",
    "no_slower",
    "decide",
    "fmt_interval",
    "fmt_margin",
    "fmt_power",
    "SUPPORTED",
    "NOT_SUPPORTED",
    "ONE_SEED",
    "AT_THIS_SCALE",
    "INCONCLUSIVE",
    "NOT_MEASURED",
    "FAILS",
    "DOES_NOT_FAIL",
]

#: Margin of an accuracy comparison: 1 percentage point (accuracies are fractions).
ACC_MARGIN = 0.01
#: Margin of a bits-per-character comparison: 2 % of the reference run's value.
BPC_MARGIN = 0.02
#: Margin of a step-time comparison: 5 % slower than the reference.
SPEED_MARGIN = 0.05

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
ONE_SEED = "inconclusive (1 seed)"
AT_THIS_SCALE = "inconclusive at this scale"
INCONCLUSIVE = "inconclusive"
NOT_MEASURED = "not measured"
FAILS = "fails"
DOES_NOT_FAIL = "does not fail"


@dataclass
class Check:
    """One paired comparison of run ``a`` with its reference ``b``.

    :ivar name: what is checked, in words.
    :ivar a, b: the run and its reference.
    :ivar metric: the compared row key (``test_acc``, ``test_bpc``, ``step_cpu_time``).
    :ivar rule: ``non-inferiority``, ``equivalence``, ``failure`` or ``no-slower``.
    :ivar margin: δ, in the difference's units (fraction of accuracy, relative bpc, time ratio − 1).
    :ivar kind: ``difference`` (a − b), ``relative`` ((a − b)/b) or ``ratio`` (a/b).
    :ivar outcome: ``supported``, ``not supported``, ``fails``, ``does not fail``, or one of the
        inconclusive words, or ``not measured``.
    :ivar passed: what the outcome means for the claim: ``True`` (as claimed), ``False``
        (against the claim), ``None`` (undecided or not measured).
    :ivar diff: the mean paired difference and its interval (``Interval.to_dict``).
    :ivar seeds: the paired seeds; ``per_seed``: their differences.
    :ivar nonfinite: seeds in which ``a`` produced non-finite values or diverged.
    :ivar text: the evidence in a sentence.
    :ivar core: whether it votes in the claim's verdict.
    """

    name: str
    a: str
    b: str
    metric: str
    rule: str
    margin: float | None
    kind: str
    outcome: str
    passed: bool | None
    diff: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    per_seed: list[float] = field(default_factory=list)
    nonfinite: int = 0
    text: str = ""
    core: bool = True

    @property
    def n(self) -> int:
        return len(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    """A claim's verdict, the rule that produced it (in words, stated before the runs) and its checks."""

    verdict: str
    rule: str
    checks: list[Check] = field(default_factory=list)

    @property
    def core(self) -> list[Check]:
        return [c for c in self.checks if c.core]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "rule": self.rule, "checks": [c.to_dict() for c in self.checks]}


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------
def _number(v: Any) -> float:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def paired(rows: Iterable[dict[str, Any]], a: str, b: str, key: str) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """``(seed, row of a, row of b)`` for every seed with both runs, in seed order."""
    by: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("run") in (a, b):
            by[(r["run"], int(r.get("seed", 0)))] = r
    seeds = sorted({s for (run, s) in by if run == a} & {s for (run, s) in by if run == b})
    return [(s, by[(a, s)], by[(b, s)]) for s in seeds]


def _diff(kind: str, va: float, vb: float) -> float:
    if kind == "ratio":
        return va / vb if vb else math.nan
    if kind == "relative":
        return (va - vb) / abs(vb) if vb else math.nan
    return va - vb


def _shortfall(kind: str, higher_is_better: bool, iv: Interval) -> tuple[float, float]:
    """The interval of "how much worse a is" (positive = worse) from the difference interval."""
    lo, hi = iv.lo, iv.hi
    assert lo is not None and hi is not None
    if kind == "ratio":
        return lo - 1.0, hi - 1.0
    return (-hi, -lo) if higher_is_better else (lo, hi)


def _inconclusive(n: int, width: float | None, limit: float) -> str:
    if n < 2 or width is None:
        return ONE_SEED
    return AT_THIS_SCALE if width > limit else INCONCLUSIVE


def _fmt_diff(kind: str, metric: str, v: float | None, signed: bool = True) -> str:
    if v is None or not math.isfinite(v):
        return "—" if v is None else "nan"
    if kind == "ratio":
        return f"{v:.3f}×"
    if kind == "relative":
        return f"{100 * v:+.2f}%" if signed else f"{100 * v:.2f}%"
    if metric.endswith("acc"):
        return f"{100 * v:+.2f} pt" if signed else f"{100 * v:.2f} pt"
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def fmt_margin(kind: str, metric: str, margin: float | None) -> str:
    """δ in words: ``1 pt``, ``2%``, ``5%``."""
    if margin is None:
        return "—"
    if kind in ("ratio", "relative"):
        return f"{100 * margin:g}%"
    if metric.endswith("acc"):
        return f"{100 * margin:g} pt"
    return f"{margin:g}"


def fmt_interval(c: Check) -> str:
    """``+0.12 pt [−0.40, +0.64]`` (mean and 95 % interval), or the mean alone with one seed."""
    d = c.diff or {}
    mean = _fmt_diff(c.kind, c.metric, d.get("mean"))
    if d.get("lo") is None or d.get("hi") is None:
        return mean + (" (1 seed)" if c.n == 1 else "")
    out = f"{mean} [{_fmt_diff(c.kind, c.metric, d['lo'])}, {_fmt_diff(c.kind, c.metric, d['hi'])}]"
    if d.get("degenerate"):
        out += (f" (identical in all {c.n} seeds; interval from a spread of one test example)" if d.get("sd")
                else f" (identical in all {c.n} seeds: zero-width interval)")
    return out


def _fmt_size(kind: str, metric: str, v: float | None) -> str:
    """An unsigned size in the difference's units (a ratio's as a percentage of 1)."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{100 * v:.2f}%" if kind == "ratio" else _fmt_diff(kind, metric, v, signed=False)


def fmt_power(c: Check) -> str:
    """``±0.17 pt / 0.25 pt``: the interval's half-width and the minimum detectable difference."""
    d = c.diff or {}
    if d.get("half_width") is None:
        return "—"
    return f"±{_fmt_size(c.kind, c.metric, d['half_width'])} / {_fmt_size(c.kind, c.metric, d.get('mdd'))}"


def _resolution(pairs, metric: str, kind: str) -> float | None:
    """The step of an accuracy difference: one example of the smaller test set (rows' ``test_examples``)."""
    if kind != "difference" or not metric.endswith("acc"):
        return None
    sizes = [_number(r.get("test_examples")) for _, ra, rb in pairs for r in (ra, rb)]
    sizes = [n for n in sizes if math.isfinite(n) and n > 0]
    return 1.0 / min(sizes) if sizes else None


def _compare(rows: Sequence[dict[str, Any]], a: str, b: str, metric: str, kind: str):
    pairs = paired(rows, a, b, metric)
    seeds = [s for s, _, _ in pairs]
    diffs = [_diff(kind, _number(ra.get(metric)), _number(rb.get(metric))) for _, ra, rb in pairs]
    return seeds, diffs, mean_interval(diffs, resolution=_resolution(pairs, metric, kind)), *_bad(pairs, metric)


def _bad(pairs, metric: str) -> tuple[int, int, int]:
    bad = sum(1 for _, ra, _ in pairs if not math.isfinite(_number(ra.get(metric))) or _number(ra.get("nonfinite")) > 0)
    diverged = sum(1 for _, ra, _ in pairs if not math.isfinite(_number(ra.get(metric))))
    ref_bad = sum(1 for _, _, rb in pairs if not math.isfinite(_number(rb.get(metric))))
    return bad, diverged, ref_bad


def _missing(name: str, a: str, b: str, metric: str, rule: str, margin: float | None, kind: str, core: bool) -> Check:
    return Check(name, a, b, metric, rule, margin, kind, NOT_MEASURED, None,
                 text=f"runs {a} and {b} were not both measured with a common seed", core=core)


def non_inferior(rows: Sequence[dict[str, Any]], a: str, b: str, name: str, *, metric: str, margin: float,
                 higher_is_better: bool = True, kind: str = "difference", core: bool = True,
                 count_nonfinite: bool = False) -> Check:
    """``a`` is as good as ``b`` within ``margin``: the rule "as good as" of the module docstring.

    :param count_nonfinite: a seed in which ``a`` produced non-finite values (row key
        ``nonfinite``) makes the check ``not supported``, whatever the metric.
    """
    rule = "non-inferiority"
    seeds, diffs, iv, bad, diverged, ref_bad = _compare(rows, a, b, metric, kind)
    if not seeds:
        return _missing(name, a, b, metric, rule, margin, kind, core)
    base = dict(diff=iv.to_dict(), seeds=seeds, per_seed=diffs, core=core)
    delta = fmt_margin(kind, metric, margin)
    if diverged or (count_nonfinite and bad):
        n_bad = bad if count_nonfinite else diverged
        what = "diverged" if diverged else "produced non-finite values"
        return Check(name, a, b, metric, rule, margin, kind, NOT_SUPPORTED, False, nonfinite=n_bad,
                     text=f"{a} {what} in {n_bad}/{len(seeds)} seeds", **base)
    if ref_bad:
        return Check(name, a, b, metric, rule, margin, kind, SUPPORTED, True,
                     text=f"the reference {b} diverged in {ref_bad}/{len(seeds)} seeds while {a} did not", **base)
    c = Check(name, a, b, metric, rule, margin, kind, "", None, **base)
    if iv.lo is None:
        c.outcome = ONE_SEED
    else:
        lo, hi = _shortfall(kind, higher_is_better, iv)
        if hi <= margin:
            c.outcome, c.passed = SUPPORTED, True
        elif lo > margin:
            c.outcome, c.passed = NOT_SUPPORTED, False
        else:
            c.outcome = _inconclusive(len(seeds), iv.hi - iv.lo, margin)
    c.text = (f"{a} − {b}: {fmt_interval(c)} over {len(seeds)} seed(s); δ = {delta} "
              f"({'higher' if higher_is_better else 'lower'} is better) → {c.outcome}")
    return c


def equivalent(rows: Sequence[dict[str, Any]], a: str, b: str, name: str, *, metric: str, margin: float,
               kind: str = "difference", core: bool = True) -> Check:
    """``a`` matches ``b``: the whole interval of a − b lies in [−margin, margin]."""
    rule = "equivalence"
    seeds, diffs, iv, bad, diverged, ref_bad = _compare(rows, a, b, metric, kind)
    if not seeds:
        return _missing(name, a, b, metric, rule, margin, kind, core)
    c = Check(name, a, b, metric, rule, margin, kind, "", None, diff=iv.to_dict(), seeds=seeds, per_seed=diffs,
              core=core)
    if diverged or ref_bad:
        c.outcome, c.passed, c.nonfinite = NOT_SUPPORTED, False, diverged
        c.text = f"{a if diverged else b} diverged in {diverged or ref_bad}/{len(seeds)} seeds"
        return c
    if iv.lo is None:
        c.outcome = ONE_SEED
    elif -margin <= iv.lo and iv.hi <= margin:
        c.outcome, c.passed = SUPPORTED, True
    elif iv.lo > margin or iv.hi < -margin:
        c.outcome, c.passed = NOT_SUPPORTED, False
    else:
        c.outcome = _inconclusive(len(seeds), iv.hi - iv.lo, 2 * margin)
    c.text = (f"{a} − {b}: {fmt_interval(c)} over {len(seeds)} seed(s); δ = ±{fmt_margin(kind, metric, margin)} "
              f"→ {c.outcome}")
    return c


def fails(rows: Sequence[dict[str, Any]], a: str, b: str, name: str, *, metric: str, margin: float,
          higher_is_better: bool = True, kind: str = "difference", core: bool = True) -> Check:
    """``a`` fails against ``b``: non-finite values or divergence in a seed (row key ``nonfinite``),
    or worse with an interval that excludes zero. ``passed`` is ``True`` when it fails (as claimed)."""
    rule = "failure"
    seeds, diffs, iv, bad, diverged, _ = _compare(rows, a, b, metric, kind)
    if not seeds:
        return _missing(name, a, b, metric, rule, margin, kind, core)
    c = Check(name, a, b, metric, rule, margin, kind, "", None, diff=iv.to_dict(), seeds=seeds, per_seed=diffs,
              nonfinite=bad, core=core)
    if bad:
        c.outcome, c.passed = FAILS, True
        c.text = (f"{a} produced non-finite values{' and diverged' if diverged else ''} in {bad}/{len(seeds)} "
                  f"seeds; {a} − {b}: {fmt_interval(c)} → fails")
        return c
    if iv.lo is None:
        c.outcome = ONE_SEED
    else:
        lo, hi = _shortfall(kind, higher_is_better, iv)
        if lo > 0:
            c.outcome, c.passed = FAILS, True
        elif hi <= margin:
            c.outcome, c.passed = DOES_NOT_FAIL, False
        else:
            c.outcome = _inconclusive(len(seeds), iv.hi - iv.lo, margin)
    c.text = (f"no non-finite values in {len(seeds)} seed(s); {a} − {b}: {fmt_interval(c)}; fails if the "
              f"interval is worse than 0, does not if its worse end is within δ = "
              f"{fmt_margin(kind, metric, margin)} → {c.outcome}")
    return c


def no_slower(rows: Sequence[dict[str, Any]], a: str, b: str, name: str, *, metric: str = "step_cpu_time",
              margin: float = SPEED_MARGIN, core: bool = True) -> Check:
    """``a``'s step time is at most (1 + margin) × ``b``'s: non-inferiority on the per-seed ratio.

    A run that recorded no step time is left out (not measured), never counted as diverged.
    """
    timed = [r for r in rows if math.isfinite(_number(r.get(metric))) and _number(r.get(metric)) > 0]
    return non_inferior(timed, a, b, name, metric=metric, margin=margin, higher_is_better=False, kind="ratio",
                        core=core)


def decide(checks: Sequence[Check], rule: str) -> Verdict:
    """A claim's verdict from its core checks.

    All core checks as claimed → ``supported``; all against → ``not supported``; all undecided →
    the common inconclusive word; a mix → ``partly supported`` (some as claimed) or ``not
    supported`` (none as claimed), with the counts. Checks that lack their runs are left out and
    the verdict says so.
    """
    core = [c for c in checks if c.core]
    known = [c for c in core if c.outcome != NOT_MEASURED]
    if not known:
        return Verdict(INCONCLUSIVE + (" (runs missing)" if core else ""), rule, list(checks))
    yes = sum(c.passed is True for c in known)
    no = sum(c.passed is False for c in known)
    und = [c for c in known if c.passed is None]
    if yes == len(known):
        v = SUPPORTED
    elif no == len(known):
        v = NOT_SUPPORTED
    elif len(und) == len(known):
        words = {c.outcome for c in und}
        v = ONE_SEED if words == {ONE_SEED} else (AT_THIS_SCALE if AT_THIS_SCALE in words else INCONCLUSIVE)
    else:
        v = ("partly supported" if yes else NOT_SUPPORTED) + \
            f" ({yes} as claimed, {no} against, {len(und)} inconclusive)"
    if len(known) < len(core):
        v += f" (on {len(known)} of {len(core)} checks; the others lack their runs)"
    return Verdict(v, rule, list(checks))
