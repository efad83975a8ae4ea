"""Norm scheduling as an identity (claim C1).

Where the LR schedule divides the learning rate by ``a``, the norm-scheduled run multiplies the
scale-invariant weights by ``√a`` (momentum buffers by ``1/√a``) and keeps their rate: the
directions ``ŵ`` of the two runs must agree to rounding after hundreds of steps, in float64,
on a real conv → batch-norm network whose last layer, biases and BN gains keep the ordinary LR
schedule in both runs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from normmatters.optim import (
    NormSchedule,
    ReferenceNormSchedule,
    ReferenceNorms,
    grouped_norms,
    multistep_lambda,
    scale_invariant_parameters,
    split_param_groups,
)

STEPS = 300
MILESTONES = (100, 200)  # per-step schedule: the LR is divided by 10 twice


def make_model(eps: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, eps=eps), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8, eps=eps), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16, bias=False), nn.LayerNorm(16, eps=eps), nn.ReLU(),
        nn.Linear(16, 4),
    ).double()


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 1, 6, 6, generator=g, dtype=torch.float64),
         torch.randint(0, 4, (16,), generator=g))
        for _ in range(6)
    ]


def train(
    model: nn.Module,
    make_opt: Callable[[list[dict]], torch.optim.Optimizer],
    mode: str,
    inv: dict,
    *,
    weight_decay: float = 0.0,
    steps: int = STEPS,
    lr_lambda: Callable[[int], float] = multistep_lambda(MILESTONES, 0.1),
    broken: bool = False,
) -> nn.Module:
    """mode "lr": LambdaLR on every group; mode "norm": NormSchedule (or, with ``broken``, a
    rescaling that forgets the momentum buffers)."""
    groups = split_param_groups(model, inv, weight_decay=weight_decay, decay="all")
    opt = make_opt(groups)
    if mode == "lr":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    elif broken:
        sched = None
    else:
        sched = NormSchedule(opt, inv, lr_lambda)
    data = make_data()
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    prev = lr_lambda(0)
    for t in range(steps):
        x, y = data[t % len(data)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        else:  # the broken variant: scale the weights, keep LRs and buffers of the others
            f = lr_lambda(t + 1)
            with torch.no_grad():
                for g in opt.param_groups:
                    if g["scale_invariant"]:
                        if f != prev:
                            for p in g["params"]:
                                p.mul_((prev / f) ** 0.5)
                    else:
                        g["lr"] = g.setdefault("initial_lr", g["lr"]) * f
            prev = f
    return model


def directions(model: nn.Module, inv: dict) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for n, info in inv.items():
        w = params[n].detach()
        norms = grouped_norms(w, info.channel_dim, info.groups)
        out[n] = w / info.expand(norms)
    return out


def max_direction_gap(a: nn.Module, b: nn.Module, inv: dict) -> float:
    da, db = directions(a, inv), directions(b, inv)
    return max(float((da[n] - db[n]).abs().max()) for n in inv)


def max_other_gap(a: nn.Module, b: nn.Module, inv: dict) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return max(float((pa[n] - pb[n]).detach().abs().max()) for n in pa if n not in inv)


def sgd(momentum: float, nesterov: bool = False):
    return lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=momentum, nesterov=nesterov)


@pytest.fixture(scope="module")
def invariant_names() -> set[str]:
    model = make_model(1e-5)
    return set(scale_invariant_parameters(model, make_data()[0][0]))


def test_model_has_both_kinds_of_parameters(invariant_names) -> None:
    # conv → BN (per channel), conv+bias → BN (bias removed by centring), linear → LN (whole).
    assert invariant_names == {"0.weight", "3.weight", "8.weight"}


@pytest.mark.parametrize(
    "make_opt",
    [sgd(0.0), sgd(0.9), sgd(0.9, nesterov=True)],
    ids=["sgd", "momentum", "nesterov"],
)
def test_norm_schedule_reproduces_lr_schedule(make_opt) -> None:
    # eps breaks scale invariance by O(eps/var); with eps the runs differ by that much, which
    # is not what this identity is about.
    a, b = make_model(1e-30), make_model(1e-30)
    inv_a = scale_invariant_parameters(a, make_data()[0][0])
    inv_b = scale_invariant_parameters(b, make_data()[0][0])
    train(a, make_opt, "lr", inv_a)
    train(b, make_opt, "norm", inv_b)
    assert max_direction_gap(a, b, inv_a) < 1e-5
    assert max_other_gap(a, b, inv_a) < 1e-5  # last layer, biases, gains: same LR schedule
    # The norm-scheduled weights are √(10·10) = 10 times the LR-scheduled ones.
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in inv_a:
        ratio = pb[n].detach().norm() / pa[n].detach().norm()
        assert abs(float(ratio) - 10.0) < 1e-6 * 10


def test_identity_with_weight_decay_needs_rescaled_decay() -> None:
    wd = 1e-2
    a, b, c = make_model(1e-30), make_model(1e-30), make_model(1e-30)
    x = make_data()[0][0]
    inv_a, inv_b = scale_invariant_parameters(a, x), scale_invariant_parameters(b, x)
    inv_c = scale_invariant_parameters(c, x)
    train(a, sgd(0.9), "lr", inv_a, weight_decay=wd)
    train(b, sgd(0.9), "norm", inv_b, weight_decay=wd)
    assert max_direction_gap(a, b, inv_a) < 1e-5

    # Keeping λ instead of λ/a at the boundary breaks the identity.
    groups = split_param_groups(c, inv_c, weight_decay=wd, decay="all")
    opt = sgd(0.9)(groups)
    sched = NormSchedule(opt, inv_c, multistep_lambda(MILESTONES, 0.1), adjust_weight_decay=False)
    data, loss_fn = make_data(), nn.CrossEntropyLoss()
    for t in range(STEPS):
        xb, yb = data[t % len(data)]
        opt.zero_grad()
        loss_fn(c(xb), yb).backward()
        opt.step()
        sched.step()
    assert max_direction_gap(a, c, inv_a) > 1e-3


def test_forgetting_the_momentum_buffers_breaks_the_identity() -> None:
    a, b = make_model(1e-30), make_model(1e-30)
    x = make_data()[0][0]
    inv_a, inv_b = scale_invariant_parameters(a, x), scale_invariant_parameters(b, x)
    train(a, sgd(0.9), "lr", inv_a)
    train(b, sgd(0.9), "norm", inv_b, broken=True)
    assert max_direction_gap(a, b, inv_a) > 1e-3


def test_adamw_identity_with_power_one() -> None:
    def adamw(groups):
        return torch.optim.AdamW(groups, lr=1e-3, eps=1e-30, weight_decay=1e-2)

    a, b = make_model(1e-30), make_model(1e-30)
    x = make_data()[0][0]
    inv_a, inv_b = scale_invariant_parameters(a, x), scale_invariant_parameters(b, x)
    train(a, adamw, "lr", inv_a, weight_decay=1e-2, steps=150,
          lr_lambda=multistep_lambda((50, 100), 0.1))
    train(b, adamw, "norm", inv_b, weight_decay=1e-2, steps=150,
          lr_lambda=multistep_lambda((50, 100), 0.1))
    assert max_direction_gap(a, b, inv_a) < 1e-5
    # Adam: the weights grow by a (not √a) per boundary.
    ratio = (dict(b.named_parameters())["0.weight"].detach().norm()
             / dict(a.named_parameters())["0.weight"].detach().norm())
    assert abs(float(ratio) - 100.0) < 1e-4


def test_norm_schedule_refuses_mixed_groups_and_unknown_optimizers() -> None:
    model = make_model(1e-5)
    inv = scale_invariant_parameters(model, make_data()[0][0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mixes scale-invariant"):
        NormSchedule(opt, inv, lambda t: 1.0)
    groups = split_param_groups(model, inv, weight_decay=0.0, decay="none")
    with pytest.raises(TypeError, match="power"):
        NormSchedule(torch.optim.Adagrad(groups, lr=0.1), inv, lambda t: 1.0)
    with pytest.raises(TypeError, match="invariant"):
        NormSchedule(torch.optim.SGD(groups, lr=0.1), ["0.weight"], lambda t: 1.0)  # type: ignore[arg-type]


def test_reference_norm_schedule_sets_channel_norms() -> None:
    model = make_model(1e-5)
    x = make_data()[0][0]
    inv = scale_invariant_parameters(model, x)
    opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=0.0, decay="none"),
                          lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    steps = torch.tensor([0, 5, 10])
    norms = {
        n: torch.rand(3, info.param.shape[info.channel_dim], generator=g, dtype=torch.float64) + 0.5
        for n, info in inv.items()
    }
    ref = ReferenceNorms(steps, norms)
    factor = multistep_lambda([7], 0.25)
    sched = ReferenceNormSchedule(opt, inv, ref, lr_factor=factor)
    data, loss_fn = make_data(), nn.CrossEntropyLoss()
    for t in range(12):
        xb, yb = data[t % len(data)]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        buf_before = {n: opt.state[i.param].get("momentum_buffer") for n, i in inv.items()}
        buf_before = {n: (b.clone() if b is not None else None) for n, b in buf_before.items()}
        opt.step()
        sched.step()
        k = int(torch.searchsorted(steps, torch.tensor([t + 1]), right=True)[0]) - 1
        for n, info in inv.items():
            want = ReferenceNorms(steps, norms).at(n, t + 1)
            want = torch.sqrt(want.pow(2).reshape(info.groups, -1).sum(1))
            want = want * factor(t + 1) ** -0.5
            torch.testing.assert_close(info.group_norms().double(), want, rtol=1e-10, atol=0)
        assert k >= 0
    # Tracking the reference leaves the momentum buffer alone (a radial correction, like the
    # weight decay it replaces)...
    info = inv["0.weight"]
    buf = opt.state[info.param]["momentum_buffer"].clone()
    ref2 = ReferenceNorms(torch.tensor([0]), {n: 2 * v[:1] for n, v in norms.items()})
    ReferenceNormSchedule(opt, inv, ref2)
    torch.testing.assert_close(opt.state[info.param]["momentum_buffer"], buf)
    torch.testing.assert_close(info.group_norms().double(),
                               2 * norms["0.weight"][0])
    # ...and a jump of the LR factor by 1/a scales the buffer by 1/√a, as in NormSchedule.
    sched2 = ReferenceNormSchedule(opt, inv, ref2, lr_factor=lambda t: 1.0 if t < 1 else 0.25)
    sched2.step()
    torch.testing.assert_close(opt.state[info.param]["momentum_buffer"], buf / 2)
    torch.testing.assert_close(info.group_norms().double(), 2 * norms["0.weight"][0] * 2)


def test_reference_norm_schedule_is_stable_with_momentum() -> None:
    # Following a fixed reference for many momentum steps must not blow up the buffers.
    model = make_model(1e-5)
    inv = scale_invariant_parameters(model, make_data()[0][0])
    opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=0.0, decay="none"),
                          lr=0.5, momentum=0.9)
    ref = ReferenceNorms(torch.tensor([0]), {
        n: grouped_norms(i.param.detach(), i.channel_dim)[None] for n, i in inv.items()})
    sched = ReferenceNormSchedule(opt, inv, ref)
    data, loss_fn = make_data(), nn.CrossEntropyLoss()
    for t in range(300):
        xb, yb = data[t % len(data)]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        sched.step()
    for n, i in inv.items():
        assert torch.isfinite(opt.state[i.param]["momentum_buffer"]).all()
        want = ref.norms[n][0].pow(2).reshape(i.groups, -1).sum(1).sqrt()
        torch.testing.assert_close(i.group_norms().double(), want)


def test_running_statistics_follow_the_weights() -> None:
    # With model=, a norm jump leaves the evaluation-mode function unchanged: the batch norms
    # after bias-free convolutions get running mean × r and variance × r².
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, eps=1e-30), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).double()
    data, loss_fn = make_data(), nn.CrossEntropyLoss()
    inv = scale_invariant_parameters(model, data[0][0])
    opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=0.0, decay="none"),
                          lr=0.05, momentum=0.9)
    sched = NormSchedule(opt, inv, lambda t: 1.0 if t < 3 else 0.1, model=model)
    for t in range(3):
        xb, yb = data[t]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        if t < 2:
            sched.step()
    model.eval()
    with torch.no_grad():
        before = model(data[0][0])
        sched.step()  # the weights jump by √10
        after = model(data[0][0])
    assert float(model[0].weight.detach().norm()) > 0
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)
    assert sched.history[-1]["weight_scale"] == pytest.approx(10**0.5)
