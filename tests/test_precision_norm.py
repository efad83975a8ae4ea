"""Normalization computed in a format (Hoffer et al. 2018, Sec. 5): the emulation has the
functional's semantics, every intermediate is in the format, sums accumulate in float32 by default
and in the format on request (overflow, swamping, or averaging reductions that cannot overflow),
and the L2 / L1 difference of claim C4 is where the arithmetic says it is."""

import math

import pytest
import torch

from normmatters.functional import lp_batch_norm, lp_layer_norm
from normmatters.precision import (
    Arithmetic,
    NonfiniteRecorder,
    emulated_batch_norm,
    emulated_dispersion,
    emulated_layer_norm,
    emulated_sum,
    round_to_format,
)

INF = float("inf")
KINDS = [(1, None), (2, None), (INF, None), (INF, 5)]
KIND_IDS = ["l1", "l2", "linf", "top5"]


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_float32_emulation_is_the_functional(p, k, momentum):
    # compute_dtype=float32 rounds nothing: the emulation must be lp_batch_norm (train, running
    # statistics with Bessel's factor, eval), which pins the formulas and their order.
    x = torch.randn(6, 4, 3, 5) * 3 + 1
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm1, rv1 = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = emulated_batch_norm(x, rm1, rv1, w, b, True, momentum, 1e-5, p=p, k=k, compute_dtype=torch.float32)
    y2 = lp_batch_norm(x, rm2, rv2, w, b, True, momentum, 1e-5, p=p, k=k)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)
    e1 = emulated_batch_norm(x, rm1, rv1, w, b, False, momentum, 1e-5, p=p, k=k, compute_dtype="fp32")
    e2 = lp_batch_norm(x, rm2, rv2, w, b, False, momentum, 1e-5, p=p, k=k)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_float32_emulation_gradients_are_the_functional(p, k):
    x = (torch.randn(5, 3, 4, dtype=torch.float32) * 2).requires_grad_()
    w = (torch.rand(3) + 0.5).requires_grad_()
    g = torch.randn(5, 3, 4)
    a = torch.autograd.grad((emulated_batch_norm(x, None, None, w, None, True, p=p, k=k,
                                                 compute_dtype=torch.float32) * g).sum(), (x, w))
    r = torch.autograd.grad((lp_batch_norm(x, None, None, w, None, True, p=p, k=k) * g).sum(), (x, w))
    for u, v in zip(a, r):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e4m3"])
def test_low_precision_output_is_in_the_format_and_close_to_float(p, k, fmt):
    x = torch.randn(16, 4, 6, 6)
    # sums in the format itself; fp8 sums of 576 values would overflow e4m3 (max 448): accumulate
    # those in fp16
    acc = "fp16" if fmt.startswith("fp8") else fmt
    y = emulated_batch_norm(x, None, None, torch.rand(4) + 0.5, torch.randn(4), True, p=p, k=k,
                            compute_dtype=fmt, accumulate_dtype=acc)
    assert torch.equal(round_to_format(y, fmt), y)  # every output value is a number of the format
    ref = lp_batch_norm(x, None, None, None, None, True, p=p, k=k)
    y0 = emulated_batch_norm(x, None, None, None, None, True, p=p, k=k, compute_dtype=fmt, accumulate_dtype=acc)
    # a few units of the format's precision over |x̂| ≲ 4 (fp8 e4m3: 2^-3 relative)
    tol = {"fp16": 0.01, "bf16": 0.08, "fp8_e4m3": 0.8}[fmt]
    assert float((y0 - ref).abs().max()) < tol


