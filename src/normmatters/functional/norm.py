r"""Stateless Lp normalizations: batch, layer, group and RMS norm for p ∈ {1, 2, ∞}.

With d = x − mean(x) over the statistic's axes (n values each), the dispersion σ̂ is
(Hoffer et al. 2018, Sec. 4; the derivations are in ``docs/math.md``)

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
activations, i.e. one per-channel affine y = a·x + b (:func:`eval_affine`).

Ties. Where several positions share the largest |d| (L∞) or the k-th largest (Top(k)), the
selection takes the lowest within-statistic index first (for batch norm the index n·S + s of
sample n and spatial position s; for the synchronized batch norm the index in the concatenated
batch). Every path — this reference, the fused CPU and Triton kernels, the synchronized batch
norm — selects the same positions, so the gradient of σ̂ goes to the same place everywhere.

Closed-form backward (Hoffer et al. 2018, Sec. 4; ``docs/math.md``). With g = γ·∂L/∂y,
d = x − μ, inv = 1/(σ̂ + eps) and w = ∂σ̂/∂d,

.. math::
    \frac{\partial L}{\partial x_j} = inv\,\Big(g_j - \frac{\sum g}{n}\Big)
        - inv^2 \Big(\sum g\,d\Big) \Big(w_j - \frac{\sum w}{n}\Big),

w = d·inv/n (L2, where Σw = 0), C_L1·sign(d)/n (L1), C_k·sign(d)·[d selected]/k (Top(k), L∞
being k = 1). :func:`closed_form_sums` gives the three sums (Σg, Σg·d, Σ of the sign pattern),
which the synchronized batch norm all-reduces, and :func:`closed_form_grad` the gradient from them;
the fused kernels compute the same sums in compiled code, and their double backward uses these
functions, which are differentiable.

The public functions check their arguments once and hand the call to the dispatcher that
:mod:`normmatters.kernels` installs (:func:`install_dispatcher`), which runs a fused backend where
one applies and the reference functions of this module (plain differentiable torch ops, gradients
by autograd) otherwise; the fused backends are tested against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import C_L1, lp_constant, parse_norm_options, traced_constant

__all__ = [
    "lp_dispersion",
    "lp_batch_norm",
    "lp_layer_norm",
    "lp_group_norm",
    "lp_rms_norm",
    "batch_norm_statistics",
    "update_running",
    "eval_affine",
    "ghost_split",
    "ghost_merge",
    "closed_form_sums",
    "closed_form_grad",
    "selection_pattern",
    "topk_mask",
    "check_float",
    "check_batch_norm_input",
    "check_batch_norm_call",
    "check_layer_norm_call",
    "check_group_norm_call",
    "check_rms_norm_call",
    "reference_batch_norm",
    "reference_layer_norm",
    "reference_group_norm",
    "reference_rms_norm",
    "install_dispatcher",
]

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_TYPES = FLOAT_TYPES


def _constant(p: float, k: int | None, n, constant: str,
              device: torch.device | None = None) -> float | Tensor:
    """The constant of a dispersion over n values: a Python float in eager mode (cached per n) and
    wherever it does not depend on n (L1, L2, ``"none"``); while compiling or exporting, for L∞ and
    Top(k), a 0-d tensor computed in the graph (:func:`traced_constant`), so that n may be
    symbolic (dynamic shapes, a dynamic batch in ``torch.export``): never a Python float of a
    symbolic size. (Dynamo shows a symbolic size to Python as an ``int``, so under torch.compile
    the choice is made by mode, not by type; with static sizes inductor folds the expression.)"""
    if p == 2.0 or constant == "none":
        return 1.0
    if p == 1.0:
        return C_L1
    if _dynamo_compiling() or not isinstance(n, int):
        return traced_constant(p, k, n, constant, device)
    return lp_constant(p, k, n, constant)


# Under dynamo a symbolic size looks like an int to Python; elsewhere (eager, non-strict export)
# isinstance tells a symbolic size from a concrete one.
_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


#: The constant of a dispersion over n values (see :func:`_constant`).
dispersion_constant = _constant


# ---------------------------------------------------------------------------------------- checks
def check_float(input: Tensor, where: str) -> None:
    """Refuse anything but a floating-point tensor (float16, bfloat16, float32, float64)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.dtype not in FLOAT_TYPES:
        raise TypeError(
            f"{where}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )


_check_float = check_float


def _check_p_k(p: float | int | str, k: int | None) -> tuple[float, int | None]:
    return parse_norm_options(p, k)


def _compute_dtype(input: Tensor) -> torch.dtype:
    # Half-precision inputs are computed in float32, as torch's own CPU/cuDNN kernels do; the
    # emulated low-precision path exists for the opposite behaviour.
    return torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype


compute_dtype = _compute_dtype


def _verify_batch_size(size: Sequence[int], where: str) -> None:
    n = size[0]
    for s in size[2:]:
        n *= s
    if n == 1:
        raise ValueError(
            f"{where}: expected more than 1 value per channel when training, "
            f"got input size {list(size)}"
        )


def check_batch_norm_input(input: Tensor, training: bool, eps: float, where: str) -> None:
    """The inputs every batch norm refuses, as torch's ``F.batch_norm`` does, named by ``where``."""
    check_float(input, where)
    if input.dim() < 2:
        raise ValueError(f"{where}: expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}D")
    if training:
        _verify_batch_size(input.shape, where)
        if eps <= 0.0:
            raise ValueError(f"{where}: eps must be positive during training, got {eps}")
    elif eps < 0.0:
        raise ValueError(f"{where}: eps must be non-negative, got {eps}")


_check_batch_norm_input = check_batch_norm_input


def check_k(k: int | None, n: int, where: str, what: str = "statistic") -> None:
    """Top(k) needs at least k values per statistic."""
    if k is not None and n > 0 and k > n:
        raise ValueError(f"{where}: Top(k) needs k <= n values per {what}, got k={k} > n={n}")


def _check_vector(t: Tensor | None, name: str, size: int, where: str) -> None:
    if t is not None and t.numel() != size:  # torch's rule: one value per channel
        raise ValueError(f"{where}: expected {name} of shape [{size}] (one value per channel), "
                         f"got {name} of shape {list(t.shape)}")


def check_batch_norm_call(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                          weight: Tensor | None, bias: Tensor | None, training: bool, eps: float,
                          p: float | int | str, k: int | None, constant: str,
                          ghost_batch_size: int | None, where: str = "lp_batch_norm",
                          ) -> tuple[float, int | None]:
    """Every check of a batch-norm call, once; returns the parsed ``(p, k)``."""
    check_batch_norm_input(input, training, eps, where)
    p, k = parse_norm_options(p, k, constant, where)
    c = input.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _check_vector(t, name, c, where)
    if not training and p != 2.0 and (running_mean is None or running_var is None):
        raise ValueError(f"{where}: evaluation (training=False) needs running_mean and running_var")
    if training and k is not None and input.numel() > 0:
        batch = input.shape[0]
        if ghost_batch_size is not None:
            batch = min(batch, ghost_batch_size)
        check_k(k, input.numel() // (input.shape[0] * c) * batch, where, "channel")
    return p, k


def _last_dims(input: Tensor, normalized_shape: Sequence[int], where: str) -> tuple[int, ...]:
    shape = tuple(normalized_shape)
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{where}: expected an input whose trailing dimensions are normalized_shape={list(shape)}, "
            f"got input of shape {list(input.shape)}"
        )
    return tuple(range(input.dim() - len(shape), input.dim()))


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def check_layer_norm_call(input: Tensor, normalized_shape: int | Sequence[int], p: float | int | str,
                          k: int | None, constant: str, where: str = "lp_layer_norm",
                          ) -> tuple[tuple[int, ...], float, int | None]:
    """Every check of a layer-norm (or RMS-norm) call; returns ``(normalized_shape, p, k)``."""
    check_float(input, where)
    p, k = parse_norm_options(p, k, constant, where)
    shape = _as_shape(normalized_shape)
    _last_dims(input, shape, where)
    check_k(k, math.prod(shape), where)
    return shape, p, k


def check_rms_norm_call(input: Tensor, normalized_shape: int | Sequence[int], p: float | int | str,
                        k: int | None, constant: str, where: str = "lp_rms_norm",
                        ) -> tuple[tuple[int, ...], float, int | None]:
    return check_layer_norm_call(input, normalized_shape, p, k, constant, where)


def check_group_norm_call(input: Tensor, num_groups: int, p: float | int | str, k: int | None,
                          constant: str, where: str = "lp_group_norm") -> tuple[float, int | None]:
    """Every check of a group-norm call; returns ``(p, k)``."""
    check_float(input, where)
    p, k = parse_norm_options(p, k, constant, where)
    if input.dim() < 2:
        raise ValueError(f"{where}: expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}D")
    c = input.shape[1]
    if c % num_groups != 0:
        raise ValueError(f"{where}: {c} channels are not divisible into num_groups={num_groups}")
    if input.shape[0] > 0:
        check_k(k, input[0].numel() // num_groups, where)
    return p, k


# ------------------------------------------------------------------------------------ statistics
def _by_statistic(a: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``a`` with the kept axes first and each statistic's values flattened last, in index order."""
    kept = [i for i in range(a.dim()) if i not in dims]
    return a.permute(*kept, *dims).reshape(*[a.shape[i] for i in kept], -1)


def _unflatten_kept(out: Tensor, a: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    if keepdim:
        out = out.reshape([1 if i in dims else a.shape[i] for i in range(a.dim())])
    return out


def topk_mask(flat: Tensor, k: int) -> Tensor:
    """Mask of the k largest values along the last axis, ties to the lowest index (the tie rule).

    With t the k-th largest value: every value above t, then the first of those equal to t (by
    index) until k are taken. Plain ops (``topk``, comparisons, ``cumsum``) that every exporter
    knows.
    """
    t = flat.topk(k, dim=-1).values[..., -1:]
    above = flat > t
    level = flat == t
    room = k - above.sum(-1, keepdim=True)
    return above | (level & (level.cumsum(-1) <= room))


_selected = topk_mask


def _topk_mean(a: Tensor, dims: tuple[int, ...], k: int, keepdim: bool) -> Tensor:
    flat = _by_statistic(a, dims)
    mask = _selected(flat.detach(), k)
    picked = torch.where(mask, flat, torch.zeros_like(flat))
    out = picked.sum(-1, dtype=_sum_dtype(picked)).div(k).to(flat.dtype)
    return _unflatten_kept(out, a, dims, keepdim)


def selection_pattern(d: Tensor, dims: tuple[int, ...], k: int | None) -> Tensor:
    """sign(d) at the positions Top(k) selects (L∞: k = 1), zero elsewhere; the tie rule above."""
    kk = 1 if k is None else k
    flat = _by_statistic(d.detach(), dims)
    mask = _selected(flat.abs(), kk)
    pat = flat.sign() * mask
    kept = [i for i in range(d.dim()) if i not in dims]
    shape = [d.shape[i] for i in kept] + [d.shape[i] for i in dims]
    order = kept + list(dims)
    inverse = [order.index(i) for i in range(d.dim())]
    return pat.reshape(shape).permute(*inverse)


def _sum_dtype(x: Tensor) -> torch.dtype:
    # float32 sums run in float64, as torch's CPU batch norm accumulates: a sum of float32 values
    # near 1e38 stays finite.
    return torch.float64 if x.dtype == torch.float32 else x.dtype


def _mean(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.mean(dims, keepdim=True, dtype=_sum_dtype(x)).to(x.dtype)


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
    p, k = parse_norm_options(p, k, constant)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    dims = tuple(sorted(i % d.dim() for i in dims))
    n = 1
    for i in dims:
        n *= d.shape[i]
    if p == 2.0:
        return d.pow(2).mean(dims, keepdim=keepdim, dtype=_sum_dtype(d)).sqrt().to(d.dtype)
    c = _constant(p, k, n, constant, d.device)
    if p == 1.0:
        s = d.abs().mean(dims, keepdim=keepdim, dtype=_sum_dtype(d)).to(d.dtype)
    else:
        check_k(k, n, "lp_dispersion")
        s = _topk_mean(d.abs(), dims, 1 if k is None else k, keepdim)
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
    mean = _mean(x, dims)
    d = x - mean
    if p == 2.0:
        var = d.pow(2).mean(dims, keepdim=True, dtype=_sum_dtype(d)).to(d.dtype)
        return mean, d, torch.rsqrt(var + eps), var.sqrt()
    sigma = lp_dispersion(d, dims, p, k, constant)
    return mean, d, 1.0 / (sigma + eps), sigma


@torch.no_grad()
def update_running(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    sigma: Tensor,
    n: int,
    momentum: float,
) -> None:
    """``running_mean ← (1−m)·running_mean + m·mean``, ``running_var ← (1−m)·running_var + m·σ̂²·n/(n−1)``."""
    _refuse_batched_update(mean, running_mean, running_var)
    if running_mean is not None:
        running_mean.mul_(1.0 - momentum).add_(mean.detach().flatten().to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        # n may be symbolic (dynamic shapes): n / (n − 1) stays a symbolic expression.
        bessel = n / (n - 1) if n > 1 else 1.0
        unbiased = sigma.detach().flatten().to(running_var.dtype).pow(2) * bessel
        running_var.mul_(1.0 - momentum).add_(unbiased, alpha=momentum)


_update_running = update_running

_is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)

#: Whether a torch.func transform (vmap, grad, jacrev) is running around this call.
transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _refuse_batched_update(mean: Tensor, *buffers: Tensor | None) -> None:
    # What torch's batch norm says under torch.func.vmap, instead of a broadcasting error.
    if _is_batched is None or not transforms_active() or not _is_batched(mean):
        return
    if any(b is not None and not _is_batched(b) for b in buffers):
        raise RuntimeError(
            "lp_batch_norm: the input is batched by torch.func.vmap in training mode, but the running "
            "statistics, which are updated in place, are not. As for torch's batch norm: use "
            "track_running_stats=False, evaluation mode, or batched running statistics.")


def eval_affine(running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The evaluation-mode batch norm as one per-channel affine y = a·x + b.

    a = γ / (√running_var + eps), b = β − running_mean·a (γ = 1, β = 0 when absent): one square
    root per channel and no squares of activations.
    """
    a = 1.0 / (running_var.to(dtype).sqrt() + eps)
    if weight is not None:
        a = a * weight.to(dtype)
    b = -running_mean.to(dtype) * a
    if bias is not None:
        b = b + bias.to(dtype)
    return a, b


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape([1, -1] + [1] * (ndim - 2))


channel_view = _channel_view


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, ndim: int) -> Tensor:
    if weight is not None:
        xhat = xhat * _channel_view(weight, ndim).to(xhat.dtype)
    if bias is not None:
        xhat = xhat + _channel_view(bias, ndim).to(xhat.dtype)
    return xhat


channel_affine = _affine


# ---------------------------------------------------------------------------- closed-form backward
def closed_form_sums(g: Tensor, d: Tensor, pattern: Tensor | None,
                     dims: tuple[int, ...]) -> Tensor:
    """The sums of the closed-form backward, stacked ``[3, C]``: Σg, Σg·d and Σ pattern.

    ``pattern`` is sign(d) for L1, :func:`selection_pattern` for L∞ / Top(k) and ``None`` for L2
    (its row is zero). These are what a synchronized batch norm all-reduces.
    """
    s_g = g.sum(dims)
    s_gd = (g * d).sum(dims)
    s_p = pattern.sum(dims) if pattern is not None else torch.zeros_like(s_g)
    return torch.stack([s_g, s_gd, s_p])


def closed_form_grad(g: Tensor, d: Tensor, inv: Tensor, pattern: Tensor | None, sums: Tensor,
                     n: int, p: float, k: int | None, scale: float, dims: tuple[int, ...],
                     center: bool = True) -> Tensor:
    """∂L/∂x from the sums of :func:`closed_form_sums` (see the module docstring).

    ``g`` = γ·∂L/∂y; ``inv`` broadcasts against ``d`` (keepdim shape); ``scale`` is the constant
    C; ``center=False`` drops the mean terms (RMS norm, where d = x).
    """
    view = [1 if i in dims else d.shape[i] for i in range(d.dim())]

    def v(t: Tensor) -> Tensor:
        return t.reshape(view)

    s_g, s_gd, s_p = v(sums[0]), v(sums[1]), v(sums[2])
    out = inv * (g - s_g / n) if center else inv * g
    if p == 2.0:
        return out - d * (inv.pow(3) * s_gd / n)
    if p == 1.0:
        w, s_w = pattern * (scale / n), s_p * (scale / n)
    else:
        kk = 1 if k is None else k
        w, s_w = pattern * (scale / kk), s_p * (scale / kk)
    coef = inv.pow(2) * s_gd
    return out - coef * ((w - s_w / n) if center else w)


# -------------------------------------------------------------------------------- ghost batches
def ghost_split(x: Tensor, ghost_batch_size: int, where: str = "lp_batch_norm") -> tuple[Tensor, ...]:
    """The virtual batches of ``ghost_batch_size`` samples; refuses a last one of one value per channel."""
    chunks = x.split(ghost_batch_size, dim=0)
    if chunks[-1].shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"{where}: the last ghost batch has one value per channel (batch of "
            f"{x.shape[0]} with ghost_batch_size={ghost_batch_size}); choose a batch size that "
            f"leaves at least 2 samples in every ghost batch"
        )
    return chunks


def ghost_merge(means: Sequence[Tensor], sigmas: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """One (mean, σ̂) for the running statistics from the ghost batches': their mean and RMS."""
    mean = torch.stack([m.detach() for m in means]).mean(0)
    sigma = torch.stack([s.detach() for s in sigmas]).pow(2).mean(0).sqrt()
    return mean, sigma


def _ghost_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, p, k,
                      constant, ghost_batch_size):
    ndim = input.dim()
    x = input.to(_compute_dtype(input))
    chunks = ghost_split(x, ghost_batch_size)
    dims = (0,) + tuple(range(2, ndim))
    outs, means, sigmas = [], [], []
    for chunk in chunks:
        mean, d, inv, sigma = batch_norm_statistics(chunk, dims, p, k, constant, eps)
        outs.append(d * inv)
        means.append(mean)
        sigmas.append(sigma)
    xhat = torch.cat(outs, dim=0)
    if running_mean is not None or running_var is not None:
        n = chunks[0].numel() // x.shape[1]
        mean, sigma = ghost_merge(means, sigmas)
        update_running(running_mean, running_var, mean, sigma, n, momentum)
    return _affine(xhat, weight, bias, ndim).to(input.dtype)


# ------------------------------------------------------------------------------ reference paths
def reference_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                         weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                         eps: float, p: float, k: int | None, constant: str,
                         ghost_batch_size: int | None = None) -> Tensor:
    """The reference batch norm on checked arguments (``p``, ``k`` parsed): plain torch ops."""
    if ghost_batch_size is not None and training and input.shape[0] > ghost_batch_size:
        return _ghost_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                                 p, k, constant, ghost_batch_size)
    if p == 2.0:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        # As torch: an empty batch gives an empty output and leaves the statistics alone.
        return input.clone()
    ndim = input.dim()
    dims = (0,) + tuple(range(2, ndim))
    x = input.to(_compute_dtype(input))
    if training:
        mean, d, inv, sigma = batch_norm_statistics(x, dims, p, k, constant, eps)
        if running_mean is not None or running_var is not None:
            n = x.numel() // x.shape[1]
            update_running(running_mean, running_var, mean, sigma, n, momentum)
        return _affine(d * inv, weight, bias, ndim).to(input.dtype)
    a, b = eval_affine(running_mean, running_var, weight, bias, eps, x.dtype)  # type: ignore[arg-type]
    return torch.addcmul(_channel_view(b, ndim), x, _channel_view(a, ndim)).to(input.dtype)


def reference_layer_norm(input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None,
                         bias: Tensor | None, eps: float, p: float, k: int | None,
                         constant: str) -> Tensor:
    """The reference layer norm on checked arguments."""
    if p == 2.0:
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    if input.numel() == 0:
        return input.clone()
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    x = input.to(_compute_dtype(input))
    _, d, inv, _ = batch_norm_statistics(x, dims, p, k, constant, eps)
    y = d * inv
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


def reference_group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                         eps: float, p: float, k: int | None, constant: str) -> Tensor:
    """The reference group norm on checked arguments."""
    if p == 2.0:
        return F.group_norm(input, num_groups, weight, bias, eps)
    if input.numel() == 0:
        return input.clone()
    x = input.to(_compute_dtype(input))
    g = x.reshape(x.shape[0], num_groups, -1)
    _, d, inv, _ = batch_norm_statistics(g, (2,), p, k, constant, eps)
    y = (d * inv).reshape(x.shape)
    return _affine(y, weight, bias, x.dim()).to(input.dtype)


def reference_rms_norm(input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None,
                       eps: float | None, p: float, k: int | None, constant: str) -> Tensor:
    """The reference RMS norm on checked arguments."""
    if p == 2.0:
        return F.rms_norm(input, normalized_shape, weight, eps)
    if input.numel() == 0:
        return input.clone()
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    x = input.to(_compute_dtype(input))
    e = torch.finfo(input.dtype).eps if eps is None else eps
    y = x / (lp_dispersion(x, dims, p, k, constant) + e)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(input.dtype)


# ---------------------------------------------------------------------------------- dispatching
_dispatch: dict[str, Callable[..., Tensor]] = {
    "batch": reference_batch_norm,
    "layer": reference_layer_norm,
    "group": reference_group_norm,
    "rms": reference_rms_norm,
}


def install_dispatcher(*, batch: Callable[..., Tensor], layer: Callable[..., Tensor],
                       group: Callable[..., Tensor], rms: Callable[..., Tensor]) -> None:
    """Route the public functions' checked calls through ``batch`` / ``layer`` / ``group`` / ``rms``.

    Each takes the arguments of the matching ``reference_*`` function. :mod:`normmatters.kernels`
    installs its dispatcher (fused backends where they apply, these references otherwise) when it
    is imported, which ``import normmatters`` does; until then the references run.
    """
    _dispatch.update(batch=batch, layer=layer, group=group, rms=rms)


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
    p, k = check_batch_norm_call(input, running_mean, running_var, weight, bias, training, eps,
                                 p, k, constant, ghost_batch_size)
    return _dispatch["batch"](input, running_mean, running_var, weight, bias, training, momentum,
                              eps, p, k, constant, ghost_batch_size)


def _reference_lp_batch_norm(input, running_mean, running_var, weight=None, bias=None,
                             training=False, momentum=0.1, eps=1e-5, *, p=2, k=None,
                             constant="calibrated", ghost_batch_size=None) -> Tensor:
    """:func:`lp_batch_norm` on the reference path (checked)."""
    p, k = check_batch_norm_call(input, running_mean, running_var, weight, bias, training, eps,
                                 p, k, constant, ghost_batch_size)
    return reference_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                eps, p, k, constant, ghost_batch_size)


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
    shape, p, k = check_layer_norm_call(input, normalized_shape, p, k, constant)
    return _dispatch["layer"](input, shape, weight, bias, eps, p, k, constant)


def _reference_lp_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, p=2,
                             k=None, constant="calibrated") -> Tensor:
    shape, p, k = check_layer_norm_call(input, normalized_shape, p, k, constant)
    return reference_layer_norm(input, shape, weight, bias, eps, p, k, constant)


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
    p, k = check_group_norm_call(input, num_groups, p, k, constant)
    return _dispatch["group"](input, num_groups, weight, bias, eps, p, k, constant)


def _reference_lp_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, p=2, k=None,
                             constant="calibrated") -> Tensor:
    p, k = check_group_norm_call(input, num_groups, p, k, constant)
    return reference_group_norm(input, num_groups, weight, bias, eps, p, k, constant)


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
    shape, p, k = check_rms_norm_call(input, normalized_shape, p, k, constant)
    return _dispatch["rms"](input, shape, weight, eps, p, k, constant)


def _reference_lp_rms_norm(input, normalized_shape, weight=None, eps=None, *, p=2, k=None,
                           constant="calibrated") -> Tensor:
    shape, p, k = check_rms_norm_call(input, normalized_shape, p, k, constant)
    return reference_rms_norm(input, shape, weight, eps, p, k, constant)
