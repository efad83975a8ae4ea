"""Per-channel LR correction that mimics weight decay (claim C1)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normmatters.optim import (
    LRCorrection,
    NormTracker,
    ReferenceNorms,
    grouped_norms,
    reference_group_norms,
    scale_invariant_parameters,
    split_param_groups,
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, eps=1e-30), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 8, bias=False), nn.LayerNorm(8, eps=1e-30), nn.ReLU(),
        nn.Linear(8, 3),
    ).double()


def data(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def random_reference(inv, records: int = 4, seed: int = 2) -> ReferenceNorms:
    g = torch.Generator().manual_seed(seed)
    return ReferenceNorms(
        torch.arange(records) * 2,
        {n: torch.rand(records, i.param.shape[i.channel_dim], generator=g, dtype=torch.float64) + 0.3
         for n, i in inv.items()},
    )


def test_reference_group_norms() -> None:
    ch = torch.tensor([3.0, 4.0, 1.0, 0.0])
    torch.testing.assert_close(reference_group_norms(ch, 2), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(reference_group_norms(ch, 1), torch.tensor([26.0]).sqrt())
    with pytest.raises(ValueError, match="groups"):
        reference_group_norms(ch, 3)


@pytest.mark.parametrize("apply_to", ["gradient", "update"])
def test_sgd_momentum_step_is_scaled_per_channel(apply_to) -> None:
    model = make_model()
    inv = scale_invariant_parameters(model, data()[0][0])
    assert {n: i.groups for n, i in inv.items()} == {"0.weight": 6, "5.weight": 1}
    opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=5e-4, decay="last_layer"),
                          lr=0.2, momentum=0.9)
    ref = random_reference(inv)
    corr = LRCorrection(opt, inv, ref, apply_to=apply_to)
    assert corr.apply_to == apply_to
    plain_buf = {n: torch.zeros_like(i.param) for n, i in inv.items()}
    for t, (x, y) in enumerate(data(6)):
        before = {n: i.param.detach().clone() for n, i in inv.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {n: i.param.grad.detach().clone() for n, i in inv.items()}
        opt.step()
        for n, info in inv.items():
            # s = (‖w_g‖/‖w_ref,g(t)‖)² from the weights before the step.
            s = info.expand((grouped_norms(before[n], info.channel_dim, info.groups)
                             / reference_group_norms(ref.at(n, t), info.groups)) ** 2)
            if apply_to == "gradient":  # the buffer accumulates corrected gradients
                plain_buf[n] = 0.9 * plain_buf[n] + s * raw[n] if t else s * raw[n]
                want = before[n] - 0.2 * plain_buf[n]
            else:  # the buffer holds raw gradients, the step is -η·s·buffer
                plain_buf[n] = 0.9 * plain_buf[n] + raw[n] if t else raw[n]
                want = before[n] - 0.2 * s * plain_buf[n]
            torch.testing.assert_close(info.param.detach(), want, rtol=1e-12, atol=1e-14)
    assert corr.num_steps == 6


def test_adamw_uses_the_first_power() -> None:
    model_a, model_b = make_model(), make_model()
    x, y = data(1)[0]
    inv_a = scale_invariant_parameters(model_a, x)
    inv_b = scale_invariant_parameters(model_b, x)
    opt_a = torch.optim.AdamW(split_param_groups(model_a, inv_a, weight_decay=0.0, decay="none"), lr=1e-2)
    opt_b = torch.optim.AdamW(split_param_groups(model_b, inv_b, weight_decay=0.0, decay="none"), lr=1e-2)
    ref = random_reference(inv_a)
    corr = LRCorrection(opt_a, inv_a, ref)
    assert corr.power == 1.0
    before = {n: i.param.detach().clone() for n, i in inv_a.items()}
    for m, o in ((model_a, opt_a), (model_b, opt_b)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for n, info in inv_a.items():
        s = grouped_norms(before[n], 0, info.groups) / reference_group_norms(ref.at(n, 0), info.groups)
        step_a = info.param.detach() - before[n]
        step_b = inv_b[n].param.detach() - before[n]
        torch.testing.assert_close(step_a, info.expand(s) * step_b, rtol=1e-10, atol=1e-15)


def _train(model, opt, steps, tracker=None, corr=None):
    for t, (x, y) in zip(range(steps), data(6) * (steps // 6 + 1)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if tracker is not None:
            tracker.step()


def _wd_on_groups(model, inv, wd):
    # Weight decay on the scale-invariant weights and the last layer; the normalization gains
    # and biases are trained alike in every run (decaying them changes the function itself).
    groups = split_param_groups(model, inv, weight_decay=wd, decay="last_layer")
    for g in groups:
        if g["scale_invariant"]:
            g["weight_decay"] = wd
    return groups


def _direction_gap(a: nn.Module, b: nn.Module, inv) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    out = 0.0
    for n, info in inv.items():
        ua = pa[n].detach() / info.expand(grouped_norms(pa[n].detach(), 0, info.groups))
        ub = pb[n].detach() / info.expand(grouped_norms(pb[n].detach(), 0, info.groups))
        out = max(out, float((ua - ub).abs().max()))
    return out


@pytest.fixture(scope="module")
def wd_on_run():
    steps, lr, wd = 200, 0.05, 2e-2
    ref_model = make_model()
    inv_r = scale_invariant_parameters(ref_model, data(1)[0][0])
    opt_r = torch.optim.SGD(_wd_on_groups(ref_model, inv_r, wd), lr=lr)
    tr_r = NormTracker(inv_r, opt_r)
    _train(ref_model, opt_r, steps, tr_r)
    return steps, lr, wd, ref_model, inv_r, tr_r


def _wd_off_run(wd_on_run, correction: dict | None):
    steps, lr, wd, _, _, tr_r = wd_on_run
    m = make_model()
    inv = scale_invariant_parameters(m, data(1)[0][0])
    opt = torch.optim.SGD(split_param_groups(m, inv, weight_decay=wd, decay="last_layer"), lr=lr)
    corr = LRCorrection(opt, inv, tr_r.reference_norms(), **correction) if correction is not None else None
    tr = NormTracker(inv, opt, lr_scale=corr.channel_scale if corr else None)
    _train(m, opt, steps, tr)
    return m, tr


def test_corrected_run_has_the_reference_effective_lr(wd_on_run) -> None:
    _, _, _, _, inv_r, tr_r = wd_on_run
    _, tr_c = _wd_off_run(wd_on_run, {})
    # The corrected run's effective LR is the reference's at every step: per channel where
    # the invariance is per channel (batch norm), per layer everywhere.
    for rec_c, rec_r in zip(tr_c.history, tr_r.history, strict=True):
        assert rec_c["step"] == rec_r["step"]
        for n, info in inv_r.items():
            if info.groups == info.param.shape[0]:
                assert rec_c["layers"][n]["channel_eff_lr"] == pytest.approx(
                    rec_r["layers"][n]["channel_eff_lr"], rel=1e-9)
            assert rec_c["layers"][n]["eff_lr"] == pytest.approx(rec_r["layers"][n]["eff_lr"], rel=1e-9)


def test_exact_correction_reproduces_weight_decay_directions(wd_on_run) -> None:
    # Weight decay acts on scale-invariant weights only through the effective LR: with the
    # exact ratio (reference_shrink = ηλ) WD off reproduces WD on's directions to rounding,
    # while plain WD off drifts away.
    _, lr, wd, ref_model, inv_r, _ = wd_on_run
    exact, _ = _wd_off_run(wd_on_run, {"reference_shrink": lr * wd})
    off, _ = _wd_off_run(wd_on_run, None)
    assert _direction_gap(ref_model, exact, inv_r) < 1e-9
    assert _direction_gap(ref_model, off, inv_r) > 1e-3


def test_max_scale_and_remove() -> None:
    model = make_model()
    x, y = data(1)[0]
    inv = scale_invariant_parameters(model, x)
    opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=0.0, decay="none"), lr=0.1)
    tiny = ReferenceNorms(torch.tensor([0]), {n: torch.full((1, i.param.shape[0]), 1e-6,
                                                           dtype=torch.float64)
                                             for n, i in inv.items()})
    corr = LRCorrection(opt, inv, tiny, max_scale=3.0)
    assert float(corr.group_scale("0.weight").max()) == 3.0
    corr.remove()
    before = inv["0.weight"].param.detach().clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = inv["0.weight"].param.grad.clone()
    opt.step()
    torch.testing.assert_close(inv["0.weight"].param.detach(), before - 0.1 * g)


def test_errors() -> None:
    model = make_model()
    x = data(1)[0][0]
    inv = scale_invariant_parameters(model, x)
    ref = random_reference(inv)
    with pytest.raises(ValueError, match="weight_decay"):
        LRCorrection(torch.optim.SGD(split_param_groups(model, inv, weight_decay=1e-3, decay="all"),
                                     lr=0.1), inv, ref)
    groups = split_param_groups(model, inv, weight_decay=0.0, decay="none")
    with pytest.raises(TypeError, match="power"):
        LRCorrection(torch.optim.Adagrad(groups, lr=0.1), inv, ref)
    LRCorrection(torch.optim.Adagrad(copy.copy(groups), lr=0.1), inv, ref, power=1.0).remove()
    with pytest.raises(ValueError, match="no norms"):
        LRCorrection(torch.optim.SGD(groups, lr=0.1), inv,
                     ReferenceNorms(ref.steps, {"0.weight": ref.norms["0.weight"]}))
    with pytest.raises(ValueError, match="channels"):
        bad = dict(ref.norms)
        bad["0.weight"] = bad["0.weight"][:, :2]
        LRCorrection(torch.optim.SGD(groups, lr=0.1), inv, ReferenceNorms(ref.steps, bad))
    with pytest.raises(TypeError, match="ReferenceNorms"):
        LRCorrection(torch.optim.SGD(groups, lr=0.1), inv, {"0.weight": 1.0})  # type: ignore[arg-type]


def test_gradient_mode_keeps_momentum_feedback_negative() -> None:
    # A reference 5x smaller than the weights (25x the effective LR) with momentum: scaling the
    # update by the current ratio amplifies the stale, larger gradients in the buffer and the
    # norm explodes within a few dozen steps; corrected gradients only grow it geometrically.
    final = {}
    for apply_to in ("gradient", "update"):
        model = make_model()
        inv = scale_invariant_parameters(model, data(1)[0][0])
        opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=0.0, decay="none"),
                              lr=0.1, momentum=0.9)
        ref = ReferenceNorms(torch.tensor([0]), {
            n: 0.2 * grouped_norms(i.param.detach(), i.channel_dim)[None] for n, i in inv.items()})
        LRCorrection(opt, inv, ref, apply_to=apply_to)
        _train(model, opt, 30)
        final[apply_to] = float(inv["0.weight"].param.detach().norm())
    assert final["gradient"] < 1e4
    assert not final["update"] < 1e10  # also true for inf / nan


def test_reference_floor() -> None:
    model = make_model()
    inv = scale_invariant_parameters(model, data(1)[0][0])
    opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=0.0, decay="none"), lr=0.1)
    norms = {n: torch.ones(1, i.param.shape[0], dtype=torch.float64) for n, i in inv.items()}
    norms["0.weight"][0, 2] = 1e-6  # a channel that died in the reference run
    ref = ReferenceNorms(torch.tensor([0]), norms)
    cur = grouped_norms(inv["0.weight"].param.detach().double(), 0)
    plain = LRCorrection(opt, inv, ref)
    torch.testing.assert_close(plain.group_scale("0.weight")[2], (cur[2] / 1e-6) ** 2)
    plain.remove()
    floored = LRCorrection(opt, inv, ref, reference_floor=0.5)
    rms = float(norms["0.weight"][0].pow(2).mean().sqrt())
    s = floored.group_scale("0.weight")
    torch.testing.assert_close(s[2], (cur[2] / (0.5 * rms)) ** 2)
    torch.testing.assert_close(s[0], cur[0] ** 2)  # channels above the floor are untouched
    with pytest.raises(ValueError, match="reference_floor"):
        LRCorrection(opt, inv, ref, reference_floor=2.0)
