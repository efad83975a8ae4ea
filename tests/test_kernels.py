"""Fused Lp normalization kernels (normmatters.kernels) against the reference path.

The reference is the plain-torch path of normmatters.functional (autograd through torch ops),
selected with ``use_backend("reference")``. The fused path must agree with it in outputs,
gradients and running statistics, and its closed-form backward must pass gradcheck in float64.
The CPU kernels are compiled once (float32, float64 and bfloat16, about 2 s of compiler time each)
and cached on disk.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import normmatters.kernels as K
from normmatters.functional import lp_batch_norm, lp_group_norm, lp_layer_norm, lp_rms_norm
from normmatters.kernels import build, cpu
from normmatters.kernels.autograd import lp_norm_fwd
from normmatters.nn import LpBatchNorm2d, LpLayerNorm

from _shared import fused as _fused

pytestmark = pytest.mark.skipif(not K.available("cpu"), reason="no C++ compiler for the kernels")


@pytest.fixture(autouse=True, params=["operators", "python"])
def eager_path(request, monkeypatch):
    """Every test twice: through the C++ eager operators (csrc/lp_norm_op.cpp), and through the
    Python path around the same kernels that runs where the operators cannot be built."""
    if request.param == "python":
        monkeypatch.setattr(cpu, "_registered", {d: False for d in cpu.DTYPE_CODES})
    elif not cpu.eager_ops(torch.float32):
        pytest.skip("the C++ eager operators are unavailable")
    return request.param


NORMS = [(1, None), (math.inf, None), (math.inf, 3), (math.inf, 10)]
NORM_IDS = ["l1", "linf", "top3", "top10"]


def _run(fn, tensors, grad):
    """Output and gradients of ``fn(*tensors)`` for the given output gradient."""
    out = fn(*tensors)
    grads = torch.autograd.grad(out, [t for t in tensors if t is not None and t.requires_grad], grad)
    return out, grads


def _compare(fn, tensors, grad, atol, rtol=0.0):
    fused_out, fused_grads = _run(fn, tensors, grad)
    with K.use_backend("reference"):
        ref_out, ref_grads = _run(fn, tensors, grad)
    assert fused_out.dtype == ref_out.dtype and fused_out.shape == ref_out.shape
    assert fused_out.stride() == ref_out.stride()
    torch.testing.assert_close(fused_out, ref_out, atol=atol, rtol=rtol)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    return fused_out


def _leaf(*shape, dtype=torch.float32, scale=1.0, shift=0.0, channels_last=False):
    t = torch.randn(*shape, dtype=torch.float64) * scale + shift
    t = t.to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(True)


# ------------------------------------------------------------------ batch norm
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("p,k", NORMS, ids=NORM_IDS)
def test_batch_norm_matches_reference(p, k, channels_last, dtype, atol):
    x = _leaf(6, 5, 7, 9, dtype=dtype, scale=3.0, shift=1.0, channels_last=channels_last)
    w = _leaf(5, dtype=dtype)
    b = _leaf(5, dtype=dtype)
    g = torch.randn(6, 5, 7, 9, dtype=dtype)
    stats = {}

    def fn(x, w, b):
        rm, rv = torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype)
        y = lp_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, p=p, k=k)
        stats[K.get_backend()] = (rm, rv)
        return y

    y = _compare(fn, (x, w, b), g, atol=atol)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    # Running statistics (Bessel-corrected σ̂², momentum) as the reference's.
    for a, r in zip(stats["auto"], stats["reference"]):
        torch.testing.assert_close(a, r, atol=atol, rtol=0)


@pytest.mark.parametrize("shape", [(16, 4), (8, 3, 11), (2, 3, 2, 3, 4)], ids=["1d", "1d-len", "3d"])
@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
def test_batch_norm_other_ranks(shape, p, k):
    x = _leaf(*shape, scale=2.0)
    w, b = _leaf(shape[1]), _leaf(shape[1])
    g = torch.randn(shape)
    _compare(lambda x, w, b: lp_batch_norm(x, None, None, w, b, True, p=p, k=k), (x, w, b), g, 1e-5)


@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
def test_batch_norm_without_affine_and_noncontiguous(p, k):
    base = _leaf(6, 10, 5, 8)
    x = base[:, ::2]  # neither NCHW- nor channels-last-contiguous: copied to NCHW
    g = torch.randn(x.shape)
    _compare(lambda x: lp_batch_norm(x, None, None, None, None, True, p=p, k=k), (x,), g, 1e-5)


@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
def test_batch_norm_bfloat16_close_to_reference(p, k):
    x = _leaf(8, 4, 6, 6, dtype=torch.bfloat16, scale=2.0)
    w, b = _leaf(4), _leaf(4)
    g = torch.randn(8, 4, 6, 6).to(torch.bfloat16)
    # Both compute in float32; they differ by the rounding of their outputs (one bf16 ulp).
    _compare(lambda x, w, b: lp_batch_norm(x, None, None, w, b, True, p=p, k=k), (x, w, b), g,
             atol=0.05, rtol=0.02)


@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
def test_closed_form_backward_gradcheck(p, k):
    # Finite differences of the fused forward against its closed-form backward (SPEC §2).
    x = _leaf(3, 2, 4, 5, dtype=torch.float64)
    w, b = _leaf(2, dtype=torch.float64), _leaf(2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: lp_batch_norm(x, None, None, w, b, True, p=p, k=k), (x, w, b))
    y = _leaf(4, 3, 6, dtype=torch.float64)
    wy = _leaf(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y, w: lp_rms_norm(y, (6,), w, 1e-3, p=p, k=k), (y, wy))
    # Layer norm: γ and β per position are fused into the kernels (the rows backward).
    by = _leaf(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda y, w, b: lp_layer_norm(y, (6,), w, b, 1e-5, p=p, k=k), (y, wy, by))


def test_fused_path_is_the_default_and_switchable():
    x = _leaf(4, 3, 5, 5)
    assert K.get_backend() == "auto"
    assert _fused(lp_batch_norm(x, None, None, training=True, p=1))
    with K.use_backend("reference"):
        assert not _fused(lp_batch_norm(x, None, None, training=True, p=1))
    assert K.get_backend() == "auto"
    K.set_backend("reference")
    try:
        assert not _fused(lp_batch_norm(x, None, None, training=True, p=1))
    finally:
        K.set_backend("auto")
    with pytest.raises(ValueError, match="backend"):
        K.set_backend("cuda-please")


def test_module_uses_fused_path_and_matches_reference():
    m = LpBatchNorm2d(4, p=1)
    ref = LpBatchNorm2d(4, p=1)
    x = _leaf(8, 4, 3, 3)
    y = m(x)
    with K.use_backend("reference"):
        y_ref = ref(x)
    assert _fused(y)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.running_var, ref.running_var, atol=1e-6, rtol=0)
    assert int(m.num_batches_tracked) == 1
    m.eval()
    ref.eval()
    with K.use_backend("reference"):
        expected = ref(x)
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("call", [
    lambda x: lp_batch_norm(x, torch.zeros(3), torch.ones(3), training=False, p=1),  # eval
    lambda x: lp_batch_norm(x, None, None, training=True, p=1, ghost_batch_size=2),
    lambda x: lp_batch_norm(x, None, None, training=True, p=2),
    lambda x: lp_batch_norm(x, None, None, training=True, p=math.inf, k=K.autograd.MAX_K + 1),
], ids=["eval", "ghost", "p2", "large-k"])
def test_unsupported_cases_fall_back_to_reference(call):
    x = _leaf(4, 3, 5, 5)
    y = call(x)
    assert not _fused(y)
    with K.use_backend("reference"):
        torch.testing.assert_close(y, call(x))


def test_errors_are_the_reference_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="eps must be positive"):
        lp_batch_norm(x, None, None, training=True, eps=0.0, p=1)
    with pytest.raises(ValueError, match="k <= n"):
        lp_batch_norm(x, None, None, training=True, p=math.inf, k=17)
    with pytest.raises(ValueError, match="more than 1 value"):
        lp_batch_norm(torch.randn(1, 3), None, None, training=True, p=1)
    with pytest.raises(ValueError, match="constant"):
        lp_batch_norm(x, None, None, training=True, p=1, constant="bogus")
    with pytest.raises(ValueError, match="p must be"):
        lp_batch_norm(x, None, None, training=True, p=3)
    y = lp_batch_norm(torch.randn(0, 3, 2, 2), None, None, training=True, p=1)
    assert y.shape == (0, 3, 2, 2)


def test_ties_go_to_the_first_position():
    # Two equal maxima of |x − μ| in channel 0: the L∞ kernel gives the gradient of σ̂ to the
    # first (lowest index) of them; the reference's amax splits it. With the second copy
    # nudged the maximum is unique and both agree.
    base = torch.tensor([0.0, 3.0, -1.0, 0.5, 3.0, -2.0, 1.0, -4.5], dtype=torch.float64)
    x = base.view(8, 1).clone().requires_grad_(True)
    g = torch.randn(8, 1, dtype=torch.float64)
    (gx,) = torch.autograd.grad(lp_batch_norm(x, None, None, training=True, p="inf"), x, g)
    with K.use_backend("reference"):
        (gx_ref,) = torch.autograd.grad(lp_batch_norm(x, None, None, training=True, p="inf"), x, g)
    # mean is 0, the two +3 ties are at positions 1 and 4; -4.5 is the max |d| → unique: agree.
    torch.testing.assert_close(gx, gx_ref)
    tied = torch.tensor([0.0, 4.0, -1.0, 0.5, -4.0, -2.0, 1.0, 1.5], dtype=torch.float64)
    x2 = (tied - tied.mean()).view(8, 1).requires_grad_(True)
    (gt,) = torch.autograd.grad(lp_batch_norm(x2, None, None, training=True, p="inf"), x2, g)
    # Expected: the closed form with the whole σ̂ gradient at position 1 (the first maximum).
    d = x2.detach().view(-1)
    c = K.autograd._constant(math.inf, None, 8, "calibrated")
    sig = c * d.abs().max()
    inv = 1.0 / (sig + 1e-5)
    xhat = d * inv
    gv = g.view(-1)
    big_m = (gv * xhat).mean()
    s_top = torch.zeros(8, dtype=torch.float64)
    s_top[1] = torch.sign(d[1])
    expected = inv * (gv - gv.mean() - c * 8 * (s_top - s_top.mean()) * big_m)
    torch.testing.assert_close(gt.view(-1), expected)


def _hard_rows(count: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` statistics of ``n`` values that stress the Top(k) selection, cycling through: many
    exact ties of |x − μ| (integers, all |d| equal, mostly zeros, few levels, a repeated largest
    value) and tails heavy (Cauchy) and light (uniform) that the threshold guess misjudges."""
    g = torch.Generator().manual_seed(n)

    def row(kind: int) -> torch.Tensor:
        r = torch.randn(n, generator=g, dtype=torch.float64)
        if kind == 1:
            r = torch.randint(-3, 4, (n,), generator=g).double()
        elif kind == 2:   # ±1, as many of each: μ = 0 exactly, every |d| = 1
            r = torch.ones(n, dtype=torch.float64)
            r[torch.randperm(n, generator=g)[: n // 2]] = -1.0
        elif kind == 3:
            r = r * (torch.rand(n, generator=g) < 0.1)
        elif kind == 4:
            r = torch.randint(-1, 2, (n,), generator=g).double() * 0.5
        elif kind == 5:   # the largest value at a third of the positions
            r[torch.randperm(n, generator=g)[: n // 3]] = 4.0
        elif kind == 6:
            r = torch.tan(math.pi * (torch.rand(n, generator=g, dtype=torch.float64) - 0.5))
        elif kind == 7:
            r = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        return r

    return torch.stack([row(i % 8) for i in range(count)]).to(dtype)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("k", [1, 2, 10, 64])
@pytest.mark.parametrize("shape", ["layer64", "layer100", "layer768", "layer5000", "layer20000",
                                   "batch128x64x10", "channels-last32x8x4x4"])
def test_top_k_selection_with_ties_matches_reference(shape, k, dtype, atol):
    # The short-statistic selection (csrc short_topk) against the reference's sort, forward and
    # input gradient, on statistics full of exact ties (the tie rule: the lower index first);
    # rows of 20000 values go by pieces and heaps instead.
    if shape.startswith("layer"):
        n = int(shape[5:])
        x = _hard_rows(8, n, dtype).requires_grad_(True)
        f = lambda x: lp_layer_norm(x, (n,), None, None, p="inf", k=k)  # noqa: E731
    elif shape.startswith("batch"):
        x = _hard_rows(64, 1280, dtype).view(64, 128, 10).transpose(0, 1).contiguous().requires_grad_(True)
        f = lambda x: lp_batch_norm(x, None, None, training=True, p="inf", k=k)  # noqa: E731
    else:   # channel c's 512 values are row c (strided in memory)
        x = _hard_rows(8, 512, dtype).view(8, 32, 4, 4).transpose(0, 1)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        f = lambda x: lp_batch_norm(x, None, None, training=True, p="inf", k=k)  # noqa: E731
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    assert _fused(f(x))
    _compare(f, (x,), g, atol, rtol=atol)


# ------------------------------------------------------------------ layer, group, RMS norm
@pytest.mark.parametrize("p,k", NORMS, ids=NORM_IDS)
def test_layer_norm_matches_reference(p, k):
    x = _leaf(4, 6, 16, scale=2.0, shift=-1.0)
    w, b = _leaf(16), _leaf(16)
    g = torch.randn(4, 6, 16)
    _compare(lambda x, w, b: lp_layer_norm(x, (16,), w, b, 1e-5, p=p, k=k), (x, w, b), g, 1e-5)
    x2 = _leaf(3, 4, 5, 6)
    _compare(lambda x: lp_layer_norm(x, (5, 6), None, None, p=p, k=k), (x2,), torch.randn(3, 4, 5, 6), 1e-5)


@pytest.mark.parametrize("p,k", NORMS, ids=NORM_IDS)
def test_group_norm_matches_reference(p, k):
    x = _leaf(3, 6, 5, 4, scale=2.0)
    w, b = _leaf(6), _leaf(6)
    g = torch.randn(3, 6, 5, 4)
    _compare(lambda x, w, b: lp_group_norm(x, 3, w, b, 1e-5, p=p, k=k), (x, w, b), g, 1e-5)


@pytest.mark.parametrize("p,k", NORMS, ids=NORM_IDS)
@pytest.mark.parametrize("shape,groups", [((2, 6, 8), 3), ((3, 8, 5, 4), 2), ((2, 4, 1500), 2),
                                          ((2, 6, 7, 5), 6)], ids=["short", "4d", "long", "one-each"])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_group_norm_affine_in_the_kernel(shape, groups, affine, p, k, eager_path):
    # γ and β per channel inside the kernel (rows of one sample's group, each channel a run of the
    # row): rows shorter than 32, rows of 3000 values (Top(k) by pieces), one channel per group.
    torch.manual_seed(0)
    x = _leaf(*shape, scale=2.0, shift=0.5)
    c = shape[1]
    w = _leaf(c, scale=0.5, shift=1.0) if affine in ("both", "weight") else None
    b = _leaf(c) if affine in ("both", "bias") else None
    y = _compare(lambda x, w, b: lp_group_norm(x, groups, w, b, 1e-5, p=p, k=k), (x, w, b),
                 torch.randn(shape), 2e-5, 1e-5)
    if eager_path == "operators" and affine != "none":
        # One node takes x, γ and β: no separate multiply-add after the kernel.
        assert _fused(y)
        inputs = {id(f.variable) for f, _ in y.grad_fn.next_functions if f is not None and hasattr(f, "variable")}
        assert {id(t) for t in (w, b) if t is not None} <= inputs


@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
def test_group_norm_affine_gradcheck_and_layouts(p, k):
    x = _leaf(3, 4, 3, 2, dtype=torch.float64, scale=2.0)
    w = _leaf(4, dtype=torch.float64, shift=1.0)
    b = _leaf(4, dtype=torch.float64)
    f = lambda x, w, b: lp_group_norm(x, 2, w, b, p=p, k=k)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    # Channels-last and permuted inputs: the same values (the kernel reads a contiguous copy).
    g = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    for xv in (x.detach().contiguous(memory_format=torch.channels_last),
               x.detach().permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)):
        xv.requires_grad_(True)
        _compare(f, (xv, w, b), g, 1e-10)
    # Half-precision storage, float32 statistics and affine.
    xb = _leaf(4, 8, 6, 6, dtype=torch.bfloat16)
    wb, bb = _leaf(8, shift=1.0), _leaf(8)
    _compare(lambda x, w, b: lp_group_norm(x, 4, w, b, p=p, k=k), (xb, wb, bb),
             torch.randn(4, 8, 6, 6, dtype=torch.bfloat16), 3e-2, 3e-2)


@pytest.mark.parametrize("p,k", NORMS, ids=NORM_IDS)
def test_rms_norm_matches_reference(p, k):
    x = _leaf(5, 7, 32, scale=2.0, shift=0.5)
    w = _leaf(32)
    g = torch.randn(5, 7, 32)
    _compare(lambda x, w: lp_rms_norm(x, (32,), w, None, p=p, k=k), (x, w), g, 1e-5)


def test_layer_norm_module_default_path():
    m = LpLayerNorm(16, p=1)
    y = m(_leaf(2, 3, 16))
    assert y.grad_fn is not None
    assert torch.allclose(y.detach().mean(-1), torch.zeros(2, 3), atol=1e-5)


# ------------------------------------------------------------------ integration
def test_torch_compile_traces_through_the_custom_ops():
    m = LpBatchNorm2d(3, p=1)
    x = _leaf(4, 3, 5, 5)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    m2 = LpBatchNorm2d(3, p=1)
    y2 = m2(x)
    (gx2,) = torch.autograd.grad(y2.sum(), x)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(m.running_var, m2.running_var)


@pytest.mark.parametrize("mode,k,center", [(1, 1, True), (2, 1, True), (2, 3, False)])
def test_compiled_cpu_operators_registration(eager_path, mode, k, center):
    # The C++ twins that compiled CPU graphs call: schema, fake implementation and autograd.
    if eager_path != "operators":
        pytest.skip("operators only")
    from normmatters.kernels import autograd

    assert autograd.compiled_cpu_ops(torch.float64)
    op = torch.ops.normmatters.cpu_lp_norm_fwd.default
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(op, (x, w, None, 0, mode, k, 1.25, 1e-5, center))
    rows = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    wr = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(op, (rows, wr, None, 0, mode, k, 1.25, 1e-5, center, 2))
    # and the same values as the Python op
    for a, b in zip(op(x, w, None, 0, mode, k, 1.25, 1e-5, center),
                    lp_norm_fwd(x, w, None, 0, mode, k, 1.25, 1e-5, center)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode,k,center", [(1, 1, True), (2, 1, True), (2, 3, False)])
def test_custom_op_registration(mode, k, center):
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(lp_norm_fwd, (x, w, None, 0, mode, k, 1.25, 1e-5, center))
    rows = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    wr = torch.randn(6, dtype=torch.float64, requires_grad=True)
    br = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(lp_norm_fwd, (rows, wr, br, 0, mode, k, 1.25, 1e-5, center, 2))


def test_saves_no_more_for_backward_than_torch():
    from normmatters.kernels.bench import saved_bytes

    x = _leaf(16, 8, 6, 6)
    ours = saved_bytes(lambda: LpBatchNorm2d(8, p=1)(x))
    top = saved_bytes(lambda: LpBatchNorm2d(8, p="inf", k=10)(x))
    theirs = saved_bytes(lambda: torch.nn.BatchNorm2d(8)(x))
    with K.use_backend("reference"):
        reference = saved_bytes(lambda: LpBatchNorm2d(8, p=1)(x))
    assert ours <= theirs and top <= theirs
    assert reference > 1.5 * ours  # the op chain keeps more than one tensor of x's size


def test_compile_failure_falls_back_to_reference(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NORMMATTERS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_compiler", lambda: None)
    monkeypatch.setattr(cpu, "_libs", {})
    monkeypatch.setattr(cpu, "_registered", {})
    with caplog.at_level(logging.WARNING, logger="normmatters.kernels"):
        assert cpu.library(torch.float32) is None
        assert not K.available("cpu")
        x = _leaf(4, 3, 5, 5)
        y = lp_batch_norm(x, None, None, training=True, p=1)
    assert not _fused(y)
    assert "unavailable" in caplog.text


def test_library_is_cached_on_disk():
    lib = cpu.library(torch.float32)
    assert lib is cpu.library(torch.float32)
    assert any(build.cache_dir().joinpath("kernels").glob("lp_norm_cpu_float32_*.so"))


def test_bench_main_writes_table_and_json(tmp_path, capsys):
    from normmatters.experiments.bench_steps import main

    out = tmp_path / "bench.json"
    rc = main(["--suites", "layers", "overhead", "--shapes", "4x3x4x4", "--layer-shapes", "4x16",
               "--norms", "l1", "top10", "--repeat", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ratio" in text and "4x3x4x4" in text
    payload = json.loads(out.read_text())
    rows = payload["layers"]
    assert {(r["family"], r["norm"]) for r in rows} == {("batch", "l1"), ("batch", "top10"),
                                                        ("layer", "l1"), ("layer", "top10")}
    for r in rows:
        assert r["ours_train_us"] > 0 and r["torch_train_us"] > 0
        assert r["train_ratio"] == pytest.approx(r["ours_train_us"] / r["torch_train_us"])
        assert r["ours_saved_bytes"] <= r["torch_saved_bytes"]
    assert {r["family"] for r in payload["overhead"]} >= {"batch", "layer", "group", "rms"}


# ------------------------------------------------------------------ second order, huge inputs
@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
@pytest.mark.parametrize("kind", ["batch", "batch_cl", "layer", "group", "rms"])
def test_second_order_gradients_on_the_fused_path(kind, p, k):
    # create_graph=True backward through the fused op is the differentiable closed form.
    x = _leaf(5, 4, 3, 2, dtype=torch.float64, scale=2.0, channels_last=kind == "batch_cl")
    w = _leaf(4, dtype=torch.float64)
    b = _leaf(4, dtype=torch.float64)
    if kind in ("batch", "batch_cl"):
        f = lambda x, w, b: lp_batch_norm(x, None, None, w, b, True, p=p, k=k)  # noqa: E731
    elif kind == "layer":
        x, w, b = _leaf(3, 5, 8, dtype=torch.float64), _leaf(8, dtype=torch.float64), _leaf(8, dtype=torch.float64)
        f = lambda x, w, b: lp_layer_norm(x, (8,), w, b, p=p, k=k)  # noqa: E731
    elif kind == "group":
        f = lambda x, w, b: lp_group_norm(x, 2, w, b, p=p, k=k)  # noqa: E731
    else:
        x, w, b = _leaf(3, 5, 8, dtype=torch.float64), _leaf(8, dtype=torch.float64), _leaf(8, dtype=torch.float64)
        f = lambda x, w, b: lp_rms_norm(x, (8,), w, 1e-6, p=p, k=k) + b  # noqa: E731
    assert _fused(f(x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b), atol=1e-6)


@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
def test_gradient_penalty_matches_the_reference(p, k):
    # The reported failure: a gradient penalty through conv → Lp batch norm gave a wrong
    # conv-weight gradient on the fused path.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).double()
    x = torch.randn(6, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    grads = {}
    for backend in ("auto", "reference"):
        conv.zero_grad()
        with K.use_backend(backend):
            bn = LpBatchNorm2d(4, dtype=torch.float64, p=p, k=k)
            y = bn(conv(x))
            (gx,) = torch.autograd.grad((y.tanh() ** 2).sum(), x, create_graph=True)
            gx.pow(2).sum().backward()
        grads[backend] = conv.weight.grad.clone()
    torch.testing.assert_close(grads["auto"], grads["reference"], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_huge_inputs_stay_finite_like_torch(backend, p, k):
    # Values near 1e38 (float32): torch's layers stay finite; so must ours (the sums of the mean
    # and of |x − μ| overflow float32).
    torch.manual_seed(0)
    x = (torch.rand(8, 4, 5, 5) * 2 - 1) * 1e38
    assert torch.isfinite(torch.nn.functional.batch_norm(x, None, None, training=True)).all()
    with K.use_backend(backend):
        outs = [lp_batch_norm(x, None, None, training=True, p=p, k=k),
                lp_batch_norm(x.contiguous(memory_format=torch.channels_last), None, None,
                              training=True, p=p, k=k),
                lp_batch_norm(x.view(8, 100), None, None, training=True, p=p, k=k),
                lp_layer_norm(x, (5, 5), p=p, k=k), lp_group_norm(x, 2, p=p, k=k),
                lp_rms_norm(x, (5, 5), p=p, k=k)]
        rm, rv = torch.zeros(4), torch.ones(4)
        lp_batch_norm(x, rm, rv, training=True, p=p, k=k)
        outs.append(lp_batch_norm(x, rm, rv, training=False, p=p, k=k))
    for y in outs:
        assert torch.isfinite(y).all()
    if backend == "auto":
        xr = x.clone().requires_grad_(True)
        lp_batch_norm(xr, None, None, training=True, p=p, k=k).sum().backward()
        assert torch.isfinite(xr.grad).all()


def test_enums_are_the_kernel_codes():
    from normmatters.kernels.enums import Affine, Layout, Mode

    x = torch.randn(2, 3, 4)
    y, mean, inv, _ = cpu.forward(x, Layout.NCS, None, None, Mode.L1, 1, 1.0, 1e-5, True, Affine.CHANNEL)
    expected = (x - x.mean((0, 2), keepdim=True)) / (
        (x - x.mean((0, 2), keepdim=True)).abs().mean((0, 2), keepdim=True) + 1e-5)
    torch.testing.assert_close(y, expected)
    assert (int(Layout.NCS), int(Layout.NSC), int(Mode.L1), int(Mode.TOPK)) == (0, 1, 1, 2)


def test_operator_library_is_cached_and_verified(eager_path):
    if eager_path != "operators":
        pytest.skip("operators only")
    verified = [p for p in build.kernel_dir().glob("lp_norm_op_*.so") if build.verify(p) is None]
    assert verified, "no verified operator library in the cache"
    record = json.loads(verified[0].with_suffix(".json").read_text())
    assert record["source"] == "lp_norm_op.cpp"


def test_operators_refuse_tensors_they_cannot_take(eager_path):
    if eager_path != "operators":
        pytest.skip("operators only")
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="non-empty"):
        torch.ops.normmatters.eager_norm(x[:0], None, None, None, None, 0, 0, 1, 1, 1.0, 1e-5, 0.1)
    with pytest.raises(RuntimeError, match="kind"):
        torch.ops.normmatters.eager_norm(x, None, None, None, None, 7, 1, 1, 1, 1.0, 1e-5, 0.1)
    with pytest.raises(RuntimeError, match="code -4"):  # k beyond MAX_K: the kernel refuses
        torch.ops.normmatters.eager_norm(x, None, None, None, None, 1, 1, 2, 65, 1.0, 1e-5, 0.0)


@pytest.mark.parametrize("p,k", NORMS[:3], ids=NORM_IDS[:3])
@pytest.mark.parametrize("family", ["layer64", "layer300", "batch-runs40"])
def test_non_finite_and_huge_values_match_reference(family, p, k):
    # A NaN in one statistic makes that statistic's outputs NaN and leaves the others alone; values
    # near float's top overflow a float sum (taken again in double) but not the statistics.
    torch.manual_seed(0)
    if family.startswith("layer"):
        n = int(family[5:])
        x = torch.randn(6, n)
        x[1, 5] = float("nan")
        x[3] *= 3e36
        f = lambda x: lp_layer_norm(x, (n,), None, None, p=p, k=k)  # noqa: E731
    else:
        x = torch.randn(16, 3, 40)
        x[2, 1, 7] = float("nan")
        x[:, 2] *= 3e36
        f = lambda x: lp_batch_norm(x, None, None, training=True, p=p, k=k)  # noqa: E731
    x.requires_grad_(True)
    g = torch.randn(x.shape)
    out, (gx,) = _run(f, (x,), g)
    with K.use_backend("reference"):
        ref, (gr,) = _run(f, (x,), g)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert out.isnan().any() and not out.isnan().all()
    # Gradients outside the NaN statistic (inside it, the fused backward gives NaN where the
    # reference's amax backward gives numbers: the gradient of a NaN output).
    keep = ~ref.isnan()
    torch.testing.assert_close(gx[keep], gr[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,k", [(5, 2), (17, 3), (17, 10), (33, 10), (48, 16), (64, 3), (64, 30)])
def test_top_k_of_short_rows_held_in_registers_matches_reference(n, k):
    # Rows of at most 64 values select in registers when the threshold guess admits at most 32
    # (csrc topk_row64 / topk_at_row64): partial last vectors, ties, light and heavy tails.
    x = _hard_rows(16, n, torch.float32).requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    f = lambda x: lp_layer_norm(x, (n,), None, None, p="inf", k=k)  # noqa: E731
    _compare(f, (x,), g, 1e-4, rtol=1e-4)
    with torch.no_grad():
        with K.use_backend("reference"):
            ref = f(x)
        torch.testing.assert_close(f(x), ref, atol=1e-4, rtol=1e-4)
