r"""Triton kernels for the fused Lp normalizations on CUDA.

Same interface and layouts as :mod:`.cpu` (a dense ``[N, C, S]`` tensor stored NCS or NSC, i.e.
NCHW or channels-last): ``forward`` → ``(y, mean, inv, sigma)``, ``backward`` → ``(dx, dw, db)``.
Inputs and outputs are float16, bfloat16 or float32; every sum accumulates in float32, each term
scaled by 1/n first so that sums of values near float32's maximum stay finite.

Work split, chosen to keep a large GPU busy even with few channels: a 2-D grid of (channel
block × slice of the channel's N·S values) writes per-slice partial reductions, which a few
tiny torch ops over the ``[C, splits]`` partials combine; one elementwise kernel then writes the
output. Tiles are ``BLOCK_J`` values × ``BLOCK_C`` channels: one channel at a time along the
contiguous axis for NCHW, a block of adjacent channels for channels-last, so every load is
coalesced.

* forward, L1:   pass 1 Σx; pass 2 Σ|x − μ|; pass 3 y = (x − μ)·inv·γ + β  (reads x three times,
  as cuDNN's two-pass batch norm does);
* forward, L∞:   pass 1 Σx with max/min (and their first positions); pass 2 the output: σ̂ =
  C·max(max − μ, μ − min) needs no second reduction;
* forward, Top(k > 1): the k largest |x − μ| by ``torch.topk`` (one extra read and a temporary);
* backward:      pass 1 Σg, Σg·(x − μ) (and Σ sign(x − μ) for L1); pass 2 ∂L/∂x elementwise;
  for L∞ / Top(k) the k positions are found again as in the forward and corrected by indexing.

Correctness is tested on the CPU with ``TRITON_INTERPRET=1`` (tests/test_kernels_triton.py);
timing needs a GPU (``normmatters bench --device cuda``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

import triton
import triton.language as tl

__all__ = ["available", "supports", "forward", "backward"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether the Triton kernels can run: a CUDA device (or the Triton interpreter)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


#: The running statistics are updated by the caller (the CPU kernels update them in place).
FUSED_RUNNING = False


def supports(dtype: torch.dtype, layout: int = 0, affine: int = 1) -> bool:
    """float64 stays on the reference path (the kernels accumulate in float32); γ and β per
    position (layer and RMS norm) are applied by the caller."""
    return dtype in _SUPPORTED and affine != 2


@triton.jit
def _offsets(j, c, C, S, LAYOUT: tl.constexpr):
    # j: within-channel index n·S + s; memory offset of (j, c) in the NCS or NSC layout.
    if LAYOUT == 0:
        return ((j // S) * C + c) * S + (j % S)
    else:
        return j * C + c


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, psum_ptr, pmax_ptr, pmin_ptr, pimax_ptr, pimin_ptr,
                  C, S, n, inv_n, chunk, SPLIT,
                  LAYOUT: tl.constexpr, PASS: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    # PASS 0: Σx/n. PASS 1: Σx/n, max, min and their first positions. PASS 2: Σ|x − μ|/n.
    # Each term is scaled by 1/n before it is added, so no partial sum exceeds max|x|: the mean
    # of float32 values near 3e38 stays finite, as torch's does.
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    j_start = pid_s * chunk
    j_end = tl.minimum(j_start + chunk, n)
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    vmax = tl.full([BLOCK_J, BLOCK_C], float("-inf"), tl.float32)
    vmin = tl.full([BLOCK_J, BLOCK_C], float("inf"), tl.float32)
    imax = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.int64)
    imin = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.int64)
    for j0 in range(j_start, j_end, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        m = (j < j_end)[:, None] & cmask[None, :]
        offs = _offsets(j[:, None], cols[None, :].to(tl.int64), C, S, LAYOUT)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if PASS == 2:
            acc += tl.where(m, tl.abs(v - mu[None, :]) * inv_n, 0.0)
        else:
            acc += v * inv_n
        if PASS == 1:
            jj = j[:, None] + tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.int64)
            hi = tl.where(m, v, float("-inf"))
            up = hi > vmax  # strict: each lane keeps its first position of a tie
            vmax = tl.where(up, hi, vmax)
            imax = tl.where(up, jj, imax)
            lo = tl.where(m, v, float("inf"))
            dn = lo < vmin
            vmin = tl.where(dn, lo, vmin)
            imin = tl.where(dn, jj, imin)
    out = cols * SPLIT + pid_s
    tl.store(psum_ptr + out, tl.sum(acc, axis=0), mask=cmask)
    if PASS == 1:
        big = tl.full([BLOCK_J, BLOCK_C], 9223372036854775807, tl.int64)
        bmax = tl.max(vmax, axis=0)
        bmin = tl.min(vmin, axis=0)
        tl.store(pmax_ptr + out, bmax, mask=cmask)
        tl.store(pmin_ptr + out, bmin, mask=cmask)
        tl.store(pimax_ptr + out, tl.min(tl.where(vmax == bmax[None, :], imax, big), axis=0), mask=cmask)
        tl.store(pimin_ptr + out, tl.min(tl.where(vmin == bmin[None, :], imin, big), axis=0), mask=cmask)


@triton.jit
def _bwd_stats_kernel(g_ptr, x_ptr, mean_ptr, p1_ptr, p2_ptr, p3_ptr, C, S, n, inv_n, chunk,
                      SPLIT, LAYOUT: tl.constexpr, SIGN: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    # Σg/n, Σg·(x − μ)/n (scaled like the forward's sums) and (SIGN) Σ sign(x − μ) per slice.
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    j_start = pid_s * chunk
    j_end = tl.minimum(j_start + chunk, n)
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    a1 = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        m = (j < j_end)[:, None] & cmask[None, :]
        offs = _offsets(j[:, None], cols[None, :].to(tl.int64), C, S, LAYOUT)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - mu[None, :], 0.0)
        gs = g * inv_n
        a1 += gs
        a2 += gs * d
        if SIGN:
            a3 += tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)
    out = cols * SPLIT + pid_s
    tl.store(p1_ptr + out, tl.sum(a1, axis=0), mask=cmask)
    tl.store(p2_ptr + out, tl.sum(a2, axis=0), mask=cmask)
    tl.store(p3_ptr + out, tl.sum(a3, axis=0), mask=cmask)


@triton.jit
def _channel_of(o, C, S, LAYOUT: tl.constexpr):
    if LAYOUT == 0:
        return (o // S) % C
    else:
        return o % C


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mean_ptr, a_ptr, b_ptr, total, C, S,
                  LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
    # y = (x − μ_c)·a_c + b_c over the whole dense tensor.
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < total
    c = _channel_of(o, C, S, LAYOUT)
    v = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + c, mask=m, other=0.0)
    a = tl.load(a_ptr + c, mask=m, other=0.0)
    b = tl.load(b_ptr + c, mask=m, other=0.0)
    tl.store(y_ptr + o, ((v - mu) * a + b).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_apply_kernel(g_ptr, x_ptr, dx_ptr, mean_ptr, a_ptr, b_ptr, e_ptr, total, C, S,
                      LAYOUT: tl.constexpr, SIGN: tl.constexpr, BLOCK: tl.constexpr):
    # dx = a_c·g + b_c (+ e_c·sign(x − μ_c) for L1).
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < total
    c = _channel_of(o, C, S, LAYOUT)
    g = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + c, mask=m, other=0.0)
    b = tl.load(b_ptr + c, mask=m, other=0.0)
    r = a * g + b
    if SIGN:
        v = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + c, mask=m, other=0.0)
        e = tl.load(e_ptr + c, mask=m, other=0.0)
        d = v - mu
        r += e * (tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0))
    tl.store(dx_ptr + o, r.to(dx_ptr.dtype.element_ty), mask=m)


def _grid(x: Tensor, layout: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_J, BLOCK_C, channel blocks, splits, values per split)."""
    n_, c_, s_ = x.shape
    n = n_ * s_
    if layout == 0:
        block_j, block_c = 1024, 1
    else:
        block_c = min(64, triton.next_power_of_2(c_))
        block_j = max(16, 4096 // block_c)
    cblocks = triton.cdiv(c_, block_c)
    if x.is_cuda:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:  # the interpreter: few programs keep the CPU tests quick
        target = 4
    splits = max(1, min(triton.cdiv(target, cblocks), triton.cdiv(n, 4 * block_j)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block_j) * block_j
    splits = triton.cdiv(n, chunk)
    return block_j, block_c, cblocks, splits, chunk


def _flat(t: Tensor) -> Tensor:
    # The dense storage of an NCS or NSC view as one flat tensor (for indexing by memory offset).
    return t.as_strided((t.numel(),), (1,))


def _stats(x: Tensor, layout: int, mean: Tensor, pass_: int) -> tuple[Tensor, ...]:
    n_, c_, s_ = x.shape
    block_j, block_c, cblocks, splits, chunk = _grid(x, layout)
    f32 = dict(dtype=torch.float32, device=x.device)
    psum = torch.empty(c_, splits, **f32)
    pmax = torch.empty(c_, splits, **f32) if pass_ == 1 else psum
    pmin = torch.empty(c_, splits, **f32) if pass_ == 1 else psum
    i64 = dict(dtype=torch.int64, device=x.device)
    pimax = torch.empty(c_, splits, **i64) if pass_ == 1 else psum
    pimin = torch.empty(c_, splits, **i64) if pass_ == 1 else psum
    _stats_kernel[(cblocks, splits)](x, mean, psum, pmax, pmin, pimax, pimin, c_, s_, n_ * s_,
                                     1.0 / (n_ * s_), chunk, splits, LAYOUT=layout, PASS=pass_,
                                     BLOCK_J=block_j, BLOCK_C=block_c)
    return psum, pmax, pmin, pimax, pimin


def _first_best(vals: Tensor, idx: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    best = vals.amax(1) if largest else vals.amin(1)
    big = torch.iinfo(torch.int64).max
    pos = torch.where(vals == best[:, None], idx, torch.full_like(idx, big)).amin(1)
    return best, pos


def _linf(x: Tensor, layout: int, mean: Tensor, center: bool
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean x, max x, its first position, min x, its first position) per channel, in one pass."""
    psum, pmax, pmin, pimax, pimin = _stats(x, layout, mean, 1)
    xmax, imax = _first_best(pmax, pimax, True)
    xmin, imin = _first_best(pmin, pimin, False)
    return psum.sum(1), xmax, imax, xmin, imin


def _choose_linf(mu: Tensor, xmax: Tensor, imax: Tensor, xmin: Tensor, imin: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    up, dn = xmax - mu, mu - xmin
    # The larger deviation; on a tie the lower position (the rule of the CPU kernels).
    take_up = (up > dn) | ((up == dn) & (imax <= imin))
    amax = torch.where(take_up, up, dn)
    pos = torch.where(take_up, imax, imin)
    sign = torch.where(take_up, torch.sign(up), -torch.sign(dn))
    return amax, pos, sign


def _topk(x: Tensor, mean: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest |x − μ| per channel: values, within-channel positions, signs.

    Ties go to the lowest within-channel position (a stable sort), the rule of every path.
    """
    c_ = x.shape[1]
    d = (x.float() - mean.view(1, c_, 1)).transpose(0, 1).reshape(c_, -1)
    vals, pos = d.abs().sort(dim=1, descending=True, stable=True)
    vals, pos = vals[:, :k], pos[:, :k]
    return vals, pos, torch.sign(d.gather(1, pos))


def _positions_to_offsets(pos: Tensor, x: Tensor, layout: int) -> Tensor:
    n_, c_, s_ = x.shape
    c = torch.arange(c_, device=x.device).view(-1, 1)
    if layout == 0:
        return ((pos // s_) * c_ + c) * s_ + pos % s_
    return pos * c_ + c


def forward(x: Tensor, layout: int, weight: Tensor | None, bias: Tensor | None, mode: int, k: int,
            constant: float, eps: float, center: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused forward; see :func:`normmatters.kernels.cpu.forward`."""
    n_, c_, s_ = x.shape
    n = n_ * s_
    zeros = torch.zeros(c_, dtype=torch.float32, device=x.device)
    if mode == 2 and k == 1:
        xbar, xmax, imax, xmin, imin = _linf(x, layout, zeros, center)
        mean = xbar if center else zeros
        amax, _, _ = _choose_linf(mean, xmax, imax, xmin, imin)
        sigma = constant * amax
    else:
        mean = _stats(x, layout, zeros, 0)[0].sum(1) if center else zeros
        if mode == 1:
            sigma = constant * _stats(x, layout, mean, 2)[0].sum(1)
        else:
            sigma = constant * (_topk(x, mean, k)[0] / k).sum(1)  # scaled first: no overflow
    inv = 1.0 / (sigma + eps)
    a = inv * weight.float() if weight is not None else inv
    b = bias.float().contiguous() if bias is not None else zeros
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    block = 1024
    _apply_kernel[(triton.cdiv(x.numel(), block),)](x, y, mean.contiguous(), a.contiguous(), b,
                                                    x.numel(), c_, s_, LAYOUT=layout, BLOCK=block)
    return y, mean, inv, sigma


def backward(grad: Tensor, x: Tensor, layout: int, weight: Tensor | None, mean: Tensor, inv: Tensor,
             mode: int, k: int, constant: float, center: bool, need_input: bool,
             need_affine: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward (``normmatters.functional.norm``); see :func:`normmatters.kernels.cpu.backward`."""
    n_, c_, s_ = x.shape
    n = n_ * s_
    block_j, block_c, cblocks, splits, chunk = _grid(x, layout)
    f32 = dict(dtype=torch.float32, device=x.device)
    p1, p2, p3 = (torch.empty(c_, splits, **f32) for _ in range(3))
    sign = mode == 1 and center and need_input
    _bwd_stats_kernel[(cblocks, splits)](grad, x, mean, p1, p2, p3, c_, s_, n, 1.0 / n, chunk, splits,
                                         LAYOUT=layout, SIGN=sign, BLOCK_J=block_j,
                                         BLOCK_C=block_c)
    mdy, mdyd, ssg = p1.sum(1), p2.sum(1), p3.sum(1)  # mean(g), mean(g·d), Σ sign(d)
    dw = inv * mdyd * n if need_affine else None
    db = mdy * n if need_affine else None
    if not need_input:
        return None, dw, db
    gam = weight.float() if weight is not None else torch.ones_like(inv)
    big_m = gam * inv * mdyd
    mg = gam * mdy if center else torch.zeros_like(inv)
    a = inv * gam
    e = torch.zeros_like(inv)
    if mode == 1:
        b = inv * (-mg + (constant * big_m * ssg / n if center else 0.0))
        e = -inv * constant * big_m
    else:
        if k == 1:
            _, xmax, imax, xmin, imin = _linf(x, layout, mean, center)
            _, pos, sgn = _choose_linf(mean, xmax, imax, xmin, imin)
            pos, sgn = pos.view(-1, 1), sgn.view(-1, 1)
        else:
            _, pos, sgn = _topk(x, mean, k)
        st = sgn.sum(1)
        b = inv * (-mg + (constant * big_m * st / k if center else 0.0))
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    block = 1024
    _bwd_apply_kernel[(triton.cdiv(x.numel(), block),)](
        grad, x, dx, mean, a.contiguous(), b.contiguous(), e.contiguous(), x.numel(), c_, s_,
        LAYOUT=layout, SIGN=(mode == 1), BLOCK=block)
    if mode == 2:
        # Only the k positions per channel carry the gradient of σ̂: set them exactly.
        offs = _positions_to_offsets(pos, x, layout)
        g = _flat(grad)[offs].float()
        corr = (-inv * constant * big_m * n / k).view(-1, 1) * sgn
        _flat(dx)[offs] = (a.view(-1, 1) * g + b.view(-1, 1) + corr).to(dx.dtype)
    return dx, dw, db
