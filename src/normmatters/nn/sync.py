r"""Synchronized Lp batch normalization across processes (Hoffer et al. 2018, Sec. 4).

Under data parallelism (``torch.distributed``, DDP) every process sees a shard of the batch.
:class:`SyncLpBatchNorm` takes its statistics over the union of the shards, so that the
outputs, the gradients and the running statistics are those of one process normalizing the
concatenated batch, for every p:

* L2:     one all-gather of each process's (count, mean, Σ(x − mean)²), merged with Chan's
          parallel formula — the sum and sum of squares, in the form that does not cancel;
* L1:     an all-reduce of (count, Σx) gives the global mean μ, then an all-reduce of Σ|x − μ|
          gives the global mean absolute deviation — exact, not an approximation;
* L∞:     an all-reduce (max) of each process's max|x − μ|;
* Top(k): an all-gather of each process's k largest |x − μ|, of which the global k largest are
          kept (a process with fewer than k values pads with −1, which is never selected); L∞ is
          Top(1).

Ties follow the one rule of :mod:`normmatters.functional.norm`: the lowest index in the
concatenated batch (lower rank first, then the lower index within the process), so the
gradient goes where one process normalizing the whole batch would send it.

The constants C_∞(n) and C_k(n) and the Bessel factor n/(n−1) of ``running_var`` use the global
n = Σ over processes of the per-process counts, so uneven shards (an empty one included) give the
statistics of the whole batch. Every process takes part in every collective, also with an empty
shard, so none waits for another.

The backward pass is synchronized too: it is the closed form of
:func:`normmatters.functional.norm.closed_form_grad`, whose three sums
(:func:`~normmatters.functional.norm.closed_form_sums`: Σg, Σg·d and the sum of the sign pattern)
are all-reduced over the global batch before the gradient is formed — the same sums the
one-process backward computes. Each process
differentiates the sum of all processes' losses, exactly as :class:`torch.nn.SyncBatchNorm`
does, so DDP's gradient averaging gives the gradient of the mean loss over the whole batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..functional.constants import lp_constant
from ..functional.norm import (
    channel_affine,
    channel_view,
    check_batch_norm_input,
    check_k,
    closed_form_grad,
    closed_form_sums,
    compute_dtype,
    topk_mask,
    update_running,
)
from ..kernels.dispatch import batch_norm as dispatch_batch_norm
from .batchnorm import LpBatchNormBase, _check_dtype

__all__ = ["SyncLpBatchNorm"]


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _by_channel(t: Tensor) -> Tensor:
    """(N, C, *S) -> (C, N·∏S), the layout in which Top(k) is taken per channel."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _from_channel(t: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_by_channel` (a view in ``like``'s layout)."""
    shape = [like.shape[1], like.shape[0], *like.shape[2:]]
    return t.reshape(shape).transpose(0, 1)


def _check_global_n(n: int, p: float, k: int | None, shape: list[int]) -> None:
    # Every process sees the same global n, so every process raises together: no one is left
    # waiting in a collective.
    if n == 1:
        raise ValueError(
            "SyncLpBatchNorm: expected more than 1 value per channel over all processes when "
            f"training, got 1 (local input size {shape})"
        )
    if p == math.inf and k is not None and k > n:
        raise ValueError(
            f"SyncLpBatchNorm: Top(k) needs k <= n values per channel over all processes, got "
            f"k={k} > n={n} (local input size {shape})"
        )


