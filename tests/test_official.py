"""from_official_state_dict: state dicts of the paper's official code (and torch's legacy weight norm)
load into normmatters' layers and give the same evaluation outputs.

The official layers are re-implemented here, minimally and faithfully (forward, buffers, parameter
names, reversed momentum, ``running_var`` holding an inverse scale), after the excerpts of the
official ``models/lp_norm.py``, ``models/mean_bn.py`` and ``models/bwn.py`` quoted in the
reproduction study (seed 003). They exist only to produce state dicts and reference outputs.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Parameter

from normmatters.convert.official import from_official_state_dict
from normmatters.nn import LpBatchNorm2d, MeanOnlyBatchNorm2d
from normmatters.parametrizations import bounded_weight_norm, weight_norm

INF = math.inf


# ----------------------------------------------------------------------------------------------
# the official layers (test-only re-implementation)
# ----------------------------------------------------------------------------------------------


class OfficialBN(nn.Module):
    """L1BatchNorm2d (kind="l1"), LpBatchNorm2d (kind="lp", p) and TopkBatchNorm2d (kind="topk", k)."""

    def __init__(self, num_features, kind="l1", p=2, k=1, momentum=0.1, eps=1e-5):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.zeros(num_features))
        self.kind, self.p, self.k, self.momentum, self.eps = kind, p, k, momentum, eps
        self.mean = Parameter(torch.Tensor(num_features))
        self.scale = Parameter(torch.Tensor(num_features))
        # the official code leaves these uninitialised; give them definite, non-trivial values
        with torch.no_grad():
            self.scale.uniform_(0.5, 1.5)
            self.mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        if self.training:
            mean = x.view(x.size(0), x.size(1), -1).mean(-1).mean(0)
            t = x.transpose(0, 1).contiguous().view(x.size(1), -1)
            A = torch.abs(t.transpose(1, 0) - mean)
            if self.kind == "l1":
                scale = (A.mean(0) * (np.pi / 2) ** 0.5 + self.eps) ** (-1)
            elif self.kind == "lp":
                scale = ((A ** self.p).mean(0) + self.eps) ** (-1 / self.p)
            else:
                const = 0.5 * (1 + (np.pi * np.log(4)) ** 0.5) / ((2 * np.log(A.size(0))) ** 0.5)
                scale = 1 / (torch.topk(A, self.k, dim=0)[0].mean(0) * const + self.eps)
            # reversed momentum: the new batch has weight 1 - momentum
            self.running_mean.mul_(self.momentum).add_(mean.data * (1 - self.momentum))
            self.running_var.mul_(self.momentum).add_(scale.data * (1 - self.momentum))
        else:
            mean, scale = self.running_mean, self.running_var
        out = (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
        out = out * self.scale.view(1, -1, 1, 1)
        return out + self.mean.view(1, -1, 1, 1)


class OfficialMeanBN(nn.Module):
    def __init__(self, num_features, momentum=0.1, bias=True):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.momentum = momentum
        self.bias = Parameter(torch.Tensor(num_features).uniform_(-0.5, 0.5)) if bias else None

    def forward(self, x):
        if self.training:
            mean = x.view(x.size(0), x.size(1), -1).mean(-1).mean(0)
            self.running_mean.mul_(self.momentum).add_(mean.data * (1 - self.momentum))
        else:
            mean = self.running_mean
        out = x - mean.view(1, -1, 1, 1)
        return out + self.bias.view(1, -1, 1, 1) if self.bias is not None else out


class OfficialL1BatchNormScale(nn.Module):
    """``mean_bn.L1BatchNorm``: running_scale holds σ̂ itself, evaluation divides by it (no eps)."""

    def __init__(self, num_features, momentum=0.1):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.zeros(num_features))
        self.momentum = momentum
        self.bias = Parameter(torch.Tensor(num_features).uniform_(-0.5, 0.5))
        self.weight = Parameter(torch.Tensor(num_features).uniform_(0.5, 1.5))

    def forward(self, x):
        if self.training:
            mean = x.view(x.size(0), x.size(1), -1).mean(-1).mean(0)
            xc = x - mean.view(1, -1, 1, 1)
            scale = xc.view(x.size(0), x.size(1), -1).abs().mean(-1).mean(0) * math.sqrt(math.pi / 2)
            out = xc / scale.view(1, -1, 1, 1)
            self.running_mean.mul_(self.momentum).add_(mean.data * (1 - self.momentum))
            self.running_scale.mul_(self.momentum).add_(scale.data * (1 - self.momentum))
        else:
            out = (x - self.running_mean.view(1, -1, 1, 1)) / self.running_scale.view(1, -1, 1, 1)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _official_norm(x, p):
    """The official _norm(x, dim=0, p): per output channel, shape (out, 1, ..., 1)."""
    flat = x.contiguous().view(x.size(0), -1)
    n = flat.abs().max(dim=1)[0] if p == INF else torch.norm(flat, dim=1, p=p)
    return n.view((x.size(0),) + (1,) * (x.dim() - 1))


class OfficialBWNConv2d(nn.Conv2d):
    """A Conv2d under the official BoundedWeighNorm: weight_g, weight_v, buffer weight_g_prenorm."""

    def __init__(self, *args, p=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.p = p
        weight = self.weight.data
        del self._parameters["weight"]
        self.weight_g = Parameter(_official_norm(weight, p).data)
        self.register_buffer("weight_g_prenorm", torch.Tensor([self.weight_g.data.norm()]))
        self.weight_v = Parameter(weight.clone())

    def forward(self, x):
        g = self.weight_g
        g = (self.weight_g_prenorm / g.norm()) * g
        w = self.weight_v * (g / _official_norm(self.weight_v, self.p))
        return self._conv_forward(x, w, self.bias)


# ----------------------------------------------------------------------------------------------
# one network, built with the official layers or with ours
# ----------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, official: bool, bwn_p=2, bn4="ours", conv1="bounded", fc="wn"):
        super().__init__()
        torch.manual_seed(0)
        if official:
            self.conv1 = OfficialBWNConv2d(1, 8, 3, padding=1, bias=False, p=bwn_p)
            self.bn1 = OfficialMeanBN(8)
            self.bn2 = OfficialBN(8, "l1")
            self.bn3 = OfficialBN(8, "topk", k=4)
            self.bn4 = OfficialBN(8, "lp", p=2)
            fc_layer = nn.Linear(8, 3)
            with pytest.warns(FutureWarning):  # torch's deprecated hook-based weight norm
                self.fc = torch.nn.utils.weight_norm(fc_layer)
        else:
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
            if conv1 == "bounded":
                bounded_weight_norm(self.conv1, p=bwn_p, gain="bounded")
            elif conv1 == "wn":
                weight_norm(self.conv1, p=bwn_p)
            elif conv1 == "fixed":
                bounded_weight_norm(self.conv1, p=bwn_p)
            self.bn1 = MeanOnlyBatchNorm2d(8)
            self.bn2 = LpBatchNorm2d(8, p=1)
            self.bn3 = LpBatchNorm2d(8, p=INF, k=4, constant="paper")
            self.bn4 = LpBatchNorm2d(8, p=2) if bn4 == "ours" else nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)
            if fc == "wn":
                weight_norm(self.fc)
            elif fc == "torch_wn":
                torch.nn.utils.parametrizations.weight_norm(self.fc)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.bn4(self.conv4(x))
        return self.fc(x.mean((2, 3)))


def _digits(n=64):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return x


def _trained_official(**kw) -> Net:
    net = Net(official=True, **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x = _digits(96)
    y = torch.arange(96) % 3
    net.train()
    for i in range(4):  # a few real steps: running statistics and weights move
        xb = x[i * 24:(i + 1) * 24]
        loss = F.cross_entropy(net(xb), y[i * 24:(i + 1) * 24])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    diff = float((a - b).abs().max())
    assert diff <= tol * max(1.0, float(a.abs().max())), diff


@pytest.fixture(scope="module")
def official() -> Net:
    return _trained_official()


@pytest.mark.parametrize("variant", [
    {"bn4": "ours", "conv1": "bounded", "fc": "wn"},
    {"bn4": "torch", "conv1": "wn", "fc": "torch_wn"},
    {"bn4": "ours", "conv1": "bounded", "fc": "plain"},
])
def test_model_loads_official_state_dict_with_same_outputs(official: Net, variant: dict) -> None:
    sd = official.state_dict()
    sd_copy = {k: v.clone() for k, v in sd.items()}
    ours = Net(official=False, **variant).eval()
    converted = from_official_state_dict(sd, ours)
    ours.load_state_dict(converted)  # strict
    x = _digits(200)[100:]
    with torch.no_grad():
        _close(official(x), ours(x))
    for k, v in sd.items():  # the input is not modified
        assert torch.equal(v, sd_copy[k])


@pytest.mark.parametrize("bwn_p", [1, INF])
def test_bwn_with_other_p(bwn_p: float) -> None:
    official = _trained_official(bwn_p=bwn_p)
    ours = Net(official=False, bwn_p=bwn_p).eval()
    ours.load_state_dict(from_official_state_dict(official.state_dict(), ours))
    x = _digits(40)
    with torch.no_grad():
        _close(official(x), ours(x))


def test_running_var_is_an_inverse_scale_conversion(official: Net) -> None:
    # the converted running_var is not the official one: that would be silently wrong
    conv = from_official_state_dict(official.state_dict(), Net(official=False))
    assert not torch.allclose(conv["bn2.running_var"], official.bn2.running_var)
    r = official.bn2.running_var.double()
    torch.testing.assert_close(conv["bn2.running_var"].double(), (1 / r - 1e-5) ** 2, rtol=1e-6, atol=0)
    r4 = official.bn4.running_var.double()
    torch.testing.assert_close(conv["bn4.running_var"].double(), 1 / r4 ** 2 - 1e-5, rtol=1e-6, atol=0)
    assert conv["bn2.weight"] is official.state_dict()["bn2.scale"] or torch.equal(
        conv["bn2.weight"], official.bn2.scale.detach())


class _SmallOfficial(nn.Module):
    def __init__(self, official: bool):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = OfficialBN(4, "l1") if official else LpBatchNorm2d(4, p=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = OfficialBN(4, "topk", k=2) if official else LpBatchNorm2d(4, p=INF, k=2)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))


def test_without_model_given_p() -> None:
    off = _SmallOfficial(True).train()
    x = _digits(48)
    with torch.no_grad():
        off(x)
        off(x[:20])
    off.eval()
    ours = _SmallOfficial(False).eval()
    sd = {"module." + k: v for k, v in off.state_dict().items()}  # as saved from DataParallel
    sd["bn2.meanTOPK"] = torch.zeros(4)  # GhostTopkBatchNorm2d's training-only buffer
    sd = {k if k != "bn2.meanTOPK" else "module.bn2.meanTOPK": v for k, v in sd.items()}
    ours.load_state_dict(from_official_state_dict(sd, p=1, strip_prefix="module."))
    with torch.no_grad():
        _close(off(x), ours(x))
    with pytest.raises(ValueError, match="pass model=.*or p="):
        from_official_state_dict(sd, strip_prefix="module.")


def test_mean_bn_l1_running_scale() -> None:
    off = nn.Sequential(nn.Conv2d(1, 4, 3), OfficialL1BatchNormScale(4)).train()
    x = _digits(32)
    with torch.no_grad():
        off(x)
        off(x * 2)
    off.eval()
    for p, layer in ((1, LpBatchNorm2d(4, p=1)), (2, nn.BatchNorm2d(4))):
        ours = nn.Sequential(nn.Conv2d(1, 4, 3), layer).eval()
        ours.load_state_dict(from_official_state_dict(off.state_dict(), ours))
        with torch.no_grad():
            _close(off(x), ours(x))


def test_errors_name_the_key(official: Net) -> None:
    sd = dict(official.state_dict())
    ours = Net(official=False)
    bad = {k: v for k, v in sd.items() if k != "bn2.running_var"}
    with pytest.raises(ValueError, match=r"bn2\.running_var"):
        from_official_state_dict(bad, ours)
    bad = {k: v for k, v in sd.items() if k != "conv1.weight_v"}
    with pytest.raises(ValueError, match=r"conv1\.weight_g"):
        from_official_state_dict(bad, ours)
    bad = dict(sd, **{"head.extra": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"head"):
        from_official_state_dict(bad, ours)
    bad = dict(sd, **{"bn2.unknown": torch.zeros(8)})
    with pytest.raises(ValueError, match=r"bn2\.unknown"):
        from_official_state_dict(bad, ours)
    bad = dict(sd, **{"fc.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"fc\.bias.*shape"):
        from_official_state_dict(bad, ours)
    untrained = Net(official=True).state_dict()  # running_var still zeros
    with pytest.raises(ValueError, match=r"bn2\.running_var.*ever trained"):
        from_official_state_dict(untrained, ours)
    with pytest.raises(TypeError, match="'x'"):
        from_official_state_dict({"x": 3}, p=1)
    with pytest.raises(ValueError, match="checkpoint"):
        from_official_state_dict({"state_dict": sd, "epoch": 3})
    with pytest.raises(TypeError, match="either model= or p="):
        from_official_state_dict(sd, ours, p=1)


def test_target_layer_kinds_are_checked(official: Net) -> None:
    sd = official.state_dict()
    for variant, match in (({"conv1": "fixed"}, "gain='fixed'"), ({"conv1": "plain"}, "plain weight")):
        with pytest.raises(ValueError, match=match):
            from_official_state_dict(sd, Net(official=False, **variant))
    wrong = Net(official=False)
    wrong.bn1 = LpBatchNorm2d(8)  # a MeanBN checkpoint into a full batch norm
    with pytest.raises(ValueError, match=r"bn1.*MeanOnlyBatchNorm"):
        from_official_state_dict(sd, wrong)
    wrong = Net(official=False)
    wrong.bn2 = MeanOnlyBatchNorm2d(8)
    with pytest.raises(ValueError, match=r"'bn2'.*official batch norm"):
        from_official_state_dict(sd, wrong)


def test_inverse_scale_out_of_range_for_target_eps() -> None:
    # an inverse scale of 1e4 (σ̂ ≈ 1e-4) fits a p≠2 layer with eps=1e-5 but not a p=2 one
    sd = {"bn.scale": torch.ones(2), "bn.mean": torch.zeros(2), "bn.running_mean": torch.zeros(2),
          "bn.running_var": torch.tensor([1.0, 1e4])}
    out = from_official_state_dict(sd, p=1)
    assert torch.all(out["bn.running_var"] >= 0)
    with pytest.raises(ValueError, match=r"bn\.running_var.*smaller eps"):
        from_official_state_dict(sd, p=2)


def test_not_an_official_state_dict() -> None:
    torch_sd = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).state_dict()
    with pytest.raises(ValueError, match="no key of the official"):
        from_official_state_dict(torch_sd, p=1)
    with pytest.raises(TypeError):
        from_official_state_dict([1, 2])  # type: ignore[arg-type]


def test_legacy_weight_norm_into_plain_and_parametrized() -> None:
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        legacy = torch.nn.utils.weight_norm(nn.Conv2d(3, 5, 3))
        legacy_whole = torch.nn.utils.weight_norm(nn.Linear(4, 6), dim=None)
    with torch.no_grad():
        legacy.weight_g.mul_(1.7)
        legacy_whole.weight_g.mul_(0.3)
    x = torch.randn(2, 3, 5, 5)
    for target in (nn.Conv2d(3, 5, 3), weight_norm(nn.Conv2d(3, 5, 3)),
                   torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 5, 3))):
        target.load_state_dict(from_official_state_dict(legacy.state_dict(), target))
        with torch.no_grad():
            _close(legacy(x), target(x), 1e-6)
    plain = nn.Linear(4, 6)
    plain.load_state_dict(from_official_state_dict(legacy_whole.state_dict(), plain))
    xl = torch.randn(3, 4)
    with torch.no_grad():
        _close(legacy_whole(xl), plain(xl), 1e-6)
    # BWN keys into a bounded-gain target keep the exact stored norm
    sd = copy.deepcopy(legacy.state_dict())
    target = bounded_weight_norm(nn.Conv2d(3, 5, 3), gain="bounded")
    target.load_state_dict(from_official_state_dict(sd, target))
    with torch.no_grad():
        _close(legacy(x), target(x), 1e-6)


def test_integer_statistics_are_refused_naming_the_key() -> None:
    # An integer running_var used to be converted to zeros (outputs off by ~1e5).
    sd = {"bn.scale": torch.ones(2), "bn.mean": torch.zeros(2), "bn.running_mean": torch.zeros(2),
          "bn.running_var": torch.tensor([2, 3])}
    with pytest.raises(ValueError, match=r"'bn\.running_var' is a torch\.int64 tensor"):
        from_official_state_dict(sd, p=1)
    sd = {"bn.running_mean": torch.zeros(2), "bn.running_scale": torch.tensor([1, 2], dtype=torch.int32),
          "bn.weight": torch.ones(2), "bn.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"'bn\.running_scale' is a torch\.int32"):
        from_official_state_dict(sd, p=1)


def test_weight_norm_gain_shape_mismatch_names_the_key() -> None:
    # Used to be a raw broadcasting error from deep inside the conversion.
    sd = {"conv.weight_g": torch.ones(4, 1, 1, 1), "conv.weight_v": torch.randn(5, 3, 3, 3),
          "conv.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"'conv\.weight_g' has shape \(4, 1, 1, 1\).*'conv\.weight_v'"):
        from_official_state_dict(sd, nn.Sequential())
    with pytest.raises(ValueError, match=r"'conv\.weight_g' has shape \(4, 1, 1, 1\)"):
        from_official_state_dict(sd)
    ok = {"conv.weight_g": torch.ones(5, 1, 1, 1), "conv.weight_v": torch.randn(5, 3, 3, 3)}
    assert "conv.parametrizations.weight.original0" in from_official_state_dict(ok)
