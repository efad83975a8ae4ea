r"""Range batch normalization (Banner, Hubara, Hoffer & Soudry 2018, "Scalable methods for 8-bit
training of neural networks", Sec. 5; Hoffer et al. 2018, Sec. 5).

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

Range BN is a kind of its own, not an Lp batch norm: its modules derive from
:class:`normmatters.nn.BatchNormBase` (torch's parameters, buffers, momentum and state dicts), so
the Lp converters (``convert_sync_lp_batchnorm``, ``convert_norms``) leave it alone. Everything
but the dispersion is the shared batch norm computed in a format
(:func:`normmatters.functional.emulated.batch_norm_in_format`): running statistics
``running_var ← (1−m)·running_var + m·σ̂²·n/(n−1)``, evaluation
x̂ = (x − running_mean) / (√running_var + eps), the affine. Like the L∞ batch norm (which reads
max|d|), Range BN reads only the extremes of each chunk, exact in any format.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..functional.emulate import Arithmetic, record
from ..functional.emulated import batch_norm_in_format
from ..functional.norm import check_batch_norm_input
from ..nn.batchnorm import BatchNormBase

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


def _check_num_chunks(num_chunks: Any, where: str) -> None:
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"{where}: num_chunks must be a positive integer, got {num_chunks!r}")


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
    summation: str = "pairwise",
    block_size: int = 32,
    round_grad: bool = False,
) -> Tensor:
    """Range batch norm with the arguments of :func:`torch.nn.functional.batch_norm`.

    ``compute_dtype`` / ``accumulate_dtype`` / ``summation`` run it emulated in a format, as
    :func:`normmatters.precision.emulated_batch_norm` does (``compute_dtype=None``: float32;
    ``accumulate_dtype=None``: float32 sums).

    Example::

        >>> x = torch.randn(32, 8, 4, 4)
        >>> y = range_batch_norm(x, None, None, training=True, num_chunks=4)
    """
    where = "range_batch_norm"
    check_batch_norm_input(input, training, eps, where)
    _check_num_chunks(num_chunks, where)
    if constant not in _CONSTANTS:
        raise ValueError(f"{where}: constant must be one of {_CONSTANTS}, got {constant!r}")
    ar = Arithmetic(torch.float32 if compute_dtype is None else compute_dtype, accumulate_dtype,
                    summation=summation, block_size=block_size, round_grad=round_grad)

    def statistics(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c, n = x.shape
        if n % num_chunks != 0 or n // num_chunks < 2:
            raise ValueError(
                f"{where}: the {n} values per channel must split into num_chunks={num_chunks} "
                f"equal chunks of at least 2 values"
            )
        m = n // num_chunks
        mean = ar.mean(x)
        d = ar.comp(x - ar.comp(mean))
        chunks = d.reshape(c, num_chunks, m)
        ranges = ar.acc(chunks.amax(-1) - chunks.amin(-1))  # (C, chunks): a per-statistic op
        r = ar.mean(ranges)
        cst = range_constant(m, constant)
        sigma = r if cst == 1.0 else ar.acc(r * cst)
        record("dispersion", sigma)
        xhat = ar.comp(d / ar.comp(ar.acc(sigma + ar.constant(eps, x))))
        return mean, sigma, xhat

    return batch_norm_in_format(input, running_mean, running_var, weight, bias, training, momentum,
                                eps, statistics=statistics, arithmetic=ar, where=where)


class _RangeBatchNorm(BatchNormBase):
    """Range BN modules: :class:`~normmatters.nn.BatchNormBase` (parameters, buffers, momentum and
    state dicts as ``nn.BatchNorm2d``) with the Range dispersion; not an Lp batch norm."""

    __constants__ = BatchNormBase.__constants__ + ["num_chunks", "constant"]

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
        precision_kwargs: dict[str, Any] | None = None,
    ) -> None:
        name = type(self).__name__
        _check_num_chunks(num_chunks, name)
        if constant not in _CONSTANTS:
            raise ValueError(f"{name}: constant must be one of {_CONSTANTS}, got {constant!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.num_chunks = num_chunks
        self.constant = constant
        self.compute_dtype = compute_dtype
        self.accumulate_dtype = accumulate_dtype
        self.precision_kwargs = dict(precision_kwargs or {})

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
        self._check_input_dim(input)
        self.check_channels(input)
        bn_training, factor, running_mean, running_var = self.batch_norm_state()
        return range_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps,
            num_chunks=self.num_chunks, constant=self.constant, compute_dtype=self.compute_dtype,
            accumulate_dtype=self.accumulate_dtype, **self.precision_kwargs,
        )


class RangeBatchNorm1d(_RangeBatchNorm):
    """Range batch norm for (N, C) or (N, C, L) input; see :mod:`normmatters.precision.range_bn`.

    Example::

        >>> m = RangeBatchNorm1d(16, num_chunks=4)
        >>> y = m(torch.randn(32, 16, 10))
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: expected a 2D or 3D input, got {input.dim()}D "
                             f"input of shape {list(input.shape)}")


class RangeBatchNorm2d(_RangeBatchNorm):
    """Range batch norm for (N, C, H, W) input; see :mod:`normmatters.precision.range_bn`.

    Example::

        >>> m = RangeBatchNorm2d(16)
        >>> y = m(torch.randn(8, 16, 5, 5))
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected a 4D input, got {input.dim()}D "
                             f"input of shape {list(input.shape)}")
