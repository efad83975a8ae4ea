"""freeze_norms / unfreeze_norms: frozen norms train nothing, use running statistics in both modes,
and survive state-dict round trips; unfreezing restores the original layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normmatters.deploy import FrozenNorm, freeze_norms, unfreeze_norms
from normmatters.nn import (
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    MeanOnlyBatchNorm2d,
)

INF = math.inf

BATCH_NORMS = {
    "torch_bn": lambda: nn.BatchNorm2d(6),
    "l2": lambda: LpBatchNorm2d(6, p=2),
    "l1": lambda: LpBatchNorm2d(6, p=1),
    "linf": lambda: LpBatchNorm2d(6, p=INF),
    "top3": lambda: LpBatchNorm2d(6, p=INF, k=3),
    "l1_eps": lambda: LpBatchNorm2d(6, 0.3, p=1),
    "l1_noaffine": lambda: LpBatchNorm2d(6, p=1, affine=False),
    "mean": lambda: MeanOnlyBatchNorm2d(6),
    "mean_scale": lambda: MeanOnlyBatchNorm2d(6, scale=True),
}
SAMPLE_NORMS = {
    "torch_ln": lambda: nn.LayerNorm([6, 4, 4]),
    "l1_ln": lambda: LpLayerNorm([6, 4, 4], p=1),
    "torch_gn": lambda: nn.GroupNorm(3, 6),
    "top2_gn": lambda: LpGroupNorm(3, 6, p=INF, k=2),
    "torch_rms": lambda: nn.RMSNorm([4]),
    "l1_rms": lambda: LpRMSNorm([4], p=1),
}


def _net(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(6, 2, 1))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name == "weight" else 0.0))
    net.train()
    with torch.no_grad():
        for i in range(3):  # real running statistics
            net(torch.randn(8, 3, 4, 4) * (1 + i) + i)
    return net


@pytest.mark.parametrize("kind", sorted(BATCH_NORMS))
def test_frozen_batch_norm_uses_running_statistics_in_train_and_eval(kind: str) -> None:
    net = _net(BATCH_NORMS[kind]())
    reference = copy.deepcopy(net).eval()
    stats = {k: v.clone() for k, v in net[1].state_dict().items()}
    frozen = freeze_norms(net)
    assert isinstance(frozen[1], FrozenNorm)
    assert list(frozen[1].parameters()) == []  # nothing left to train in the norm
    assert all(p.requires_grad for p in frozen[0].parameters())  # the rest still trains
    x = torch.randn(5, 3, 4, 4) * 2 + 0.5
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), reference(x), rtol=1e-6, atol=1e-6)
    for k, v in frozen[1].state_dict().items():  # running statistics are not updated
        assert torch.equal(v, stats[k]), k


@pytest.mark.parametrize("kind", sorted(SAMPLE_NORMS))
def test_frozen_per_sample_norms_compute_the_same(kind: str) -> None:
    net = _net(SAMPLE_NORMS[kind]())
    reference = copy.deepcopy(net)
    frozen = freeze_norms(net)
    assert list(frozen[1].parameters()) == []
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(frozen(x), reference(x), rtol=1e-6, atol=1e-6)


def test_gradients_reach_the_rest_but_not_the_norm() -> None:
    net = freeze_norms(_net(LpBatchNorm2d(6, p=1)))
    net.train()
    net(torch.randn(4, 3, 4, 4)).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.startswith("1.") for n in names)


@pytest.mark.parametrize("kind", ["torch_bn", "l1", "top3", "mean_scale", "l1_ln"])
def test_state_dict_round_trips(kind: str) -> None:
    factory = {**BATCH_NORMS, **SAMPLE_NORMS}[kind]
    net = _net(factory())
    original_sd = copy.deepcopy(net.state_dict())
    frozen = freeze_norms(net).eval()
    x = torch.randn(3, 3, 4, 4)
    expect = frozen(x)
    # same keys as the unfrozen model: state dicts move both ways
    assert set(frozen.state_dict()) == set(original_sd)
    fresh = freeze_norms(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), factory(), nn.ReLU(), nn.Conv2d(6, 2, 1))).eval()
    fresh.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(fresh(x), expect)
    fresh.load_state_dict(original_sd)  # an unfrozen model's state dict loads into a frozen one
    torch.testing.assert_close(fresh(x), expect)
    unfrozen_target = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), factory(), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    unfrozen_target.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(unfrozen_target(x), expect)
    # and through torch.save / torch.load(weights_only=True)
    import io

    buf = io.BytesIO()
    torch.save(frozen.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), expect)


@pytest.mark.parametrize("kind", sorted(BATCH_NORMS) + sorted(SAMPLE_NORMS))
def test_unfreeze_restores_class_values_and_training(kind: str) -> None:
    factory = {**BATCH_NORMS, **SAMPLE_NORMS}[kind]
    net = _net(factory())
    original = copy.deepcopy(net)
    cls = type(net[1])
    frozen = freeze_norms(net)
    with torch.no_grad():  # change a frozen value: the unfrozen layer must carry it
        for name, buf in frozen[1].named_buffers():
            if name == "running_mean":
                buf.add_(0.25)
    restored = unfreeze_norms(frozen)
    assert type(restored[1]) is cls
    assert {n for n, _ in restored.named_parameters()} == {n for n, _ in original.named_parameters()}
    assert all(p.requires_grad for p in restored.parameters())
    for k, v in restored[1].state_dict().items():
        expect = original[1].state_dict()[k] + (0.25 if k == "running_mean" else 0)
        torch.testing.assert_close(v, expect.to(v.dtype))
    for attr in ("p", "k", "eps", "momentum", "constant"):
        assert getattr(restored[1], attr, None) == getattr(original[1], attr, None)
    # training again updates statistics (it is a real, unfrozen layer)
    restored.train()
    x = torch.randn(6, 3, 4, 4)
    restored(x)
    if hasattr(restored[1], "running_mean") and restored[1].running_mean is not None:
        assert not torch.allclose(restored[1].running_mean, original[1].running_mean + 0.25)


def test_requires_grad_and_dtype_survive_unfreeze() -> None:
    net = _net(LpBatchNorm2d(6, p=1))
    net[1].bias.requires_grad_(False)
    net = net.double()
    restored = unfreeze_norms(freeze_norms(net))
    assert restored[1].weight.requires_grad and not restored[1].bias.requires_grad
    assert restored[1].weight.dtype == torch.float64


def test_root_norm_and_kinds() -> None:
    bn = LpBatchNorm1d(4, p=1)
    assert isinstance(freeze_norms(bn), FrozenNorm)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4))
    out = freeze_norms(net, kinds=["layer"])
    assert isinstance(out[1], nn.BatchNorm1d) and isinstance(out[2], FrozenNorm)
    with pytest.raises(ValueError, match="unknown kinds"):
        freeze_norms(net, kinds=["instance"])


def test_nothing_to_freeze_or_unfreeze() -> None:
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze_norms(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="nothing to freeze.*running statistics"):
        freeze_norms(nn.Sequential(LpBatchNorm2d(3, p=1, track_running_stats=False)))
    with pytest.raises(ValueError, match="nothing to unfreeze"):
        unfreeze_norms(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError):
        freeze_norms(3)  # type: ignore[arg-type]


def test_freeze_keeps_hooks_and_shared_norms():
    from torch import nn as tnn

    shared = tnn.BatchNorm2d(4)
    model = tnn.Sequential(tnn.Conv2d(3, 4, 1), shared, tnn.Conv2d(4, 4, 1), shared)
    model(torch.randn(2, 3, 5, 5))  # some running statistics
    calls = []
    handle = shared.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model = freeze_norms(model)
    assert model[1] is model[3]  # still one module at both places
    model(torch.randn(2, 3, 5, 5))
    assert calls == ["FrozenNorm", "FrozenNorm"]
    handle.remove()  # the user's handle still removes it
    model = unfreeze_norms(model)
    assert model[1] is model[3] and isinstance(model[1], tnn.BatchNorm2d)
    model(torch.randn(2, 3, 5, 5))
    assert len(calls) == 2
