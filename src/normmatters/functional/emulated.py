r"""Lp batch and layer normalization computed in a low-precision format (SPEC §5, claim C4).

These are :func:`normmatters.functional.lp_batch_norm` / :func:`~normmatters.functional.lp_layer_norm`
with the same arguments, the same formulas (SPEC §2) and the same running statistics, but every
intermediate result held in a format instead of float32. Under ``torch.autocast`` torch keeps
normalization in float32 (layer/group norm) or accumulates its statistics in float32 (batch
norm); this module removes that high-precision arithmetic, which is what the paper's claim C4 is
about: the squares of L2 overflow and lose precision where L1's absolute values do not.

Over the n values of a statistic (per channel for batch norm, per sample for layer norm), with
``c(·)`` rounding to ``compute_dtype`` and ``a(·)`` rounding to ``accumulate_dtype``
(:class:`~normmatters.precision.emulate.Arithmetic`):

.. code-block:: text

    x      = c(input)                           the input as the format holds it
    μ      = a(Σ_a x / n)                       Σ_a: a sum accumulated in accumulate_dtype
    d      = c(x − c(μ))
    L2:    q = c(d·d);  v = a(Σ_a q / n);  σ̂ = a(√v);   s = a(√a(v + eps))
    L1:    q = |d|;     σ̂ = a(C_L1 · a(Σ_a q / n));               s = a(σ̂ + eps)
    L∞:    σ̂ = a(C_∞(n) · max|d|);                                s = a(σ̂ + eps)
    Top(k):σ̂ = a(C_k(n) · a(Σ_a top_k|d| / k));                   s = a(σ̂ + eps)
    x̂      = c(d / c(s));     y = c(c(x̂ · c(γ)) + c(β))

In evaluation ``d = c(x − c(running_mean))`` and ``s = a(√a(running_var + eps))`` (L2, as
torch) or ``a(a(√running_var) + eps)`` (other p, as the functional). ``accumulate_dtype=None``
means ``compute_dtype``: the sums really accumulate in the low format, so they overflow and
swamp (pairwise by default, see :mod:`normmatters.precision.emulate`). The running statistics
are updated in their buffers' dtype from the emulated μ and σ̂: ``running_var ← (1−m)·running_var
+ m·σ̂²·n/(n−1)``, exactly the functional's update (an overflowed σ̂ makes it inf, as it would be).

Gradients come from autograd through the emulated ops with straight-through rounding (optionally
rounding every intermediate gradient too, ``round_grad=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .constants import lp_constant
from .norm import _check_batch_norm_input, _check_float, _check_p_k, _last_dims, _update_running
from .emulate import Arithmetic, _record
from .formats import FloatFormat

__all__ = ["emulated_batch_norm", "emulated_layer_norm", "emulated_dispersion", "emulated_statistics"]

#: what a ``compute_dtype`` / ``accumulate_dtype`` may be: a torch dtype, a format name or object.
DType = str | torch.dtype | FloatFormat


def emulated_statistics(
    x: Tensor, p: float, k: int | None, constant: str, eps: float, ar: Arithmetic
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics over the last axis of ``x`` (already in the compute format), keepdim.

    Returns ``(μ, σ̂, x̂)``: the mean, the dispersion without eps (what running_var records) and the
    normalized values, each computed as in the module doc.
    """
    n = x.shape[-1]
    mean = ar.acc(ar.sum(x) / n)
    d = ar.comp(x - ar.comp(mean))
    _record("centred", d)
    eps_a = ar.constant(eps, x)
    if p == 2.0:
        raw = d * d
        sq = ar.comp(raw)
        _record("square", sq, raw)
        s = ar.sum(sq)
        _record("sum", s)
        var = ar.acc(s / n)
        sigma = ar.acc(torch.sqrt(var))
        denom = ar.acc(torch.sqrt(ar.acc(var + eps_a)))
    else:
        a = d.abs()  # exact in any format
        _record("abs", a)
        c = lp_constant(p, k, n, constant)
        if p == 1.0:
            s = ar.sum(a)
            _record("sum", s)
            m = ar.acc(s / n)
        elif k is None or k == 1:
            m = a.amax(-1, keepdim=True)  # exact
        else:
            if k > n:
                raise ValueError(f"Top(k) needs k <= n values per statistic, got k={k} > n={n}")
            top = a.topk(k, dim=-1, sorted=False).values
            s = ar.sum(top)
            _record("sum", s)
            m = ar.acc(s / k)
        sigma = m if c == 1.0 else ar.acc(m * c)
        denom = ar.acc(sigma + eps_a)
    _record("dispersion", sigma)
    xhat = ar.comp(d / ar.comp(denom))
    return mean, sigma, xhat


