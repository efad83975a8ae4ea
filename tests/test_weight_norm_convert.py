"""Tests for normmatters.convert.weight_norm: batch-norm networks -> BN-free WN / BWN networks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normmatters.convert.weight_norm import WeightNormPair, find_weight_norm_pairs, to_weight_normalized
from normmatters.nn import LpBatchNorm2d, MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d
from normmatters.parametrizations import bounded_weight_norm, is_weight_normalized, remove_weight_norm


class Block(nn.Module):
    """A CIFAR-style basic residual block (conv-bn-relu-conv-bn + shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def small_resnet(width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )
    for m in net.modules():  # the official ResNet's initialization
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


RESNET_PAIRS = {
    ("0", "1"), ("3.conv1", "3.bn1"), ("3.conv2", "3.bn2"), ("4.conv1", "4.bn1"),
    ("4.conv2", "4.bn2"), ("4.down.0", "4.down.1"), ("5.conv1", "5.bn1"), ("5.conv2", "5.bn2"),
}


# ------------------------------------------------------------------ finding pairs


def test_fx_finds_every_conv_bn_pair_of_a_resnet_and_nothing_else():
    pairs = find_weight_norm_pairs(small_resnet())
    assert {(p.weight, p.norm) for p in pairs} == RESNET_PAIRS
    assert all(p.method == "fx" for p in pairs)


def test_conv_whose_output_is_also_used_elsewhere_is_left_alone():
    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert find_weight_norm_pairs(Tap()) == []


def test_bn_not_directly_after_the_layer_is_not_paired():
    # conv -> relu -> bn: the batch norm does not see the conv's output
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert find_weight_norm_pairs(net) == []


def test_module_called_twice_is_left_alone():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    assert find_weight_norm_pairs(Twice()) == []


def test_channel_mismatch_is_not_paired():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x)[:, :4])

    assert find_weight_norm_pairs(Odd()) == []


