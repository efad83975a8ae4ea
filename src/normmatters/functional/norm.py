r"""Stateless Lp normalizations (SPEC §2): batch, layer, group and RMS norm for p ∈ {1, 2, ∞}.

With d = x − mean(x) over the statistic's axes (n values each), the dispersion σ̂ is

* L2:     √(mean(d²) + eps) — exactly torch's, and at p=2 these functions call torch's kernels;
* L1:     C_L1 · mean(|d|),  C_L1 = √(π/2);
* L∞:     C_∞(n) · max(|d|);
* Top(k): C_k(n) · mean of the k largest |d|;

and x̂ = d / (σ̂ + eps) (L2: d / σ̂), y = γ·x̂ + β. The constants live in
:mod:`normmatters.functional.constants`.

Running statistics follow torch: ``running_mean ← (1−m)·running_mean + m·mean`` and
``running_var ← (1−m)·running_var + m·σ̂²·n/(n−1)`` (σ̂ without eps). At p=2 the last term is
torch's unbiased variance; for the other p the same Bessel factor makes ``running_var`` the same
kind of estimate, so a state dict means the same thing whatever p produced it. In evaluation
x̂ = (x − running_mean) / (√running_var + eps): one square root per channel and no squares of
activations.

These functions are the reference path: plain differentiable torch ops, with gradients from
autograd. Fused kernels (:mod:`normmatters.kernels`) are tested against them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import lp_constant, normalize_p

__all__ = [
    "lp_dispersion",
    "lp_batch_norm",
    "lp_layer_norm",
    "lp_group_norm",
    "lp_rms_norm",
    "batch_norm_statistics",
]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _constant(p: float, k: int | None, n: int, constant: str) -> float:
    # A Python float computed once per shape, which torch.compile must fold in as a constant.
    return lp_constant(p, k, n, constant)


# What torch.compiler.assume_constant_result(_constant) does, without importing torch._dynamo at
# import time (about 3 s per process, paid again by every worker torchrun starts). A test compiles
# a model with fullgraph=True, so a change in torch's mechanism fails loudly.
_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _kernels():
    # Imported on use: normmatters.kernels imports this module.
    from .. import kernels

    return kernels


def _fused_enabled() -> bool:
    """Whether to offer a call to the fused kernels first (p=2 always runs torch's own kernels)."""
    return _kernels().get_backend() == "auto"


def _check_float(input: Tensor, where: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.dtype not in _FLOAT_TYPES:
        raise TypeError(
            f"{where}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )


def _compute_dtype(input: Tensor) -> torch.dtype:
    # Half-precision inputs are computed in float32, as torch's own CPU/cuDNN kernels do; the
    # emulated low-precision path (normmatters.precision) exists for the opposite behaviour.
    return torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _check_p_k(p: float | int | str, k: int | None) -> tuple[float, int | None]:
    p = normalize_p(p)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer or None, got k={k!r}")
        if p != math.inf:
            raise ValueError(f"k={k} selects Top(k), which needs p=inf; got p={p}")
    return p, k


def _topk_mean(a: Tensor, dims: tuple[int, ...], k: int, keepdim: bool) -> Tensor:
    kept = [i for i in range(a.dim()) if i not in dims]
    flat = a.permute(*kept, *dims).reshape(*[a.shape[i] for i in kept], -1)
    out = flat.topk(k, dim=-1, sorted=False).values.mean(-1)
    if keepdim:
        shape = [1 if i in dims else a.shape[i] for i in range(a.dim())]
        out = out.reshape(shape)
    return out


def lp_dispersion(
    d: Tensor,
    dim: int | Sequence[int],
    p: float | int | str,
    k: int | None = None,
    constant: str = "calibrated",
    keepdim: bool = True,
) -> Tensor:
    r"""The scaled dispersion σ̂ of already-centred values ``d`` over ``dim``, without eps.

    .. math::
        σ̂_{L2} = \sqrt{\mathrm{mean}(d^2)},\quad σ̂_{L1} = C_{L1}\,\mathrm{mean}|d|,\quad
        σ̂_{Top(k)} = C_k(n)\,\mathrm{mean}(\mathrm{top}_k |d|)

    Args:
        d: centred tensor.
        dim: the axes each statistic is taken over (n = product of their sizes).
        p: 1, 2 or inf; with p=inf, ``k=None`` is L∞ and an integer k is Top(k).
        constant: ``"calibrated"``, ``"paper"`` or ``"none"`` (see :func:`lp_constant`).

    Example::

        >>> d = torch.randn(4096, dtype=torch.float64)
        >>> float(lp_dispersion(d - d.mean(), 0, p=1))  # ≈ 1 for Gaussian data
    """
    p, k = _check_p_k(p, k)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    dims = tuple(sorted(i % d.dim() for i in dims))
    n = 1
    for i in dims:
        n *= d.shape[i]
    if p == 2.0:
        return d.pow(2).mean(dims, keepdim=keepdim).sqrt()
    c = _constant(p, k, n, constant)
    if p == 1.0:
        s = d.abs().mean(dims, keepdim=keepdim)
    elif k is None or k == 1:
        s = d.abs().amax(dims, keepdim=keepdim)
    else:
        if k > n:
            raise ValueError(f"Top(k) needs k <= n values per statistic, got k={k} > n={n}")
        s = _topk_mean(d.abs(), dims, k, keepdim)
    return s * c


def batch_norm_statistics(
    x: Tensor,
    dims: tuple[int, ...],
    p: float,
    k: int | None,
    constant: str,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Statistics over ``dims`` (all keepdim): ``(mean, d, inv_scale, sigma)``.

    ``d = x − mean``; ``inv_scale`` multiplies d into x̂: 1/(σ̂+eps), or 1/√(σ̂²+eps) at p=2;
    ``sigma`` is σ̂ without eps (what the running statistics record).
    """
    mean = x.mean(dims, keepdim=True)
    d = x - mean
    if p == 2.0:
        var = d.pow(2).mean(dims, keepdim=True)
        return mean, d, torch.rsqrt(var + eps), var.sqrt()
    sigma = lp_dispersion(d, dims, p, k, constant)
    return mean, d, 1.0 / (sigma + eps), sigma


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape([1, -1] + [1] * (ndim - 2))


def _verify_batch_size(size: Sequence[int], where: str) -> None:
    n = size[0]
    for s in size[2:]:
        n *= s
    if n == 1:
        raise ValueError(
            f"{where}: expected more than 1 value per channel when training, "
            f"got input size {list(size)}"
        )


def _check_batch_norm_input(input: Tensor, training: bool, eps: float, where: str) -> None:
    """The inputs every batch norm refuses, as torch's ``F.batch_norm`` does, named by ``where``."""
    _check_float(input, where)
    if input.dim() < 2:
        raise ValueError(f"{where}: expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}D")
    if training:
        _verify_batch_size(input.shape, where)
        if eps <= 0.0:
            raise ValueError(f"{where}: eps must be positive during training, got {eps}")
    elif eps < 0.0:
        raise ValueError(f"{where}: eps must be non-negative, got {eps}")


def lp_batch_norm(
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
    ghost_batch_size: int | None = None,
) -> Tensor:
    r"""Lp batch normalization, with the arguments and semantics of :func:`torch.nn.functional.batch_norm`.

    Statistics are per channel (axis 1) over every other axis. In training the batch statistics
    normalize the input and update ``running_mean`` / ``running_var`` in place (if given) with
    weight ``momentum``; otherwise the running statistics are used. ``ghost_batch_size`` splits a
    training batch into virtual batches of that many samples, each normalized by its own
    statistics; the running statistics are updated once with their average.

    At ``p=2`` without ghost batches this *is* ``F.batch_norm``.

    Example::

        >>> x = torch.randn(32, 8, 5, 5)
        >>> y = lp_batch_norm(x, None, None, training=True, p=1)
    """
    if _fused_enabled():
        out = _kernels().try_batch_norm(input, running_mean, running_var, weight, bias, training,
                                        momentum, eps, p, k, constant, ghost_batch_size)
        if out is not None:
            return out
    return _reference_lp_batch_norm(input, running_mean, running_var, weight, bias, training,
                                    momentum, eps, p=p, k=k, constant=constant,
                                    ghost_batch_size=ghost_batch_size)


def _reference_lp_batch_norm(
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
    ghost_batch_size: int | None = None,
) -> Tensor:
    """The reference path of :func:`lp_batch_norm`: plain torch ops, gradients by autograd."""
    where = "lp_batch_norm"
    _check_batch_norm_input(input, training, eps, where)
    p, k = _check_p_k(p, k)
    if ghost_batch_size is not None and training and input.shape[0] > ghost_batch_size:
        return _ghost_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                                 p, k, constant, ghost_batch_size)
    if p == 2.0:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        # As torch: an empty batch gives an empty output and leaves the statistics alone.
        return input.clone()
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{where}: evaluation (training=False) needs running_mean and running_var")

    ndim = input.dim()
    dims = (0,) + tuple(range(2, ndim))
    x = input.to(_compute_dtype(input))
    if training:
        mean, d, inv, sigma = batch_norm_statistics(x, dims, p, k, constant, eps)
        if running_mean is not None or running_var is not None:
            n = x.numel() // x.shape[1]
            _update_running(running_mean, running_var, mean, sigma, n, momentum)
        xhat = d * inv
    else:
        rm = _channel_view(running_mean, ndim).to(x.dtype)
        rs = _channel_view(running_var, ndim).to(x.dtype).sqrt()
        xhat = (x - rm) / (rs + eps)
    return _affine(xhat, weight, bias, ndim).to(input.dtype)


@torch.no_grad()
def _update_running(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    sigma: Tensor,
    n: int,
    momentum: float,
) -> None:
    if running_mean is not None:
        running_mean.mul_(1.0 - momentum).add_(mean.detach().flatten().to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        unbiased = sigma.detach().flatten().to(running_var.dtype).pow(2) * (n / max(n - 1, 1))
        running_var.mul_(1.0 - momentum).add_(unbiased, alpha=momentum)


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, ndim: int) -> Tensor:
    if weight is not None:
        xhat = xhat * _channel_view(weight, ndim).to(xhat.dtype)
    if bias is not None:
        xhat = xhat + _channel_view(bias, ndim).to(xhat.dtype)
    return xhat


def _ghost_statistics(x: Tensor, ghost_batch_size: int, statistics, where: str):
    """Ghost batches: split ``x`` (N, C, *) along dim 0 into virtual batches of
    ``ghost_batch_size`` samples and run ``statistics(chunk) -> (out, mean, sigma)`` on each.

    Returns ``(outs, mean, sigma, n)``: the chunks' outputs in order; the merge of their
    statistics that the running statistics record — the mean of the means and the root mean
    square of the σ̂ (detached); and n, the values per channel of one ghost batch. Every batch-norm
    path with ghost batches (the reference and the emulated low precision) goes through here.
    """
    chunks = x.split(ghost_batch_size, dim=0)
    if chunks[-1].shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"{where}: the last ghost batch has one value per channel (batch of "
            f"{x.shape[0]} with ghost_batch_size={ghost_batch_size}); choose a batch size that "
            f"leaves at least 2 samples in every ghost batch"
        )
    outs, means, sigmas = [], [], []
    for chunk in chunks:
        out, mean, sigma = statistics(chunk)
        outs.append(out)
        means.append(mean.detach())
        sigmas.append(sigma.detach())
    mean = torch.stack(means).mean(0)
    sigma = torch.stack(sigmas).pow(2).mean(0).sqrt()
    return outs, mean, sigma, chunks[0].numel() // x.shape[1]


def _ghost_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, p, k,
                      constant, ghost_batch_size):
    ndim = input.dim()
    x = input.to(_compute_dtype(input))
    dims = (0,) + tuple(range(2, ndim))

    def statistics(chunk: Tensor):
        mean, d, inv, sigma = batch_norm_statistics(chunk, dims, p, k, constant, eps)
        return d * inv, mean, sigma

    outs, mean, sigma, n = _ghost_statistics(x, ghost_batch_size, statistics, "lp_batch_norm")
    if running_mean is not None or running_var is not None:
        _update_running(running_mean, running_var, mean, sigma, n, momentum)
    return _affine(torch.cat(outs, dim=0), weight, bias, ndim).to(input.dtype)


def _last_dims(input: Tensor, normalized_shape: Sequence[int], where: str) -> tuple[int, ...]:
    shape = tuple(normalized_shape)
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{where}: expected an input whose trailing dimensions are normalized_shape={list(shape)}, "
            f"got input of shape {list(input.shape)}"
        )
    return tuple(range(input.dim() - len(shape), input.dim()))


