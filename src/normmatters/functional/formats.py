r"""Number formats and rounding into them, on any device.

A tensor is *emulated* in a format by keeping it in float32 (or float64) storage while rounding
every value to the nearest number the format represents, with the format's own subnormals and
overflow. Every format here is a subset of float32, so the rounded value is held exactly.

Formats (``FloatFormat``; ``man_bits`` fraction bits, ``emin`` the exponent of the smallest
normal number):

=========  =====  ========  ==========  ======================  =============================
name       bits   man_bits  max         smallest subnormal      overflow (``overflow="format"``)
=========  =====  ========  ==========  ======================  =============================
fp16       16     10        65504       2^-24 ≈ 6.0e-8          ±inf (IEEE 754 binary16)
bf16       16     7         ≈3.39e38    2^-133 ≈ 9.2e-41        ±inf
fp8_e5m2   8      2         57344       2^-16 ≈ 1.5e-5          ±inf (IEEE-like, OCP FP8)
fp8_e4m3   8      3         448         2^-9 ≈ 2.0e-3           NaN: the format has no inf
=========  =====  ========  ==========  ======================  =============================

Round to nearest, ties to even, is IEEE rounding with an unbounded exponent followed by an
overflow check: a value overflows when it rounds to a magnitude above ``max``. For fp16, bf16
and e5m2 (``max`` has an odd significand) the threshold is ``max + ulp/2``; for e4m3 (OCP FP8
"e4m3fn", whose largest significand 1.111₂·2⁸ = 480 is reserved for NaN) a tie at 464 goes to the
even 448 and anything above 464 overflows, to NaN, in the format's non-saturating mode.

What torch's casts do, checked in torch 2.13 and pinned by tests:

* ``x.to(torch.float16 | torch.bfloat16 | torch.float8_e5m2)`` is exactly the behaviour above
  (round to nearest even, subnormals, ±inf on overflow);
* ``x.to(torch.float8_e4m3fn)`` *saturates*: every finite overflow **and ±inf** become ±448 (the
  OCP "satfinite" conversion). The format itself overflows to NaN, so :func:`round_to_format`
  applies that explicitly; ``overflow="saturate"`` gives torch's behaviour (and saturation for
  every format).

Integer formats (``IntFormat``) quantize uniformly, ``q = clamp(round(x / scale), qmin, qmax)``
with ``qmin = −(2^{b−1} − 1)`` (symmetric, "narrow range") and ``qmax = 2^{b−1} − 1``, and return
``q · scale``. Integers saturate on overflow, as quantizers do.

Stochastic rounding rounds ``x`` to one of its two neighbours on the format's grid, up with
probability equal to the distance to the lower one in ulps, so ``E[round(x)] = x`` (Gupta et
al. 2015; Banner et al. 2018 use it for 8-bit gradients).

Example::

    >>> x = torch.tensor([1.0, 300.0, 500.0])
    >>> round_to_format(x, "fp8_e4m3")
    tensor([  1., 288.,  nan])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FloatFormat",
    "IntFormat",
    "FORMATS",
    "get_format",
    "round_to_format",
    "quantize_int",
    "stochastic_round",
]

_OVERFLOW_MODES = ("format", "saturate")
_ROUNDING_MODES = ("nearest", "stochastic")


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with subnormals.

    Attributes:
        name: canonical name (``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ...).
        exp_bits: exponent field width.
        man_bits: fraction (explicit significand) bits; the precision is ``man_bits + 1``.
        emin: exponent of the smallest normal number, 2^emin.
        max: the largest finite value.
        has_inf: whether the format encodes ±inf (e4m3fn does not: overflow is NaN).
        torch_dtype: the torch dtype that stores it natively, if any.
    """

    name: str
    exp_bits: int
    man_bits: int
    emin: int
    max: float
    has_inf: bool
    torch_dtype: torch.dtype | None

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def eps(self) -> float:
        """Machine epsilon, the gap between 1 and the next number: 2^-man_bits."""
        return math.ldexp(1.0, -self.man_bits)

    @property
    def overflow_threshold(self) -> float:
        """``max + ulp(max)/2``: larger magnitudes overflow under round to nearest even.

        A value exactly at the threshold is a tie: it overflows when ``max`` has an odd
        significand (fp16, bf16, e5m2) and rounds down to ``max`` when it is even (e4m3).
        """
        return self.max + 0.5 * math.ldexp(1.0, math.frexp(self.max)[1] - 1 - self.man_bits)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class IntFormat:
    """A symmetric ``bits``-bit integer grid ``{−(2^{b−1}−1), …, 2^{b−1}−1} · scale``."""

    bits: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 32:
            raise ValueError(f"IntFormat: bits must be an integer in [2, 32], got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def __str__(self) -> str:
        return self.name


FP32 = FloatFormat("fp32", 8, 23, -126, float(torch.finfo(torch.float32).max), True, torch.float32)
FP16 = FloatFormat("fp16", 5, 10, -14, 65504.0, True, torch.float16)
BF16 = FloatFormat("bf16", 8, 7, -126, float(torch.finfo(torch.bfloat16).max), True, torch.bfloat16)
FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, -6, 448.0, False, torch.float8_e4m3fn)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, -14, 57344.0, True, torch.float8_e5m2)