class _DataDependent(nn.Module):
    """A module torch.fx cannot trace (control flow on a tensor value)."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_sequential_falls_back_to_registration_order_and_says_so(caplog):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), _DataDependent(), nn.Conv2d(4, 4, 3),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="normmatters.convert.weight_norm"):
        pairs = find_weight_norm_pairs(net)
    assert pairs == [WeightNormPair("0", "1", "sequential"), WeightNormPair("3", "4", "sequential")]
    assert "could not trace" in caplog.text
    assert any("registered right after it among its children" in r.getMessage() and "a guess" not in r.getMessage()
               for r in caplog.records)


def test_untraceable_parent_traces_its_children(caplog):
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block(4, 8, 2)
            self.gate = _DataDependent()

        def forward(self, x):
            return self.block(self.gate(x))

    with caplog.at_level(logging.INFO, logger="normmatters.convert.weight_norm"):
        pairs = find_weight_norm_pairs(Parent())
    assert {(p.weight, p.norm) for p in pairs} == {
        ("block.conv1", "block.bn1"), ("block.conv2", "block.bn2"), ("block.down.0", "block.down.1")}
    assert all(p.method == "fx" for p in pairs)
    assert "could not trace" in caplog.text


class _ShapeDependentNet(nn.Module):
    """Like a ResNet whose pooling uses range(x.dim()): torch.fx cannot trace it."""

    def __init__(self, tap: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)
        self.tap = tap

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = self.drop(torch.relu(self.bn2(y) + (y if self.tap else 0)))
        return self.fc(x.mean(dim=tuple(range(2, x.dim()))))


def test_untraceable_non_sequential_is_paired_by_registration_order_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="normmatters.convert.weight_norm"):
        pairs = find_weight_norm_pairs(_ShapeDependentNet())
    assert pairs == [WeightNormPair("conv1", "bn1", "registration"), WeightNormPair("conv2", "bn2", "registration")]
    assert "a guess" in caplog.text and "example_inputs" in caplog.text


def test_example_inputs_read_the_data_flow_without_side_effects(caplog):
    net = _ShapeDependentNet(tap=True)  # conv2's output also goes around bn2
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 1, 6, 6)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="normmatters.convert.weight_norm"):
        pairs = find_weight_norm_pairs(net, x)
    assert pairs == [WeightNormPair("conv1", "bn1", "example")]
    assert "reading the data flow" in caplog.text
    assert not net.training and not net.bn1.training  # modes restored
    for k, v in net.state_dict().items():  # running statistics untouched
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    # the same net without the tap: both pairs
    assert [p.weight for p in find_weight_norm_pairs(_ShapeDependentNet(), torch.randn(5, 1, 6, 6))] == ["conv1", "conv2"]


def test_example_inputs_are_not_used_when_fx_succeeds():
    pairs = find_weight_norm_pairs(small_resnet(), torch.randn(2, 1, 8, 8))
    assert {(p.weight, p.norm) for p in pairs} == RESNET_PAIRS and all(p.method == "fx" for p in pairs)


# ------------------------------------------------------------------ converting


@pytest.mark.parametrize("kind,gain,scale_default", [("bwn", "fixed", True), ("bwn", "bounded", False),
                                                      ("wn", "fixed", False), ("lpwn", "fixed", False)])
def test_convert_resnet_replaces_exactly_the_pairs(kind, gain, scale_default):
    net = small_resnet()
    untouched = {name: m for name, m in net.named_modules() if isinstance(m, (nn.ReLU, nn.Linear, nn.AdaptiveAvgPool2d))}
    fc_weight = net[8].weight.detach().clone()
    out = to_weight_normalized(net, kind, gain=gain)
    assert out is net
    modules = dict(net.named_modules())
    for w, b in RESNET_PAIRS:
        assert is_weight_normalized(modules[w])
        assert type(modules[b]) is MeanOnlyBatchNorm2d
        assert (modules[b].weight is not None) == scale_default
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    for name, m in untouched.items():
        assert modules[name] is m and not parametrize.is_parametrized(m)
    assert torch.equal(net[8].weight, fc_weight)
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_bn_state_is_carried():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    bn = net[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.num_batches_tracked.fill_(17)
    bn.bias.requires_grad_(False)
    net.eval()
    ref = {k: v.clone() for k, v in bn.state_dict().items()}
    to_weight_normalized(net, "bwn", scale=True)
    new = net[1]
    assert isinstance(new, MeanOnlyBatchNorm2d) and not new.training
    assert new.eps == 1e-3 and new.momentum == 0.3
    torch.testing.assert_close(new.weight.detach(), ref["weight"])
    torch.testing.assert_close(new.bias.detach(), ref["bias"])
    assert not new.bias.requires_grad
    torch.testing.assert_close(new.running_mean, ref["running_mean"])
    assert int(new.num_batches_tracked) == 17


def test_without_scale_gamma_is_folded_into_the_wn_gain():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    gamma = torch.tensor([0.5, 2.0, -1.0, 3.0])
    with torch.no_grad():
        net[1].weight.copy_(gamma)
    w0, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    to_weight_normalized(net, "wn", scale=False)
    assert net[1].weight is None
    torch.testing.assert_close(net[0].weight, w0 * gamma.view(-1, 1, 1, 1))
    torch.testing.assert_close(net[0].bias.detach(), b0 * gamma)


def test_without_scale_bwn_fixed_warns_when_gamma_is_dropped(caplog):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with caplog.at_level(logging.WARNING, logger="normmatters.convert.weight_norm"):
        to_weight_normalized(net, "bwn", scale=False)
    assert "dropped" in caplog.text


@pytest.mark.parametrize(
    "layer,bn,mean_cls,x",
    [
        (nn.Linear(5, 6), nn.BatchNorm1d(6), MeanOnlyBatchNorm1d, torch.randn(4, 5)),
        (nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), MeanOnlyBatchNorm1d, torch.randn(4, 2, 9)),
        (nn.Conv3d(2, 6, 2), nn.BatchNorm3d(6), MeanOnlyBatchNorm3d, torch.randn(2, 2, 4, 4, 4)),
        (nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), MeanOnlyBatchNorm2d, torch.randn(2, 4, 5, 5)),
        (nn.Conv2d(2, 6, 3), LpBatchNorm2d(6, p=1), MeanOnlyBatchNorm2d, torch.randn(2, 2, 6, 6)),
        (nn.Conv2d(2, 6, 3), nn.SyncBatchNorm(6), MeanOnlyBatchNorm2d, None),
    ],
)
def test_layer_and_norm_kinds(layer, bn, mean_cls, x):
    net = nn.Sequential(layer, bn)
    to_weight_normalized(net, "bwn")
    assert isinstance(net[1], mean_cls) and is_weight_normalized(net[0])
    if x is not None:
        net.train()
        y = net(x)
        # mean-only BN in training: per-channel batch mean of the output equals the bias (0 here)
        dims = [0] + list(range(2, y.dim()))
        torch.testing.assert_close(y.mean(dims), torch.zeros(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_converted_bwn_channels_have_norm_rho(p):
    net = small_resnet()
    to_weight_normalized(net, "bwn", p=p)
    for w, _ in RESNET_PAIRS:
        layer = net.get_submodule(w)
        rho = layer.parametrizations.weight[0].rho
        norms = torch.linalg.vector_norm(layer.weight.flatten(1), ord=p, dim=1)
        torch.testing.assert_close(norms, rho.expand_as(norms))


@pytest.mark.parametrize("kind,gain", [("wn", "fixed"), ("lpwn", "fixed"), ("bwn", "bounded"), ("bwn", "fixed")])
def test_convert_then_remove_round_trips_the_weights(kind, gain):
    net = small_resnet()
    before = {w: net.get_submodule(w).weight.detach().clone() for w, _ in RESNET_PAIRS}
    to_weight_normalized(net, kind, p=1 if kind == "lpwn" else 2, gain=gain)
    for w, _ in RESNET_PAIRS:
        remove_weight_norm(net.get_submodule(w))
    for w, w0 in before.items():
        w1 = net.get_submodule(w).weight.detach()
        if kind == "bwn" and gain == "fixed":
            # directions kept; every channel rescaled to the common rho
            cos = nn.functional.cosine_similarity(w1.flatten(1), w0.flatten(1), dim=1)
            torch.testing.assert_close(cos, torch.ones_like(cos))
        else:
            torch.testing.assert_close(w1, w0)


def test_converted_model_state_dict_loads_into_a_fresh_conversion():
    a = to_weight_normalized(small_resnet(), "bwn")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)
    b = to_weight_normalized(small_resnet(), "bwn")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 1, 8, 8)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x))


# ------------------------------------------------------------------ bad input


def test_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        to_weight_normalized(small_resnet(), "sn")
    with pytest.raises(ValueError, match="kind='wn' is L2"):
        to_weight_normalized(small_resnet(), "wn", p=1)
    with pytest.raises(ValueError, match="p must be 1, 2"):
        to_weight_normalized(small_resnet(), "bwn", p=3)
    with pytest.raises(ValueError, match="gain must be"):
        to_weight_normalized(small_resnet(), "bwn", gain="learned")
    with pytest.raises(ValueError, match="applies to kind='bwn' only"):
        to_weight_normalized(small_resnet(), "wn", gain="bounded")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        to_weight_normalized("resnet20")


def test_already_normalized_layer_is_refused_before_anything_changes():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    bounded_weight_norm(net[2])
    with pytest.raises(ValueError, match="already weight-normalized"):
        to_weight_normalized(net, "bwn")
    assert isinstance(net[1], nn.BatchNorm2d) and not is_weight_normalized(net[0])


def test_converting_twice_is_a_no_op():
    net = to_weight_normalized(small_resnet(), "bwn")
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    to_weight_normalized(net, "bwn")
    assert net.state_dict().keys() == sd.keys()


# ------------------------------------------------------------------ training on real data


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(y)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bwn", "wn"])
def test_converted_resnet_trains_on_digits(kind):
    x, y = _digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    net = to_weight_normalized(small_resnet(), kind)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    rho = {w: net.get_submodule(w).parametrizations.weight[0].rho.clone() for w, _ in RESNET_PAIRS} if kind == "bwn" else {}

    def test_loss() -> float:
        net.eval()
        with torch.no_grad():
            return nn.functional.cross_entropy(net(x[te]), y[te]).item()

    loss0 = test_loss()
    for epoch in range(3):
        net.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    loss1 = test_loss()
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    for w, r in rho.items():  # BWN: every channel still at rho after training
        norms = net.get_submodule(w).weight.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, r.expand_as(norms))


def test_to_weight_normalized_uses_example_inputs():
    net = to_weight_normalized(_ShapeDependentNet(tap=True), "wn", example_inputs=torch.randn(4, 1, 6, 6))
    assert is_weight_normalized(net.conv1) and isinstance(net.bn1, MeanOnlyBatchNorm2d)
    assert not is_weight_normalized(net.conv2) and isinstance(net.bn2, nn.BatchNorm2d)
    assert not parametrize.is_parametrized(net.fc)


def test_converter_matches_the_experiment_models_bwn_construction():
    # the converter applied to the batch-norm ResNet gives the same network, parameter for
    # parameter, as building it with norm="bwn" from the same seed
    models = pytest.importorskip("normmatters.experiments.models")
    kw = dict(num_classes=10, in_channels=1, input_dims=2)
    torch.manual_seed(0)
    converted = to_weight_normalized(models.create_model("resnet_digits", norm="l2", **kw), "bwn",
                                     example_inputs=torch.zeros(2, 1, 8, 8))
    torch.manual_seed(0)
    built = models.create_model("resnet_digits", norm="bwn", **kw)
    a, b = converted.state_dict(), built.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [type(m).__name__ for m in converted.modules()] == [type(m).__name__ for m in built.modules()]
