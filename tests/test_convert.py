"""convert_norms / to_torch_norms on a small ResNet-style model."""

import copy

import pytest
import torch
from torch import nn

from normmatters import convert_norms, to_torch_norms
from normmatters.nn import LpBatchNorm2d, LpLayerNorm


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def small_resnet():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         Block(8), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8),
                         nn.Linear(8, 10))


def _warm(model):
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2 + 1)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_convert_to_l1_copies_everything_and_trains():
    model = _warm(small_resnet())
    ref = copy.deepcopy(model)
    out = convert_norms(model, p=1)
    bns = [m for m in out.modules() if isinstance(m, LpBatchNorm2d)]
    assert len(bns) == 5 and all(m.p == 1 for m in bns)
    assert not any(type(m) is nn.BatchNorm2d or type(m) is nn.LayerNorm for m in out.modules())
    assert isinstance(out[7], LpLayerNorm) and out[7].p == 1
    for key, value in ref.state_dict().items():
        assert torch.equal(out.state_dict()[key], value), key
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(out(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_convert_at_p2_and_back_is_identity_in_eval():
    model = _warm(small_resnet()).eval()
    x = torch.randn(4, 1, 8, 8)
    y = model(x)
    lp = convert_norms(copy.deepcopy(model), p=2)
    assert not lp.training
    torch.testing.assert_close(lp(x), y, rtol=0, atol=0)
    back = to_torch_norms(lp)
    assert any(type(m) is nn.BatchNorm2d for m in back.modules())
    torch.testing.assert_close(back(x), y, rtol=0, atol=0)


def test_convert_between_p_keeps_topk_options():
    model = convert_norms(small_resnet(), p="inf", k=3, constant="paper", kinds=("batch",))
    bn = model[1]
    assert bn.p == float("inf") and bn.k == 3 and bn.constant == "paper"
    assert type(model[7]) is nn.LayerNorm
    model = convert_norms(model, p=1)
    assert model[1].p == 1 and model[1].k is None


def test_errors():
    with pytest.raises(ValueError, match="no batch/layer/group/rms norm"):
        convert_norms(nn.Linear(2, 2), p=1)
    with pytest.raises(ValueError, match="not an L2 norm"):
        to_torch_norms(convert_norms(small_resnet(), p=1))
    with pytest.raises(ValueError, match="needs p=inf"):
        convert_norms(small_resnet(), p=1, k=3)
    with pytest.raises(ValueError, match="unknown kinds"):
        convert_norms(small_resnet(), p=1, kinds=("instance",))


def test_root_module_is_replaced():
    out = convert_norms(nn.BatchNorm1d(4), p=1)
    assert type(out).__name__ == "LpBatchNorm1d" and out.p == 1


def test_sync_layers_stay_synchronized():
    from normmatters.nn import SyncLpBatchNorm

    sentinel = object()
    model = nn.Sequential(SyncLpBatchNorm(4, p=2, process_group=sentinel))
    out = convert_norms(model, p=1)
    assert type(out[0]) is SyncLpBatchNorm and out[0].p == 1 and out[0].process_group is sentinel
    back = to_torch_norms(convert_norms(out, p=2))
    assert type(back[0]) is nn.SyncBatchNorm and back[0].process_group is sentinel
