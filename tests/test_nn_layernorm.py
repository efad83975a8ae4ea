"""LpLayerNorm / LpGroupNorm / LpRMSNorm: torch agreement at p=2, unit variance, errors."""

import inspect

import pytest
import torch
from torch import nn

from normmatters.nn import LpGroupNorm, LpLayerNorm, LpRMSNorm

INF = float("inf")
KINDS = [(1, None), (2, None), (INF, None), (INF, 10)]
KIND_IDS = ["l1", "l2", "linf", "top10"]


def _compare(ref, ours, x):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), ours(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2.grad, p1.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_p2_is_torch(kwargs):
    with torch.no_grad():
        ref = nn.LayerNorm([6, 5], **kwargs)
        ours = LpLayerNorm([6, 5], **kwargs)
        if ref.weight is not None:
            ref.weight.uniform_()
            ours.weight.copy_(ref.weight)
    _compare(ref, ours, torch.randn(4, 3, 6, 5))


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"eps": 1e-3}])
def test_group_norm_p2_is_torch(kwargs):
    ref, ours = nn.GroupNorm(3, 6, **kwargs), LpGroupNorm(3, 6, **kwargs)
    _compare(ref, ours, torch.randn(4, 6, 5, 2))


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-4}, {"elementwise_affine": False}])
def test_rms_norm_p2_is_torch(kwargs):
    ref, ours = nn.RMSNorm(7, **kwargs), LpRMSNorm(7, **kwargs)
    _compare(ref, ours, torch.randn(4, 3, 7))


@pytest.mark.parametrize("cls,torch_cls", [(LpLayerNorm, nn.LayerNorm), (LpGroupNorm, nn.GroupNorm),
                                           (LpRMSNorm, nn.RMSNorm)])
def test_signatures_mirror_torch(cls, torch_cls):
    ours = list(inspect.signature(cls.__init__).parameters.values())
    ref = list(inspect.signature(torch_cls.__init__).parameters.values())
    assert [(p.name, p.kind) for p in ours[: len(ref)]] == [(p.name, p.kind) for p in ref]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(ref):])


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_state_dicts_move_between_torch_and_ours(p, k):
    for ref, ours in ((nn.LayerNorm(8), LpLayerNorm(8, p=p, k=k)),
                      (nn.GroupNorm(2, 8), LpGroupNorm(2, 8, p=p, k=k)),
                      (nn.RMSNorm(8), LpRMSNorm(8, p=p, k=k))):
        with torch.no_grad():
            for t in ref.parameters():
                t.uniform_()
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_unit_variance(p, k):
    # Many statistics over many values each: L-inf's single maximum is a noisy estimate.
    x = torch.randn(64, 8, 16384) * 3 + 1
    assert LpLayerNorm(16384, p=p, k=k)(x).std().item() == pytest.approx(1, abs=0.01)
    assert LpGroupNorm(4, 8, p=p, k=k)(x).std().item() == pytest.approx(1, abs=0.01)
    assert LpRMSNorm(16384, p=p, k=k)(x - 1).std().item() == pytest.approx(1, abs=0.01)


@pytest.mark.parametrize(
    "make,x,exc,match",
    [
        (lambda: LpLayerNorm(8, p=1), torch.randn(2, 7), ValueError, "normalized_shape"),
        (lambda: LpLayerNorm(8, p=1), torch.ones(2, 8, dtype=torch.long), TypeError, "floating-point"),
        (lambda: LpGroupNorm(2, 8, p=1), torch.randn(2, 6, 3), ValueError, "8 channels"),
        (lambda: LpRMSNorm(8, p="inf", k=9), torch.randn(2, 8), ValueError, "k=9 > n=8"),
        (lambda: LpLayerNorm(4, p=5), None, ValueError, "p must be"),
        (lambda: LpGroupNorm(3, 8, p=1), None, ValueError, "divisible"),
    ],
)
def test_bad_input(make, x, exc, match):
    with pytest.raises(exc, match=match):
        m = make()
        m(x)


def test_compile_layer_norm_fullgraph():
    torch._dynamo.reset()
    m = nn.Sequential(nn.Linear(16, 16), LpLayerNorm(16, p=1), nn.Linear(16, 4), LpRMSNorm(4, p="inf", k=2))
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), atol=1e-5, rtol=1e-5)
