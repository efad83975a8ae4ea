"""One weight-decay grouping for every training: ``normmatters train`` and claim C1's runs.

``normmatters train --wd-last-layer-only`` (the trainer's :func:`build_optimizer`) and C1's WD-off
run (``split_param_groups(..., decay="last_layer")`` with the detected scale-invariant weights)
must decay the same tensors: the classifier's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normmatters.experiments.config import TrainConfig
from normmatters.experiments.models import create_model, last_layer
from normmatters.experiments.trainer import build_optimizer
from normmatters.optim import (
    last_layer_module,
    last_layer_parameters,
    scale_invariant_parameters,
    split_param_groups,
)


def _decayed(groups) -> set[int]:
    return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def _trainer_groups(model, **flags):
    return build_optimizer(model, TrainConfig(weight_decay=5e-4, **flags)).param_groups


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet20", {"input_dims": 1, "in_channels": 1}, (4, 1, 40)),
    ("resnet1d", {}, (4, 1, 40)),
    ("resnet20", {}, (4, 3, 16, 16)),
])
def test_trainer_and_c1_wd_off_decay_the_same_tensors(name, kw, shape):
    model = create_model(name, norm="l1", num_classes=10, **kw)
    inv = scale_invariant_parameters(model, torch.randn(shape))
    assert inv  # every convolution feeds a batch norm
    c1_wd_off = split_param_groups(model, inv, weight_decay=5e-4, decay="last_layer")
    trainer = _trainer_groups(model, wd_last_layer_only=True)
    head = {id(p) for p in last_layer(model).parameters()}
    assert _decayed(trainer) == _decayed(c1_wd_off) == head == {id(model.fc.weight), id(model.fc.bias)}
    # The scale-invariant weights are in C1's groups of their own, undecayed.
    inv_groups = [g for g in c1_wd_off if g["scale_invariant"]]
    assert {n for g in inv_groups for n in g["names"]} == set(inv)
    assert all(g["weight_decay"] == 0.0 for g in inv_groups)


class _HeadFirst(nn.Module):
    """The classifier is registered before a later projection: the case where "the last Linear
    or convolution" and "the classifier" are different layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)
        self.proj = nn.Conv1d(8, 8, 1, bias=False)  # registered last, used before the head
        self.bn2 = nn.BatchNorm1d(8)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.bn2(self.proj(h)))
        return self.fc(h.mean(-1))


def test_the_last_layer_is_the_classifier_not_the_last_registered_layer():
    model = _HeadFirst()
    assert last_layer_module(model) is model.fc
    assert last_layer_parameters(model) == ["fc.weight", "fc.bias"]
    inv = scale_invariant_parameters(model, torch.randn(4, 1, 12))
    assert set(inv) == {"conv.weight", "proj.weight"}
    c1 = split_param_groups(model, inv, weight_decay=1e-3, decay="last_layer")
    trainer = build_optimizer(model, TrainConfig(weight_decay=1e-3, wd_last_layer_only=True)).param_groups
    assert _decayed(c1) == _decayed(trainer) == {id(model.fc.weight), id(model.fc.bias)}


def test_without_get_classifier_the_last_linear_or_convolution():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1))
    assert last_layer_parameters(seq) == ["3.weight", "3.bias"]
    assert last_layer_module(nn.Sequential(nn.ReLU())) is None
    assert last_layer_parameters(nn.Sequential(nn.ReLU())) == []


def test_a_head_tied_to_the_embedding_is_named_by_the_embedding():
    lm = create_model("transformer_lm", norm="l1", vocab_size=11, block_size=8, n_layer=1, d_model=16, n_head=2)
    names = last_layer_parameters(lm)
    assert names and all(dict(lm.named_parameters())[n] is p for n, p in zip(names, last_layer(lm).parameters()))


def test_exclude_norm_bias_and_group_order():
    model = create_model("resnet_digits", norm="l1")
    inv = scale_invariant_parameters(model, torch.randn(4, 1, 8, 8))
    groups = split_param_groups(model, inv, weight_decay=1e-3, decay="all", exclude_norm_bias=True)
    assert [g["name"] for g in groups] == ["scale_invariant_decay", "decay", "no_decay"]
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["fc.weight"] == 1e-3 and wd["fc.bias"] == 0.0
    for n, p in model.named_parameters():
        if p.ndim == 1:
            assert wd[n] == 0.0, n
        if n in inv:
            assert wd[n] == 1e-3, n
    # Every trainable parameter exactly once, in named_parameters() order within a group.
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    order = [n for n, _ in model.named_parameters()]
    for g in groups:
        assert g["names"] == [n for n in order if n in set(g["names"])]
    # A frozen parameter is left out.
    model.fc.bias.requires_grad_(False)
    groups = split_param_groups(model, inv, weight_decay=1e-3)
    assert "fc.bias" not in {n for g in groups for n in g["names"]}
    with pytest.raises(ValueError, match="not parameters"):
        split_param_groups(model, ["nope.weight"], weight_decay=1e-3)


def test_trainer_groups_keep_their_order_for_old_checkpoints():
    """The trainer's group structure is the one its checkpoints were written with: the decayed
    group first, then the undecayed one (or a single group)."""
    model = create_model("resnet_digits", norm="l1")
    assert [g["name"] for g in _trainer_groups(model)] == ["decay"]
    both = _trainer_groups(model, wd_last_layer_only=True, wd_exclude_norm_bias=True)
    assert [g["name"] for g in both] == ["decay", "no_decay"]
    assert [id(p) for p in both[0]["params"]] == [id(model.fc.weight)]