def test_sums_accumulate_in_the_format():
    ones = torch.ones(1, 4096)
    # A running fp16 sum stops at 2048: 2048 + 1 is a tie that rounds to even (swamping).
    assert float(emulated_sum(ones, "fp16", summation="sequential")) == 2048.0
    assert float(emulated_sum(ones, "fp16", summation="pairwise")) == 4096.0
    assert float(emulated_sum(ones, "fp16", summation="blocked", block_size=64)) == 4096.0
    assert float(emulated_sum(ones[:, :3000], "fp16", summation="blocked", block_size=64)) == 3000.0
    # bf16 (8 bits of precision) swamps at 256
    assert float(emulated_sum(ones, "bf16", summation="sequential")) == 256.0
    # overflow whatever the order
    big = torch.full((1, 64), 2048.0)
    for order in ("pairwise", "sequential", "blocked"):
        assert math.isinf(float(emulated_sum(big, "fp16", summation=order)))
        assert math.isnan(float(emulated_sum(big, "fp8_e4m3", summation=order)))
    # fp32 accumulation sums with torch
    torch.testing.assert_close(emulated_sum(big, "fp32"), big.sum(-1, keepdim=True))


def test_fp16_sums_l2_overflows_where_l1_does_not():
    # With fp16 sums: n = 16384 values per channel, σ = 3: Σd² ≈ 147000 > 65504, Σ|d| ≈ 39000 < 65504.
    x = 3 * torch.randn(64, 4, 16, 16)
    with NonfiniteRecorder() as rec:
        with rec.scope("l2"):
            y2 = emulated_batch_norm(x, None, None, training=True, p=2, compute_dtype=torch.float16,
                                     accumulate_dtype=torch.float16)
        with rec.scope("l1"):
            y1 = emulated_batch_norm(x, None, None, training=True, p=1, compute_dtype=torch.float16,
                                     accumulate_dtype=torch.float16)
    t = rec.totals()
    assert t["l2/square"]["nonfinite"] == 0          # each square fits (|d| < 256) …
    assert t["l2/sum"]["nonfinite"] == 4              # … their sum overflows in every channel
    assert t["l2/dispersion"]["nonfinite"] == 4
    assert rec.total_nonfinite("sum") == 4 and t["l1/sum"]["nonfinite"] == 0
    assert float(y2.abs().max()) == 0.0               # x̂ = d / inf
    assert abs(float(y1.std()) - 1.0) < 0.02
    # with float32 accumulation the squares themselves must overflow: |d| > 256
    x = torch.randn(8, 2, 8, 8)
    x[0, 0, 0, 0] = 300.0
    with NonfiniteRecorder() as rec:
        emulated_batch_norm(x, None, None, training=True, p=2, compute_dtype="fp16", accumulate_dtype="fp32")
    assert rec.totals()["square"]["nonfinite"] == 1


def test_fp16_l2_loses_small_squares_to_underflow():
    # σ = 1e-4: d² ≈ 1e-8 is below fp16's smallest subnormal (6e-8): the squares vanish.
    x = 1e-4 * torch.randn(1, 1, 4096, dtype=torch.float64)
    s2 = emulated_dispersion(x.reshape(1, -1), p=2, compute_dtype="fp16", accumulate_dtype="fp32")
    s1 = emulated_dispersion(x.reshape(1, -1), p=1, compute_dtype="fp16", accumulate_dtype="fp32")
    xr = round_to_format(x, "fp16").reshape(-1)
    true = float((xr - xr.mean()).pow(2).mean().sqrt())
    assert abs(float(s1) / true - 1) < 0.05       # L1 keeps its scale (≈ the Gaussian constant)
    assert abs(float(s2) / true - 1) > 0.2        # L2 lost most of it


def test_lead_module_routes_to_emulation():
    from normmatters.nn import LpBatchNorm2d

    m = LpBatchNorm2d(4, p=1, compute_dtype=torch.float16)
    x = torch.randn(8, 4, 5, 5)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    ref = emulated_batch_norm(x, rm, rv, m.weight, m.bias, True, 0.1, 1e-5, p=1, compute_dtype=torch.float16)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(m.running_var, rv)
    m.eval()
    assert torch.equal(round_to_format(m(x), "fp16"), m(x).detach())


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_layer_norm_emulation(p, k):
    x = torch.randn(3, 5, 12)
    w, b = torch.rand(12) + 0.5, torch.randn(12)
    y = emulated_layer_norm(x, (12,), w, b, 1e-5, p=p, k=k, compute_dtype=torch.float32)
    torch.testing.assert_close(y, lp_layer_norm(x, (12,), w, b, 1e-5, p=p, k=k), rtol=1e-5, atol=1e-5)
    y16 = emulated_layer_norm(x, 12, w, b, p=p, k=k, compute_dtype="fp16")
    assert torch.equal(round_to_format(y16, "fp16"), y16)


