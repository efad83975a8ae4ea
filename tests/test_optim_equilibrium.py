"""Rotational equilibrium: closed forms on chosen hyperparameters, and agreement with
simulation (Wan et al. 2021; Kosson, Messmer & Jaggi 2024).

Two kinds of simulation, both dynamics tests (no accuracy claim):

* the random-walk model the theory is derived in: each neuron's gradient is Gaussian noise
  projected onto the tangent plane and divided by ‖w‖ (what a scale-invariant loss with noise-
  dominated gradients gives), fed to the real torch optimizers — the formulas must hold to a few
  percent there;
* a small MLP with batch norm (torch's and our L1 one) on a fixed set of random inputs and
  labels, with a fixed random readout so the gradient signal stays of the same size — the
  measured mean per-neuron angular update must be within 15% of the prediction after several
  time constants.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normmatters.nn import LpBatchNorm1d
from normmatters.optim import (
    GroupEquilibrium,
    angle_between,
    lion_correlation_sum,
    rotational_equilibrium,
    scale_invariant_parameters,
)

from _shared import Lion


def _param(shape=(4, 32)) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Closed forms, computed by hand for these hyperparameters.


def test_sgd_closed_forms() -> None:
    p = _param()
    (eq,) = rotational_equilibrium(torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4))
    assert eq.theory == "sgd"
    assert eq.angular_update == pytest.approx(7.254762e-3, rel=1e-6)  # √(2·0.1·5e-4/1.9)
    assert eq.time_constant == pytest.approx(2000.0)  # (1−α)/(ηλ)
    assert eq.norm is None and "gradient" in eq.reason
    (eq,) = rotational_equilibrium(torch.optim.SGD([p], lr=0.1, weight_decay=5e-4))
    assert eq.angular_update == pytest.approx(0.01, rel=1e-12)  # √(2ηλ)
    assert eq.time_constant == pytest.approx(20000.0)
    (eq,) = rotational_equilibrium(
        torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=5e-4))
    assert eq.angular_update == pytest.approx(5.129892e-3, rel=1e-6)  # √(2·0.1·5e-4·0.5/1.9)
    assert eq.time_constant == pytest.approx(4000.0)
    (eq,) = rotational_equilibrium(
        torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    assert eq.theory == "sgd_nesterov"
    assert eq.angular_update == pytest.approx(8.404260e-3, rel=1e-6)  # √(2ηλ·1.342/1.9)


def test_adamw_closed_forms() -> None:
    p = _param((4, 32))
    (eq,) = rotational_equilibrium(torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1))
    assert eq.theory == "adamw"
    assert eq.angular_update == pytest.approx(3.244428e-3, rel=1e-6)  # √(2·1e-4·0.1/1.9)
    assert eq.time_constant == pytest.approx(1e4)
    # √(ηC/(2λ)) with C = 32 weights per neuron: √(1e-3·32/0.2) = 0.4, for each of 4 neurons.
    torch.testing.assert_close(eq.norm["0.0"], torch.full((4,), 0.4, dtype=torch.float64))
    # Adam with decoupled_weight_decay=True is AdamW.
    (eq2,) = rotational_equilibrium(
        torch.optim.Adam([p], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True))
    assert eq2.theory == "adamw" and eq2.angular_update == eq.angular_update


def test_lion_correlation_sum() -> None:
    # Independent brute-force sum of the sign correlations (no tail formula).
    b1, b2 = 0.9, 0.99
    coef = [1 - b1] + [b1 * (1 - b2) * b2 ** (k - 1) for k in range(1, 4000)]
    var = sum(c * c for c in coef)
    brute = 1.0 + 2 * sum(
        (2 / math.pi) * math.asin(sum(coef[k] * coef[k + j] for k in range(len(coef) - j)) / var)
        for j in range(1, 3000)
    )
    assert lion_correlation_sum(b1, b2) == pytest.approx(brute, rel=1e-4)
    assert lion_correlation_sum(0.0, 0.0) == pytest.approx(1.0)  # signs of white noise
    # Monte Carlo: Var(Σ_t u_t)/T → S for the sign updates of Gaussian gradients.
    gen = torch.Generator().manual_seed(0)
    m = torch.zeros(4000, dtype=torch.float64)
    total = torch.zeros_like(m)
    b1, b2, t_max = 0.9, 0.9, 3000
    for _ in range(t_max):
        g = torch.randn(4000, generator=gen, dtype=torch.float64)
        total += torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    assert float(total.var() / t_max) == pytest.approx(lion_correlation_sum(b1, b2), rel=0.06)
    p = _param((4, 32))
    (eq,) = rotational_equilibrium(Lion([p], lr=1e-3, weight_decay=0.5))
    s = lion_correlation_sum(0.9, 0.99)
    assert eq.theory == "lion"
    assert eq.angular_update == pytest.approx(math.sqrt(2 * 1e-3 * 0.5 / s), rel=1e-12)
    torch.testing.assert_close(eq.norm["0.0"], torch.full((4,), math.sqrt(1e-3 * 32 * s / 1.0),
                                                          dtype=torch.float64))


def test_no_decay_no_theory_and_errors() -> None:
    p, q = _param(), _param()
    eqs = rotational_equilibrium(torch.optim.SGD(
        [{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=0.1, weight_decay=1e-4))
    assert [e.index for e in eqs] == [0, 1]
    assert isinstance(eqs[1], GroupEquilibrium)
    assert eqs[1].angular_update is None and eqs[1].time_constant is None
    assert "no weight decay" in eqs[1].reason
    (e,) = rotational_equilibrium(torch.optim.NAdam([p], weight_decay=1e-2))
    assert e.theory is None and e.angular_update is None and "NAdam is not covered" in e.reason
    (e,) = rotational_equilibrium(torch.optim.AdamW([p], weight_decay=1e-2, amsgrad=True))
    assert e.angular_update is None and "AMSGrad" in e.reason
    # Adam + L2 needs the second moments: nothing before the first step.
    opt = torch.optim.Adam([p], lr=1e-2, weight_decay=1e-2)
    (e,) = rotational_equilibrium(opt)
    assert e.theory == "adam_l2" and e.angular_update is None and "after at least one step" in e.reason
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        rotational_equilibrium([p])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ScaleInvariantParam"):
        rotational_equilibrium(opt, {"w": 3})  # type: ignore[dict-item]


def test_prediction_follows_the_learning_rate() -> None:
    p = _param()
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    before = rotational_equilibrium(opt)[0]
    p.grad = torch.zeros_like(p)
    opt.step()
    sched.step()
    after = rotational_equilibrium(opt)[0]
    assert after.lr == pytest.approx(2.5e-4)
    assert after.angular_update == pytest.approx(before.angular_update / 2, rel=1e-12)  # ∝ √η
    assert after.time_constant == pytest.approx(before.time_constant * 4, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The random-walk model: Gaussian tangent noise of size 1/‖w‖, real torch optimizers.


def _random_walk(opt_factory, steps: int, window: int, n: int = 64, c: int = 32):
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(n, c, generator=gen, dtype=torch.float64))
    opt = opt_factory([w])
    angles = []
    for s in range(steps):
        with torch.no_grad():
            z = torch.randn(n, c, generator=gen, dtype=torch.float64)
            norm = w.norm(dim=1, keepdim=True)
            wh = w / norm
            w.grad = (z - wh * (wh * z).sum(1, keepdim=True)) / norm
        prev = w.detach().clone()
        opt.step()
        if s >= steps - window:
            angles.append(angle_between(prev, w.detach(), dim=0).mean())
    (eq,) = rotational_equilibrium(opt)
    measured = float(torch.stack(angles).mean())
    norm_ratio = None
    if eq.norm is not None:
        norm_ratio = float(w.detach().norm(dim=1).mean() / eq.norm["0.0"].mean())
    return measured / eq.angular_update, norm_ratio


@pytest.mark.parametrize("name,factory,steps,angle_tol", [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.2, weight_decay=1e-2), 3000, 0.05),
    ("sgd-momentum-dampening",
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=5e-3), 3000,
     0.05),
    ("sgd-nesterov",
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3), 3000,
     0.05),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5, betas=(0.9, 0.99)), 3000,
     0.05),
    ("adam-l2", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-2, betas=(0.9, 0.99)),
     4000, 0.05),
    # Lion's momentum remembers ~1/(1−β₂) = 100 steps, over which the neuron turns by a
    # noticeable angle; the random-walk sum is then a few percent off.
    ("lion", lambda p: Lion(p, lr=1e-3, weight_decay=0.5), 8000, 0.05),
])
def test_random_walk_model_matches(name, factory, steps, angle_tol) -> None:
    ratio, norm_ratio = _random_walk(factory, steps, window=steps // 3)
    assert ratio == pytest.approx(1.0, abs=angle_tol), name
    if norm_ratio is not None:
        # a neuron of C weights has C−1 tangent directions: the norm is √((C−1)/C) of the
        # prediction, 0.984 here
        assert norm_ratio == pytest.approx(1.0, abs=0.05), name


# ---------------------------------------------------------------------------------------------
# A small MLP with batch norm.


def _mlp_run(norm: str, factory, steps: int = 3000, window: int = 1000):
    torch.manual_seed(0)
    make = (lambda n: nn.BatchNorm1d(n)) if norm == "l2" else (lambda n: LpBatchNorm1d(n, p=1))
    model = nn.Sequential(nn.Linear(32, 64, bias=False), make(64), nn.ReLU(),
                          nn.Linear(64, 64, bias=False), make(64), nn.ReLU(), nn.Linear(64, 10))
    # A fixed random readout keeps the hidden layers' gradients of one size: a trained readout
    # on unlearnable labels shrinks them, and the norms with them, into batch norm's eps.
    model[6].requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(2048, 32, generator=gen)
    y_all = torch.randint(0, 10, (2048,), generator=gen)
    inv = scale_invariant_parameters(model, x_all[:8])
    assert sorted(inv) == ["0.weight", "3.weight"]
    ids = {id(i.param) for i in inv.values()}
    opt = factory([
        {"params": [i.param for i in inv.values()]},
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids],
         "weight_decay": 0.0},
    ])
    angles = []
    for s in range(steps):
        idx = torch.randint(0, 2048, (32,), generator=gen)
        prev = [i.param.detach().clone() for i in inv.values()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        opt.step()
        if s >= steps - window:
            angles.append(torch.stack([
                angle_between(a.double(), i.param.detach().double(), dim=0).mean()
                for a, i in zip(prev, inv.values())]))
    eq = rotational_equilibrium(opt, inv)[0]
    measured = torch.stack(angles).mean(0)  # per layer
    norms = torch.stack([i.param.detach().double().norm(dim=1).mean() for i in inv.values()])
    return eq, measured, norms, list(inv)


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_mlp_with_batch_norm_reaches_the_predicted_rotation(norm: str, opt: str) -> None:
    if opt == "sgd":
        factory = lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=5e-3)  # noqa: E731
    else:
        factory = lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.5)  # noqa: E731
    eq, measured, norms, names = _mlp_run(norm, factory)
    assert 3000 - 1000 > 4 * eq.time_constant  # measured after several time constants
    ratio = measured / eq.angular_update
    assert torch.all((ratio - 1).abs() < 0.15), ratio
    if opt == "adamw":
        predicted = torch.stack([eq.norm[n].mean() for n in names])
        assert torch.all((norms / predicted - 1).abs() < 0.15), norms / predicted


def test_mlp_adam_l2_per_neuron_prediction() -> None:
    # Adam + L2: the equilibrium is read per neuron from the second moments; the norms agree to
    # a few percent, the angular update per layer less well (0.80 and 1.21 here: the per-step
    # update of Adam is not exactly the random walk's), their mean to 15%.
    factory = lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=5e-3, betas=(0.9, 0.99))  # noqa: E731
    eq, measured, norms, names = _mlp_run("l2", factory)
    assert eq.theory == "adam_l2" and eq.neuron_angular_update is not None
    predicted_norm = torch.stack([eq.norm[n].mean() for n in names])
    assert torch.all((norms / predicted_norm - 1).abs() < 0.15), norms / predicted_norm
    assert float(measured.mean()) / eq.angular_update == pytest.approx(1.0, abs=0.15)
