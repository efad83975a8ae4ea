r"""Fused Lp normalizations as torch custom ops with the closed-form backward.

Two operators, registered with :mod:`torch.library` so that autograd and ``torch.compile`` see
them as single opaque nodes (with fake implementations for tracing):

* ``normmatters::lp_norm_fwd(x, weight, bias, layout, mode, k, constant, eps, center, affine)``
  → ``(y, mean, inv, sigma)`` on a dense ``[N, C, S]`` view: statistics per channel c over the
  N·S values, y = (x − μ)·inv·γ + β with inv = 1/(σ̂ + eps), γ and β per channel
  (:attr:`Affine.CHANNEL`, batch norm) or per position s (:attr:`Affine.POSITION`: layer and RMS
  norm as N=1, C=rows, where the backend supports it);
* ``normmatters::lp_norm_bwd(grad, x, weight, mean, inv, ...)`` → ``(dx, dweight, dbias)``.

The integer arguments are the enums of :mod:`.enums`. The backward saves only x, γ, μ and inv
(what torch's batch norm saves). With g' = γ·∂L/∂y, x̂ = (x − μ)·inv, M = mean(g'·x̂) and
s = sign(x − μ) (Hoffer et al. 2018, Sec. 4; derived with eps in ``docs/math.md``):

* L1:      ∂L/∂x = inv·(g' − mean(g') − C·(s − mean(s))·M);
* Top(k):  ∂L/∂x = inv·(g' − mean(g') − C_k·(n/k)·(s·[x in T] − (1/n)·Σ_T s)·M), T the positions
  of the k largest |x − μ| (L∞: k = 1); only they carry the gradient of σ̂;
* without centring (RMS norm) the mean(·) terms vanish.

Ties follow the one rule of :mod:`normmatters.functional.norm`: among equal |x − μ| the lowest
within-channel index (n·S + s) is selected first, here as in the reference.

Second-order gradients: when the backward itself runs with grad mode on (``create_graph=True``,
e.g. a gradient penalty) it computes the same closed form with differentiable torch ops
(:func:`normmatters.functional.norm.closed_form_grad` on statistics recomputed from x), so the
double backward is exact; otherwise the compiled backward runs.

The functions ``batch_norm``, ``batch_norm_eval``, ``layer_norm``, ``group_norm`` and ``rms_norm``
are called by the dispatcher (:mod:`.dispatch`) on arguments it has already checked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from ..functional.constants import lp_constant
from ..functional.norm import (
    closed_form_grad,
    closed_form_sums,
    dispersion_constant,
    selection_pattern,
    update_running,
)
from . import cpu
from .enums import Affine, Layout, Mode

__all__ = ["batch_norm", "batch_norm_eval", "layer_norm", "group_norm", "rms_norm", "MAX_K",
           "prepare_input", "backend_for", "register_backend", "lp_norm_fwd", "lp_norm_bwd",
           "eager_op", "eager_norm", "eager_bn_eval", "compiled_cpu_ops", "RUNTIME_CONSTANT",
           "resolve_constant"]

#: Largest k the fused Top(k) kernels take; larger k (rare) runs the reference.
MAX_K = 64

NCS, NSC = Layout.NCS, Layout.NSC

# The name the tests and older callers use for the constant of a dispersion.
_constant = dispersion_constant

# Backends by device type: modules with ``supports(dtype, layout, affine)``, ``forward`` and
# ``backward`` (and, for the CPU, ``evaluate``); ``FUSED_RUNNING`` says whether ``forward`` updates
# the running statistics itself.
_BACKENDS: dict[str, ModuleType] = {"cpu": cpu}


def register_backend(device_type: str, module: ModuleType) -> None:
    """Serve ``device_type`` tensors with ``module`` (the Triton kernels register for ``cuda``)."""
    _BACKENDS[device_type] = module


def backend_for(device: torch.device) -> ModuleType | None:
    """The backend module for tensors on ``device``, or ``None``."""
    return _BACKENDS.get(device.type)


def _fix_layout(t: Tensor, layout: int) -> Tensor:
    if layout == NCS:
        return t.contiguous()
    if t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def prepare_input(x3: Tensor) -> tuple[Tensor, Layout]:
    """Choose the layout of a ``[N, C, S]`` tensor: NCS if contiguous, NSC if channels-last, else copy."""
    if x3.is_contiguous():
        return x3, (NSC if x3.shape[2] == 1 else NCS)  # (N, C) inputs: rows of C values
    if x3.shape[2] == 1 and x3.transpose(1, 2).is_contiguous():
        return x3, NSC  # (N, C) inputs: rows of C values
    if x3.is_contiguous():
        return x3, NCS
    if x3.transpose(1, 2).is_contiguous():
        return x3, NSC
    return x3.contiguous(), NCS


#: ``constant`` values that compiled graphs pass for L∞ / Top(k): the op computes C for the n of
#: its call at run time (a graph traced with symbolic sizes has no Python float for C_k(n)).
RUNTIME_CONSTANT = {"calibrated": -1.0, "paper": -2.0}
_RUNTIME_NAMES = {1: "calibrated", 2: "paper"}


def resolve_constant(constant: float, k: int, n) -> float | Tensor:
    """The constant for a call over n values: ``constant`` itself, or for a run-time constant
    (:data:`RUNTIME_CONSTANT`) C_k(n) of this n (a traced tensor if n is symbolic)."""
    if constant >= 0:
        return constant
    return dispersion_constant(math.inf, k, n, _RUNTIME_NAMES[2 if constant < -1.5 else 1])


def _fwd_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int, mode: int,
              k: int, constant: float, eps: float, center: bool, affine: int = Affine.CHANNEL,
              running_mean: Tensor | None = None, running_var: Tensor | None = None,
              momentum: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = _fix_layout(x, layout)
    constant = resolve_constant(constant, k, x.shape[0] * x.shape[2])
    impl = _BACKENDS[x.device.type]
    if running_mean is None and running_var is None:
        if affine == Affine.POSITION:
            return impl.forward(x, layout, weight, bias, mode, k, constant, eps, center, affine)
        return impl.forward(x, layout, weight, bias, mode, k, constant, eps, center)
    return impl.forward(x, layout, weight, bias, mode, k, constant, eps, center, affine,
                        running_mean, running_var, momentum)


@torch.library.custom_op("normmatters::lp_norm_fwd", mutates_args=())
def lp_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int, mode: int,
                k: int, constant: float, eps: float, center: bool, affine: int = 1
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, layout, mode, k, constant, eps, center, affine)


@lp_norm_fwd.register_fake
def _fwd_fake(x, weight, bias, layout, mode, k, constant, eps, center, affine=1):
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return y, x.new_empty(c, dtype=stat), x.new_empty(c, dtype=stat), x.new_empty(c, dtype=stat)


def _bwd_impl(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, inv: Tensor,
              layout: int, mode: int, k: int, constant: float, center: bool,
              need_input: bool, need_affine: bool, affine: int = Affine.CHANNEL
              ) -> tuple[Tensor, Tensor, Tensor]:
    x = _fix_layout(x, layout)
    grad = _fix_layout(grad, layout)
    constant = resolve_constant(constant, k, x.shape[0] * x.shape[2])
    impl = _BACKENDS[x.device.type]
    args = (grad, x, layout, weight, mean, inv, mode, k, constant, center, need_input, need_affine)
    dx, dw, db = impl.backward(*args) if affine != Affine.POSITION else impl.backward(*args, affine)
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
def _bwd_fake(grad, x, weight, mean, inv, layout, mode, k, constant, center, need_input,
              need_affine, affine=1):
    c = x.shape[1] if affine != Affine.POSITION else x.shape[2]
    dx = (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
          if need_input else x.new_empty(0))
    dw = mean.new_empty(c) if need_affine else mean.new_empty(0)
    db = mean.new_empty(c) if need_affine else mean.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, layout, mode, k, constant, eps, center, affine = inputs[:10]
    _, mean, inv, _ = output
    ctx.save_for_backward(x, weight, mean, inv)
    ctx.args = (layout, mode, k, constant, center, affine, eps)
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None


def _double_backward_grads(x: Tensor, weight: Tensor | None, grad_y: Tensor, layout: int,
                           mode: int, k: int, constant: float, eps: float, center: bool,
                           affine: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The closed-form gradients as differentiable torch ops of x, γ and ∂L/∂y (create_graph)."""
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(stat)
    g = grad_y.to(stat)
    dims = (0, 2)
    n = xs.shape[0] * xs.shape[2]
    constant = resolve_constant(constant, k, n)
    mean = xs.mean(dims, keepdim=True) if center else torch.zeros_like(xs[:1, :, :1])
    d = xs - mean
    if mode == Mode.L1:
        pattern = d.detach().sign()
        sigma = constant * (pattern * d).sum(dims, keepdim=True) / n
        p, kk = 1.0, None
    else:
        pattern = selection_pattern(d, dims, k)
        sigma = constant * (pattern * d).sum(dims, keepdim=True) / k
        p, kk = math.inf, k
    inv = 1.0 / (sigma + eps)
    if affine == Affine.GROUP:
        # x is [1, samples·G, S], each row one group's channels of S / channels values; γ comes
        # as [G, channels per group, 1] (csrc/lp_norm_op.cpp): per row, per channel.
        groups, cg = weight.shape[0], weight.shape[1]
        def by_channel(t: Tensor) -> Tensor:
            return t.reshape(-1, groups, cg, t.shape[2] // cg)
        gp = (by_channel(g) * weight.to(stat).view(1, groups, cg, 1)).reshape(g.shape)
    elif weight is None:
        gp = g
    elif affine == Affine.POSITION:
        gp = g * weight.to(stat).view(1, 1, -1)
    else:
        gp = g * weight.to(stat).view(1, -1, 1)
    sums = closed_form_sums(gp, d, pattern, dims)
    dx = closed_form_grad(gp, d, inv, pattern, sums, n, p, kk, constant, dims, center).to(x.dtype)
    xhat = d * inv
    if affine == Affine.GROUP:
        dw, db = by_channel(g * xhat).sum((0, 3)).reshape(-1), by_channel(g).sum((0, 3)).reshape(-1)
    elif affine == Affine.POSITION:
        dw, db = (g * xhat).sum((0, 1)), g.sum((0, 1))
    else:
        dw, db = (g * xhat).sum(dims), g.sum(dims)
    return dx, dw, db


def _backward(ctx, grad_y, grad_mean, grad_inv, grad_sigma, bwd=None):
    # The statistics are outputs only for the running averages (updated under no_grad): their
    # incoming gradients are None or zeros and are not propagated.
    x, weight, mean, inv = ctx.saved_tensors
    layout, mode, k, constant, center, affine, eps = ctx.args
    need_input = ctx.needs_input_grad[0]
    need_affine = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    none_rest = (None,) * (len(ctx.needs_input_grad) - 3)
    if grad_y is None or not (need_input or need_affine):
        return (None,) * len(ctx.needs_input_grad)
    if torch.is_grad_enabled():
        dx, dw, db = _double_backward_grads(x, weight, grad_y, layout, mode, k, constant, eps,
                                            center, affine)
    else:
        grad_y = _fix_layout(grad_y, layout)
        dx, dw, db = (bwd or lp_norm_bwd)(grad_y, x, weight, mean, inv, layout, mode, k, constant,
                                          center, need_input, need_affine, affine)
    return (dx if need_input else None,
            dw if (need_affine and ctx.has_weight) else None,
            db if (need_affine and ctx.has_bias) else None) + none_rest


torch.library.register_autograd("normmatters::lp_norm_fwd", _backward, setup_context=_setup_context)


class _EagerLpNorm(torch.autograd.Function):
    """The same forward and backward as the custom op, without the custom-op dispatch.

    ``torch.library`` custom ops cost a few hundred microseconds of Python per call, which
    dominates for the small tensors of small networks; eager calls take this direct path (which
    also updates the running statistics inside the kernel, and keeps the statistics in one
    tensor) and ``torch.compile`` / ``torch.export`` see the registered op. The non-tensor
    arguments travel as one tuple ``cfg`` = (layout, mode, k, constant, eps, center, affine,
    momentum): autograd inspects every argument of ``apply``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, cfg):
        layout, mode, k, constant, eps, center, affine, momentum = cfg
        y, stats = _BACKENDS[x.device.type].forward(x, layout, weight, bias, mode, k, constant,
                                                    eps, center, affine, running_mean,
                                                    running_var, momentum, packed=True)
        ctx.save_for_backward(x, weight, stats)
        ctx.cfg = cfg
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, grad_y, grad_stats):
        x, weight, stats = ctx.saved_tensors
        layout, mode, k, constant, eps, center, affine, _ = ctx.cfg
        need_input = ctx.needs_input_grad[0]
        need_affine = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        if grad_y is None or not (need_input or need_affine):
            return None, None, None, None, None, None
        if torch.is_grad_enabled():
            dx, dw, db = _double_backward_grads(x, weight, grad_y, layout, mode, k, constant, eps,
                                                center, affine)
        else:
            grad_y = _fix_layout(grad_y, layout)
            dx, dw, db = _BACKENDS[x.device.type].backward(
                grad_y, x, layout, weight, None, None, mode, k, constant, center, need_input,
                need_affine, affine, stats=stats)
        return (dx if need_input else None,
                dw if (need_affine and ctx.has_weight) else None,
                db if (need_affine and ctx.has_bias) else None, None, None, None)


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _lp_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: int, mode: int,
             k: int, constant: float, eps: float, center: bool, affine: int = Affine.CHANNEL,
             running_mean: Tensor | None = None, running_var: Tensor | None = None,
             momentum: float = 0.0) -> Tensor:
    """Run the fused op on ``x`` (already in ``layout``) and return y; ``running_mean`` /
    ``running_var`` are updated in the kernel where the backend can (contiguous buffers in the
    statistics dtype) and afterwards otherwise."""
    tracked = running_mean is not None or running_var is not None
    impl = _BACKENDS[x.device.type]
    compiling = torch.compiler.is_compiling()
    if compiling or not getattr(impl, "PACKED", False):
        if compiling:
            # On the CPU the C++ twin: the compiled graph calls it without Python around the kernel.
            op = (torch.ops.normmatters.cpu_lp_norm_fwd if impl is cpu and compiled_cpu_ops(x.dtype)
                  else lp_norm_fwd)
            out = op(x, weight, bias, layout, mode, k, constant, eps, center, affine)
        elif _needs_grad(x, weight, bias):
            out = lp_norm_fwd(x, weight, bias, layout, mode, k, constant, eps, center, affine)
        else:
            out = _fwd_impl(x, weight, bias, layout, mode, k, constant, eps, center, affine)
        if tracked:
            update_running(running_mean, running_var, out[1], out[3], x.shape[0] * x.shape[2], momentum)
        return out[0]
    fused_running = False
    if tracked:
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        fused_running = all(t is None or (t.dtype == stat and t.is_contiguous() and not t.requires_grad)
                            for t in (running_mean, running_var))
    rm, rv = (running_mean, running_var) if fused_running else (None, None)
    if _needs_grad(x, weight, bias):
        y, stats = _EagerLpNorm.apply(x, weight, bias, rm, rv,
                                      (layout, mode, k, constant, eps, center, affine, momentum))
    else:
        y, stats = impl.forward(x, layout, weight, bias, mode, k, constant, eps, center, affine,
                                rm, rv, momentum, packed=True)
    if tracked and not fused_running:
        update_running(running_mean, running_var, stats[0], stats[2], x.shape[0] * x.shape[2], momentum)
    return y


def _mode(p: float, k: int | None) -> tuple[int, int]:
    if p == 1.0:
        return 1, 1  # Mode.L1 (plain ints: the operators take int64)
    return 2, (1 if k is None else k)  # Mode.TOPK


def eager_op(x: Tensor) -> bool:
    """Whether the C++ eager operators of :mod:`.cpu` take this call: a CPU tensor outside
    ``torch.compile`` (which traces the torch.library ops above instead)."""
    return (x.device.type == "cpu" and _BACKENDS["cpu"] is cpu and cpu.eager_ops(x.dtype)
            and not torch.compiler.is_compiling())


_compiled_ops_registered = False


def compiled_cpu_ops(dtype: torch.dtype) -> bool:
    """Whether ``normmatters::cpu_lp_norm_fwd`` / ``cpu_lp_norm_bwd`` (the C++ twins of
    :func:`lp_norm_fwd` / :func:`lp_norm_bwd`) serve CPU tensors of ``dtype``; registers their
    fake implementations and autograd formula on first use."""
    global _compiled_ops_registered
    if not cpu.eager_ops(dtype):
        return False
    if not _compiled_ops_registered:
        torch.library.register_fake("normmatters::cpu_lp_norm_fwd")(_fwd_fake)
        torch.library.register_fake("normmatters::cpu_lp_norm_bwd")(_bwd_fake)
        torch.library.register_autograd(
            "normmatters::cpu_lp_norm_fwd",
            functools.partial(_backward, bwd=torch.ops.normmatters.cpu_lp_norm_bwd),
            setup_context=_setup_context)
        _compiled_ops_registered = True
    return True


# A constant of the process for torch.compile (evaluated once, eagerly, while tracing).
compiled_cpu_ops._dynamo_marked_constant = True  # type: ignore[attr-defined]


_eager_call = None


def eager_norm(*args):
    """``torch.ops.normmatters.eager_norm`` (see ``csrc/lp_norm_op.cpp``; it exists once
    :func:`cpu.eager_ops` has loaded the operators)."""
    global _eager_call
    if _eager_call is None:
        overload = torch.ops.normmatters.eager_norm.default
        # The overload's C++ callable itself where torch exposes it: a Python frame less per call.
        _eager_call = getattr(overload, "_op", overload)
    return _eager_call(*args)


def eager_bn_eval(*args):
    """``torch.ops.normmatters.eager_bn_eval`` (see ``csrc/lp_norm_op.cpp``)."""
    return torch.ops.normmatters.eager_bn_eval(*args)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _affine_param(t: Tensor | None, x: Tensor) -> Tensor | None:
    if t is None:
        return None
    if t.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32) and t.is_contiguous():
        return t
    return t.to(_stat_dtype(x)).contiguous()


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float,
               p: float, k: int | None, constant: float) -> Tensor:
    """Fused training-mode Lp batch norm (statistics per channel, axis 1); updates running stats.

    ``constant`` is the dispersion's constant C for this input's n, as a float.
    """
    if eager_op(input):
        mode, kk = _mode(p, k)
        return eager_norm(input, weight, bias, running_mean, running_var, 0, 0, mode, kk, constant,
                      float(eps), momentum)
    n_, c_ = input.shape[0], input.shape[1]
    x3, layout = prepare_input(input.reshape(n_, c_, -1))
    mode, kk = _mode(p, k)
    y = _lp_norm(x3, _affine_param(weight, input), _affine_param(bias, input),
                 layout, mode, kk, constant, float(eps), True, Affine.CHANNEL, running_mean,
                 running_var, momentum)
    return y.reshape(input.shape)


def batch_norm_eval(input: Tensor, running_mean: Tensor, running_var: Tensor,
                    weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor | None:
    """Evaluation batch norm as one fused per-channel affine, where a backend has the kernel and
    no gradient is needed; ``None`` otherwise (the caller uses torch ops)."""
    impl = _BACKENDS.get(input.device.type)
    if impl is None or not hasattr(impl, "evaluate") or _needs_grad(input, weight, bias):
        return None
    if eager_op(input):
        return eager_bn_eval(input, running_mean, running_var, weight, bias, float(eps))
    n_, c_ = input.shape[0], input.shape[1]
    x3, layout = prepare_input(input.reshape(n_, c_, -1))
    if not impl.supports(x3.dtype, layout, Affine.CHANNEL):
        return None
    y = impl.evaluate(x3, layout, _affine_param(running_mean, input), _affine_param(running_var, input),
                      _affine_param(weight, input), _affine_param(bias, input), float(eps))
    return y.reshape(input.shape)


def _flat_param(t: Tensor | None, x: Tensor) -> Tensor | None:
    # The kernels read γ and β through their pointers as flat vectors, and their gradients come
    # back flat: a γ of the normalized shape [5, 6] goes in as a view of 30 values, so autograd
    # gives its gradient the shape [5, 6] again.
    t = _affine_param(t, x)
    return t.reshape(-1) if t is not None and t.dim() > 1 else t


def _rows(input: Tensor, ndims: int) -> Tensor:
    d = math.prod(input.shape[input.dim() - ndims:]) if ndims else 1
    return input.contiguous().view(1, -1, d)


def _position_affine(impl: ModuleType, x3: Tensor) -> bool:
    return impl.supports(x3.dtype, NCS, Affine.POSITION)


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
               bias: Tensor | None, eps: float, p: float, k: int | None, constant: float) -> Tensor:
    """Fused Lp layer norm over the trailing ``normalized_shape`` axes (γ, β fused where the
    backend supports per-position affine, by torch ops otherwise)."""
    mode, kk = _mode(p, k)
    if eager_op(input):
        return eager_norm(input, weight, bias, None, None, 1, len(normalized_shape), mode, kk,
                      constant, float(eps), 0.0)
    x3 = _rows(input, len(normalized_shape))
    if _position_affine(_BACKENDS[input.device.type], x3):
        y = _lp_norm(x3, _flat_param(weight, input), _flat_param(bias, input), NCS,
                              mode, kk, constant, float(eps), True, Affine.POSITION)
        return y.view(input.shape)
    xhat = _lp_norm(x3, None, None, NCS, mode, kk, constant, float(eps), True)
    return _affine_by_ops(xhat.view(input.shape), weight, bias, [-1])


def _affine_by_ops(y: Tensor, weight: Tensor | None, bias: Tensor | None,
                   shape: list[int]) -> Tensor:
    """``y·γ + β`` by torch ops, in the wider of y's and the parameters' dtypes (half-precision
    activations with float32 parameters: float32 affine and float32 gradients of γ and β, as the
    fused kernels compute them)."""
    param = weight if weight is not None else bias
    if param is None:
        return y
    wide = torch.promote_types(y.dtype, param.dtype)
    z = y.to(wide)
    if weight is not None:
        z = z * weight.to(wide).view(shape)
    if bias is not None:
        z = z + bias.to(wide).view(shape)
    return z.to(y.dtype)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
               eps: float, p: float, k: int | None, constant: float) -> Tensor:
    """Fused Lp group norm: statistics per sample and group; per-channel γ, β inside the kernel
    (eager operators) or by torch ops (the Python path)."""
    mode, kk = _mode(p, k)
    if eager_op(input):
        return eager_norm(input, weight, bias, None, None, 2, num_groups, mode, kk, constant,
                      float(eps), 0.0)
    x3 = input.contiguous().view(1, input.shape[0] * num_groups, -1)
    xhat = _lp_norm(x3, None, None, NCS, mode, kk, constant, float(eps), True)
    return _affine_by_ops(xhat.view(input.shape), weight, bias, [1, -1] + [1] * (input.dim() - 2))


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float,
             p: float, k: int | None, constant: float) -> Tensor:
    """Fused Lp RMS norm (no centring: σ̂ of x itself)."""
    mode, kk = _mode(p, k)
    if eager_op(input):
        return eager_norm(input, weight, None, None, None, 3, len(normalized_shape), mode, kk,
                      constant, float(eps), 0.0)
    x3 = _rows(input, len(normalized_shape))
    if _position_affine(_BACKENDS[input.device.type], x3):
        y = _lp_norm(x3, _flat_param(weight, input), None, NCS, mode, kk, constant,
                              float(eps), False, Affine.POSITION)
        return y.view(input.shape)
    xhat = _lp_norm(x3, None, None, NCS, mode, kk, constant, float(eps), False)
    return _affine_by_ops(xhat.view(input.shape), weight, None, [-1])


# The differentiable closed form, as an operator the C++ eager node (csrc/lp_norm_op.cpp) calls
# when its backward runs in grad mode (create_graph=True): CompositeImplicitAutograd, so autograd
# records the torch ops inside.
_LIB = torch.library.Library("normmatters", "FRAGMENT")
_LIB.define("closed_form_grads(Tensor x, Tensor? weight, Tensor grad, int layout, int mode, int k, "
            "float constant, float eps, bool center, int affine) -> (Tensor, Tensor, Tensor)")


_LIB.impl("closed_form_grads", _double_backward_grads, "CompositeImplicitAutograd")

# The run-time constant of the compiled graphs' C++ operators (see RUNTIME_CONSTANT): which 1 is
# the calibrated C_k(n), 2 the paper's formula; cached by functional.constants and in C++.
_LIB.define("runtime_constant(int n, int k, int which) -> float")


def _runtime_constant(n: int, k: int, which: int) -> float:
    return float(lp_constant(math.inf, k, n, _RUNTIME_NAMES[which]))


_LIB.impl("runtime_constant", _runtime_constant, "CompositeExplicitAutograd")
