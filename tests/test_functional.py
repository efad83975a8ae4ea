"""The reference Lp normalizations of SPEC §2: torch agreement at p=2, unbiased scale on
Gaussian data, gradients against gradcheck and the closed forms, running statistics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from normmatters.functional import (
    C_L1,
    lp_batch_norm,
    lp_constant,
    lp_dispersion,
    lp_group_norm,
    lp_layer_norm,
    lp_rms_norm,
)

INF = float("inf")
KINDS = [(1, None), (2, None), (INF, None), (INF, 10)]
KIND_IDS = ["l1", "l2", "linf", "top10"]


def test_p2_is_torch_batch_norm_exactly():
    x = torch.randn(8, 5, 4, 4)
    rm1, rv1 = torch.randn(5), torch.rand(5) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    w, b = torch.randn(5), torch.randn(5)
    y1 = lp_batch_norm(x, rm1, rv1, w, b, True, 0.3, 1e-5, p=2)
    y2 = F.batch_norm(x, rm2, rv2, w, b, True, 0.3, 1e-5)
    assert torch.equal(y1, y2) and torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_dispersion_is_unbiased_in_scale_for_gaussian(p, k):
    # sigma-hat estimates sigma: averaged over many statistics it is 2.0 for N(0, 2^2) data.
    x = 2.0 * torch.randn(400, 4096, dtype=torch.float64)
    d = x - x.mean(1, keepdim=True)
    s = lp_dispersion(d, 1, p, k)
    # The centring shrinks deviations by sqrt((n-1)/n); negligible at n=4096.
    assert s.mean().item() == pytest.approx(2.0, rel=5e-3)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_gaussian_input_gives_unit_std_output(p, k):
    x = 3.0 * torch.randn(64, 128, 16, 16) + 5.0
    y = lp_batch_norm(x, None, None, training=True, p=p, k=k)
    assert y.std().item() == pytest.approx(1.0, abs=0.01)
    assert y.mean().abs().item() < 1e-3


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_uncalibrated_constant_is_off(p, k):
    # constant="none" must not give unit variance (except L2, whose constant is 1).
    x = torch.randn(64, 32, 16, 16)
    y = lp_batch_norm(x, None, None, training=True, p=p, k=k, constant="none")
    if p == 2:
        assert y.std().item() == pytest.approx(1.0, abs=0.01)
    else:
        assert abs(y.std().item() - 1.0) > 0.1


@pytest.mark.parametrize("p,k", [(1, None), (INF, None), (INF, 3)], ids=["l1", "linf", "top3"])
@pytest.mark.parametrize("fn", ["batch", "layer", "group", "rms"])
def test_gradcheck(fn, p, k):
    x = torch.randn(4, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    if fn == "batch":
        f = lambda x, w, b: lp_batch_norm(x, None, None, w, b, True, p=p, k=k)  # noqa: E731
    elif fn == "layer":
        x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
        f = lambda x, w, b: lp_layer_norm(x, (6,), w, b, p=p, k=k)  # noqa: E731
    elif fn == "group":
        f = lambda x, w, b: lp_group_norm(x, 2, w, b, p=p, k=k)  # noqa: E731
    else:
        x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
        f = lambda x, w, b: lp_rms_norm(x, (6,), w, 1e-6, p=p, k=k) + b  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("p,k", [(1, None), (2, None), (INF, None), (INF, 7)], ids=["l1", "l2", "linf", "top7"])
def test_closed_form_backward_matches_autograd(p, k):
    # SPEC §2: dL/dx = (g' - mean g' - C (s - mean s) mean(g' xhat)) / (sigma + eps), where
    # s = sign(d) for L1, s = sign(d)[d in top k] n/k times C_k/C_L1 for Top(k), and x-hat for L2.
    eps = 1e-5
    x = torch.randn(16, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(3, dtype=torch.float64)
    y = lp_batch_norm(x, None, None, gamma, None, True, eps=eps, p=p, k=k)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    with torch.no_grad():
        dims = (0, 2, 3)
        n = x.numel() // 3
        xd = x.detach()
        d = xd - xd.mean(dims, keepdim=True)
        g = gy * gamma.view(1, -1, 1, 1)
        if p == 2:
            sigma = (d.pow(2).mean(dims, keepdim=True) + eps).sqrt()
            xhat = d / sigma
            expected = (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True)) / sigma
        else:
            kk = 1 if k is None else k
            c = lp_constant(p, k, n)
            if p == 1:
                s = d.sign()
                c_s = C_L1
            else:
                flat = d.abs().transpose(0, 1).reshape(3, -1)
                thresh = flat.topk(kk, dim=1).values[:, -1].view(1, -1, 1, 1)
                s = d.sign() * (d.abs() >= thresh) * (n / kk)
                c_s = c
            sigma = lp_dispersion(d, dims, p, k) + eps
            xhat = d / sigma
            expected = (g - g.mean(dims, keepdim=True)
                        - c_s * (s - s.mean(dims, keepdim=True)) * (g * xhat).mean(dims, keepdim=True)) / sigma
    torch.testing.assert_close(gx, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_running_statistics(p, k):
    x1, x2 = torch.randn(16, 3, 4, 4) * 2 + 1, torch.randn(16, 3, 4, 4) * 3 - 1
    rm, rv = torch.zeros(3), torch.ones(3)
    n = 16 * 16
    stats = []
    for x in (x1, x2):
        lp_batch_norm(x, rm, rv, training=True, momentum=0.25, p=p, k=k)
        mean = x.mean((0, 2, 3))
        d = x - mean.view(1, -1, 1, 1)
        stats.append((mean, lp_dispersion(d, (0, 2, 3), p, k, keepdim=False)))
    exp_m, exp_v = torch.zeros(3), torch.ones(3)
    for mean, sigma in stats:
        exp_m = 0.75 * exp_m + 0.25 * mean
        exp_v = 0.75 * exp_v + 0.25 * sigma.pow(2) * n / (n - 1)
    torch.testing.assert_close(rm, exp_m)
    torch.testing.assert_close(rv, exp_v)
    # Evaluation: (x - running_mean) / (sqrt(running_var) + eps), L2 with eps inside the root.
    y = lp_batch_norm(x1, rm, rv, training=False, p=p, k=k)
    if p == 2:
        ref = (x1 - rm.view(1, -1, 1, 1)) / (rv.view(1, -1, 1, 1) + 1e-5).sqrt()
    else:
        ref = (x1 - rm.view(1, -1, 1, 1)) / (rv.view(1, -1, 1, 1).sqrt() + 1e-5)
    torch.testing.assert_close(y, ref)


class _RecordOps(TorchFunctionMode):
    def __init__(self, shape):
        super().__init__()
        self.shape, self.bad = tuple(shape), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        big = [a for a in tensors if tuple(a.shape) == self.shape]
        if big and (name in ("pow", "square", "rsqrt", "sqrt", "__pow__")
                    or (name in ("mul", "__mul__") and len(big) == 2 and big[0] is big[1])):
            self.bad.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("p,k", [(1, None), (INF, None), (INF, 10)], ids=["l1", "linf", "top10"])
def test_evaluation_computes_no_squares_of_activations(p, k):
    x = torch.randn(8, 4, 6, 6)
    rm, rv = torch.zeros(4), torch.ones(4)
    with _RecordOps(x.shape) as rec:
        lp_batch_norm(x, rm, rv, torch.ones(4), torch.zeros(4), training=False, p=p, k=k)
    assert rec.bad == []
    with _RecordOps(x.shape) as rec:  # the recorder does see a square when there is one
        _ = x.pow(2)
    assert rec.bad == ["pow"]


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_ghost_batches_normalize_each_chunk(p, k):
    x = torch.randn(12, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = lp_batch_norm(x, rm, rv, training=True, momentum=1.0, p=p, k=k, ghost_batch_size=4)
    parts = [lp_batch_norm(c, None, None, training=True, p=p, k=k) for c in x.split(4)]
    torch.testing.assert_close(y, torch.cat(parts))
    means = torch.stack([c.mean((0, 2, 3)) for c in x.split(4)]).mean(0)
    torch.testing.assert_close(rm, means)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_layer_group_rms_at_unit_scale(p, k):
    # L-inf's single maximum fluctuates: E[1/sigma-hat] exceeds 1/E[sigma-hat] by about the
    # squared coefficient of variation, ~0.5 % at n = 8192 (1.2 % at n = 1024).
    x = 4 * torch.randn(16, 8, 8192) + 2
    y = lp_layer_norm(x, (8192,), p=p, k=k)
    assert y.std().item() == pytest.approx(1.0, abs=0.01)
    g = lp_group_norm(x, 4, p=p, k=k)
    assert g.std().item() == pytest.approx(1.0, abs=0.01)
    r = lp_rms_norm(4 * torch.randn(16, 8, 8192), (8192,), p=p, k=k)
    assert r.std().item() == pytest.approx(1.0, abs=0.01)


def test_p2_layer_group_rms_are_torch():
    x = torch.randn(4, 6, 5)
    w, b = torch.randn(5), torch.randn(5)
    assert torch.equal(lp_layer_norm(x, (5,), w, b, p=2), F.layer_norm(x, (5,), w, b))
    assert torch.equal(lp_rms_norm(x, (5,), w, p=2), F.rms_norm(x, (5,), w))
    wc, bc = torch.randn(6), torch.randn(6)
    assert torch.equal(lp_group_norm(x, 3, wc, bc, p=2), F.group_norm(x, 3, wc, bc))


def test_l1_is_topn_up_to_constant():
    d = torch.randn(10, 50, dtype=torch.float64)
    d = d - d.mean(1, keepdim=True)
    l1 = lp_dispersion(d, 1, 1)
    topn = lp_dispersion(d, 1, INF, 50)
    torch.testing.assert_close(l1, topn)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: lp_batch_norm(torch.ones(4, 3, dtype=torch.int64), None, None, training=True, p=1), TypeError, "floating-point"),
        (lambda: lp_batch_norm(torch.randn(1, 3), None, None, training=True, p=1), ValueError, "more than 1 value"),
        (lambda: lp_batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0, p=1), ValueError, "eps must be positive"),
        (lambda: lp_batch_norm(torch.randn(4, 3), None, None, training=True, p=3), ValueError, "p must be"),
        (lambda: lp_batch_norm(torch.randn(4, 3), None, None, training=True, p=1, k=2), ValueError, "needs p=inf"),
        (lambda: lp_batch_norm(torch.randn(4, 3), None, None, training=True, p="inf", k=5), ValueError, "k <= n"),
        (lambda: lp_layer_norm(torch.randn(4, 3), (5,), p=1), ValueError, "normalized_shape"),
        (lambda: lp_group_norm(torch.randn(4, 6), 4, p=1), ValueError, "divisible"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_half_inputs_computed_in_float32():
    x = torch.randn(16, 4, 8, 8)
    for dt in (torch.float16, torch.bfloat16):
        y = lp_batch_norm(x.to(dt), None, None, training=True, p=1)
        assert y.dtype == dt
        ref = lp_batch_norm(x.to(dt).float(), None, None, training=True, p=1)
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=1e-2)


def test_empty_batch_like_torch():
    x = torch.randn(0, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = lp_batch_norm(x, rm, rv, training=True, p=1)
    assert y.shape == x.shape and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert not math.isnan(rv.sum().item())


@pytest.mark.parametrize("p", [1, 2, INF])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_one_element_vector_for_three_channels_is_refused(name, p):
    # As torch: a weight (or bias, or running statistic) must have one value per channel; a
    # 1-element tensor is not broadcast over 3 channels.
    x = torch.randn(8, 3, 4)
    args = {"weight": None, "bias": None, "running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    args[name] = torch.ones(1)
    with pytest.raises(ValueError, match=rf"{name} .*\[3\].*\[1\]"):
        lp_batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                      training=True, p=p)
    with pytest.raises((ValueError, RuntimeError)):
        F.batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                     training=True)
