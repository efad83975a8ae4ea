r"""Statistics of the verdicts: Student's t quantiles and the confidence interval of a mean.

Every verdict of ``normmatters reproduce`` compares two runs trained with the same seed (the
same initialization and data order), seed by seed. With the per-seed paired differences
:math:`d_1, \dots, d_n`, their mean :math:`\bar d` and sample standard deviation :math:`s`
(ddof = 1), the two-sided :math:`(1-\alpha)` confidence interval of the mean difference is

.. math::

    \bar d \pm t_{1-\alpha/2,\, n-1} \, s / \sqrt{n},

with :math:`t_{q,\nu}` the q-quantile of Student's t distribution with ν degrees of freedom. With
one seed there is no interval (:math:`s` is undefined).

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

__all__ = ["t_cdf", "t_quantile", "Interval", "mean_interval", "Agg", "aggregate"]


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
    """

    mean: float
    lo: float | None
    hi: float | None
    n: int
    sd: float | None
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None or self.hi is None else 0.5 * (self.hi - self.lo)

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "sd": self.sd, "level": self.level}


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and its t interval: mean ± t_{(1+level)/2, n−1} · sd / √n."""
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
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, level)


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
