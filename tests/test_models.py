"""Tests of normmatters.experiments.models: the norm factory's wiring and the models' invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from normmatters.experiments.errors import ConfigError
from normmatters.experiments.models import create_model, last_layer, list_models, model_task
from normmatters.experiments.models.norms import NormFactory, parse_norm
from normmatters.nn import LpBatchNorm1d, LpBatchNorm2d, LpLayerNorm, MeanOnlyBatchNorm2d

# Small inputs per model: (kwargs, input)
_CLS_INPUTS = {
    "resnet20": ({"in_channels": 3}, (2, 3, 16, 16)),
    "resnet32": ({"in_channels": 3}, (2, 3, 8, 8)),
    "resnet44": ({"in_channels": 3}, (2, 3, 8, 8)),
    "resnet56": ({"in_channels": 3}, (2, 3, 8, 8)),
    "resnet110": ({"in_channels": 3}, (2, 3, 8, 8)),
    "vgg11": ({"in_channels": 3}, (2, 3, 32, 32)),
    "resnet18": ({"in_channels": 3}, (2, 3, 32, 32)),
    "resnet50": ({"in_channels": 3}, (2, 3, 32, 32)),
    "resnet1d": ({"in_channels": 1}, (2, 1, 40)),
    "resnet_digits": ({"in_channels": 1}, (2, 1, 8, 8)),
}


def _norm_layers(model):
    return [m for m in model.modules() if isinstance(m, (LpBatchNorm1d, LpBatchNorm2d, MeanOnlyBatchNorm2d))]


def test_registry_lists_every_model():
    assert set(_CLS_INPUTS) | {"transformer_lm", "lstm_lm"} == set(list_models())
    assert model_task("transformer_lm") == "lm" and model_task("resnet20") == "classification"


@pytest.mark.parametrize("name", list(_CLS_INPUTS))
def test_classifiers_forward_backward_shapes(name):
    torch.manual_seed(0)
    kw, shape = _CLS_INPUTS[name]
    model = create_model(name, norm="l1", num_classes=7, **kw)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert last_layer(model).out_features == 7


@pytest.mark.parametrize("norm,p,k", [("l2", 2.0, None), ("bn", 2.0, None), ("l1", 1.0, None),
                                      ("linf", math.inf, None), ("top10", math.inf, 10), ("top3", math.inf, 3)])
def test_factory_maps_lp_names_to_lp_batch_norm(norm, p, k):
    model = create_model("resnet20", norm=norm)
    bns = [m for m in model.modules() if isinstance(m, LpBatchNorm2d)]
    # stem + 2 per block (9 blocks) + 2 projection shortcuts
    assert len(bns) == 1 + 18 + 2
    assert all(m.p == p and m.k == k for m in bns)
    assert all(not parametrize.is_parametrized(m) for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("norm,scale,p,gain", [("wn", False, 2.0, None), ("bwn", True, 2.0, "fixed"),
                                                ("bwn_bounded", False, 2.0, "bounded"), ("bwn_l1", True, 1.0, "fixed")])
def test_factory_weight_norm_variants(norm, scale, p, gain):
    spec = parse_norm(norm)
    assert spec.p == p and (gain is None or spec.gain == gain)
    model = create_model("resnet20", norm=norm)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert not parametrize.is_parametrized(model.fc)  # the classifier feeds no norm
    mobn = [m for m in model.modules() if isinstance(m, MeanOnlyBatchNorm2d)]
    assert len(mobn) == len(convs)
    assert all((m.weight is not None) == scale for m in mobn)
    assert not any(isinstance(m, LpBatchNorm2d) for m in model.modules())


def test_norm_none_gives_identity_and_conv_bias():
    model = create_model("resnet20", norm="none")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert not _norm_layers(model)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_norm_kwargs_reach_every_norm_layer():
    model = create_model("resnet20", norm="linf", norm_kwargs={"constant": "paper", "momentum": 0.3})
    bns = _norm_layers(model)
    assert bns and all(m.constant == "paper" and m.momentum == 0.3 for m in bns)


@pytest.mark.parametrize("bad", ["l3", "topk", "wn_bounded", "", "batchnorm"])
def test_unknown_norm_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="norm"):
        create_model("resnet20", norm=bad)


def test_unknown_model_is_a_value_error_naming_choices():
    with pytest.raises(ValueError, match="resnet20"):
        create_model("resnet21")


def test_input_dims_selects_1d_or_2d():
    m1 = create_model("resnet20", in_channels=1, input_dims=1)
    assert any(isinstance(m, nn.Conv1d) for m in m1.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in m1.modules())
    assert m1(torch.randn(3, 1, 40)).shape == (3, 10)
    m2 = create_model("resnet_digits", norm="l2")
    assert any(isinstance(m, nn.Conv2d) for m in m2.modules())
    with pytest.raises(ValueError):
        create_model("resnet18", input_dims=1)


@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "top10", "wn", "bwn"])
def test_batch_normalized_resnet_is_scale_invariant(norm):
    """C1: BN(ρ·w·x) = BN(w·x) — scaling every normalized weight leaves the output unchanged.

    Fails if any convolution of the network does not feed a normalization.
    """
    torch.manual_seed(0)
    # eps → 0 so that σ̂ + eps scales exactly with the weight (eps breaks invariance by O(eps/σ)).
    model = create_model("resnet20", norm=norm, in_channels=1, input_dims=1,
                         norm_kwargs={"eps": 1e-12}).double().train()
    x = torch.randn(16, 1, 40, dtype=torch.float64)
    y0 = model(x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv1d):
                if parametrize.is_parametrized(m, "weight"):
                    for t in m.parametrizations.weight.parameters():  # the direction v
                        if t.shape == m.weight.shape:
                            t.mul_(3.0)
                else:
                    m.weight.mul_(3.0)
    y1 = model(x)
    torch.testing.assert_close(y1, y0, rtol=1e-8, atol=1e-8)


def test_scaling_the_classifier_is_not_invariant():
    """The control of the test above: the last layer is not followed by a norm."""
    torch.manual_seed(0)
    model = create_model("resnet20", norm="l2", in_channels=1, input_dims=1).double()
    x = torch.randn(8, 1, 40, dtype=torch.float64)
    y0 = model(x)
    with torch.no_grad():
        model.fc.weight.mul_(3.0)
    assert not torch.allclose(model(x), y0)


@pytest.mark.parametrize("norm,p,k", [("l2", 2.0, None), ("l1", 1.0, None), ("top4", math.inf, 4)])
def test_transformer_uses_lp_layer_norm_and_is_causal(norm, p, k):
    torch.manual_seed(0)
    model = create_model("transformer_lm", norm=norm, vocab_size=30, block_size=16, n_layer=2, d_model=32,
                         n_head=4, dropout=0.0).eval()
    lns = [m for m in model.modules() if isinstance(m, LpLayerNorm)]
    assert len(lns) == 2 * 2 + 1 and all(m.p == p and m.k == k for m in lns)
    assert model.head.weight is model.tok.weight
    idx = torch.randint(0, 30, (2, 16))
    out = model(idx)
    assert out.shape == (2, 16, 30)
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 30
    out2 = model(idx2)
    torch.testing.assert_close(out2[:, :10], out[:, :10])  # the past does not see the future
    assert not torch.allclose(out2[:, 10:], out[:, 10:])


def test_transformer_bwn_parametrizes_projections():
    model = create_model("transformer_lm", norm="bwn", vocab_size=20, block_size=8, n_layer=1, d_model=16, n_head=2)
    lin = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.head]
    assert lin and all(parametrize.is_parametrized(m, "weight") for m in lin)
    assert not any(isinstance(m, LpLayerNorm) for m in model.modules())
    assert model(torch.randint(0, 20, (2, 8))).shape == (2, 8, 20)


@pytest.mark.parametrize("norm", ["none", "wn", "bwn"])
def test_lstm_lm_forward_causal_and_weight_norm(norm):
    torch.manual_seed(0)
    model = create_model("lstm_lm", norm=norm, vocab_size=25, embed_size=16, hidden_size=24, dropout=0.0)
    hh = [layer.hh for layer in model.layers]
    assert all(parametrize.is_parametrized(h, "weight") == (norm != "none") for h in hh)
    idx = torch.randint(0, 25, (3, 12))
    out = model(idx)
    assert out.shape == (3, 12, 25)
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % 25
    torch.testing.assert_close(model(idx2)[:, :7], out[:, :7])
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lstm_lm_rejects_activation_norms():
    with pytest.raises(ConfigError, match="lstm_lm"):
        create_model("lstm_lm", norm="l1", vocab_size=10)


def test_lstm_matches_torch_lstm_equations():
    """The written-out LSTM computes what nn.LSTM computes with the same weights."""
    torch.manual_seed(0)
    model = create_model("lstm_lm", norm="none", vocab_size=10, embed_size=6, hidden_size=5, num_layers=1)
    layer = model.layers[0]
    ref = nn.LSTM(6, 5)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.ih.weight)
        ref.bias_ih_l0.copy_(layer.ih.bias)
        ref.weight_hh_l0.copy_(layer.hh.weight)
        ref.bias_hh_l0.zero_()
    x = torch.randn(7, 3, 6)
    torch.testing.assert_close(layer(x)[0], ref(x)[0])


def test_factory_builds_1d_and_rejects_bad_dims():
    f = NormFactory("l1")
    assert isinstance(f.batch_norm(8, dims=1), LpBatchNorm1d)
    with pytest.raises(ConfigError):
        f.batch_norm(8, dims=4)
