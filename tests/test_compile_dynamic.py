"""Compiled, exported and transformed use of every Lp norm: sizes that change between calls.

* ``torch.compile(fullgraph=True)`` with automatic dynamic shapes: three batch (and image or
  sequence) sizes in a row, no graph break, at most one recompilation (the switch to dynamic), the
  same values and gradients as eager. The L∞ / Top(k) constant of a symbolic n is never a Python
  float: the fused operators compute C_k(n) for each call's n, the traced reference path computes
  it in the graph (:func:`normmatters.functional.constants.traced_constant`).
* ``torch.export`` with a dynamic batch in training and evaluation mode, every p: after
  ``run_decompositions()`` only core ATen operations, matching eager on another batch size.
* ``torch.func`` transforms (per-sample gradients): the reference path for that call only; the
  fast path stays on and nothing reports a kernel failure.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.export import Dim

import normmatters as nm
import normmatters.kernels as K
from normmatters.functional.constants import paper_constant, topk_constant, traced_constant
from normmatters.kernels import selfcheck

from _shared import fused

INF = math.inf
PKS = [(1, None), (INF, None), (INF, 3), (2, None)]
PK_IDS = ["l1", "linf", "top3", "l2"]


def _kw(p, k):
    return {"p": p} if k is None else {"p": p, "k": k}


FAMILIES = {
    "bn1d": (lambda p, k: nm.LpBatchNorm1d(6, **_kw(p, k)), lambda b, s: torch.randn(b, 6, s)),
    "bn2d": (lambda p, k: nm.LpBatchNorm2d(6, **_kw(p, k)), lambda b, s: torch.randn(b, 6, s, s)),
    "bn3d": (lambda p, k: nm.LpBatchNorm3d(6, **_kw(p, k)), lambda b, s: torch.randn(b, 6, 2, s, s)),
    "ln": (lambda p, k: nm.LpLayerNorm(12, **_kw(p, k)), lambda b, s: torch.randn(b, s, 12)),
    "gn": (lambda p, k: nm.LpGroupNorm(3, 6, **_kw(p, k)), lambda b, s: torch.randn(b, 6, s, s)),
    "rms": (lambda p, k: nm.LpRMSNorm(12, **_kw(p, k)), lambda b, s: torch.randn(b, s, 12)),
}
SIZES = [(8, 5), (6, 4), (5, 6)]  # batch and image / sequence size change between calls


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("pk", PKS, ids=PK_IDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fullgraph_with_changing_sizes_matches_eager(family, pk):
    make_module, make_input = FAMILIES[family]
    for training in (True, False):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        module = make_module(*pk).train(training)
        with torch.no_grad():
            for t in module.parameters():
                t.add_(0.3 * torch.randn_like(t))
        eager = copy.deepcopy(module)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        for b, s in SIZES:
            x = make_input(b, s).requires_grad_(True)
            y = compiled(x)
            y.square().sum().backward()
            xe = x.detach().clone().requires_grad_(True)
            ye = eager(xe)
            ye.square().sum().backward()
            where = f"{family} {pk} training={training} size=({b}, {s})"
            torch.testing.assert_close(y, ye, atol=2e-5, rtol=2e-5, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(x.grad, xe.grad, atol=2e-4, rtol=2e-4, msg=lambda m: f"{where}: {m}")
            for (name, a), (_, e) in zip(module.named_parameters(), eager.named_parameters()):
                torch.testing.assert_close(a.grad, e.grad, atol=2e-4, rtol=2e-4,
                                           msg=lambda m, name=name: f"{where}: {name}: {m}")
            for (name, a), (_, e) in zip(module.named_buffers(), eager.named_buffers()):
                torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5,
                                           msg=lambda m, name=name: f"{where}: {name}: {m}")
        assert _graphs() <= 2, f"{family} {pk}: {_graphs()} graphs for three sizes"


def test_inductor_fullgraph_changing_batch_resnet_block():
    """The real compiler (inductor) on a small network with every p, three batch sizes."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nm.LpBatchNorm2d(8, p=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nm.LpBatchNorm2d(8, p=INF), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nm.LpBatchNorm2d(8, p=INF, k=3), nn.ReLU(),
        nn.Flatten(1, 2), nm.LpLayerNorm(8, p=INF), nm.LpRMSNorm(8, p=1),
    )
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True)
    for b in (8, 6, 4):
        x = torch.randn(b, 3, 4, 8)
        y = compiled(x)
        y.square().sum().backward()
        ye = eager(x)
        ye.square().sum().backward()
        torch.testing.assert_close(y, ye, atol=1e-4, rtol=1e-4)
        for a, e in zip(net.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, e.grad, atol=1e-3, rtol=1e-3)
    assert _graphs() <= 2


