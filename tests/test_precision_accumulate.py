"""Where a low-precision normalization accumulates (Hoffer et al. 2018, Sec. 5).

By default the elementwise work is in the format and the sums in float32, so L1 stays finite and
accurate on activations of large scale, while L2 fails exactly where its squares d² overflow the
format. Sums in the format are an option: plain sums overflow (for L1 too, once n·mean|d| exceeds
the format's max); the averaging reductions ``pairwise_mean`` / ``blocked_mean`` cannot."""

import math

import pytest
import torch

from normmatters.functional import lp_batch_norm, lp_dispersion, lp_layer_norm
from normmatters.nn import LpBatchNorm2d, LpLayerNorm
from normmatters.precision import (
    MEAN_SUMMATIONS,
    Arithmetic,
    NonfiniteRecorder,
    emulated_batch_norm,
    emulated_dispersion,
    emulated_layer_norm,
    emulated_mean,
    emulated_sum,
    round_to_format,
)

FP16_MAX = 65504.0


def _raw_activations(scale: float, shape=(32, 4, 8, 8), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g)


def _float64_bn(x: torch.Tensor, p) -> torch.Tensor:
    return lp_batch_norm(x.double(), None, None, None, None, True, p=p).float()


# ----------------------------------------------------------------------------- the default

def test_default_fp16_module_sums_in_float32_so_l1_is_finite_on_std_400():
    # The reported failure: LpBatchNorm2d(C, p=1, compute_dtype=fp16) gave 100% non-finite output
    # on activations of std 400, because Σ|d| ≈ 0.8·400·2048 ≈ 650000 overflowed an fp16 sum.
    x = _raw_activations(400.0)
    m = LpBatchNorm2d(4, p=1, compute_dtype=torch.float16)
    with NonfiniteRecorder() as rec:
        y = m(x).detach()
    assert torch.isfinite(y).all()
    assert rec.total_nonfinite() == 0
    # close to float64: a few fp16 units of x̂ (|x̂| ≲ 4, ulp 2^-9 at 4)
    assert float((y - _float64_bn(x, 1)).abs().max()) < 0.01
    assert torch.isfinite(m.running_var).all()
    sigma64 = lp_dispersion(x.double() - x.double().mean((0, 2, 3), keepdim=True), (0, 2, 3), p=1).flatten()
    n = x.numel() // 4
    expect = 0.9 + 0.1 * sigma64.pow(2) * n / (n - 1)
    torch.testing.assert_close(m.running_var.double(), expect, rtol=2e-3, atol=0)
    # the module and the functional agree on the default (float32 sums)
    explicit = emulated_batch_norm(x, None, None, m.weight, m.bias, True, p=1, compute_dtype="fp16",
                                   accumulate_dtype=torch.float32)
    torch.testing.assert_close(y, explicit)


def test_default_fp16_l2_fails_by_its_squares_at_raw_scale_not_at_standardized_scale():
    # Claim C4: with float32 sums, L2 fails in fp16 because d² > 65504 once |d| > 256 — not
    # because of the sum. At std 400 most squares overflow; at std 1 none do and L2 is accurate.
    x = _raw_activations(400.0)
    with NonfiniteRecorder() as rec:
        y2 = emulated_batch_norm(x, None, None, training=True, p=2, compute_dtype=torch.float16)
    t = rec.totals()
    n_big = int(((x - x.mean((0, 2, 3), keepdim=True)).abs() > 256).sum())
    assert t["square"]["nonfinite"] > 0
    # every square that overflows is one whose |d| exceeds √65504 ≈ 256 (up to fp16 rounding of d)
    assert abs(t["square"]["nonfinite"] - n_big) <= 0.01 * n_big
    assert t["dispersion"]["nonfinite"] == 4             # an inf square makes the float32 sum inf
    assert float(y2.abs().max()) == 0.0                   # x̂ = d / inf
    xs = _raw_activations(1.0)
    with NonfiniteRecorder() as rec:
        y2s = emulated_batch_norm(xs, None, None, training=True, p=2, compute_dtype=torch.float16)
    assert rec.total_nonfinite() == 0
    assert float((y2s - _float64_bn(xs, 2)).abs().max()) < 0.01