#: The float formats by canonical name.
FORMATS: dict[str, FloatFormat] = {f.name: f for f in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2)}

_ALIASES = {
    "float32": "fp32", "single": "fp32",
    "float16": "fp16", "half": "fp16",
    "bfloat16": "bf16",
    "e4m3": "fp8_e4m3", "fp8": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
}
_BY_DTYPE = {f.torch_dtype: f for f in FORMATS.values()}


def get_format(fmt: str | torch.dtype | FloatFormat | IntFormat) -> FloatFormat | IntFormat:
    """Resolve a format from a name, a torch dtype or a format object.

    Names: ``"fp32"``, ``"fp16"``/``"half"``, ``"bf16"``, ``"fp8_e4m3"``/``"e4m3"``/``"fp8"``,
    ``"fp8_e5m2"``/``"e5m2"``, ``"int8"`` (any ``"int<b>"``). Dtypes: ``torch.float32``,
    ``torch.float16``, ``torch.bfloat16``, ``torch.float8_e4m3fn``, ``torch.float8_e5m2``,
    ``torch.int8``.
    """
    if isinstance(fmt, (FloatFormat, IntFormat)):
        return fmt
    if isinstance(fmt, torch.dtype):
        if fmt in _BY_DTYPE:
            return _BY_DTYPE[fmt]
        if fmt == torch.int8:
            return IntFormat(8)
        raise ValueError(
            f"get_format: no emulated format for dtype {fmt}; expected one of "
            f"{[str(d) for d in _BY_DTYPE]} or torch.int8"
        )
    if isinstance(fmt, str):
        key = fmt.strip().lower()
        key = _ALIASES.get(key, key)
        if key in FORMATS:
            return FORMATS[key]
        if key.startswith("int") and key[3:].isdigit():
            return IntFormat(int(key[3:]))
        raise ValueError(
            f"get_format: unknown format {fmt!r}; expected one of {sorted(FORMATS)} "
            f"(or aliases {sorted(_ALIASES)}) or 'int<bits>'"
        )
    raise TypeError(f"get_format: expected a format name, torch.dtype or format object, got {type(fmt).__name__}")


def _check_modes(rounding: str, overflow: str, where: str) -> None:
    if rounding not in _ROUNDING_MODES:
        raise ValueError(f"{where}: rounding must be one of {_ROUNDING_MODES}, got {rounding!r}")
    if overflow not in _OVERFLOW_MODES:
        raise ValueError(f"{where}: overflow must be one of {_OVERFLOW_MODES}, got {overflow!r}")


