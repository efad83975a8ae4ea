"""Every input layout gives the reference's values: a property test over memory layouts.

The fused paths read a dense ``[N, C, S]`` tensor (contiguous, or channels-last for batch norm)
and must copy anything else, then write their output in the layout they read. A kernel that
writes a contiguous result into memory allocated in the input's permuted order puts values in
the wrong places (the bug this file pins). Here each family × p runs on contiguous and
channels-last inputs, dense inputs in several random memory orders, non-dense slices and expanded
(stride-0) inputs, in training and evaluation, forward and backward, through the C++ operators
and through the Python path around the same kernels, against the reference path (p ≠ 2) or
torch's own layer (p = 2).
"""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
from torch import nn

import normmatters as nm
import normmatters.kernels as K
from normmatters.functional import lp_batch_norm
from normmatters.kernels import cpu

pytestmark = pytest.mark.skipif(not K.available("cpu"), reason="no C++ compiler for the kernels")


@pytest.fixture(autouse=True, params=["operators", "python"])
def eager_path(request, monkeypatch):
    """Through the C++ eager operators, and through the Python path around the same kernels."""
    if request.param == "python":
        monkeypatch.setattr(cpu, "_registered", {d: False for d in cpu.DTYPE_CODES})
    elif not cpu.eager_ops(torch.float32):
        pytest.skip("the C++ eager operators are unavailable")
    return request.param


PKS = [(2, None), (1, None), (math.inf, None), (math.inf, 3)]
PK_IDS = ["l2", "l1", "linf", "top3"]

# family → (shape, our module, torch's module at p=2)
FAMILIES = {
    "bn1d-2d": ((8, 4), lambda **kw: nm.LpBatchNorm1d(4, **kw), lambda: nn.BatchNorm1d(4)),
    "bn1d": ((6, 4, 7), lambda **kw: nm.LpBatchNorm1d(4, **kw), lambda: nn.BatchNorm1d(4)),
    "bn2d": ((4, 3, 5, 6), lambda **kw: nm.LpBatchNorm2d(3, **kw), lambda: nn.BatchNorm2d(3)),
    "bn3d": ((3, 3, 4, 3, 5), lambda **kw: nm.LpBatchNorm3d(3, **kw), lambda: nn.BatchNorm3d(3)),
    "ln": ((4, 5, 6), lambda **kw: nm.LpLayerNorm(6, **kw), lambda: nn.LayerNorm(6)),
    "ln2": ((3, 4, 5, 6), lambda **kw: nm.LpLayerNorm((5, 6), **kw), lambda: nn.LayerNorm((5, 6))),
    "gn": ((4, 6, 3, 5), lambda **kw: nm.LpGroupNorm(3, 6, **kw), lambda: nn.GroupNorm(3, 6)),
    "rms": ((4, 5, 6), lambda **kw: nm.LpRMSNorm(6, **kw), lambda: nn.RMSNorm(6)),
}


