r"""Lp batch and layer normalization computed in a low-precision format (Hoffer et al. 2018, Sec. 5).

These are :func:`normmatters.functional.lp_batch_norm` / :func:`~normmatters.functional.lp_layer_norm`
with the same arguments, the same formulas (Hoffer et al. 2018, Sec. 4; ``docs/math.md``) and
the same running statistics, but every intermediate result held in a format instead of float32.
Under ``torch.autocast`` torch keeps normalization in float32 (layer/group norm) or takes its
statistics in float32 (batch norm); this module removes that high-precision arithmetic, which is
what the paper's low-precision claim is about: the squares of L2 overflow and lose precision where
L1's absolute values do not.

Over the n values of a statistic (per channel for batch norm, per sample for layer norm), with
``c(·)`` rounding to ``compute_dtype`` and ``a(·)`` rounding to ``accumulate_dtype``
(:class:`~normmatters.functional.emulate.Arithmetic`), and ``M_a`` the mean accumulated in
``accumulate_dtype`` (``a(Σ_a · / n)``, or an averaging reduction, see below):

.. code-block:: text

    x      = c(input)                           the input as the format holds it
    μ      = M_a(x)
    d      = c(x − c(μ))
    L2:    q = c(d·d);  v = M_a(q);  σ̂ = a(√v);   s = a(√a(v + eps))
    L1:    q = |d|;     σ̂ = a(C_L1 · M_a(q));              s = a(σ̂ + eps)
    L∞:    σ̂ = a(C_∞(n) · max|d|);                          s = a(σ̂ + eps)
    Top(k):σ̂ = a(C_k(n) · M_a(top_k|d|));                   s = a(σ̂ + eps)
    x̂      = c(d / c(s));     y = c(c(x̂ · c(γ)) + c(β))

In evaluation ``d = c(x − c(running_mean))`` and ``s = a(√a(running_var + eps))`` (L2, as
torch) or ``a(a(√running_var) + eps)`` (other p, as the functional).

Accumulation. ``accumulate_dtype=None`` (the default) is float32: the elementwise work is in the
low format and the sums in float32, as low-precision hardware computes a normalization. In fp16
L2 then fails exactly where its squares overflow (|d| > 256, d² > 65504) while L1 does not.
``accumulate_dtype=`` the low format accumulates the sums in it too; ``summation=`` chooses how
(:mod:`normmatters.functional.emulate`): plain sums (``"pairwise"``, the default order,
``"blocked"``, ``"sequential"``), which overflow once n·mean|d| exceeds the format's max, for L1
as well; or ``"pairwise_mean"`` / ``"blocked_mean"``, which average as they reduce and cannot
overflow.

The running statistics are updated in their buffers' dtype from the emulated μ and σ̂:
``running_var ← (1−m)·running_var + m·σ̂²·n/(n−1)``, exactly the functional's update (an
overflowed σ̂ makes it inf, as it would be); ghost batches are split and merged as the functional
does.

Gradients come from autograd through the emulated ops with straight-through rounding (optionally
rounding every intermediate gradient too, ``round_grad=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .constants import lp_constant, parse_norm_options
from .emulate import Arithmetic, record
from .formats import FloatFormat
from .norm import (
    _selected,
    check_batch_norm_call,
    check_k,
    check_layer_norm_call,
    ghost_merge,
    ghost_split,
    update_running,
)

__all__ = [
    "emulated_batch_norm",
    "emulated_layer_norm",
    "emulated_dispersion",
    "emulated_statistics",
    "batch_norm_in_format",
]

#: what a ``compute_dtype`` / ``accumulate_dtype`` may be: a torch dtype, a format name or object.
DType = str | torch.dtype | FloatFormat

#: ``statistics(x) -> (μ, σ̂, x̂)`` over the last axis of x (C, n), keepdim (see emulated_statistics)
Statistics = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def emulated_statistics(
    x: Tensor, p: float, k: int | None, constant: str, eps: float, ar: Arithmetic
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics over the last axis of ``x`` (already in the compute format), keepdim.

    Returns ``(μ, σ̂, x̂)``: the mean, the dispersion without eps (what running_var records) and the
    normalized values, each computed as in the module doc. ``p`` and ``k`` as
    :func:`normmatters.functional.normalize_p` gives them (a float p, k only with p = inf).
    """
    n = x.shape[-1]
    mean = ar.mean(x)
    d = ar.comp(x - ar.comp(mean))
    record("centred", d)
    eps_a = ar.constant(eps, x)
    if p == 2.0:
        raw = d * d
        sq = ar.comp(raw)
        record("square", sq, raw)
        var = ar.mean(sq, stage="sum")
        sigma = ar.acc(torch.sqrt(var))
        denom = ar.acc(torch.sqrt(ar.acc(var + eps_a)))
    else:
        a = d.abs()  # exact in any format
        record("abs", a)
        c = lp_constant(p, k, n, constant)
        if p == 1.0:
            m = ar.mean(a, stage="sum")
        else:
            check_k(k, n, "emulated_statistics")
            # the positions every path selects (ties: the lowest index), so the gradient of σ̂
            # goes where the reference sends it
            kk = 1 if k is None else k
            mask = _selected(a.detach(), kk)
            if bool((mask.sum(-1) == kk).all()):
                top = a[mask].reshape(*a.shape[:-1], kk)  # in index order
            else:  # a NaN (an overflow in e4m3) defeats the comparisons; it propagates here
                top = a.topk(kk, dim=-1, sorted=False).values
            m = top if k is None or k == 1 else ar.mean(top, stage="sum")  # a max is exact
        sigma = m if c == 1.0 else ar.acc(m * c)
        denom = ar.acc(sigma + eps_a)
    record("dispersion", sigma)
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

    The input is first rounded to ``compute_dtype``; ``accumulate_dtype=None`` sums in float32.
    Compare with ``lp_dispersion(x64 - x64.mean(-1, keepdim=True), -1, p, k, constant)`` in
    float64.

    Example::

        >>> x = 400 * torch.randn(1, 4096)
        >>> s1 = emulated_dispersion(x, p=1, compute_dtype="fp16")        # ≈ 400
        >>> s2 = emulated_dispersion(x, p=2, compute_dtype="fp16")        # inf: d² > 65504
    """
    p, k = parse_norm_options(p, k, constant, "emulated_dispersion")
    ar = Arithmetic(compute_dtype, accumulate_dtype, summation=summation, block_size=block_size)
    xc = ar.comp(x)
    record("input", xc)
    _, sigma, _ = emulated_statistics(xc, p, k, constant, 0.0, ar)
    return sigma


def _affine_last(y: Tensor, weight: Tensor | None, bias: Tensor | None, ar: Arithmetic) -> Tensor:
    if weight is not None:
        y = ar.comp(y * ar.comp(weight))
    if bias is not None:
        y = ar.comp(y + ar.comp(bias))
    return y


def _channels_last_axis(x: Tensor) -> Tensor:
    # (N, C, *) -> (C, N·*): each channel's n values on the last axis, samples in order.
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def batch_norm_in_format(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    statistics: Statistics,
    arithmetic: Arithmetic,
    l2_eval: bool = False,
    ghost_batch_size: int | None = None,
    where: str = "batch_norm_in_format",
) -> Tensor:
    r"""A batch norm whose arithmetic is ``arithmetic``'s and whose batch statistics are ``statistics``'.

    Everything a batch norm does besides its dispersion, once, for every batch norm computed in a
    format (the caller has checked the arguments): the layout (each channel's
    n values on the last axis), ghost batches, the running-statistics update
    ``running_mean ← (1−m)·running_mean + m·μ``, ``running_var ← (1−m)·running_var + m·σ̂²·n/(n−1)``,
    evaluation with the running statistics — x̂ = c(c(x − c(running_mean)) / c(s)) with
    s = a(√a(running_var + eps)) when ``l2_eval`` and a(a(√running_var) + eps) otherwise — and the
    affine y = c(c(x̂·c(γ)) + c(β)).

    Args:
        statistics: ``statistics(x) -> (μ, σ̂, x̂)`` over the last axis of x (C, n), which is
            already in the compute format; :func:`emulated_statistics` for the Lp norms, the
            range of chunks for Range BN (:mod:`normmatters.precision.range_bn`).
        arithmetic: the formats (:class:`~normmatters.functional.emulate.Arithmetic`).
        l2_eval: evaluate as torch's L2 batch norm does (eps inside the square root).
        where: the caller's name in error messages.

    The other arguments are those of :func:`torch.nn.functional.batch_norm`; the output has the
    input's dtype.
    """
    ar = arithmetic
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{where}: evaluation (training=False) needs running_mean and running_var")
    if input.numel() == 0:
        return input.clone()
    c = input.shape[1]
    xc = ar.comp(input)
    record("input", xc)
    if training:
        if ghost_batch_size is not None and input.shape[0] > ghost_batch_size:
            chunks = ghost_split(xc, ghost_batch_size, where)
            means, sigmas, outs = zip(*(statistics(_channels_last_axis(chunk)) for chunk in chunks))
            mean, sigma = ghost_merge(means, sigmas)
            xhat = torch.cat(outs, dim=-1)
            n = outs[0].shape[-1]
        else:
            mean, sigma, xhat = statistics(_channels_last_axis(xc))
            n = xhat.shape[-1]
        if running_mean is not None or running_var is not None:
            update_running(running_mean, running_var, mean.float(), sigma.float(), n, momentum)
    else:
        x = _channels_last_axis(xc)
        rm = running_mean.reshape(c, 1).to(torch.float32)
        rv = running_var.reshape(c, 1).to(torch.float32)
        d = ar.comp(x - ar.comp(rm))
        eps_a = ar.constant(eps, x)
        if l2_eval:
            denom = ar.acc(torch.sqrt(ar.acc(ar.acc(rv) + eps_a)))
        else:
            # √ of the float32 buffer, then rounded: σ̂ is representable where σ̂² (what the buffer
            # holds, torch's convention) may not be, and L1 squares no activation.
            denom = ar.acc(ar.acc(torch.sqrt(rv)) + eps_a)
        xhat = ar.comp(d / ar.comp(denom))
    w = None if weight is None else weight.reshape(c, 1)
    b = None if bias is None else bias.reshape(c, 1)
    y = _affine_last(xhat, w, b, ar)
    record("output", y)
    shape = (c, input.shape[0], *input.shape[2:])
    return y.reshape(shape).transpose(0, 1).to(input.dtype).contiguous()


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
    r"""Lp batch norm with its elementwise arithmetic in ``compute_dtype`` (see the module doc).

    Arguments as :func:`normmatters.functional.lp_batch_norm`, plus:

    Args:
        compute_dtype: format of every elementwise result: ``torch.float16``,
            ``torch.bfloat16``, ``torch.float8_e4m3fn``, ``torch.float8_e5m2``,
            ``torch.float32`` or a name (``"fp16"``, ``"e4m3"``, ...).
        accumulate_dtype: format of the sums and per-channel statistics; ``None`` = float32
            (the default of low-precision hardware). The low format itself accumulates in it.
        summation: how a low ``accumulate_dtype`` reduces: ``"pairwise"`` (default),
            ``"blocked"`` (``block_size``) or ``"sequential"`` sums, which overflow; or
            ``"pairwise_mean"`` / ``"blocked_mean"``, which cannot.
        round_grad: round every intermediate gradient to the format as well.
        backend: ``"emulate"`` (float32 storage + rounding, any device and format) or
            ``"native"`` (real fp16/bf16 tensors and arithmetic, e.g. on a GPU).

    The output has the input's dtype. With ``compute_dtype=torch.float32`` the result equals the
    functional's up to float32 rounding.

    Example::

        >>> x = 400 * torch.randn(16, 8, 16, 16)         # n = 4096 values per channel, |d| > 256
        >>> y2 = emulated_batch_norm(x, None, None, training=True, p=2, compute_dtype=torch.float16)
        >>> y1 = emulated_batch_norm(x, None, None, training=True, p=1, compute_dtype=torch.float16)
        >>> # fp16 squares d² overflow 65504 (σ̂ = inf, x̂ = 0); |d| and its float32 sum do not
        >>> bool(y2.abs().max() == 0), round(float(y1.std()), 1)
        (True, 1.0)
    """
    where = "emulated_batch_norm"
    p, k = check_batch_norm_call(input, running_mean, running_var, weight, bias, training, eps,
                                 p, k, constant, ghost_batch_size, where)
    ar = Arithmetic(compute_dtype, accumulate_dtype, summation=summation, block_size=block_size,
                    round_grad=round_grad, backend=backend)

    def statistics(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return emulated_statistics(x, p, k, constant, eps, ar)

    return batch_norm_in_format(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        statistics=statistics, arithmetic=ar, l2_eval=p == 2.0, ghost_batch_size=ghost_batch_size,
        where=where,
    )


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
    :func:`emulated_batch_norm` (float32 sums by default); the formulas are in the module doc
    (statistics per sample).

    Example::

        >>> x = 400 * torch.randn(8, 1024)
        >>> y = emulated_layer_norm(x, 1024, p=1, compute_dtype=torch.float16)   # finite
    """
    where = "emulated_layer_norm"
    normalized_shape, p, k = check_layer_norm_call(input, normalized_shape, p, k, constant, where)
    if eps < 0.0:
        raise ValueError(f"{where}: eps must be non-negative, got {eps}")
    ar = Arithmetic(compute_dtype, accumulate_dtype, summation=summation, block_size=block_size,
                    round_grad=round_grad, backend=backend)
    if input.numel() == 0:
        return input.clone()
    m = math.prod(normalized_shape)
    x = ar.comp(input.reshape(-1, m))
    record("input", x)
    _, _, xhat = emulated_statistics(x, p, k, constant, eps, ar)
    w = None if weight is None else weight.reshape(1, m)
    b = None if bias is None else bias.reshape(1, m)
    y = _affine_last(xhat, w, b, ar)
    record("output", y)
    return y.reshape(input.shape).to(input.dtype)