def lp_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
) -> Tensor:
    """Lp layer normalization over the trailing ``normalized_shape`` axes of each sample.

    Arguments and semantics of :func:`torch.nn.functional.layer_norm`; at ``p=2`` it calls it.
    """
    if _fused_enabled():
        out = _kernels().try_layer_norm(input, normalized_shape, weight, bias, eps, p, k, constant)
        if out is not None:
            return out
    return _reference_lp_layer_norm(input, normalized_shape, weight, bias, eps, p=p, k=k,
                                    constant=constant)


def _reference_lp_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
) -> Tensor:
    """The reference path of :func:`lp_layer_norm`."""
    where = "lp_layer_norm"
    _check_float(input, where)
    p, k = _check_p_k(p, k)
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = _last_dims(input, normalized_shape, where)
    if p == 2.0:
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    if input.numel() == 0:
        return input.clone()
    x = input.to(_compute_dtype(input))
    _, d, inv, _ = batch_norm_statistics(x, dims, p, k, constant, eps)
    y = d * inv
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


def lp_group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
) -> Tensor:
    """Lp group normalization: statistics per sample and group of ``C / num_groups`` channels.

    Arguments and semantics of :func:`torch.nn.functional.group_norm`; at ``p=2`` it calls it.
    """
    if _fused_enabled():
        out = _kernels().try_group_norm(input, num_groups, weight, bias, eps, p, k, constant)
        if out is not None:
            return out
    return _reference_lp_group_norm(input, num_groups, weight, bias, eps, p=p, k=k,
                                    constant=constant)