def _layouts(shape: tuple[int, ...], gen: torch.Generator):
    """(name, make) pairs; make(base) turns a contiguous leaf of ``shape`` (or of a larger shape,
    for slices) into the input, as views so that gradients flow back to the leaf."""
    nd = len(shape)
    out = [("contiguous", shape, lambda b: b)]
    if nd >= 3:
        # channels-last of any rank: memory order N, spatial..., C
        order = [0, *range(2, nd), 1]
        out.append(("channels-last", tuple(shape[i] for i in order),
                    lambda b, o=order: b.permute(*[o.index(i) for i in range(nd)])))
    for j in range(3):  # random dense memory orders
        order = torch.randperm(nd, generator=gen).tolist()
        out.append((f"permuted{order}", tuple(shape[i] for i in order),
                    lambda b, o=order: b.permute(*[o.index(i) for i in range(nd)])))
    # A non-dense slice along the last axis, and along the channels.
    wide = (*shape[:-1], 2 * shape[-1])
    out.append(("sliced-last", wide, lambda b: b[..., ::2]))
    wide1 = (shape[0], 2 * shape[1], *shape[2:])
    out.append(("sliced-channels", wide1, lambda b: b[:, 1::2]))
    # Expanded (stride 0) along the batch: every sample the same, exact ties for Top(k). (For
    # (N, C) inputs along the channels instead: a batch of equal rows has no dispersion.)
    axis = 0 if nd >= 3 else 1
    one = tuple(1 if i == axis else s for i, s in enumerate(shape))
    out.append(("expanded", one, lambda b, s=shape: b.expand(*s)))
    return out


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps or overlaps, in some order of its axes."""
    dims = sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _randomise(module: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point():
                if "var" in name:
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name == "weight" else 0.0))
    return module


def _call(module: nn.Module, make, base_shape, x_values: torch.Tensor, g: torch.Tensor,
          grad: bool, use_functional: bool = False):
    base = x_values.clone().requires_grad_(grad)
    x = make(base)
    if use_functional:
        y = lp_batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias,
                          module.training, 0.1, module.eps, p=module.p, k=module.k)
    else:
        y = module(x)
    grads = {}
    if grad:
        y.backward(g)
        grads = {"input": base.grad, **{n: p.grad for n, p in module.named_parameters()}}
    state = {n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return y.detach(), grads, state


@pytest.mark.parametrize("pk", PKS, ids=PK_IDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layout_matches_the_reference(family, pk):
    p, k = pk
    shape, ours, theirs = FAMILIES[family]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{family}{p}{k}".encode()))
    is_bn = family.startswith("bn")
    modes = [("train", True), ("eval", True), ("eval-no-grad", False)] if is_bn else [("train", True)]
    for name, base_shape, make in _layouts(shape, gen):
        values = torch.randn(base_shape, generator=gen) * 2 + 0.5
        g = torch.randn(shape, generator=gen)
        for mode, grad in modes:
            fused = _randomise(ours(p=p, k=k) if k else ours(p=p), torch.Generator().manual_seed(1))
            if p == 2:
                ref = theirs()
                ref.load_state_dict(fused.state_dict())
            else:
                ref = copy.deepcopy(fused)
            fused.train(mode == "train")
            ref.train(mode == "train")
            callers = [False, True] if is_bn else [False]
            for use_functional in callers:
                f, r = copy.deepcopy(fused), copy.deepcopy(ref)
                where = f"{family} p={p} k={k} {name} {mode} functional={use_functional}"
                with torch.set_grad_enabled(grad):
                    y, gy, sy = _call(f, make, base_shape, values, g, grad, use_functional)
                    with K.use_backend("reference"):
                        if use_functional and p == 2:
                            r = copy.deepcopy(fused)  # functional at p=2 is torch's F.batch_norm
                        yr, gr, sr = _call(r, make, base_shape, values, g, grad, use_functional)
                torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: output: {m}")
                for key in gr:
                    torch.testing.assert_close(gy[key], gr[key], atol=1e-4, rtol=1e-4,
                                               msg=lambda m, key=key: f"{where}: {key} gradient: {m}")
                for key in sr:
                    torch.testing.assert_close(sy[key], sr[key], atol=1e-5, rtol=1e-5,
                                               msg=lambda m, key=key: f"{where}: {key}: {m}")
                # The result is a dense tensor; a channels-last batch or group norm input keeps
                # its layout, as torch's own layers do.
                assert _dense(y), where
                if name == "channels-last" and y.dim() == 4 and is_bn:
                    assert y.is_contiguous(memory_format=torch.channels_last), where


def test_the_reported_case():
    """``LpBatchNorm2d(4, p=1)`` on ``x.transpose(2, 3)``: the values of the reference, not 5.3 off."""
    x = torch.randn(8, 4, 6, 5).transpose(2, 3)
    bn = nm.LpBatchNorm2d(4, p=1)
    with K.use_backend("reference"):
        want = copy.deepcopy(bn)(x)
    torch.testing.assert_close(bn(x), want, atol=1e-5, rtol=1e-5)
    assert bn(x).is_contiguous()  # torch's BatchNorm2d gives a contiguous result here too


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_can_be_modified_in_place(channels_last):
    """``ReLU(inplace=True)`` after the norm: the output is a tensor of its own, not a view."""
    x = torch.randn(4, 3, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    for norm in (nm.LpBatchNorm2d(3, p=1), nm.LpGroupNorm(3, 3, p=1), nm.LpBatchNorm1d(3, p=1)):
        net = nn.Sequential(norm, nn.ReLU(inplace=True))
        inp = x if not isinstance(norm, nm.LpBatchNorm1d) else x.flatten(2)
        net(inp).sum().backward()
        ref = copy.deepcopy(nn.Sequential(norm, nn.ReLU()))
        x2 = inp.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        with K.use_backend("reference"):
            ref(x2).sum().backward()
        g = x.grad if inp is x else None
        if g is not None:
            torch.testing.assert_close(g, x2.grad, atol=1e-5, rtol=1e-5)
        x.grad = None


@pytest.mark.parametrize("p", [1, "inf"])
def test_empty_batch_group_norm(p):
    x = torch.randn(0, 4, 3, 3)
    assert nm.functional.lp_group_norm(x, 2, p=p).shape == x.shape
    assert nm.LpGroupNorm(2, 4, p=p)(x).shape == x.shape
