"""RotationalOptimizer: scale-invariant neurons turn at the equilibrium rate with fixed norms
(Kosson, Messmer & Jaggi 2024); everything else steps as the wrapped optimizer does."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from normmatters.optim import (
    NormTracker,
    RotationalOptimizer,
    angle_between,
    rotational_equilibrium,
    scale_invariant_parameters,
)

from _shared import Lion


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.GroupNorm(3, 6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 3),
    ).double()
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]
    return model, data


def groups_with_decay(model: nn.Module, wd: float) -> list[dict]:
    # group 0: both invariant convolutions and the (not invariant) linear weight, with decay;
    # group 1: the rest, without.
    decay = [model[0].weight, model[3].weight, model[7].weight]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": wd},
            {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]


FACTORIES = {
    "sgd-momentum": (lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), 5e-4, None),
    "sgd-nesterov": (lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True), 5e-4, None),
    "sgd-foreach": (lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, foreach=True), 5e-4, None),
    "adamw": (lambda g: torch.optim.AdamW(g, lr=1e-3), 0.1, None),
    "adam-decoupled": (lambda g: torch.optim.Adam(g, lr=1e-3, decoupled_weight_decay=True), 0.1,
                       None),
    "adam-l2": (lambda g: torch.optim.Adam(g, lr=1e-3), 1e-2, 0.01),
    "lion": (lambda g: Lion(g, lr=1e-4), 1.0, None),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_step_turns_each_neuron_by_the_target_with_its_norm_fixed(name: str) -> None:
    factory, wd, rate = FACTORIES[name]
    model, data = model_and_data()
    inv = scale_invariant_parameters(model, data[0][0])
    assert sorted(inv) == ["0.weight", "3.weight"] and inv["3.weight"].groups == 3
    base = factory(groups_with_decay(model, wd))
    expected = rate if rate is not None else rotational_equilibrium(base)[0].angular_update
    opt = RotationalOptimizer(base, inv, angular_update=rate)
    assert opt.angular_update(0) == pytest.approx(expected, rel=1e-12)
    assert opt.angular_update(1) is None
    norms0 = {n: i.group_norms().double().clone() for n, i in inv.items()}
    for x, y in data:
        before = {n: i.param.detach().clone() for n, i in inv.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n, i in inv.items():
            a = before[n].reshape(i.groups, -1)
            b = i.param.detach().reshape(i.groups, -1)
            torch.testing.assert_close(angle_between(a, b, dim=0),
                                       torch.full((i.groups,), expected, dtype=torch.float64),
                                       rtol=1e-9, atol=0)
            torch.testing.assert_close(i.group_norms().double(), norms0[n], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["sgd-momentum", "sgd-foreach", "adamw", "adam-l2"])
def test_other_parameters_step_exactly_as_the_wrapped_optimizer(name: str) -> None:
    factory, wd, rate = FACTORIES[name]
    model, data = model_and_data()
    inv = scale_invariant_parameters(model, data[0][0])
    # conv 2 is scale invariant but sits in the group without decay: it is not rotated.
    twin = copy.deepcopy(model)

    def split(m: nn.Module) -> list[dict]:
        decay = [m[0].weight, m[7].weight]
        ids = {id(p) for p in decay}
        return [{"params": decay, "weight_decay": wd},
                {"params": [p for p in m.parameters() if id(p) not in ids], "weight_decay": 0.0}]

    plain = factory(split(twin))
    opt = RotationalOptimizer(factory(split(model)), inv, angular_update=rate)
    assert opt.angular_update(1) is None
    gen = torch.Generator().manual_seed(3)
    named_twin = dict(twin.named_parameters())
    for _ in range(4):
        for n, p in model.named_parameters():
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = g.clone()
            named_twin[n].grad = g.clone()
        opt.step()
        plain.step()
        for n, p in model.named_parameters():
            if n == "0.weight":
                assert not torch.equal(p, named_twin[n])
            else:
                assert torch.equal(p, named_twin[n]), n  # bit for bit
            assert torch.equal(p.grad, named_twin[n].grad), n  # gradients given back intact


def test_the_learning_rate_schedule_scales_the_rotation() -> None:
    model, data = model_and_data()
    inv = scale_invariant_parameters(model, data[0][0])
    base = torch.optim.AdamW(groups_with_decay(model, 0.1), lr=1e-3)
    theta0 = rotational_equilibrium(base)[0].angular_update
    # A warm-up built on the wrapped optimizer before wrapping: the rate refers to its
    # initial_lr, not to the warm-up's first lr.
    warm = torch.optim.lr_scheduler.LinearLR(base, start_factor=0.25, total_iters=2)
    opt = RotationalOptimizer(base, inv)
    decay = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w = model[0].weight
    factors = []
    for x, y in data[:4]:
        factors.append(base.param_groups[0]["lr"] / 1e-3)
        before = w.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        warm.step()
        decay.step()
        torch.testing.assert_close(angle_between(before, w.detach(), dim=0),
                                   torch.full((4,), theta0 * factors[-1], dtype=torch.float64),
                                   rtol=1e-9, atol=0)
    assert factors[0] == pytest.approx(0.25) and factors[-1] < 0.25


def test_state_dict_round_trip() -> None:
    model, data = model_and_data()
    inv = scale_invariant_parameters(model, data[0][0])
    opt = RotationalOptimizer(torch.optim.SGD(groups_with_decay(model, 5e-4), lr=0.1,
                                              momentum=0.9), inv)
    for x, y in data[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = copy.deepcopy(model)
    inv_twin = scale_invariant_parameters(twin, data[0][0])
    saved_w = twin[0].weight.detach().clone()
    with torch.no_grad():
        twin[0].weight.mul_(3.0)  # other norms and another lr: all must come from the file
    other = RotationalOptimizer(torch.optim.SGD(groups_with_decay(twin, 5e-4), lr=0.7,
                                                momentum=0.9), inv_twin)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        twin[0].weight.copy_(saved_w)
    assert other.param_groups[0]["lr"] == 0.1
    assert other.angular_update(0) == opt.angular_update(0)
    torch.testing.assert_close(other.neuron_norms(twin[0].weight), opt.neuron_norms(model[0].weight))
    for x, y in data[3:]:
        for m, o in ((model, opt), (twin, other)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), n
    plain = torch.optim.SGD(groups_with_decay(twin, 5e-4), lr=0.1)
    with pytest.raises(ValueError, match="not a RotationalOptimizer state dict"):
        other.load_state_dict(plain.state_dict())


def test_tracker_sees_the_equilibrium_rotation_from_the_first_step() -> None:
    model, data = model_and_data()
    inv = scale_invariant_parameters(model, data[0][0])
    opt = RotationalOptimizer(torch.optim.AdamW(groups_with_decay(model, 0.1), lr=1e-3), inv)
    tracker = NormTracker(inv, opt, equilibrium=True)
    for x, y in data[:2]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec = tracker.step()
        for n in inv:
            e = rec["layers"][n]
            assert e["step_angle"] == pytest.approx(e["eq_angle"], rel=1e-9)


def test_closure_repr_and_clear_errors() -> None:
    model, data = model_and_data()
    inv = scale_invariant_parameters(model, data[0][0])
    x, y = data[0]
    opt = RotationalOptimizer(torch.optim.SGD(groups_with_decay(model, 1e-3), lr=0.1), inv)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) > 0
    assert "RotationalOptimizer(SGD" in repr(opt)
    with pytest.raises(TypeError, match="already a RotationalOptimizer"):
        RotationalOptimizer(opt, inv)
    with pytest.raises(TypeError, match="cannot wrap NAdam"):
        RotationalOptimizer(torch.optim.NAdam(groups_with_decay(model, 1e-3)), inv)
    with pytest.raises(ValueError, match="angular_update="):
        RotationalOptimizer(torch.optim.Adam(groups_with_decay(model, 1e-3)), inv)
    with pytest.raises(ValueError, match="AMSGrad"):
        RotationalOptimizer(torch.optim.AdamW(groups_with_decay(model, 1e-3), amsgrad=True), inv)
    with pytest.raises(ValueError, match="maximize"):
        RotationalOptimizer(torch.optim.SGD(groups_with_decay(model, 1e-3), lr=0.1,
                                            maximize=True), inv)
    with pytest.raises(ValueError, match="2 parameter groups"):
        RotationalOptimizer(torch.optim.SGD(groups_with_decay(model, 1e-3), lr=0.1), inv,
                            angular_update=[0.1])
    with pytest.raises(ValueError, match="not in the optimizer"):
        RotationalOptimizer(torch.optim.SGD([model[7].weight], lr=0.1, weight_decay=1e-3), inv)
    assert math.isfinite(opt.angular_update(0))
