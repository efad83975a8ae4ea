r"""Statistics of the verdicts: Student's t quantiles and the confidence interval of a mean.

Every verdict of ``normmatters reproduce`` compares two runs trained with the same seed (the
same initialization and data order), seed by seed. With the per-seed paired differences
:math:`d_1, \dots, d_n`, their mean :math:`\bar d` and sample standard deviation :math:`s`
(ddof = 1), the two-sided :math:`(1-\alpha)` confidence interval of the mean difference is

.. math::

    \bar d \pm t_{1-\alpha/2,\, n-1} \, s / \sqrt{n},

with :math:`t_{q,\nu}` the q-quantile of Student's t distribution with ν degrees of freedom. With
one seed there is no interval (:math:`s` is undefined).

Power. A design of n seeds whose paired differences spread with standard deviation σ has the
half-width :math:`h = t_{1-\alpha/2,\,n-1}\,\sigma/\sqrt n` and the *minimum detectable
difference* (:func:`min_detectable_difference`)

.. math::

    \mathrm{MDD} = (t_{1-\alpha/2,\,n-1} + t_{\text{power},\,n-1})\,\sigma/\sqrt n,

the true difference that a 95 % interval excludes zero for with probability ``power`` (80 % by
default; the usual t-approximation of the power of a paired t test). :func:`seeds_for_half_width`
turns a pilot's σ into the number of seeds that keeps h under a target, e.g. half a verdict's
margin, so that a true difference of zero is declared non-inferior almost always.

Identical differences. When every seed gives the same difference (possible when the metric moves
in steps, e.g. one test example = 1/N of accuracy), the sample standard deviation is 0 and the t
interval has zero width: the spread was not observed, not shown to be absent. Given the metric's
``resolution`` (its step), :func:`mean_interval` then uses one step as the standard deviation (the
smallest spread the data could have shown) and marks the interval ``degenerate``.

The t distribution's CDF is computed from the regularized incomplete beta function,
:math:`F_\nu(t) = 1 - \tfrac12 I_{\nu/(\nu+t^2)}(\nu/2, 1/2)` for t ≥ 0 (Abramowitz & Stegun
26.7.1), evaluated by its continued fraction (Lentz's method), and inverted by bisection; no
SciPy needed. Accurate to ~1e-10 against tabulated quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["t_cdf", "t_quantile", "Interval", "mean_interval", "half_width", "min_detectable_difference",
           "seeds_for_half_width", "Agg", "aggregate", "POWER"]

#: The power of :func:`min_detectable_difference` (the conventional 80 %).
POWER = 0.8


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` > 0 degrees of freedom (``df=inf``: the normal)."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom, 0 < q < 1.

    >>> round(t_quantile(0.975, 2), 4)
    4.3027
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    if q == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """The mean of n values and its two-sided confidence interval.

    :ivar mean: the sample mean (NaN if any value is not finite).
    :ivar lo, hi: the interval's ends; ``None`` with fewer than 2 values or a non-finite value.
    :ivar n: the number of values.
    :ivar sd: the sample standard deviation (ddof = 1); ``None`` with fewer than 2 values.
    :ivar level: the confidence level, e.g. 0.95.
    :ivar degenerate: every value was the same (n ≥ 2), so the sample standard deviation is 0;
        ``sd`` then holds the floor used instead (one ``resolution`` step) or 0 without one.
    """

    mean: float
    lo: float | None
    hi: float | None
    n: int
    sd: float | None
    level: float = 0.95
    degenerate: bool = False

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None or self.hi is None else 0.5 * (self.hi - self.lo)

    @property
    def mdd(self) -> float | None:
        """The minimum detectable difference of this design (:func:`min_detectable_difference`)."""
        if self.sd is None or self.n < 2 or not math.isfinite(self.sd):
            return None
        return min_detectable_difference(self.sd, self.n, self.level)

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "sd": self.sd, "level": self.level,
                "half_width": self.half_width, "mdd": self.mdd, "degenerate": self.degenerate}


def half_width(sd: float, n: int, level: float = 0.95) -> float:
    """The half-width t_{(1+level)/2, n−1} · sd / √n of the t interval of a mean of n values."""
    if n < 2:
        return math.inf
    return t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)


def min_detectable_difference(sd: float, n: int, level: float = 0.95, power: float = POWER) -> float:
    """(t_{(1+level)/2, n−1} + t_{power, n−1}) · sd / √n: the true mean difference that the
    ``level`` interval of n paired differences of standard deviation ``sd`` excludes zero for with
    probability ``power``.

    >>> round(min_detectable_difference(1.0, 3), 4)  # (4.3027 + 1.0607) / √3
    3.0966
    """
    if n < 2:
        return math.inf
    return (t_quantile(0.5 + level / 2.0, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_for_half_width(sd: float, target: float, level: float = 0.95, n_max: int = 1000) -> int:
    """The fewest seeds n ≥ 2 whose interval half-width :func:`half_width` is at most ``target``.

    :raises ValueError: ``target`` ≤ 0, or more than ``n_max`` seeds needed.
    """
    if not target > 0:
        raise ValueError(f"seeds_for_half_width: target must be > 0, got {target}")
    for n in range(2, n_max + 1):
        if half_width(sd, n, level) <= target:
            return n
    raise ValueError(f"seeds_for_half_width: more than {n_max} seeds needed for sd {sd} and half-width {target}")


def mean_interval(values: Sequence[float], level: float = 0.95, resolution: float | None = None) -> Interval:
    """The mean of ``values`` and its t interval: mean ± t_{(1+level)/2, n−1} · sd / √n.

    :param resolution: the step of the values (e.g. one test example's share of accuracy); when
        all n ≥ 2 values are equal, the interval uses ``sd = resolution`` and is marked
        ``degenerate`` (see the module docstring). Without it an all-equal sample keeps its
        zero-width interval, still marked.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Interval(math.nan, None, None, 0, None, level)
    if not all(math.isfinite(v) for v in vals):
        return Interval(math.nan, None, None, n, None, level)
    mean = math.fsum(vals) / n
    if n < 2:
        return Interval(mean, None, None, n, None, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    # equal up to the rounding of the subtraction that made them (0.98 − 0.97 ≠ 0.99 − 0.98 in floats)
    degenerate = max(vals) - min(vals) <= 1e-9 * max(1.0, max(abs(v) for v in vals))
    if degenerate:
        sd = float(resolution) if resolution is not None and resolution > 0 else 0.0
    half = half_width(sd, n, level)
    return Interval(mean, mean - half, mean + half, n, sd, level, degenerate)


# ---------------------------------------------------------------------------------------------
# Per-run summaries over seeds (the report's measured tables)
# ---------------------------------------------------------------------------------------------
@dataclass
class Agg:
    """One metric of one run over its seeds.

    :ivar mean: mean over seeds (NaN if any seed is not finite).
    :ivar std: sample standard deviation (ddof = 1) of the finite values; ``None`` for one seed.
    :ivar n: number of seeds.
    :ivar values: the per-seed values.
    :ivar nonfinite: how many seeds gave a NaN or infinity.
    """

    mean: float
    std: float | None
    n: int
    values: list[float]
    nonfinite: int = 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Agg]]:
    """Group rows by ``"run"`` (first-seen order) and aggregate every numeric key but ``"seed"``.

    A ``None`` value counts as not finite (a metric that was never reached, e.g. a diverged run).
    """
    grouped: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        name = str(r.get("run", "?"))
        g = grouped.setdefault(name, {})
        for k, v in r.items():
            if k in ("seed", "run"):
                continue
            if _is_number(v):
                g.setdefault(k, []).append(float(v))
            elif v is None and k in g:
                g[k].append(float("nan"))
            elif v is None and (k.startswith(("test_", "best_", "final_"))):
                g.setdefault(k, []).append(float("nan"))
    out: dict[str, dict[str, Agg]] = {}
    for name, metrics in grouped.items():
        out[name] = {}
        for k, vals in metrics.items():
            finite = [v for v in vals if math.isfinite(v)]
            bad = len(vals) - len(finite)
            mean = sum(vals) / len(vals) if vals and not bad else float("nan")
            std = None
            if len(finite) > 1:
                m = sum(finite) / len(finite)
                std = math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1))
            out[name][k] = Agg(mean, std, len(vals), vals, bad)
    return out
