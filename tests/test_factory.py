"""The norm factory: every name builds the layer it says, with the p and k it says."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from normmatters.nn import (
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    create_norm_layer,
    get_norm_layer,
    norm_layer_names,
)

INF = math.inf

# name -> (class, p, k)
CASES = {
    "bn": (LpBatchNorm2d, 2.0, None),
    "l2bn": (LpBatchNorm2d, 2.0, None),
    "l2": (LpBatchNorm2d, 2.0, None),
    "batchnorm2d": (LpBatchNorm2d, 2.0, None),
    "l1bn": (LpBatchNorm2d, 1.0, None),
    "l1": (LpBatchNorm2d, 1.0, None),
    "linfbn": (LpBatchNorm2d, INF, None),
    "linf": (LpBatchNorm2d, INF, None),
    "top10bn": (LpBatchNorm2d, INF, 10),
    "top10": (LpBatchNorm2d, INF, 10),
    "top3": (LpBatchNorm2d, INF, 3),
    "bn1d": (LpBatchNorm1d, 2.0, None),
    "l1bn1d": (LpBatchNorm1d, 1.0, None),
    "batchnorm1d": (LpBatchNorm1d, 2.0, None),
    "bn3d": (LpBatchNorm3d, 2.0, None),
    "linfbn3d": (LpBatchNorm3d, INF, None),
    "top5bn3d": (LpBatchNorm3d, INF, 5),
    "ln": (LpLayerNorm, 2.0, None),
    "layernorm": (LpLayerNorm, 2.0, None),
    "l1ln": (LpLayerNorm, 1.0, None),
    "linfln": (LpLayerNorm, INF, None),
    "top4ln": (LpLayerNorm, INF, 4),
    "gn": (LpGroupNorm, 2.0, None),
    "groupnorm": (LpGroupNorm, 2.0, None),
    "l1gn": (LpGroupNorm, 1.0, None),
    "linfgn": (LpGroupNorm, INF, None),
    "rmsnorm": (LpRMSNorm, 2.0, None),
    "l1rmsnorm": (LpRMSNorm, 1.0, None),
    "top2rmsnorm": (LpRMSNorm, INF, 2),
}

# input shape for a layer built with 8 features
SHAPES = {
    LpBatchNorm1d: (6, 8, 5), LpBatchNorm2d: (6, 8, 4, 4), LpBatchNorm3d: (6, 8, 2, 3, 3),
    LpLayerNorm: (6, 5, 8), LpGroupNorm: (6, 8, 4, 4), LpRMSNorm: (6, 5, 8),
    MeanOnlyBatchNorm1d: (6, 8, 5), MeanOnlyBatchNorm2d: (6, 8, 4, 4), MeanOnlyBatchNorm3d: (6, 8, 2, 3, 3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_name_builds_its_layer(name: str) -> None:
    cls, p, k = CASES[name]
    layer = create_norm_layer(name, 8)
    assert type(layer) is cls
    assert layer.p == p and layer.k == k
    # the layer runs, and matches the same layer built directly (same p/k => same function)
    torch.manual_seed(0)
    x = torch.randn(SHAPES[cls])
    if cls is LpGroupNorm:
        direct = cls(layer.num_groups, 8, p=p, k=k)
    else:
        direct = cls(8, p=p, k=k)
    torch.testing.assert_close(layer(x), direct(x))


@pytest.mark.parametrize("spelling", ["L1BN", "l1_bn", "l1-bn", " l1bn "])
def test_case_and_separators_are_ignored(spelling: str) -> None:
    layer = create_norm_layer(spelling, 4)
    assert type(layer) is LpBatchNorm2d and layer.p == 1.0


@pytest.mark.parametrize("name,cls", [("meanbn", MeanOnlyBatchNorm2d), ("meanbn2d", MeanOnlyBatchNorm2d),
                                      ("meanbn1d", MeanOnlyBatchNorm1d), ("meanbn3d", MeanOnlyBatchNorm3d)])
def test_mean_only_names(name: str, cls: type) -> None:
    assert get_norm_layer(name) is cls
    layer = create_norm_layer(name, 8, scale=True)
    assert type(layer) is cls and layer.weight is not None
    x = torch.randn(SHAPES[cls])
    dims = (0,) + tuple(range(2, x.dim()))
    # training output has zero channel means: the mean really is subtracted
    assert layer(x).mean(dims).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["none", "identity", None])
def test_identity(name) -> None:
    layer = create_norm_layer(name, 8)
    assert isinstance(layer, nn.Identity)


def test_class_and_partial_pass_through() -> None:
    assert get_norm_layer(nn.BatchNorm2d) is nn.BatchNorm2d
    part = functools.partial(LpBatchNorm2d, p=1)
    assert get_norm_layer(part) is part
    bound = get_norm_layer(nn.BatchNorm2d, eps=1e-3)
    assert bound(4).eps == 1e-3
    assert get_norm_layer(part, momentum=0.3)(4).momentum == 0.3
    assert get_norm_layer(lambda c: nn.GroupNorm(2, c))(4).num_groups == 2


def test_kwargs_are_bound() -> None:
    layer = create_norm_layer("linfbn", 8, constant="paper", eps=1e-3, momentum=None)
    assert (layer.constant, layer.eps, layer.momentum) == ("paper", 1e-3, None)
    assert get_norm_layer("top10", ghost_batch_size=16)(8).ghost_batch_size == 16


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        get_norm_layer("l3bn")
    msg = str(err.value)
    assert "'l3bn'" in msg
    for known in ("bn", "l1bn", "linfbn", "top{k}bn", "ln", "l1ln", "gn", "l1gn", "rmsnorm", "l1rmsnorm", "meanbn"):
        assert known in msg.split("known names: ")[1].split(", ")


@pytest.mark.parametrize("bad", ["top0", "top0bn", "", "bnn", "l1bn4d"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown norm"):
        get_norm_layer(bad)


def test_suffix_only_on_batch_norms() -> None:
    with pytest.raises(ValueError, match="only batch norms"):
        get_norm_layer("ln1d")


def test_name_fixes_p_and_k() -> None:
    with pytest.raises(ValueError, match="already sets p/k"):
        get_norm_layer("l1bn", p=2)
    with pytest.raises(ValueError, match="already sets p/k"):
        get_norm_layer("top10", k=3)


def test_bad_type() -> None:
    with pytest.raises(TypeError, match="expected a name"):
        get_norm_layer(3)


def test_group_norm_groups() -> None:
    assert create_norm_layer("gn", 64).num_groups == 32
    assert create_norm_layer("gn", 48).num_groups == 24  # largest divisor of 48 that is <= 32
    assert create_norm_layer("l1gn", 8).num_groups == 8
    assert create_norm_layer("gn", 64, num_groups=4).num_groups == 4
    with pytest.raises(ValueError, match="divisible"):
        create_norm_layer("gn", 48, num_groups=32)  # an explicit count is never changed


def test_names_listed_all_resolve() -> None:
    for name in norm_layer_names():
        resolved = name.replace("{k}", "7")
        layer = create_norm_layer(resolved, 14)
        assert isinstance(layer, nn.Module)


def test_factory_drop_in_for_torch_constructor() -> None:
    # a norm_layer= argument used the way torchvision/timm blocks use it
    norm_layer = get_norm_layer("l1bn")
    block = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm_layer(8), nn.ReLU())
    y = block(torch.randn(4, 3, 6, 6))
    d = y.shape
    assert d == (4, 8, 4, 4)