def test_round_grad_and_native_backend():
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    y = emulated_batch_norm(x, None, None, None, None, True, p=1, compute_dtype="fp16", round_grad=True)
    (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert torch.equal(round_to_format(gx, "fp16"), gx)  # the input gradient is in the format
    # native fp16 tensors (real arithmetic; on CPU torch accumulates reductions in float32) agree
    # with the emulation that accumulates in float32 to fp16 resolution
    xd = torch.randn(8, 3, 4, 4)
    nat = emulated_batch_norm(xd.half(), None, None, None, None, True, p=2, compute_dtype=torch.float16,
                              accumulate_dtype=torch.float32, backend="native")
    emu = emulated_batch_norm(xd, None, None, None, None, True, p=2, compute_dtype=torch.float16,
                              accumulate_dtype=torch.float32)
    assert nat.dtype == torch.float16
    assert float((nat.float() - emu).abs().max()) < 5e-3
    with pytest.raises(ValueError, match="native"):
        emulated_batch_norm(xd, None, None, training=True, compute_dtype="fp8_e4m3", backend="native")


def test_recorder_attach_scopes_by_layer_and_detaches():
    from normmatters.nn import LpBatchNorm2d

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False),
                              LpBatchNorm2d(2, p=2, compute_dtype="fp16"))
    with torch.no_grad():
        net[0].weight.fill_(300.0)
    rec = NonfiniteRecorder()
    rec.attach(net)
    net(torch.randn(4, 1, 3, 3))
    assert rec.totals()["1/square"]["nonfinite"] > 0
    rec.detach()
    rec.reset()
    net(torch.randn(4, 1, 3, 3))
    assert rec.totals() == {}


def test_refusals():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="integer format"):
        Arithmetic("int8")
    with pytest.raises(ValueError, match="summation"):
        emulated_batch_norm(x, None, None, training=True, compute_dtype="fp16", summation="random")
    with pytest.raises(ValueError, match="eps"):
        emulated_batch_norm(x, None, None, training=True, eps=0.0, compute_dtype="fp16")
    with pytest.raises(ValueError, match="running_mean"):
        emulated_batch_norm(x, None, None, training=False, compute_dtype="fp16")
    with pytest.raises(ValueError, match="more than 1 value"):
        emulated_batch_norm(torch.randn(1, 3), None, None, training=True, compute_dtype="fp16")
    assert emulated_batch_norm(torch.randn(0, 3, 2), None, None, training=True, compute_dtype="fp16").shape == (0, 3, 2)


@pytest.mark.parametrize("k", [None, 2])
def test_emulated_ties_follow_the_shared_tie_rule(k):
    # Tied largest |d| (L∞) and a tie at the k-th largest (Top(2)): the emulation selects the
    # positions the reference selects (lowest index first), so the gradients agree exactly.
    base = torch.tensor([3.0, -3.0, 3.0, 1.0, -1.0, 0.5, -0.5, -3.0])  # mean 0, |d| = 3 four times
    x = torch.stack([base, base.flip(0)], dim=1).reshape(8, 2, 1).requires_grad_()
    g = torch.randn(8, 2, 1)
    a = torch.autograd.grad((emulated_batch_norm(x, None, None, None, None, True, p="inf", k=k,
                                                 compute_dtype=torch.float32) * g).sum(), x)[0]
    r = torch.autograd.grad((lp_batch_norm(x, None, None, None, None, True, p="inf", k=k) * g).sum(), x)[0]
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
