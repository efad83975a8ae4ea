r"""Fused Lp normalizations as torch custom ops with the closed-form backward of SPEC §2.

Two operators, registered with :mod:`torch.library` so that autograd and ``torch.compile`` see
them as single opaque nodes (with fake implementations for tracing):

* ``normmatters::lp_norm_fwd(x, weight, bias, layout, mode, k, constant, eps, center, affine)``
  → ``(y, mean, inv, sigma)`` on a dense ``[N, C, S]`` view: statistics per channel c over the
  N·S values, y = (x − μ)·inv·γ + β with inv = 1/(σ̂ + eps), γ and β per channel (``affine=1``,
  batch norm) or per position s (``affine=2``: layer and RMS norm as N=1, C=rows; CPU only);
* ``normmatters::lp_norm_bwd(grad, x, weight, mean, inv, ...)`` → ``(dx, dweight, dbias)``.

The backward saves only x, γ, μ and inv (what torch's batch norm saves). With g' = γ·∂L/∂y,
x̂ = (x − μ)·inv, M = mean(g'·x̂) and s = sign(x − μ) (SPEC §2, derived with eps):

* L1:      ∂L/∂x = inv·(g' − mean(g') − C·(s − mean(s))·M);
* Top(k):  ∂L/∂x = inv·(g' − mean(g') − C_k·(n/k)·(s·[x in T] − (1/n)·Σ_T s)·M), T the positions
  of the k largest |x − μ| (L∞: k = 1); only they carry the gradient of σ̂;
* without centring (RMS norm) the mean(·) terms vanish.

Ties: the reference's ``amax`` shares the gradient of a tied maximum among the tied positions;
the kernels give it to one of them: among equal |x − μ| the lowest within-channel index
(n·S + s), on the CPU and for L∞ in Triton (Triton's Top(k > 1) takes ``torch.topk``'s choice).
The two agree whenever the k-th and (k+1)-th largest |x − μ| differ, which holds with
probability one for continuous data.

The functions ``batch_norm``, ``layer_norm``, ``group_norm`` and ``rms_norm`` below are reached
through :mod:`normmatters.kernels`'s ``try_*`` functions, which :mod:`normmatters.functional.norm`
calls first and which return ``None`` (run the reference path) when the fused path does not apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..functional.norm import _constant, _update_running

__all__ = ["batch_norm", "layer_norm", "group_norm", "rms_norm", "MAX_K", "prepare_input"]

#: Largest k the fused Top(k) kernels take; larger k (rare) runs the reference's ``topk``.
MAX_K = 64

NCS, NSC = 0, 1


def _device_impl(device: torch.device):
    if device.type == "cpu":
        from . import cpu
        return cpu
    from . import triton_kernels
    return triton_kernels


def _fix_layout(t: Tensor, layout: int) -> Tensor:
    if layout == NCS:
        return t.contiguous()
    if t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def prepare_input(x3: Tensor) -> tuple[Tensor, int]:
    """Choose the layout of a ``[N, C, S]`` tensor: NCS if contiguous, NSC if channels-last, else copy."""
    if x3.shape[2] == 1 and x3.transpose(1, 2).is_contiguous():
        return x3, NSC  # (N, C) inputs: rows of C values
    if x3.is_contiguous():
        return x3, NCS
    if x3.transpose(1, 2).is_contiguous():
        return x3, NSC
    return x3.contiguous(), NCS


def _fwd_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int, mode: int,
              k: int, constant: float, eps: float, center: bool, affine: int = 1
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = _fix_layout(x, layout)
    impl = _device_impl(x.device)
    if affine == 1:
        return impl.forward(x, layout, weight, bias, mode, k, constant, eps, center)
    return impl.forward(x, layout, weight, bias, mode, k, constant, eps, center, affine)


@torch.library.custom_op("normmatters::lp_norm_fwd", mutates_args=())
def lp_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int, mode: int,
                k: int, constant: float, eps: float, center: bool, affine: int = 1
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, layout, mode, k, constant, eps, center, affine)


@lp_norm_fwd.register_fake
def _(x, weight, bias, layout, mode, k, constant, eps, center, affine=1):
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return y, x.new_empty(c, dtype=stat), x.new_empty(c, dtype=stat), x.new_empty(c, dtype=stat)


def _bwd_impl(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, inv: Tensor,
              layout: int, mode: int, k: int, constant: float, center: bool,
              need_input: bool, need_affine: bool, affine: int = 1
              ) -> tuple[Tensor, Tensor, Tensor]:
    x = _fix_layout(x, layout)
    grad = _fix_layout(grad, layout)
    impl = _device_impl(x.device)
    args = (grad, x, layout, weight, mean, inv, mode, k, constant, center, need_input, need_affine)
    dx, dw, db = impl.backward(*args) if affine == 1 else impl.backward(*args, affine)
    empty = x.new_empty(0)
    # Outputs of a custom op may not alias each other: distinct empty tensors for absent grads.
    return (dx if dx is not None else empty, dw if dw is not None else mean.new_empty(0),
            db if db is not None else mean.new_empty(0))


@torch.library.custom_op("normmatters::lp_norm_bwd", mutates_args=())
def lp_norm_bwd(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, inv: Tensor,
                layout: int, mode: int, k: int, constant: float, center: bool,
                need_input: bool, need_affine: bool, affine: int = 1
                ) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(grad, x, weight, mean, inv, layout, mode, k, constant, center, need_input,
                     need_affine, affine)


@lp_norm_bwd.register_fake
def _(grad, x, weight, mean, inv, layout, mode, k, constant, center, need_input, need_affine,
      affine=1):
    c = x.shape[1] if affine == 1 else x.shape[2]
    dx = (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
          if need_input else x.new_empty(0))
    dw = mean.new_empty(c) if need_affine else mean.new_empty(0)
    db = mean.new_empty(c) if need_affine else mean.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, layout, mode, k, constant, eps, center, affine = inputs
    _, mean, inv, _ = output
    ctx.save_for_backward(x, weight, mean, inv)
    ctx.args = (layout, mode, k, constant, center, affine)
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, grad_mean, grad_inv, grad_sigma, bwd=None):
    # The statistics are outputs only for the running averages (updated under no_grad): their
    # incoming gradients are None or zeros and are not propagated.
    x, weight, mean, inv = ctx.saved_tensors
    layout, mode, k, constant, center, affine = ctx.args
    need_input = ctx.needs_input_grad[0]
    need_affine = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    if grad_y is None or not (need_input or need_affine):
        return (None,) * 10
    grad_y = _fix_layout(grad_y, layout)
    dx, dw, db = (bwd or lp_norm_bwd)(grad_y, x, weight, mean, inv, layout, mode, k, constant,
                                      center, need_input, need_affine, affine)
    return (dx if need_input else None,
            dw if (need_affine and ctx.has_weight) else None,
            db if (need_affine and ctx.has_bias) else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("normmatters::lp_norm_fwd", _backward, setup_context=_setup_context)


class _EagerLpNorm(torch.autograd.Function):
    """The same forward and backward as the custom op, without the custom-op dispatch.

    ``torch.library`` custom ops cost a few hundred microseconds of Python per call, which
    dominates for the small tensors of small networks; eager calls take this direct path and
    ``torch.compile`` / ``torch.export`` see the registered op.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layout, mode, k, constant, eps, center, affine):
        out = _fwd_impl(x, weight, bias, layout, mode, k, constant, eps, center, affine)
        _setup_context(ctx, (x, weight, bias, layout, mode, k, constant, eps, center, affine), out)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_inv, grad_sigma):
        return _backward(ctx, grad_y, grad_mean, grad_inv, grad_sigma, bwd=_bwd_impl)