def _check_tensor(x: Tensor, where: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point tensor, got {x.dtype}")


def _grid_round(x: Tensor, fmt: FloatFormat, stochastic: bool, generator: torch.Generator | None) -> Tensor:
    """Round to the format's grid with an unbounded exponent range above (no overflow yet).

    Computed in float64, where every step is exact: ``x / ulp`` and ``q · ulp`` scale by powers
    of two and the integers involved have at most 25 bits.
    """
    xd = x.to(torch.float64)
    _, e = torch.frexp(xd)  # |x| = m·2^e, m ∈ [0.5, 1): floor(log2|x|) = e − 1
    # Subnormals share the ulp of the smallest normal binade.
    ulp_exp = (torch.clamp(e - 1, min=fmt.emin) - fmt.man_bits).to(torch.float64)
    ulp = torch.exp2(ulp_exp)
    scaled = xd / ulp
    if stochastic:
        u = torch.rand(scaled.shape, dtype=torch.float64, device=scaled.device, generator=generator)
        q = torch.floor(scaled + u)
    else:
        q = torch.round(scaled)  # half to even
    out = q * ulp
    # frexp of 0 / inf / nan: keep those values as they are.
    return torch.where(torch.isfinite(xd), out, xd)


def _apply_overflow(y: Tensor, fmt: FloatFormat, overflow: str) -> Tensor:
    big = y.abs() > fmt.max  # includes ±inf
    if overflow == "saturate":
        return torch.where(big, torch.sign(y) * fmt.max, y).to(y.dtype)
    if fmt.has_inf:
        return torch.where(big, torch.sign(y) * math.inf, y).to(y.dtype)
    return torch.where(big, torch.full_like(y, math.nan), y)


def round_to_format(
    x: Tensor,
    fmt: str | torch.dtype | FloatFormat,
    *,
    rounding: str = "nearest",
    overflow: str = "format",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Round ``x`` to the float format ``fmt``; the result has ``x``'s dtype and device.

    Args:
        x: float32 or float64 tensor (float16/bfloat16 inputs are returned in float32).
        fmt: a float format (see :func:`get_format`).
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased, see module doc).
        overflow: ``"format"`` (the format's own behaviour: ±inf, or NaN for e4m3) or
            ``"saturate"`` (clamp to ±max; ±inf also become ±max).
        generator: random generator for stochastic rounding.

    Round to nearest of a float32 input uses torch's own cast (one rounding, exact) and then
    applies the format's overflow explicitly; float64 inputs and stochastic rounding go through an
    exact float64 grid computation (a float64 → float16 cast may round twice, through float32).

    Example::

        >>> round_to_format(torch.tensor([65519.0, 65520.0]), "fp16")
        tensor([65504.,    inf])
    """
    where = "round_to_format"
    _check_tensor(x, where)
    _check_modes(rounding, overflow, where)
    f = get_format(fmt)
    if isinstance(f, IntFormat):
        raise ValueError(f"{where}: {f.name} needs a scale; use quantize_int")
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if f.name == "fp32" and out_dtype == torch.float32 and rounding == "nearest":
        return x.to(out_dtype)
    if rounding == "nearest" and x.dtype != torch.float64 and f.torch_dtype is not None:
        y = x.to(f.torch_dtype).to(out_dtype)
        if f.name == "fp8_e4m3":
            # torch saturates e4m3 (±inf included); restore the format's overflow to NaN, which
            # happens for |x| > 464 (a tie at 464 rounds to the even 448).
            over = x.to(out_dtype).abs() > f.overflow_threshold
            if overflow == "saturate":
                return y
            return torch.where(over, torch.full_like(y, math.nan), y)
        if overflow == "saturate":
            return _apply_overflow(torch.where(torch.isinf(y), x.to(out_dtype), y), f, "saturate")
        return y
    y = _grid_round(x, f, rounding == "stochastic", generator)
    return _apply_overflow(y, f, overflow).to(out_dtype)


def stochastic_round(
    x: Tensor, fmt: str | torch.dtype | FloatFormat, *, overflow: str = "format",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``round_to_format(x, fmt, rounding="stochastic")``: unbiased, E[result] = x in range."""
    return round_to_format(x, fmt, rounding="stochastic", overflow=overflow, generator=generator)


def quantize_int(
    x: Tensor,
    scale: Tensor | float,
    bits: int = 8,
    *,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Uniform symmetric integer quantization, returned dequantized (``q · scale``).

    .. math::
        q = \mathrm{clamp}(\mathrm{round}(x / s),\ -(2^{b-1}-1),\ 2^{b-1}-1)

    Values beyond the range saturate. ``scale`` broadcasts against ``x`` (a per-tensor float or
    a per-channel tensor); a zero scale (an all-zero tensor) maps everything to zero.

    Example::

        >>> quantize_int(torch.tensor([0.5, 1.26, 300.0]), scale=0.01)
        tensor([0.5000, 1.2600, 1.2700])
    """
    where = "quantize_int"
    _check_tensor(x, where)
    _check_modes(rounding, "saturate", where)
    fmt = IntFormat(bits)
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if (s < 0).any():
        raise ValueError(f"{where}: scale must be non-negative, got min {float(s.min())}")
    safe = torch.where(s > 0, s, torch.ones_like(s))
    scaled = x / safe
    if rounding == "stochastic":
        u = torch.rand(scaled.shape, dtype=scaled.dtype, device=scaled.device, generator=generator)
        q = torch.floor(scaled + u)
    else:
        q = torch.round(scaled)
    q = q.clamp(-fmt.qmax, fmt.qmax)
    return torch.where(s > 0, q * s, torch.zeros_like(q))