@pytest.mark.parametrize("fmt,scale,p_fail", [
    ("bf16", 1e20, 2),        # bf16 squares overflow 3.4e38 once |d| > 1.8e19
    ("fp8_e5m2", 400.0, 2),   # e5m2 squares overflow 57344 once |d| > 239
    ("fp8_e4m3", 10.0, 2),    # e4m3 squares overflow 448 (to NaN) once |d| > 21
])
def test_default_float32_sums_in_other_formats(fmt, scale, p_fail):
    x = _raw_activations(scale, shape=(16, 3, 8, 8), seed=1)
    y1 = emulated_batch_norm(x, None, None, training=True, p=1, compute_dtype=fmt)
    assert torch.isfinite(y1).all()
    assert torch.equal(round_to_format(y1, fmt), y1)
    # within the format's resolution of x̂ (2^-(man_bits+1) relative, |x̂| ≲ 4)
    tol = {"bf16": 0.05, "fp8_e5m2": 0.8, "fp8_e4m3": 0.5}[fmt]
    assert float((y1 - _float64_bn(x, 1)).abs().max()) < tol
    s1 = emulated_dispersion(x.transpose(0, 1).reshape(3, -1), p=1, compute_dtype=fmt)
    ref = lp_dispersion(x.double().transpose(0, 1).reshape(3, -1)
                        - x.double().transpose(0, 1).reshape(3, -1).mean(-1, keepdim=True), -1, p=1)
    assert float(((s1.double() - ref).abs() / ref).max()) < 0.01
    with NonfiniteRecorder() as rec:
        emulated_batch_norm(x, None, None, training=True, p=p_fail, compute_dtype=fmt)
    assert rec.totals()["square"]["nonfinite"] > 0


def test_default_layer_norm_sums_in_float32():
    g = torch.Generator().manual_seed(2)
    x = 400.0 * torch.randn(6, 1024, generator=g)
    ref1 = lp_layer_norm(x.double(), (1024,), p=1).float()
    y1 = emulated_layer_norm(x, 1024, p=1, compute_dtype=torch.float16)
    assert torch.isfinite(y1).all() and float((y1 - ref1).abs().max()) < 0.01
    m = LpLayerNorm(1024, p=1, compute_dtype=torch.float16)
    torch.testing.assert_close(m(x), y1, rtol=0, atol=0)
    y2 = emulated_layer_norm(x, 1024, p=2, compute_dtype=torch.float16)
    assert float(y2.abs().max()) == 0.0   # squares overflow, as for batch norm
    # fp16 sums overflow for L1 too: Σ|d| over 1024 values ≈ 0.8·400·1024 ≈ 330000
    y16 = emulated_layer_norm(x, 1024, p=1, compute_dtype="fp16", accumulate_dtype="fp16")
    assert float(y16.abs().max()) == 0.0
    ym = emulated_layer_norm(x, 1024, p=1, compute_dtype="fp16", accumulate_dtype="fp16",
                             summation="pairwise_mean")
    assert torch.isfinite(ym).all() and float((ym - ref1).abs().max()) < 0.02


# ----------------------------------------------------------------------------- sums in the format