def emulated_dispersion(
    x: Tensor,
    *,
    p: float | int | str,
    k: int | None = None,
    constant: str = "calibrated",
    compute_dtype: DType,
    accumulate_dtype: DType | None = None,
    summation: str = "pairwise",
    block_size: int = 32,
) -> Tensor:
    """σ̂ of ``x`` over its last axis, centring included, computed in the format (keepdim).

    The input is first rounded to ``compute_dtype``. Compare with
    ``lp_dispersion(x64 - x64.mean(-1, keepdim=True), -1, p, k, constant)`` in float64.
    """
    p, k = _check_p_k(p, k)
    ar = Arithmetic(compute_dtype, accumulate_dtype, summation=summation, block_size=block_size)
    xc = ar.comp(x)
    _record("input", xc)
    _, sigma, _ = emulated_statistics(xc, p, k, constant, 0.0, ar)
    return sigma


def _affine_last(y: Tensor, weight: Tensor | None, bias: Tensor | None, ar: Arithmetic) -> Tensor:
    if weight is not None:
        y = ar.comp(y * ar.comp(weight))
    if bias is not None:
        y = ar.comp(y + ar.comp(bias))
    return y


def emulated_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
    compute_dtype: DType,
    accumulate_dtype: DType | None = None,
    summation: str = "pairwise",
    block_size: int = 32,
    round_grad: bool = False,
    backend: str = "emulate",
    ghost_batch_size: int | None = None,
) -> Tensor:
    r"""Lp batch norm with its arithmetic in ``compute_dtype`` (see the module doc).

    Arguments as :func:`normmatters.functional.lp_batch_norm`, plus:

    Args:
        compute_dtype: format of every elementwise result: ``torch.float16``,
            ``torch.bfloat16``, ``torch.float8_e4m3fn``, ``torch.float8_e5m2``,
            ``torch.float32`` or a name (``"fp16"``, ``"e4m3"``, ...).
        accumulate_dtype: format of the sums and per-channel statistics; ``None`` = compute_dtype.
        summation: ``"pairwise"`` (default), ``"blocked"`` (``block_size``) or ``"sequential"``.
        round_grad: round every intermediate gradient to the format as well.
        backend: ``"emulate"`` (float32 storage + rounding, any device and format) or
            ``"native"`` (real fp16/bf16 tensors and arithmetic, e.g. on a GPU).

    The output has the input's dtype. With ``compute_dtype=torch.float32`` the result equals the
    functional's up to float32 rounding.

    Example::

        >>> x = 3 * torch.randn(64, 8, 16, 16)           # n = 16384 values per channel
        >>> y2 = emulated_batch_norm(x, None, None, training=True, p=2, compute_dtype=torch.float16)
        >>> y1 = emulated_batch_norm(x, None, None, training=True, p=1, compute_dtype=torch.float16)
        >>> # Σd² ≈ 9·16384 overflows fp16 (σ̂ = inf, x̂ = 0); Σ|d| ≈ 2.4·16384 ≈ 39000 does not
        >>> bool(y2.abs().max() == 0), round(float(y1.std()), 1)
        (True, 1.0)
    """
    where = "emulated_batch_norm"
    _check_batch_norm_input(input, training, eps, where)
    p, k = _check_p_k(p, k)
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{where}: evaluation (training=False) needs running_mean and running_var")
    ar = Arithmetic(compute_dtype, accumulate_dtype, summation=summation, block_size=block_size,
                    round_grad=round_grad, backend=backend)
    if input.numel() == 0:
        return input.clone()

    c = input.shape[1]
    # (N, C, *) -> (C, N·*): each channel's n values on the last axis.
    x = ar.comp(input.transpose(0, 1).reshape(c, -1))
    _record("input", x)
    if training:
        n_total = x.shape[-1]
        per_sample = n_total // input.shape[0]
        if ghost_batch_size is not None and input.shape[0] > ghost_batch_size:
            sizes = [min(ghost_batch_size, input.shape[0] - i) * per_sample
                     for i in range(0, input.shape[0], ghost_batch_size)]
            if sizes[-1] == 1:
                raise ValueError(
                    f"{where}: the last ghost batch has one value per channel (batch of "
                    f"{input.shape[0]} with ghost_batch_size={ghost_batch_size})"
                )
            parts = [emulated_statistics(chunk, p, k, constant, eps, ar) for chunk in x.split(sizes, dim=-1)]
            xhat = torch.cat([part[2] for part in parts], dim=-1)
            mean = torch.stack([part[0].detach().float() for part in parts]).mean(0)
            sigma = torch.stack([part[1].detach().float() for part in parts]).pow(2).mean(0).sqrt()
            n = sizes[0]
        else:
            mean, sigma, xhat = emulated_statistics(x, p, k, constant, eps, ar)
            n = n_total
        if running_mean is not None or running_var is not None:
            _update_running(running_mean, running_var, mean.float(), sigma.float(), n, momentum)
    else:
        rm = running_mean.reshape(c, 1).to(torch.float32)
        rv = running_var.reshape(c, 1).to(torch.float32)
        d = ar.comp(x - ar.comp(rm))
        eps_a = ar.constant(eps, x)
        if p == 2.0:
            denom = ar.acc(torch.sqrt(ar.acc(ar.acc(rv) + eps_a)))
        else:
            denom = ar.acc(ar.acc(torch.sqrt(ar.acc(rv))) + eps_a)
        xhat = ar.comp(d / ar.comp(denom))
    w = None if weight is None else weight.reshape(c, 1)
    b = None if bias is None else bias.reshape(c, 1)
    y = _affine_last(xhat, w, b, ar)
    _record("output", y)
    shape = (c, input.shape[0], *input.shape[2:])
    return y.reshape(shape).transpose(0, 1).to(input.dtype).contiguous()


