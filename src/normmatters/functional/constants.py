"""Scale constants that make an Lp dispersion an estimate of the standard deviation.

For Gaussian data every dispersion of ``docs/math.md`` (Hoffer et al. 2018, Sec. 4) is proportional to σ; the constant C makes the
proportionality factor one, so that a Gaussian input gives a unit-variance output:

* L1:  C_L1 = √(π/2), because E|Z| = √(2/π).
* Top(k) (L∞ is Top(1)): C_k(n) = 1 / E[mean of the k largest of n i.i.d. |Z|], Z ~ N(0, 1).
* The paper's code uses C_∞(n) = (1 + √(π·ln 4)) / (2·√(2·ln n)) for every k (``"paper"``).

C_k(n) is computed from an identity for the half-normal order statistics. With F the half-normal
CDF, f its density and Q = F⁻¹, the expected sum of the k largest of n samples is

    E[Σ top-k] = n ∫ x f(x) P(Bin(n−1, 1−F(x)) ≤ k−1) dx.

Substituting u = F(x) turns the binomial tail into the CDF of U ~ Beta(n−k, k), and integrating by
parts with ∫_v^1 Q(u) du = 2φ(Q(v)) gives

    E[mean of top-k] = (n/k) · E_{U ~ Beta(n−k, k)}[ 2 φ(Q(U)) ],    Q(u) = Φ⁻¹((1+u)/2).

The expectation is a smooth one-dimensional integral, evaluated in float64 on a fine grid in the
logit of U (where the Beta density is a narrow, log-concave bump), which is accurate to ~1e-12 for
every n and k; results are cached.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

__all__ = ["C_L1", "CONSTANTS", "topk_constant", "paper_constant", "lp_constant", "normalize_p",
           "parse_norm_options", "traced_constant"]

#: √(π/2): 1 / E|Z| for Z ~ N(0, 1).
C_L1: float = math.sqrt(math.pi / 2.0)

#: The accepted values of ``constant``.
CONSTANTS = ("calibrated", "paper", "none")
_CONSTANTS = CONSTANTS


def normalize_p(p: float | int | str) -> float:
    """Return ``p`` as 1.0, 2.0 or ``inf``; raise ``ValueError`` for anything else."""
    if isinstance(p, str):
        key = p.strip().lower()
        table = {"1": 1.0, "l1": 1.0, "2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf,
                 "infinity": math.inf, "max": math.inf}
        if key not in table:
            raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
        return table[key]
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
    value = float(p)
    if value not in (1.0, 2.0, math.inf):
        raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
    return value


def parse_norm_options(p: float | int | str, k: int | None = None, constant: str = "calibrated",
                       where: str = "") -> tuple[float, int | None]:
    """The one parser of a normalization's ``p``, ``k`` and ``constant``: ``(p, k)`` normalized.

    ``p`` becomes 1.0, 2.0 or ``inf``; ``k`` must be ``None`` or a positive integer, and only with
    ``p=inf`` (Top(k)); ``constant`` one of :data:`CONSTANTS`. Errors name ``where``.
    """
    prefix = f"{where}: " if where else ""
    try:
        p = normalize_p(p)
    except ValueError:
        raise ValueError(f"{prefix}p must be 1, 2 or inf, got p={p!r}") from None
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{prefix}k must be a positive integer or None, got k={k!r}")
        if p != math.inf:
            raise ValueError(f"{prefix}k={k} selects Top(k), which needs p=inf, got p={p}")
    if not isinstance(constant, str) or constant not in CONSTANTS:
        raise ValueError(f"{prefix}constant must be one of {CONSTANTS}, got {constant!r}")
    return p, k


_NORMAL = NormalDist()


@functools.lru_cache(maxsize=4096)
def _expected_topk_mean(n: int, k: int) -> float:
    # numpy and the standard library only, never torch: the first call may happen while
    # torch.export or torch.compile is tracing a model, where torch ops would be traced too.
    if k == n:
        return math.sqrt(2.0 / math.pi)
    a, b = float(n - k), float(k)  # U ~ Beta(a, b); a, b >= 1
    # In t = logit(u) the Beta density ∝ exp(a·logσ(t) + b·logσ(−t)) peaks at log(a/b) with a
    # width of about √(1/a + 1/b). Cover ±45 widths (the density falls below e^-1000 there) on a
    # grid fine enough that the trapezoid rule converges geometrically.
    mode = math.log(a / b)
    width = math.sqrt(1.0 / a + 1.0 / b)
    # The unit Beta(a, 1) / Beta(1, b) cases are skewed: give the light tail more room.
    lo, hi = mode - 45.0 * width - 40.0 / b, mode + 45.0 * width + 40.0 / a
    t = np.linspace(lo, hi, 20001)
    logu = -np.logaddexp(0.0, -t)  # log σ(t)
    log1mu = -np.logaddexp(0.0, t)  # log σ(−t) = log(1 − u), without cancellation
    # log of the density in t: a·log u + b·log(1−u) (the Jacobian du/dt = u(1−u) adds one to each).
    logw = a * logu + b * log1mu
    w = np.exp(logw - logw.max())
    keep = w > 1e-300  # elsewhere the weight underflows and the point contributes nothing
    # Q(u) = Φ⁻¹((1+u)/2) = −Φ⁻¹((1−u)/2), computed from 1−u = σ(−t) without cancellation.
    inv_cdf = _NORMAL.inv_cdf
    q = np.zeros_like(t)
    q[keep] = [-inv_cdf(max(0.5 * math.exp(v), 1e-300)) for v in log1mu[keep]]
    h = 2.0 * np.exp(-0.5 * q * q) / math.sqrt(2.0 * math.pi)  # 2 φ(Q(u))
    expectation = _trapezoid(w * h, t) / _trapezoid(w, t)
    return float(expectation) * n / k


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def topk_constant(n: int, k: int) -> float:
    """C_k(n) = 1 / E[mean of the k largest of n i.i.d. |Z|], Z ~ N(0, 1) (Hoffer et al. 2018, Sec. 4; docs/math.md).

    ``topk_constant(n, 1)`` is the calibrated L∞ constant and ``topk_constant(n, n)`` equals
    :data:`C_L1`. Exact to about 1e-10 relative for every ``1 <= k <= n``; cached.

    Example::

        >>> round(topk_constant(2, 2), 6) == round(C_L1, 6)
        True
    """
    n, k = _check_nk(n, k)
    return 1.0 / _expected_topk_mean(n, k)


def paper_constant(n: int) -> float:
    """The official code's L∞ / Top(k) constant (1 + √(π·ln 4)) / (2·√(2·ln n)).

    It ignores k, and for ResNet-sized n it overestimates σ by 10–45%; offered for
    reproduction only. Undefined for n = 1 (ln 1 = 0).
    """
    n = int(n)
    if n < 2:
        raise ValueError(f"the paper's constant needs n >= 2 values to normalize over, got n={n}")
    return (1.0 + math.sqrt(math.pi * math.log(4.0))) / (2.0 * math.sqrt(2.0 * math.log(n)))


def lp_constant(p: float | int | str, k: int | None, n: int, constant: str = "calibrated") -> float:
    """The multiplier C of the dispersion for norm ``p`` (and ``k``) over ``n`` values.

    Args:
        p: 1, 2 or inf. For p=2 the constant is 1 (the dispersion is the standard deviation).
        k: for p=inf, ``None`` means L∞ (Top(1)); an integer means Top(k). Ignored otherwise.
        n: the number of values each statistic is taken over.
        constant: ``"calibrated"`` (unit variance for Gaussian input), ``"paper"`` (the official
            code's formula) or ``"none"`` (C = 1, the ablation).
    """
    p = normalize_p(p)
    if constant not in _CONSTANTS:
        raise ValueError(f"constant must be one of {_CONSTANTS}, got {constant!r}")
    if p == 2.0 or constant == "none":
        return 1.0
    if p == 1.0:
        return C_L1
    kk = 1 if k is None else k
    n, kk = _check_nk(n, kk)
    if constant == "paper":
        return paper_constant(n)
    return topk_constant(n, kk)


def _check_nk(n: int, k: int) -> tuple[int, int]:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got k={k!r}")
    n, k = int(n), int(k)
    if n < 1:
        raise ValueError(f"need at least one value to normalize over, got n={n}")
    if k > n:
        raise ValueError(f"Top(k) needs k <= n values per statistic, got k={k} > n={n}")
    return n, k


# Giles (2010), "Approximating the erfinv function": a single-precision start for Newton's method.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
                   -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
                -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


def _erfinv(u: Tensor, log1mu: Tensor) -> Tensor:
    """erfinv(u) for u in [0, 1) in float64 from erf, exp and log (``log1mu`` = log(1 − u), exact
    where u is near 1): Giles' approximation, then three Newton steps on erf(y) = u."""
    w = -(log1mu + torch.log1p(u))  # −log(1 − u²)
    central = w - 2.5
    tail = torch.sqrt(w.clamp_min(5.0)) - 3.0
    pc = torch.full_like(w, _ERFINV_CENTRAL[0])
    pt = torch.full_like(w, _ERFINV_TAIL[0])
    for a, b in zip(_ERFINV_CENTRAL[1:], _ERFINV_TAIL[1:]):
        pc = a + pc * central
        pt = b + pt * tail
    y = torch.where(w < 5.0, pc, pt) * u
    # Newton's residual erf(y) − u has an absolute error of about 1e-16, a relative error in y of
    # about 5e-17 / ((1 − u)·y²): it refines y where 1 − u > 1e-10.
    refine = log1mu > math.log(1e-10)
    for _ in range(3):
        step = (torch.erf(y) - u) / (2.0 / math.sqrt(math.pi) * torch.exp(-y * y))
        y = y - torch.where(refine & torch.isfinite(step), step, torch.zeros_like(step))
    # Beyond (y > 4.5), where Giles' start has lost accuracy too: Newton on log erfc(y) = log(1 − u)
    # with six terms of erfc's asymptotic series (about 5e-8 relative in y at y = 4.5, less beyond).
    far = ~refine
    big = (-log1mu).clamp_min(2.0)  # −log(1 − u); the start y² ≈ L − ½·log(L) − ½·log(π)
    y = torch.where(far, torch.sqrt(big - 0.5 * torch.log(big) - 0.5 * math.log(math.pi)), y)
    for _ in range(4):
        z = 1.0 / (y * y).clamp_min(1.0)
        series = 1.0 - 0.5 * z + 0.75 * z * z - 1.875 * z ** 3 + 6.5625 * z ** 4 - 29.53125 * z ** 5
        log_erfc = -y * y - torch.log(y.clamp_min(1.0)) - 0.5 * math.log(math.pi) + torch.log(series)
        step = (log_erfc - log1mu) / -(2.0 * y + 1.0 / y.clamp_min(1.0))
        y = y - torch.where(far & torch.isfinite(step), step, torch.zeros_like(step))
    return y


#: Grid points of :func:`traced_constant`'s quadrature (agrees with :func:`topk_constant` to ~1e-14).
TRACED_GRID = 513


def traced_constant(p: float, k: int | None, n, constant: str, device: torch.device | str | None = None
                    ) -> float | Tensor:
    """C for a size ``n`` that may be symbolic, in torch ops: what a compiled or exported graph uses.

    Under ``torch.compile``'s dynamic shapes or ``torch.export`` with a dynamic dimension, the
    count n of values per statistic is a symbolic integer and C_k(n) cannot be a Python float of
    it (that would specialise the graph to one size). This computes the same quantity as
    :func:`lp_constant` inside the graph, as a 0-d float64 tensor on ``device``: the paper's
    formula directly, and for the calibrated Top(k) / L∞ constant the integral of the module
    docstring, E[mean of top-k] = (n/k)·E_{U ~ Beta(n−k, k)}[2φ(Q(U))], by the trapezoid rule on
    :data:`TRACED_GRID` points in logit(U) (a few small element-wise ops and two sums; agrees with
    :func:`topk_constant` to about 1e-11 for n up to 10⁷ and 1e-9 at 10⁸; a concrete ``n`` gives
    the same tensor). A constant that
    does not depend on n (L1, L2, ``"none"``) is returned as a Python float.
    """
    p = normalize_p(p)
    if p == 2.0 or constant == "none":
        return 1.0
    if p == 1.0:
        return C_L1
    kk = 1 if k is None else int(k)
    nt = torch.ones((), dtype=torch.float64, device=device) * n
    if constant == "paper":
        return (1.0 + math.sqrt(math.pi * math.log(4.0))) / (2.0 * torch.sqrt(2.0 * torch.log(nt)))
    b = float(kk)
    a = (nt - kk).clamp_min(0.5)  # n = k: the L1 value below (clamped to keep the branch finite)
    mode = torch.log(a / b)
    width = torch.sqrt(1.0 / a + 1.0 / b)
    lo = mode - 45.0 * width - 40.0 / b
    hi = mode + 45.0 * width + 40.0 / a
    t = lo + (hi - lo) * torch.linspace(0.0, 1.0, TRACED_GRID, dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    log1mu = -torch.logaddexp(zero, t)  # log(1 − u) = log σ(−t)
    logw = a * -torch.logaddexp(zero, -t) + b * log1mu
    w = torch.exp(logw - logw.amax())
    # Q(u) = Φ⁻¹((1+u)/2) = √2·erfinv(u), by core ATen ops only (erf, exp, log), so that an
    # exported program needs nothing else: u rounds to 1 only where 1 − u < 1e-16, far beyond the
    # weight of any n below 1e12.
    q = math.sqrt(2.0) * _erfinv(torch.exp(-torch.logaddexp(zero, -t)), log1mu)
    wh = w * (torch.exp(-0.5 * q * q) * (2.0 / math.sqrt(2.0 * math.pi)))
    # A uniform grid: the trapezoid rule's spacing cancels in the ratio.
    num = wh.sum() - 0.5 * (wh[0] + wh[-1])
    den = w.sum() - 0.5 * (w[0] + w[-1])
    mean = num / den * nt / b
    return torch.where(nt > b, 1.0 / mean, torch.full_like(mean, C_L1))