@pytest.mark.parametrize("summation", ["pairwise", "blocked", "sequential"])
def test_fp16_plain_sums_overflow_for_l1_at_large_n_times_scale(summation):
    x = _raw_activations(400.0, shape=(32, 2, 8, 8))  # n = 2048: Σ|d| ≈ 650000 > 65504
    with NonfiniteRecorder() as rec:
        y = emulated_batch_norm(x, None, None, training=True, p=1, compute_dtype="fp16",
                                accumulate_dtype="fp16", summation=summation)
    t = rec.totals()
    assert t["abs"]["nonfinite"] == 0       # every |d| fits …
    assert t["sum"]["nonfinite"] == 2       # … their fp16 sum does not, in each channel
    assert float(y.abs().max()) == 0.0
    # at a scale where n·mean|d| fits (std 1: Σ|d| ≈ 1600), the same sums are fine
    xs = _raw_activations(1.0, shape=(32, 2, 8, 8))
    ys = emulated_batch_norm(xs, None, None, training=True, p=1, compute_dtype="fp16",
                             accumulate_dtype="fp16", summation=summation)
    tol = 0.25 if summation == "sequential" else 0.01   # a running fp16 sum swamps (σ̂ ≈ 4% low)
    assert float((ys - _float64_bn(xs, 1)).abs().max()) < tol


@pytest.mark.parametrize("summation", MEAN_SUMMATIONS)
@pytest.mark.parametrize("fmt,tol", [("fp16", 0.002), ("bf16", 0.015)])
def test_averaging_reductions_stay_finite_and_accurate(summation, fmt, tol):
    # The stated tolerance: relative error of σ̂ within ⌈log2 n⌉·u/2 or so; 0.2% for fp16
    # (u = 2^-10) and 1.5% for bf16 (u = 2^-7) at n = 2048, measured with margin.
    x = _raw_activations(400.0, shape=(32, 2, 8, 8), seed=3)
    cn = x.transpose(0, 1).reshape(2, -1).double()
    xf = round_to_format(cn, fmt).double()
    ref = lp_dispersion(xf - xf.mean(-1, keepdim=True), -1, p=1)
    with NonfiniteRecorder() as rec:
        s = emulated_dispersion(cn, p=1, compute_dtype=fmt, accumulate_dtype=fmt, summation=summation)
        y = emulated_batch_norm(x, None, None, training=True, p=1, compute_dtype=fmt,
                                accumulate_dtype=fmt, summation=summation)
    assert rec.total_nonfinite() == 0
    assert float(((s.double() - ref).abs() / ref).max()) < tol
    assert float((y - _float64_bn(x, 1)).abs().max()) < 10 * tol
    # the same scale overflows the plain sums of the format
    plain = emulated_dispersion(cn, p=1, compute_dtype=fmt, accumulate_dtype=fmt)
    assert fmt == "bf16" or math.isinf(float(plain.max()))


@pytest.mark.parametrize("summation", MEAN_SUMMATIONS)
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001, 4096])
def test_emulated_mean_cannot_overflow_and_stays_in_the_range_of_its_inputs(summation, n):
    full = torch.full((3, n), FP16_MAX)
    assert float(emulated_sum(full, "fp16")[0]) == (FP16_MAX if n == 1 else math.inf)
    torch.testing.assert_close(emulated_mean(full, "fp16", summation=summation, block_size=5),
                               torch.full((3, 1), FP16_MAX), rtol=0, atol=0)
    g = torch.Generator().manual_seed(n)
    x = round_to_format(torch.rand(4, n, generator=g) * 60000 + 5000, "fp16")
    m = emulated_mean(x, "fp16", summation=summation, block_size=5)
    assert torch.equal(round_to_format(m, "fp16"), m)                 # a number of the format
    assert bool((m >= x.amin(-1, keepdim=True)).all() and (m <= x.amax(-1, keepdim=True)).all())
    exact = x.double().mean(-1, keepdim=True)
    bound = (math.ceil(math.log2(n)) + 1) * 2.0 ** -11                 # one half-ulp per level
    assert float(((m.double() - exact).abs() / exact).max()) <= bound


def test_emulated_mean_with_plain_sums_and_float32():
    x = torch.full((1, 4096), 400.0)
    assert math.isinf(float(emulated_mean(x, "fp16")))                 # Σ = 1.6e6 overflows
    assert float(emulated_mean(x, "fp16", summation="pairwise_mean")) == 400.0
    y = torch.randn(3, 100)
    torch.testing.assert_close(emulated_mean(y, None), y.mean(-1, keepdim=True))
    torch.testing.assert_close(emulated_mean(y, "fp32", summation="blocked_mean"), y.mean(-1, keepdim=True))