def emulated_layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
    compute_dtype: DType,
    accumulate_dtype: DType | None = None,
    summation: str = "pairwise",
    block_size: int = 32,
    round_grad: bool = False,
    backend: str = "emulate",
) -> Tensor:
    """Lp layer norm over the trailing ``normalized_shape`` axes, arithmetic in ``compute_dtype``.

    Arguments as :func:`normmatters.functional.lp_layer_norm` plus the precision options of
    :func:`emulated_batch_norm`; the formulas are in the module doc (statistics per sample).
    """
    where = "emulated_layer_norm"
    _check_float(input, where)
    p, k = _check_p_k(p, k)
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    _last_dims(input, normalized_shape, where)
    if eps < 0.0:
        raise ValueError(f"{where}: eps must be non-negative, got {eps}")
    ar = Arithmetic(compute_dtype, accumulate_dtype, summation=summation, block_size=block_size,
                    round_grad=round_grad, backend=backend)
    if input.numel() == 0:
        return input.clone()
    m = math.prod(normalized_shape)
    x = ar.comp(input.reshape(-1, m))
    _record("input", x)
    _, _, xhat = emulated_statistics(x, p, k, constant, eps, ar)
    w = None if weight is None else weight.reshape(1, m)
    b = None if bias is None else bias.reshape(1, m)
    y = _affine_last(xhat, w, b, ar)
    _record("output", y)
    return y.reshape(input.shape).to(input.dtype)