@pytest.mark.parametrize("n", [2, 3, 7, 40, 128, 1000, 65536, 2_000_000])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_traced_constant_agrees_with_the_cached_one(n, k):
    if k > n:
        pytest.skip("k > n")
    got = float(traced_constant(INF, k, n, "calibrated"))
    assert got == pytest.approx(topk_constant(n, k), rel=1e-9)
    if n >= 2:
        assert float(traced_constant(INF, k, n, "paper")) == pytest.approx(paper_constant(n), rel=1e-12)
    assert traced_constant(1, None, n, "calibrated") == pytest.approx(math.sqrt(math.pi / 2))


def test_runtime_constant_of_the_compiled_operators_is_the_calibrated_one():
    from normmatters.kernels import autograd

    for n, k in [(40, 1), (40, 3), (2048, 10)]:
        for name, sentinel in autograd.RUNTIME_CONSTANT.items():
            want = nm.functional.lp_constant(INF, k, n, name)
            assert autograd.resolve_constant(sentinel, k, n) == want
            if K.available("cpu"):
                assert torch.ops.normmatters.runtime_constant(n, k, int(-sentinel)) == want


# ------------------------------------------------------------------------------------- export


def _core_only(ep) -> list[str]:
    bad = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            # Export's own run-time checks of dtypes and devices are not computations.
            if target.namespace != "aten" or (torch.Tag.core not in target.tags
                                              and not target.__name__.startswith("_assert")):
                bad.append(str(target))
    return bad


