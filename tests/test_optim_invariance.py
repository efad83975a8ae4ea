"""Detection of scale-invariant weights (claim C1).

Every detection is checked against the definition: scaling each reported block of a weight by a
random positive factor leaves the float64 training-mode output unchanged, and the numerical
probe (an independent method) finds the same set.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normmatters.optim import (
    ScaleInvarianceTraceError,
    analyze_scale_invariance,
    last_layer_parameters,
    scale_invariant_parameters,
    split_param_groups,
)

# -- models ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


RESNET_INVARIANT = {
    "conv.weight", "layer1.conv1.weight", "layer1.conv2.weight", "layer2.conv1.weight",
    "layer2.conv2.weight", "layer2.shortcut.0.weight",
}


def vgg() -> nn.Module:
    # Convolutions with biases (removed by batch norm's centring), a BN'd hidden linear layer
    # with bias, and a classifier.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(32, 10),
    )


VGG_INVARIANT = {"0.weight", "4.weight", "9.weight"}


class QKNormBlock(nn.Module):
    """A pre-LN Transformer block; ``qk_norm`` adds a layer norm over each head's queries and
    keys, which makes the (bias-free) query and key projections scale invariant."""

    def __init__(self, d: int = 16, heads: int = 2, qk_norm: bool = True, qkv_bias: bool = False):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=qkv_bias)
        self.k = nn.Linear(d, d, bias=qkv_bias)
        self.v = nn.Linear(d, d, bias=qkv_bias)
        self.o = nn.Linear(d, d)
        self.qn = nn.LayerNorm(self.dh) if qk_norm else nn.Identity()
        self.kn = nn.LayerNorm(self.dh) if qk_norm else nn.Identity()
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.ln1(x)
        q = self.qn(self.q(y).view(b, t, self.h, self.dh)).transpose(1, 2)
        k = self.kn(self.k(y).view(b, t, self.h, self.dh)).transpose(1, 2)
        v = self.v(y).view(b, t, self.h, self.dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / self.dh**0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            y = F.relu(y)
        return self.fc(y.mean((2, 3)))


# -- helpers -----------------------------------------------------------------------------------


def _outputs_after_scaling(model: nn.Module, x: torch.Tensor, scale: dict[str, torch.Tensor]):
    m = copy.deepcopy(model).double().train()
    for mod in m.modules():  # eps breaks the invariance by O(eps/var): take it out
        if isinstance(getattr(mod, "eps", None), float):
            mod.eps = 1e-30
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(0.3 * torch.randn_like(p) * (p.abs().mean() + 0.1))  # a generic point
        torch.manual_seed(7)
        ref = m(x.double())
        params = dict(m.named_parameters())
        for name, s in scale.items():
            params[name].mul_(s)
        torch.manual_seed(7)
        return ref, m(x.double())


def _check_invariance_holds(model: nn.Module, x: torch.Tensor, inv) -> None:
    """Scaling every reported block by its own random factor leaves the output unchanged."""
    scale = {}
    for name, info in inv.items():
        f = torch.rand(info.groups, dtype=torch.float64) * 3 + 0.2
        scale[name] = info.expand(f).to(torch.float64)
    ref, out = _outputs_after_scaling(model, x, scale)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


# -- tests -------------------------------------------------------------------------------------


def test_resnet_fx_finds_every_conv_and_agrees_with_probe() -> None:
    model, x = ResNet(), torch.randn(4, 3, 8, 8)
    inv = scale_invariant_parameters(model, x, method="fx")
    assert set(inv) == RESNET_INVARIANT
    assert all(inv[n].groups == inv[n].param.shape[0] for n in inv)  # per output channel
    assert inv["layer2.shortcut.0.weight"].norms == ("layer2.shortcut.1",)
    probe = scale_invariant_parameters(model, x, method="probe")
    assert {n: i.groups for n, i in probe.items()} == {n: i.groups for n, i in inv.items()}
    _check_invariance_holds(model, x, inv)


def test_resnet_non_invariant_weights_really_change_the_output() -> None:
    model, x = ResNet(), torch.randn(4, 3, 8, 8)
    inv = scale_invariant_parameters(model, x, method="fx")
    for name, p in model.named_parameters():
        if name in inv:
            continue
        ref, out = _outputs_after_scaling(model, x, {name: torch.tensor(2.0, dtype=torch.float64)})
        assert not torch.allclose(out, ref, rtol=1e-6, atol=1e-6), name


def test_vgg_with_biases_before_batch_norm() -> None:
    model, x = vgg(), torch.randn(4, 3, 8, 8)
    inv = scale_invariant_parameters(model, x, method="fx")
    assert set(inv) == VGG_INVARIANT
    assert inv["9.weight"].groups == 32
    probe = scale_invariant_parameters(model, x, method="probe")
    assert set(probe) == VGG_INVARIANT
    _check_invariance_holds(model, x, inv)


def test_transformer_block_qk_norm_tensor_level() -> None:
    x = torch.randn(3, 5, 16)
    model = QKNormBlock(qk_norm=True)
    inv = scale_invariant_parameters(model, x, method="fx")
    # Layer norm over each head's features: the rows of a head are scaled together.
    assert set(inv) == {"q.weight", "k.weight"}
    assert inv["q.weight"].groups == 2  # one block per head
    _check_invariance_holds(model, x, inv)
    probe = scale_invariant_parameters(model, x, method="probe")
    assert set(probe) == set(inv)


def test_transformer_block_without_qk_norm_or_with_bias_has_none() -> None:
    x = torch.randn(3, 5, 16)
    assert scale_invariant_parameters(QKNormBlock(qk_norm=False), x, method="fx") == {}
    # A bias varies across the normalized features: layer norm does not remove it.
    assert scale_invariant_parameters(QKNormBlock(qkv_bias=True), x, method="fx") == {}


def test_torch_transformer_layer_is_opaque_not_invariant() -> None:
    # Inside a model, torch's layer is an FX leaf the analysis cannot see into: its parameters
    # are reported as opaque, never as invariant.
    model = nn.Sequential(
        nn.Linear(8, 16, bias=False),
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        nn.Linear(16, 3),
    )
    report = analyze_scale_invariance(model, torch.randn(3, 5, 8), method="fx")
    assert report.invariant == {}
    assert "1.self_attn.in_proj_weight" in report.opaque
    # As the root module it cannot be traced at all; the probe answers instead (post-LN: the
    # residual stream enters every layer norm, so no weight is scale invariant).
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    report = analyze_scale_invariance(layer, torch.randn(3, 5, 16), method="auto")
    assert report.method == "probe" and report.invariant == {}


@pytest.mark.parametrize(
    "build, expected, groups",
    [
        (lambda: nn.Sequential(nn.Linear(6, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 2)),
         {"0.weight"}, 1),
        (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)), set(), None),
        (lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)),
         {"0.weight"}, 8),
        (lambda: nn.Sequential(nn.Linear(6, 8, bias=False), nn.RMSNorm(8), nn.Linear(8, 2)),
         {"0.weight"}, 1),
    ],
)
def test_linear_followed_by_norms(build, expected, groups) -> None:
    model, x = build(), torch.randn(5, 6)
    inv = scale_invariant_parameters(model, x, method="fx")
    assert set(inv) == expected
    if groups is not None:
        assert inv["0.weight"].groups == groups
    _check_invariance_holds(model, x, inv)
    assert set(scale_invariant_parameters(model, x, method="probe")) == expected


@pytest.mark.parametrize(
    "layers, expected, groups",
    [
        # ReLU and pooling are positively homogeneous: a bias-free conv stays invariant...
        ([nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(8)],
         {"0.weight"}, 8),
        # ...but a bias before the ReLU breaks it.
        ([nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8)], set(), None),
        ([nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8)], set(), None),
        ([nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(4, 8)], {"0.weight"}, 4),
        ([nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8)], {"0.weight"}, 8),
        ([nn.Conv2d(3, 8, 3, bias=False), nn.Flatten(), nn.LayerNorm(8 * 4 * 4)], {"0.weight"}, 1),
        ([nn.Conv2d(3, 8, 3, bias=False), nn.Flatten(2), nn.BatchNorm1d(8)], {"0.weight"}, 8),
        ([nn.Conv2d(3, 8, 3, bias=False), nn.InstanceNorm2d(8)], {"0.weight"}, 8),
    ],
)
def test_conv_paths(layers, expected, groups) -> None:
    model = nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(4, 3, 6, 6)
    model(x)  # materialize the lazy layer
    inv = scale_invariant_parameters(model, x, method="fx")
    assert set(inv) == expected
    if groups is not None:
        assert inv["0.weight"].groups == groups
    _check_invariance_holds(model, x, inv)
    probe = scale_invariant_parameters(model, x, method="probe")
    assert {n: i.groups for n, i in probe.items()} == {n: i.groups for n, i in inv.items()}


def test_library_lp_batch_norm_is_recognized() -> None:
    lpnn = pytest.importorskip("normmatters.nn")
    if not hasattr(lpnn, "LpBatchNorm2d"):
        pytest.skip("normmatters.nn.LpBatchNorm2d not available")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), lpnn.LpBatchNorm2d(8, p=1), nn.ReLU(),
        nn.Conv2d(8, 4, 3, bias=False), lpnn.LpBatchNorm2d(4, p=2),
        nn.Flatten(), nn.LazyLinear(3),
    )
    x = torch.randn(4, 3, 8, 8)
    model(x)
    inv = scale_invariant_parameters(model, x, method="fx")
    assert set(inv) == {"0.weight", "3.weight"}
    _check_invariance_holds(model, x, inv)
    if hasattr(lpnn, "LpLayerNorm"):
        mlp = nn.Sequential(nn.Linear(6, 8, bias=False), lpnn.LpLayerNorm(8, p=1), nn.Linear(8, 2))
        inv = scale_invariant_parameters(mlp, torch.randn(5, 6), method="fx")
        assert set(inv) == {"0.weight"} and inv["0.weight"].groups == 1
        _check_invariance_holds(mlp, torch.randn(5, 6), inv)


def test_mean_only_batch_norm_is_not_a_normalization() -> None:
    lpnn = pytest.importorskip("normmatters.nn")
    if not hasattr(lpnn, "MeanOnlyBatchNorm2d"):
        pytest.skip("normmatters.nn.MeanOnlyBatchNorm2d not available")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), lpnn.MeanOnlyBatchNorm2d(8),
                          nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(4, 3, 6, 6)
    model(x)
    assert scale_invariant_parameters(model, x, method="fx") == {}


def test_untraceable_model_clear_error_and_probe_fallback(caplog) -> None:
    model, x = DataDependent(), torch.randn(4, 3, 6, 6)
    with pytest.raises(ScaleInvarianceTraceError, match="method='probe'"):
        scale_invariant_parameters(model, x, method="fx")
    with caplog.at_level(logging.WARNING):
        report = analyze_scale_invariance(model, x, method="auto")
    assert report.method == "probe" and report.trace_error
    assert set(report.invariant) == {"conv.weight"}
    assert "falling back" in caplog.text


def test_model_is_not_modified() -> None:
    model, x = ResNet(), torch.randn(4, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    scale_invariant_parameters(model, x, method="fx")
    scale_invariant_parameters(model, x, method="probe")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        scale_invariant_parameters("not a model", torch.randn(2, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        scale_invariant_parameters(vgg(), torch.randn(2, 3, 8, 8), method="guess")
    with pytest.raises(TypeError, match="example_input"):
        scale_invariant_parameters(vgg(), 3)  # type: ignore[arg-type]


def test_split_param_groups() -> None:
    model, x = vgg(), torch.randn(4, 3, 8, 8)
    inv = scale_invariant_parameters(model, x)
    assert last_layer_parameters(model) == ["13.weight", "13.bias"]
    groups = split_param_groups(model, inv, weight_decay=5e-4, decay="last_layer")
    by_flag = {g["scale_invariant"]: g for g in groups if g["scale_invariant"]}
    assert set(by_flag[True]["names"]) == VGG_INVARIANT
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["13.weight"] == 5e-4 and wd["0.weight"] == 0.0 and wd["1.weight"] == 0.0
    all_names = [n for g in groups for n in g["names"]]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())
    wd_on = split_param_groups(model, inv, weight_decay=5e-4, decay="all")
    assert all(g["weight_decay"] == 5e-4 for g in wd_on)
    weights = split_param_groups(model, inv, weight_decay=5e-4, decay="invariant")
    wd = {n: g["weight_decay"] for g in weights for n in g["names"]}
    assert wd["0.weight"] == wd["13.weight"] == 5e-4
    assert wd["1.weight"] == wd["0.bias"] == 0.0  # normalization gains and biases
    torch.optim.SGD(groups, lr=0.1)  # torch accepts the extra keys
    with pytest.raises(ValueError, match="decay"):
        split_param_groups(model, inv, weight_decay=5e-4, decay="sometimes")