class _SyncLpBatchNormFunction(torch.autograd.Function):
    """x (compute dtype, (N, C, *)) -> x̂ with global statistics; updates the running buffers."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        p: float,
        k: int | None,
        constant: str,
        group: Any,
    ) -> Tensor:
        world = dist.get_world_size(group)
        c = x.shape[1]
        dims = _reduce_dims(x)
        m = x.numel() // c  # local values per channel; 0 for an empty shard
        dt = x.dtype
        # Counts and first-round sums travel in float64: a float32 count is exact only to 2^24.
        if p == 2.0:
            if m > 0:
                local_mean = x.mean(dims)
                local_m2 = (x - channel_view(local_mean, x.dim())).pow(2).sum(dims)
            else:
                local_mean = x.new_zeros(c)
                local_m2 = x.new_zeros(c)
            packed = torch.cat([x.new_full((1,), float(m)), local_mean, local_m2]).to(torch.float64)
            parts = [torch.empty_like(packed) for _ in range(world)]
            dist.all_gather(parts, packed, group=group)
            table = torch.stack(parts)  # (world, 1 + 2C)
            counts = table[:, :1]
            n = int(round(float(counts.sum())))
            _check_global_n(n, p, k, list(x.shape))
            if n == 0:
                return _empty(ctx, x)
            means, m2s = table[:, 1:1 + c], table[:, 1 + c:]
            mean64 = (counts * means).sum(0) / n
            # Chan et al.: the global Σ(x − μ)² from each process's own Σ(x − μ_r)².
            m2 = m2s.sum(0) + (counts * (means - mean64).pow(2)).sum(0)
            mean = mean64.to(dt)
            var = (m2 / n).to(dt)
            d = x - channel_view(mean, x.dim())
            inv = torch.rsqrt(var + eps)
            sigma = var.sqrt()
            pattern = None
            scale = 1.0
        else:
            packed = torch.cat([x.new_full((1,), float(m)), x.sum(dims)]).to(torch.float64)
            dist.all_reduce(packed, group=group)
            n = int(round(float(packed[0])))
            _check_global_n(n, p, k, list(x.shape))
            if n == 0:
                return _empty(ctx, x)
            mean = (packed[1:] / n).to(dt)
            d = x - channel_view(mean, x.dim())
            scale = lp_constant(p, k, n, constant)
            pattern = None
            if p == 1.0:
                total = d.abs().sum(dims)
                dist.all_reduce(total, group=group)
                spread = total / n
            else:
                spread, pattern = _global_topk(d, 1 if k is None else k, m, world, group)
            sigma = spread * scale
            inv = 1.0 / (sigma + eps)
        if running_mean is not None or running_var is not None:
            update_running(running_mean, running_var, mean, sigma, n, momentum)
        ctx.empty = False
        ctx.save_for_backward(d, inv, pattern)
        ctx.p, ctx.k, ctx.n, ctx.scale, ctx.group = p, k, n, scale, group
        return d * channel_view(inv, x.dim())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.empty:  # every process was empty: nothing to reduce, on any of them
            return (grad, None, None, None, None, None, None, None, None)
        d, inv, pattern = ctx.saved_tensors
        p, k, n, scale = ctx.p, ctx.k, ctx.n, ctx.scale
        dims = _reduce_dims(d)
        grad = grad.to(d.dtype)
        if p == 1.0:
            pattern = d.sign()
        elif p == math.inf:
            pattern = d.sign() * pattern
        sums = closed_form_sums(grad, d, pattern, dims)
        dist.all_reduce(sums, group=ctx.group)
        out = closed_form_grad(grad, d, channel_view(inv, d.dim()), pattern, sums, n, p, k, scale,
                               dims)
        return (out, None, None, None, None, None, None, None, None)


def _empty(ctx: Any, x: Tensor) -> Tensor:
    # The whole batch is empty (on every process): as torch, an empty output and no update.
    ctx.empty = True
    return x.clone()


def _global_topk(d: Tensor, k: int, m: int, world: int, group: Any) -> tuple[Tensor, Tensor]:
    """Mean of the k largest |d| per channel over all processes, and the local selection mask.

    Ties go to the lowest index of the concatenated batch: each process offers its own k
    largest (ties to its lowest indices) in index order, the offers are concatenated in rank
    order, and :func:`~normmatters.functional.norm.topk_mask` keeps the first among equals.
    """
    c = d.shape[1]
    rank = dist.get_rank(group)
    kk = min(k, m)
    local = _by_channel(d.abs())  # (C, m)
    cand = d.new_full((c, k), -1.0)  # |d| >= 0, so the padding is never among the top k
    idx = torch.zeros(c, k, dtype=torch.long, device=d.device)
    if kk > 0:
        mine = topk_mask(local, kk)
        # The selected positions in index order: a stable sort puts the True entries first.
        order = mine.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :kk]
        cand[:, :kk] = local.gather(1, order)
        idx[:, :kk] = order
    parts = [torch.empty_like(cand) for _ in range(world)]
    dist.all_gather(parts, cand, group=group)
    table = torch.cat(parts, dim=1)  # (C, world·k), rank-major
    chosen = topk_mask(table, k)
    best = torch.where(chosen, table, torch.zeros_like(table)).sum(1) / k
    slots = chosen[:, rank * k:rank * k + kk]
    mask = torch.zeros(c, max(m, 1), dtype=torch.bool, device=d.device)
    if kk > 0:
        mask.scatter_(1, idx[:, :kk], slots)
    mask = mask[:, :m]
    return best, _from_channel(mask, d)


class SyncLpBatchNorm(LpBatchNormBase):
    r"""Lp batch normalization with statistics over every process of a group (Hoffer et al.
    2018, Sec. 4).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\hat\sigma_p + \epsilon} \gamma + \beta

    with E[x] and σ̂ per channel over the batch of *all* processes in ``process_group`` (the
    whole world by default): at ``p=2`` σ̂ = √(Var[x]+ε) as :class:`torch.nn.SyncBatchNorm`; at
    ``p=1`` σ̂ = √(π/2)·mean|x − E[x]|; at ``p=inf`` σ̂ = C_∞(n)·max|x − E[x]|, and with ``k``,
    Top(k): C_k(n)·(mean of the k largest deviations), n being the global count. The outputs,
    input gradients and running statistics equal those of :class:`LpBatchNorm2d` (or 1d / 3d) of
    the same p on the concatenated batch; uneven and empty shards are handled.

    Synchronization happens only in training mode with an initialised process group of more
    than one process; otherwise (evaluation with running statistics, one process, no
    ``torch.distributed``) the layer is exactly the :class:`LpBatchNorm2d` of the same p.
    Evaluation never communicates. The input may be on any device whose backend the process
    group supports (gloo on CPU, NCCL on GPU). Second derivatives are not supported.

    Convert a model with :func:`normmatters.convert.convert_sync_lp_batchnorm`. Parameters and
    buffers have the names of :class:`torch.nn.BatchNorm2d`, so state dicts load both ways.

    Args:
        num_features: C, the number of channels of an input of size (N, C, +).
        eps, momentum, affine, track_running_stats, process_group, device, dtype, bias: as in
            :class:`torch.nn.SyncBatchNorm` (``momentum=None`` is a cumulative average).
        p: 1, 2 or ``inf`` (keyword-only).
        k: with ``p=inf``, use the mean of the k largest absolute deviations (Top(k)).
        constant: ``"calibrated"`` (default), ``"paper"`` or ``"none"`` (see
            :func:`normmatters.functional.lp_constant`).

    Shape:
        - Input: (N, C, +)
        - Output: same shape as the input.

    Examples::

        >>> m = SyncLpBatchNorm(16, p=1)
        >>> y = m(torch.randn(8, 16, 5, 5))   # without a process group: LpBatchNorm2d(16, p=1)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        p: float | int | str = 2,
        k: int | None = None,
        constant: str = "calibrated",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, p=p, k=k, constant=constant)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}: expected an input of at least 2 dimensions (N, C, ...), "
                f"got {input.dim()}D input of shape {list(input.shape)}"
            )

    def _sync_group(self) -> Any | None:
        """The process group to synchronize over, or None when there is nothing to synchronize."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        _check_dtype(name, input)
        self._check_input_dim(input)
        self.check_channels(input)
        bn_training, factor, running_mean, running_var = self.batch_norm_state()

        # As torch's SyncBatchNorm: synchronize only in training mode (never in evaluation, even
        # with track_running_stats=False, where each process uses its own batch).
        group = self._sync_group() if (bn_training and self.training) else None
        if group is None:
            check_batch_norm_input(input, bn_training, self.eps, name)
            if bn_training and self.k is not None and input.numel() > 0:
                check_k(self.k, input.numel() // input.shape[1], name, "channel")
            return dispatch_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                self.eps, self.p, self.k, self.constant,
            )
        if self.eps <= 0.0:
            raise ValueError(f"{name}: eps must be positive during training, got {self.eps}")
        x = input.to(compute_dtype(input))
        xhat = _SyncLpBatchNormFunction.apply(
            x, running_mean, running_var, factor, self.eps, self.p, self.k, self.constant, group
        )
        return channel_affine(xhat, self.weight, self.bias, input.dim()).to(input.dtype)
