r"""Range batch normalization (Banner, Hubara, Hoffer & Soudry 2018, "Scalable methods for 8-bit
training of neural networks", §5; SPEC §5).

Range BN replaces the standard deviation by the range of the centred values, which needs only
a max and a min — no squares — and so survives low precision. The n values of a channel are
split into ``num_chunks`` equal chunks of m values (along the batch), and

.. math::
    \hat\sigma = C_R(m)\cdot\frac{1}{\#\text{chunks}}\sum_{\text{chunks}}
        \big(\max_j d_j - \min_j d_j\big),\qquad d = x - \mathrm{mean}(x),

    y = \gamma\,\frac{d}{\hat\sigma + \epsilon} + \beta .

Constants (``constant=``):

* ``"calibrated"`` (default): C_R(m) = 1 / E[range of m i.i.d. N(0, 1)], so Gaussian input gives
  unit-variance output. E[R_m] = 2 ∫₀^∞ (1 − Φ(x)^m − Φ(−x)^m) dx, evaluated in float64 (cached).
* ``"paper"``: Banner et al.'s C(m) = 1 / √(2·ln m), from E[max] ≈ σ√(2 ln m). It estimates 2σ
  for large m (output standard deviation ≈ 0.5) — harmless under a learned γ.
* ``"none"``: C = 1.

Running statistics and evaluation are those of the Lp batch norms
(:func:`normmatters.functional.lp_batch_norm`): ``running_var ← (1−m)·running_var + m·σ̂²·n/(n−1)``
and x̂ = (x − running_mean) / (√running_var + eps). Like the L∞ batch norm (which reads max|d|),
Range BN reads only the extremes of each chunk, exact in any format.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..functional.norm import _check_batch_norm_input, _update_running
from ..nn.batchnorm import _LpNormBase
from ..functional.emulate import Arithmetic, _record

__all__ = ["expected_range", "range_constant", "range_batch_norm", "RangeBatchNorm1d", "RangeBatchNorm2d"]

_CONSTANTS = ("calibrated", "paper", "none")


@functools.lru_cache(maxsize=1024)
def expected_range(m: int) -> float:
    """E[max − min] of m i.i.d. N(0, 1) samples (0 for m = 1; 2/√π for m = 2)."""
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ValueError(f"expected_range: m must be a positive integer, got {m!r}")
    m = int(m)
    if m == 1:
        return 0.0
    # The integrand is 1 on [0, ~√(2 ln m)) and falls to 0 within a few tenths after it; by 14
    # it is below 1e-40 for any m < 1e12.
    x = torch.linspace(0.0, 14.0, 280001, dtype=torch.float64)
    lower = torch.exp(m * torch.special.log_ndtr(x))      # Φ(x)^m
    upper = torch.exp(m * torch.special.log_ndtr(-x))     # Φ(−x)^m
    return float(2.0 * torch.trapezoid(1.0 - lower - upper, x))


def range_constant(m: int, constant: str = "calibrated") -> float:
    """C_R(m) for chunks of m values (see the module doc)."""
    if constant not in _CONSTANTS:
        raise ValueError(f"range_constant: constant must be one of {_CONSTANTS}, got {constant!r}")
    if isinstance(m, bool) or int(m) != m or m < 2:
        raise ValueError(f"range_constant: a range needs chunks of m >= 2 values, got m={m!r}")
    if constant == "none":
        return 1.0
    if constant == "paper":
        return 1.0 / math.sqrt(2.0 * math.log(int(m)))
    return 1.0 / expected_range(int(m))


def range_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    num_chunks: int = 1,
    constant: str = "calibrated",
    compute_dtype: Any = None,
    accumulate_dtype: Any = None,
) -> Tensor:
    """Range batch norm with the arguments of :func:`torch.nn.functional.batch_norm`.

    ``compute_dtype`` / ``accumulate_dtype`` run it emulated in a format, as
    :func:`normmatters.precision.emulated_batch_norm` does (``None``: float32).

    Example::

        >>> x = torch.randn(32, 8, 4, 4)
        >>> y = range_batch_norm(x, None, None, training=True, num_chunks=4)
    """
    where = "range_batch_norm"
    _check_batch_norm_input(input, training, eps, where)
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"{where}: num_chunks must be a positive integer, got {num_chunks!r}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{where}: evaluation (training=False) needs running_mean and running_var")
    if input.numel() == 0:
        return input.clone()
    ar = Arithmetic(torch.float32 if compute_dtype is None else compute_dtype, accumulate_dtype)
    c = input.shape[1]
    x = ar.comp(input.transpose(0, 1).reshape(c, -1))
    _record("input", x)
    n = x.shape[-1]
    eps_a = ar.constant(eps, x)
    if training:
        if n % num_chunks != 0 or n // num_chunks < 2:
            raise ValueError(
                f"{where}: the {n} values per channel must split into num_chunks={num_chunks} "
                f"equal chunks of at least 2 values"
            )
        m = n // num_chunks
        mean = ar.acc(ar.sum(x) / n)
        d = ar.comp(x - ar.comp(mean))
        chunks = d.reshape(c, num_chunks, m)
        ranges = ar.acc(chunks.amax(-1) - chunks.amin(-1))  # (C, chunks): a per-statistic op
        r = ar.acc(ar.sum(ranges) / num_chunks)
        cst = range_constant(m, constant)
        sigma = r if cst == 1.0 else ar.acc(r * cst)
        _record("dispersion", sigma)
        if running_mean is not None or running_var is not None:
            _update_running(running_mean, running_var, mean.float(), sigma.float(), n, momentum)
        xhat = ar.comp(d / ar.comp(ar.acc(sigma + eps_a)))
    else:
        rm = running_mean.reshape(c, 1).to(torch.float32)
        rv = running_var.reshape(c, 1).to(torch.float32)
        d = ar.comp(x - ar.comp(rm))
        xhat = ar.comp(d / ar.comp(ar.acc(ar.acc(torch.sqrt(ar.acc(rv))) + eps_a)))
    y = xhat
    if weight is not None:
        y = ar.comp(y * ar.comp(weight.reshape(c, 1)))
    if bias is not None:
        y = ar.comp(y + ar.comp(bias.reshape(c, 1)))
    _record("output", y)
    return y.reshape(c, input.shape[0], *input.shape[2:]).transpose(0, 1).to(input.dtype).contiguous()


class _RangeBatchNorm(_LpNormBase):
    """Shared module code: parameters, buffers and state dicts as ``nn.BatchNorm2d``."""

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        num_chunks: int = 1,
        constant: str = "calibrated",
        compute_dtype: Any = None,
        accumulate_dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, p="inf", constant=constant, compute_dtype=compute_dtype,
                         accumulate_dtype=accumulate_dtype)
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"{type(self).__name__}: num_chunks must be a positive integer, got {num_chunks!r}")
        self.num_chunks = num_chunks

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"track_running_stats={self.track_running_stats}, num_chunks={self.num_chunks}, "
             f"constant={self.constant!r}")
        if self.compute_dtype is not None:
            s += f", compute_dtype={self.compute_dtype}"
        if self.accumulate_dtype is not None:
            s += f", accumulate_dtype={self.accumulate_dtype}"
        return s

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        if input.dim() not in self._expected_dims:
            raise ValueError(f"{name}: expected a {' or '.join(f'{d}D' for d in self._expected_dims)} "
                             f"input, got {input.dim()}D input of shape {list(input.shape)}")
        self._check_channels(input)
        bn_training, factor, running_mean, running_var = self._batch_norm_state()
        return range_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps,
            num_chunks=self.num_chunks, constant=self.constant, compute_dtype=self.compute_dtype, accumulate_dtype=self.accumulate_dtype,
        )


class RangeBatchNorm1d(_RangeBatchNorm):
    """Range batch norm for (N, C) or (N, C, L) input; see :mod:`normmatters.precision.range_bn`.

    Example::

        >>> m = RangeBatchNorm1d(16, num_chunks=4)
        >>> y = m(torch.randn(32, 16, 10))
    """

    _expected_dims = (2, 3)


class RangeBatchNorm2d(_RangeBatchNorm):
    """Range batch norm for (N, C, H, W) input; see :mod:`normmatters.precision.range_bn`.

    Example::

        >>> m = RangeBatchNorm2d(16)
        >>> y = m(torch.randn(8, 16, 5, 5))
    """

    _expected_dims = (4,)