def _reference_lp_group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
) -> Tensor:
    """The reference path of :func:`lp_group_norm`."""
    where = "lp_group_norm"
    _check_float(input, where)
    p, k = _check_p_k(p, k)
    if input.dim() < 2:
        raise ValueError(f"{where}: expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}D")
    c = input.shape[1]
    if c % num_groups != 0:
        raise ValueError(f"{where}: {c} channels are not divisible into num_groups={num_groups}")
    if p == 2.0:
        return F.group_norm(input, num_groups, weight, bias, eps)
    if input.numel() == 0:
        return input.clone()
    x = input.to(_compute_dtype(input))
    g = x.reshape(x.shape[0], num_groups, -1)
    _, d, inv, _ = batch_norm_statistics(g, (2,), p, k, constant, eps)
    y = (d * inv).reshape(x.shape)
    return _affine(y, weight, bias, x.dim()).to(input.dtype)


def lp_rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
) -> Tensor:
    """Lp RMS normalization: like layer norm without centring, σ̂ taken of x itself.

    Arguments and semantics of :func:`torch.nn.functional.rms_norm` (``eps=None`` means the
    input dtype's machine epsilon); at ``p=2`` it calls it.
    """
    if _fused_enabled():
        out = _kernels().try_rms_norm(input, normalized_shape, weight, eps, p, k, constant)
        if out is not None:
            return out
    return _reference_lp_rms_norm(input, normalized_shape, weight, eps, p=p, k=k,
                                  constant=constant)


def _reference_lp_rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    p: float | int | str = 2,
    k: int | None = None,
    constant: str = "calibrated",
) -> Tensor:
    """The reference path of :func:`lp_rms_norm`."""
    where = "lp_rms_norm"
    _check_float(input, where)
    p, k = _check_p_k(p, k)
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = _last_dims(input, normalized_shape, where)
    if p == 2.0:
        return F.rms_norm(input, normalized_shape, weight, eps)
    if input.numel() == 0:
        return input.clone()
    x = input.to(_compute_dtype(input))
    e = torch.finfo(input.dtype).eps if eps is None else eps
    y = x / (lp_dispersion(x, dims, p, k, constant) + e)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(input.dtype)