@pytest.mark.parametrize("pk", PKS, ids=PK_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_dynamic_batch_core_aten_only(pk, training):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nm.LpBatchNorm2d(6, **_kw(*pk)), nn.ReLU(),
        nm.LpGroupNorm(3, 6, **_kw(*pk)), nn.Flatten(2), nm.LpLayerNorm(16, **_kw(*pk)),
        nm.LpRMSNorm(16, **_kw(*pk)),
    ).train(training)
    eager = copy.deepcopy(net)
    x = torch.randn(5, 3, 4, 4)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: Dim("batch", min=2)},))
    ep = ep.run_decompositions()
    # At p = 2 the layers are torch's own, and torch's training batch norm exports as its
    # functional native op.
    allowed = ["aten._native_batch_norm_legit_functional.default"] if pk[0] == 2 and training else []
    assert [op for op in _core_only(ep) if op not in allowed] == []
    x2 = torch.randn(7, 3, 4, 4)
    torch.testing.assert_close(ep.module()(x2), eager(x2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- function transforms


def test_per_sample_gradients_leave_the_fast_path_on():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nm.LpLayerNorm(16, p=1), nn.ReLU(),
                          nm.LpRMSNorm(16, p=INF, k=3), nn.Linear(16, 16), nm.LpLayerNorm(16, p=INF),
                          nn.Linear(16, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = torch.randn(6, 12), torch.randint(0, 3, (6,))

    def loss(p, xi, ti):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, ti.unsqueeze(0))

    key = (torch.device("cpu"), torch.float32, 0)
    before = selfcheck._verdicts.get(key)
    with warnings.catch_warnings():
        warnings.simplefilter("error", selfcheck.FusedKernelWarning)
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(x.shape[0]):  # what a loop over samples gives
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), target[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4)
    assert selfcheck._verdicts.get(key) in (before, True)  # never distrusted
    if K.available("cpu"):
        assert fused(nm.LpLayerNorm(16, p=1)(torch.randn(4, 16, requires_grad=True)))


def test_vmap_over_evaluation_batch_norm_matches_a_loop():
    from torch.func import vmap

    bn = nm.LpBatchNorm2d(4, p=INF, k=3).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
    x = torch.randn(3, 2, 4, 5, 5)
    out = vmap(bn)(x)
    torch.testing.assert_close(out, torch.stack([bn(xi) for xi in x]))


def test_autocast_bf16_fullgraph_with_changing_batch():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nm.LpBatchNorm2d(8, p=INF, k=3), nn.ReLU(),
                        nm.LpGroupNorm(2, 8, p=1), nn.Flatten(2), nn.Linear(16, 16),
                        nm.LpLayerNorm(16, p=INF), nm.LpRMSNorm(16, p=1))
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for b in (6, 5, 4):
        x = torch.randn(b, 3, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, ye = compiled(x), eager(x)
        assert y.dtype == ye.dtype
        torch.testing.assert_close(y.float(), ye.float(), atol=1e-2, rtol=1e-2)
        y.float().sum().backward()
    assert _graphs() <= 2


def test_vmap_over_training_batch_norm_with_running_statistics_is_a_clear_error():
    from torch.func import vmap

    x = torch.randn(3, 4, 4, 5, 5)
    with pytest.raises(RuntimeError, match="running statistics"):
        vmap(nm.LpBatchNorm2d(4, p=1))(x)
    free = nm.LpBatchNorm2d(4, p=1, track_running_stats=False)
    torch.testing.assert_close(vmap(free)(x), torch.stack([free(xi) for xi in x]))


@pytest.mark.parametrize("which", ["calibrated", "paper"])
def test_run_time_constant_through_the_operators(which):
    """The compiled graphs' operators with a run-time constant: opcheck (schema, fake, autograd)
    and the values of the same call with the constant as a number."""
    from normmatters.kernels import autograd
    from normmatters.kernels.autograd import lp_norm_fwd

    sentinel = autograd.RUNTIME_CONSTANT[which]
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    c = nm.functional.lp_constant(INF, 3, 18, which)
    ops = [lp_norm_fwd]
    if K.available("cpu") and autograd.compiled_cpu_ops(torch.float64):
        ops.append(torch.ops.normmatters.cpu_lp_norm_fwd.default)
    for op in ops:
        torch.library.opcheck(op, (x, w, None, 0, 2, 3, sentinel, 1e-5, True))
        got = op(x, w, None, 0, 2, 3, sentinel, 1e-5, True)
        want = op(x, w, None, 0, 2, 3, c, 1e-5, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        (ga,) = torch.autograd.grad(got[0].square().sum(), x)
        (gb,) = torch.autograd.grad(want[0].square().sum(), x)
        torch.testing.assert_close(ga, gb)


def test_compiled_operator_takes_a_tensor_in_another_layout():
    """A graph may hand the C++ twin a tensor that is not dense in the layout it names: the values
    are those of the contiguous tensor, returned in the input's strides."""
    from normmatters.kernels import autograd

    if not (K.available("cpu") and autograd.compiled_cpu_ops(torch.float32)):
        pytest.skip("no C++ operators")
    op = torch.ops.normmatters.cpu_lp_norm_fwd.default
    x = torch.randn(3, 6, 4).transpose(1, 2)  # [3, 4, 6], neither NCS- nor NSC-dense
    y, mean, inv, sigma = op(x, None, None, 0, 1, 1, 1.25, 1e-5, True)
    y2, mean2, _, _ = op(x.contiguous(), None, None, 0, 1, 1, 1.25, 1e-5, True)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(mean, mean2)
    assert y.stride() == x.stride()