def _lp_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int, mode: int,
             k: int, constant: float, eps: float, center: bool, affine: int = 1
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if torch.compiler.is_compiling():
        return lp_norm_fwd(x, weight, bias, layout, mode, k, constant, eps, center, affine)
    return _EagerLpNorm.apply(x, weight, bias, layout, mode, k, constant, eps, center, affine)


def _mode(p: float, k: int | None) -> tuple[int, int]:
    if p == 1.0:
        return 1, 1
    return 2, (1 if k is None else k)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _affine_param(t: Tensor | None, x: Tensor) -> Tensor | None:
    return None if t is None else t.to(_stat_dtype(x)).contiguous()


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float,
               p: float, k: int | None, constant: str) -> Tensor:
    """Fused training-mode Lp batch norm (statistics per channel, axis 1); updates running stats."""
    n_, c_ = input.shape[0], input.shape[1]
    x3, layout = prepare_input(input.reshape(n_, c_, -1))
    n = x3.shape[0] * x3.shape[2]
    mode, kk = _mode(p, k)
    cst = _constant(p, k, n, constant)
    y, mean, _, sigma = _lp_norm(x3, _affine_param(weight, input), _affine_param(bias, input),
                                    layout, mode, kk, cst, float(eps), True)
    if running_mean is not None or running_var is not None:
        _update_running(running_mean, running_var, mean, sigma, n, momentum)
    return y.reshape(input.shape)