def test_averaging_reductions_are_refused_where_they_mean_nothing():
    with pytest.raises(ValueError, match="emulated_mean"):
        emulated_sum(torch.ones(1, 8), "fp16", summation="pairwise_mean")
    with pytest.raises(ValueError, match="native"):
        Arithmetic("fp16", "fp16", summation="blocked_mean", backend="native")
    with pytest.raises(ValueError, match="empty"):
        emulated_mean(torch.ones(2, 0), "fp16", summation="pairwise_mean")
    with pytest.raises(ValueError, match="block_size"):
        emulated_mean(torch.ones(2, 4), "fp16", summation="blocked_mean", block_size=0)


def test_accumulate_default_is_float32_and_the_format_is_explicit():
    assert Arithmetic("fp16").accumulate.name == "fp32"
    assert Arithmetic("fp16", "fp16").accumulate.name == "fp16"
    assert Arithmetic(torch.bfloat16, torch.bfloat16, summation="pairwise_mean").summation == "pairwise_mean"


def test_emulated_ghost_batches_are_the_functionals():
    # compute_dtype=float32 rounds nothing: the ghost split, the statistics merge and the running
    # update must be lp_batch_norm's.
    x = torch.randn(10, 3, 4, 4) * 2 + 1
    for p in (1, 2, "inf"):
        rm1, rv1 = torch.zeros(3), torch.ones(3)
        rm2, rv2 = rm1.clone(), rv1.clone()
        y1 = emulated_batch_norm(x, rm1, rv1, None, None, True, 0.3, 1e-5, p=p, compute_dtype="fp32",
                                 ghost_batch_size=4)
        y2 = lp_batch_norm(x, rm2, rv2, None, None, True, 0.3, 1e-5, p=p, ghost_batch_size=4)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm1, rm2)
        torch.testing.assert_close(rv1, rv2)
    with pytest.raises(ValueError, match="last ghost batch"):
        emulated_batch_norm(torch.randn(5, 3), None, None, training=True, compute_dtype="fp16",
                            ghost_batch_size=4)


@pytest.mark.parametrize("summation", MEAN_SUMMATIONS)
@pytest.mark.parametrize("n", [5, 64, 1001])
def test_averaging_reductions_weigh_every_value_by_one_over_n(summation, n):
    # Through the straight-through roundings the mean's gradient is the product of the weights
    # along each value's path: exactly 1/n for every value iff the tree's weights are right.
    x = (torch.rand(2, n) + 1).requires_grad_()
    (g,) = torch.autograd.grad(emulated_mean(x, "fp16", summation=summation, block_size=7).sum(), x)
    torch.testing.assert_close(g, torch.full_like(g, 1.0 / n), rtol=1e-6, atol=0)
    y = emulated_batch_norm(x.detach().reshape(2, 1, n).transpose(0, 1).contiguous().requires_grad_(),
                            None, None, training=True, p=1, compute_dtype="fp16", accumulate_dtype="fp16",
                            summation=summation)
    assert torch.isfinite(y).all()


def test_evaluation_takes_the_root_of_the_float32_running_variance():
    """L1 in fp16 with fp16 means: a running σ̂² beyond fp16's range (σ̂ ≈ 1000) still evaluates,
    since σ̂ is representable; L2's evaluation rounds σ̂² + eps, as torch's formula needs it."""
    import normmatters as nm

    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8) * 1000 + 500
    kw = dict(compute_dtype="fp16", accumulate_dtype="fp16", precision_kwargs={"summation": "pairwise_mean"})
    m = nm.LpBatchNorm2d(4, p=1, **kw)
    m(x)
    assert float(m.running_var.max()) > 65504  # σ̂² itself overflows fp16
    m.eval()
    y = m(x)
    assert torch.isfinite(y).all() and 0.5 < float(y.std()) < 20
