"""fold_norms: conv/linear + batch norm of any p -> one layer; weight norms baked; nothing folded wrongly.

Every test compares the folded model's outputs with the original's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from normmatters.deploy import fold_norms, norm_eval_affine
from normmatters.nn import (
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpLayerNorm,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
)
from normmatters.parametrizations import bounded_weight_norm, lp_weight_norm, weight_norm

INF = math.inf
NORM_NAMES = ("BatchNorm", "LpBatchNorm", "MeanOnlyBatchNorm")


def _norm(kind: str, c: int, dims: int) -> nn.Module:
    torch_bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    lp = {1: LpBatchNorm1d, 2: LpBatchNorm2d, 3: LpBatchNorm3d}[dims]
    mean = {1: MeanOnlyBatchNorm1d, 2: MeanOnlyBatchNorm2d, 3: MeanOnlyBatchNorm3d}[dims]
    return {
        "torch": lambda: torch_bn(c),
        "l2": lambda: lp(c, p=2),
        "l1": lambda: lp(c, p=1),
        "linf": lambda: lp(c, p=INF),
        "top3": lambda: lp(c, p=INF, k=3),
        "l1_noaffine": lambda: lp(c, p=1, affine=False),
        "l1_nobias": lambda: lp(c, p=1, bias=False),
        "l1_eps": lambda: lp(c, 1e-1, p=1),
        "mean": lambda: mean(c),
        "mean_scale": lambda: mean(c, scale=True),
    }[kind]()


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters, then a few training steps for real running statistics."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _train_stats(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x * (1 + 0.3 * i) + 0.2 * i)
    return model.eval()


def _norm_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if any(n in type(m).__name__ for n in NORM_NAMES))


def _assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    scale = max(1.0, float(ya.abs().max()))
    assert float((ya - yb).abs().max()) <= tol * scale


KINDS = ["torch", "l2", "l1", "linf", "top3", "l1_noaffine", "l1_nobias", "l1_eps", "mean", "mean_scale"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_norm_folds_exactly(kind: str, dims: int) -> None:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(dims)
    model = nn.Sequential(conv(3, 6, 3, padding=1), _norm(kind, 6, dims), nn.ReLU(),
                          conv(6, 6, 3, bias=False, groups=2), _norm(kind, 6, dims))
    x = torch.randn((5, 3) + (7,) * dims) * 2 + 1
    _train_stats(_randomize(model), x)
    before = copy.deepcopy(model.state_dict())
    folded, report = fold_norms(model, return_report=True)
    assert len(report.folded) == 2 and _norm_count(folded) == 0
    _assert_same(model, folded, torch.randn((4, 3) + (7,) * dims) * 3)
    # the original is unchanged
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert _norm_count(model) == 2


@pytest.mark.parametrize("kind", ["torch", "l1", "top3", "mean_scale"])
def test_linear_batch_norm_1d(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), _norm(kind, 12, 1), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(32, 10)
    _train_stats(_randomize(model), x)
    folded = fold_norms(model, x)
    assert _norm_count(folded) == 0
    _assert_same(model, folded, torch.randn(9, 10))


def test_eval_affine_matches_each_p() -> None:
    # norm(x) == scale*x + shift, the formula fold_norms relies on, for every p and for torch's BN
    torch.manual_seed(0)
    x = torch.randn(16, 6, 5, 5, dtype=torch.float64)
    for kind in KINDS:
        norm = _train_stats(_randomize(_norm(kind, 6, 2).double()), x)
        scale, shift = norm_eval_affine(norm)
        expect = norm(x)
        got = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_p2_and_p1_formulas_differ() -> None:
    # guards against folding every p with torch's formula: with a large eps the two differ
    a = _train_stats(_randomize(LpBatchNorm2d(4, 0.5, p=1)), torch.randn(8, 4, 3, 3) * 0.1)
    b = LpBatchNorm2d(4, 0.5, p=2).eval()
    b.load_state_dict(a.state_dict())
    sa, _ = norm_eval_affine(a)
    sb, _ = norm_eval_affine(b)
    assert not torch.allclose(sa, sb, rtol=1e-3)


class _Reordered(nn.Module):
    """Modules declared in an order unrelated to the data flow."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_b = LpBatchNorm2d(4, p=1)
        self.bn_a = LpBatchNorm2d(4, p=INF, k=2)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.bn_in = LpBatchNorm2d(3, p=1)

    def forward(self, x):
        x = self.bn_in(x)  # fed by the input: not foldable
        y = self.bn_a(self.conv_a(x))
        return self.bn_b(self.conv_b(F.relu(y)))