def _flat_param(t: Tensor | None, x: Tensor) -> Tensor | None:
    return None if t is None else t.to(_stat_dtype(x)).reshape(-1).contiguous()


def _rows(input: Tensor, ndims: int) -> Tensor:
    d = math.prod(input.shape[input.dim() - ndims:]) if ndims else 1
    return input.contiguous().view(1, -1, d)


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
               bias: Tensor | None, eps: float, p: float, k: int | None, constant: str) -> Tensor:
    """Fused Lp layer norm over the trailing ``normalized_shape`` axes (affine fused on CPU)."""
    x3 = _rows(input, len(normalized_shape))
    mode, kk = _mode(p, k)
    cst = _constant(p, k, x3.shape[2], constant)
    if input.device.type == "cpu":
        # γ and β per position, fused into the kernels (affine=2).
        y, _, _, _ = _lp_norm(x3, _flat_param(weight, input), _flat_param(bias, input), NCS,
                                 mode, kk, cst, float(eps), True, 2)
        return y.view(input.shape)
    xhat, _, _, _ = _lp_norm(x3, None, None, NCS, mode, kk, cst, float(eps), True)
    y = xhat.view(input.shape)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
               eps: float, p: float, k: int | None, constant: str) -> Tensor:
    """Fused Lp group norm: statistics per sample and group; per-channel affine by torch ops."""
    x3 = input.contiguous().view(1, input.shape[0] * num_groups, -1)
    mode, kk = _mode(p, k)
    cst = _constant(p, k, x3.shape[2], constant)
    xhat, _, _, _ = _lp_norm(x3, None, None, NCS, mode, kk, cst, float(eps), True)
    y = xhat.view(input.shape)
    shape = [1, -1] + [1] * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    return y


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float,
             p: float, k: int | None, constant: str) -> Tensor:
    """Fused Lp RMS norm (no centring: σ̂ of x itself)."""
    x3 = _rows(input, len(normalized_shape))
    mode, kk = _mode(p, k)
    cst = _constant(p, k, x3.shape[2], constant)
    if input.device.type == "cpu":
        y, _, _, _ = _lp_norm(x3, _flat_param(weight, input), None, NCS, mode, kk, cst,
                                 float(eps), False, 2)
        return y.view(input.shape)
    xhat, _, _, _ = _lp_norm(x3, None, None, NCS, mode, kk, cst, float(eps), False)
    y = xhat.view(input.shape)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y