def test_pairs_come_from_the_graph_not_module_order() -> None:
    torch.manual_seed(0)
    model = _Reordered()
    x = torch.randn(8, 3, 6, 6)
    _train_stats(_randomize(model), x)
    folded, report = fold_norms(model, return_report=True)
    assert sorted(report.folded) == [("conv_a", "bn_a"), ("conv_b", "bn_b")]
    assert [n for n, _ in report.skipped] == ["bn_in"]
    assert "the input" in report.skipped[0][1]
    _assert_same(model, folded, x)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = LpBatchNorm2d(4, p=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = LpBatchNorm2d(4, p=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = LpBatchNorm2d(4, p=1)
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.bn4 = LpBatchNorm2d(4, p=1, track_running_stats=False)
        self.conv5 = nn.Conv2d(4, 4, 1)
        self.bn5 = LpBatchNorm2d(4, p=1)

    def forward(self, x):
        a = self.bn(self.conv(x)) + self.conv(x)  # conv used twice
        b = self.bn2(self.conv2(a)) + self.bn2(a)  # bn2 used twice
        c = self.conv3(b)
        d = self.bn3(c) + c  # conv3's output also read elsewhere
        e = self.bn4(self.conv4(F.relu(d)))  # no running statistics
        return self.bn5(self.conv5(e))  # the one foldable pair


def test_reuse_shared_outputs_and_batch_statistics_are_refused() -> None:
    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(8, 4, 5, 5)
    _train_stats(_randomize(model), x)
    folded, report = fold_norms(model, return_report=True)
    reasons = dict(report.skipped)
    assert report.folded == [("conv5", "bn5")]
    assert len(report.skipped) == 4  # one entry per norm, however often it is called
    assert "more than one place" in reasons["bn"]
    assert "more than one place" in reasons["bn2"]
    assert "also read by" in reasons["bn3"]
    assert "running statistics" in reasons["bn4"]
    _assert_same(model, folded, x)


def test_module_registered_twice_is_not_folded() -> None:
    conv = nn.Conv2d(3, 4, 3)
    bn = LpBatchNorm2d(4, p=1)
    model = nn.Module()
    model.body = nn.Sequential(conv, bn)
    model.alias = conv  # the same conv under a second name, never called: fx cannot see it
    model.forward = model.body.forward
    _train_stats(_randomize(model), torch.randn(6, 3, 5, 5))
    with pytest.raises(ValueError, match="nothing to fold.*more than one place"):
        fold_norms(model)


class _Untraceable(nn.Module):
    """A forward torch.fx cannot trace, which also calls a child's conv directly."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LpBatchNorm2d(4, p=1))
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), LpBatchNorm2d(4, p=INF))

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent branch: not traceable
            y = self.block(x) + self.block[0](x)
        return self.block2(y)


def test_untraceable_forward_uses_children_and_example_inputs_catch_reuse() -> None:
    torch.manual_seed(0)
    model = _Untraceable()
    x = torch.randn(6, 3, 5, 5)
    _train_stats(_randomize(model), x)
    folded, report = fold_norms(model, x, return_report=True)
    assert report.untraced and report.untraced[0][0] == "<root>"
    # block.0 is called twice (once from the untraced forward): only block2 may be folded
    assert report.folded == [("block2.0", "block2.1")]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    _assert_same(model, folded, x)


def test_train_mode_is_refused_with_module_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LpBatchNorm2d(4, p=1)).eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"evaluation mode.*'1'"):
        fold_norms(model)


def test_nothing_to_fold() -> None:
    with pytest.raises(ValueError, match="nothing to fold"):
        fold_norms(nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval())
    with pytest.raises(ValueError, match="nothing to fold.*per-sample"):
        fold_norms(nn.Sequential(nn.Linear(3, 4), LpLayerNorm(4, p=1)).eval())
    with pytest.raises(TypeError):
        fold_norms("not a model")  # type: ignore[arg-type]


def test_example_inputs_check_catches_wrong_folds() -> None:
    # A Linear on (N, L, C) input followed by BatchNorm1d(L): the channel axis is L, not the
    # linear layer's outputs. With L == outputs the pair looks foldable; the check refuses it.
    model = nn.Sequential(nn.Linear(4, 5), LpBatchNorm1d(5, p=1))
    x = torch.randn(8, 5, 4)
    _train_stats(_randomize(model), x)
    with pytest.raises(ValueError, match="differs from the original"):
        fold_norms(model, x)


def _wn_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    lin = nn.Linear(6, 5)
    if kind == "wn":
        weight_norm(conv)
        lp_weight_norm(lin, p=1)
    elif kind == "bwn":
        bounded_weight_norm(conv, p=1)
        bounded_weight_norm(lin, p=INF)
    elif kind == "bwn_bounded":
        bounded_weight_norm(conv, gain="bounded")
        bounded_weight_norm(lin, p=1, gain="bounded")
    elif kind == "torch_wn":
        torch.nn.utils.parametrizations.weight_norm(conv)
        torch.nn.utils.parametrizations.weight_norm(lin)
    elif kind == "torch_legacy_wn":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(conv)
            torch.nn.utils.weight_norm(lin)
    return nn.Sequential(conv, MeanOnlyBatchNorm2d(6, scale=True), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), lin)


@pytest.mark.parametrize("kind", ["wn", "bwn", "bwn_bounded", "torch_wn", "torch_legacy_wn"])
def test_weight_norms_are_baked(kind: str) -> None:
    model = _wn_model(kind)
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():  # move the directions away from their initial values
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    _train_stats(model, x)
    folded, report = fold_norms(model, return_report=True)
    assert len(report.baked) == 2
    assert report.folded == [("0", "1")]
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert not any(type(h).__name__ == "WeightNorm" for m in folded.modules() for h in m._forward_pre_hooks.values())
    _assert_same(model, folded, x)
    # the original keeps its parametrizations and still runs (deepcopy shares torch's generated class)
    if kind != "torch_legacy_wn":
        assert parametrize.is_parametrized(model[0])
    model(x)


def test_dtype_and_requires_grad_kept() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LpBatchNorm2d(4, p=1)).double()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    _train_stats(_randomize(model), x)
    folded = fold_norms(model)
    conv = folded.get_submodule("0")
    assert conv.weight.dtype == torch.float64 and conv.bias is not None
    _assert_same(model, folded, x, tol=1e-12)


def test_resnet_digits_l1_and_bwn() -> None:
    from normmatters.experiments.models import create_model

    for norm in ("l1", "bwn"):
        torch.manual_seed(0)
        model = create_model("resnet_digits", norm=norm, in_channels=1)
        x = torch.randn(16, 1, 8, 8)
        _train_stats(_randomize(model), x)
        folded, report = fold_norms(model, x, return_report=True)
        before = _norm_count(model)
        # every norm is folded except, where the network's own forward is not fx-traceable, the stem's
        assert _norm_count(folded) <= 1 < before
        assert len(report.folded) >= before - 1
        _assert_same(model, folded, torch.randn(5, 1, 8, 8))


def test_frozen_norms_fold_too() -> None:
    from normmatters.deploy import freeze_norms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), LpBatchNorm2d(6, p=INF, k=2), nn.ReLU(),
                          nn.Conv2d(6, 6, 1), MeanOnlyBatchNorm2d(6, scale=True), nn.Flatten(),
                          nn.Linear(6 * 16, 4), LpLayerNorm(4, p=1))
    x = torch.randn(8, 3, 6, 6)
    _train_stats(_randomize(model), x)
    frozen = freeze_norms(model).eval()
    folded, report = fold_norms(frozen, x, return_report=True)
    assert [n for _, n in report.folded] == ["1", "4"]
    assert [n for n, _ in report.skipped] == ["7"]  # the layer norm: per-sample statistics
    _assert_same(frozen, folded, x)


def test_custom_tracer_class() -> None:
    import torch.fx as fx

    class KeepBlocks(fx.Tracer):  # a user tracer that keeps a whole block opaque
        def is_leaf_module(self, m, qualname):
            return qualname == "1" or super().is_leaf_module(m, qualname)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1), LpBatchNorm2d(4, p=1)),
                          LpBatchNorm2d(4, p=1))
    x = torch.randn(6, 3, 5, 5)
    _train_stats(_randomize(model), x)
    folded, report = fold_norms(model, tracer_class=KeepBlocks, return_report=True)
    # the opaque block is searched on its own; the norm after it is not fed by a conv
    assert report.folded == [("1.0", "1.1")]
    assert report.skipped == [("2", "fed by module '1' (Sequential), not by a Conv1d/2d/3d or Linear")]
    _assert_same(model, folded, x)
    folded, report = fold_norms(model, return_report=True)
    # traced through: conv -> norm -> norm, and both norms fold into the conv, one after the other
    assert report.folded == [("1.0", "1.1"), ("1.0", "2")]
    _assert_same(model, folded, x)
    with pytest.raises(TypeError, match="tracer_class"):
        fold_norms(model, tracer_class=object)  # type: ignore[arg-type]


def test_norm_after_norm_folds_both_into_the_conv() -> None:
    # conv -> L1 BN -> mean-only BN -> torch BN: each norm folds into the already-fused conv
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), LpBatchNorm2d(5, p=1), MeanOnlyBatchNorm2d(5, scale=True),
                          nn.BatchNorm2d(5), nn.ReLU())
    x = torch.randn(8, 3, 6, 6) * 2
    _train_stats(_randomize(model), x)
    folded, report = fold_norms(model, return_report=True)
    assert report.folded == [("0", "1"), ("0", "2"), ("0", "3")]
    assert _norm_count(folded) == 0
    _assert_same(model, folded, x)
