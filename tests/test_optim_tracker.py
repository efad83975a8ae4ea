"""Norm tracker: ‖w‖, effective learning rate and angular update (claim C1)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from normmatters.optim import (
    NormTracker,
    ReferenceNorms,
    angle_between,
    plot_norm_log,
    read_norm_log,
    scale_invariant_parameters,
)


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    ).double()


def batches(n: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 5, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_angle_between_is_accurate_for_tiny_and_large_angles() -> None:
    for theta in (1e-9, 1e-4, 0.3, 2.5):
        a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) * 3.0
        b = torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64) * 0.2
        assert float(angle_between(a, b)) == pytest.approx(theta, rel=1e-10)
    rows_a = torch.eye(2, dtype=torch.float64)
    rows_b = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(angle_between(rows_a, rows_b, dim=0),
                               torch.tensor([math.pi / 2, 0.0], dtype=torch.float64))


def test_records_match_direct_computation(tmp_path) -> None:
    model = small_model()
    inv = scale_invariant_parameters(model, batches(1)[0][0])
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    log = tmp_path / "norms.jsonl"
    tracker = NormTracker(inv, opt, log_path=log)
    w = model[0].weight
    prev = w.detach().clone()
    for x, y in batches(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec = tracker.step(epoch=1, loss=1.0)
        e = rec["layers"]["0.weight"]
        ch = w.detach().reshape(4, -1).norm(dim=1)
        assert e["channel_norm"] == pytest.approx(ch.tolist(), rel=1e-12)
        assert e["norm"] == pytest.approx(float(w.detach().norm()), rel=1e-12)
        assert e["eff_lr"] == pytest.approx(0.3 / float(w.detach().norm()) ** 2, rel=1e-12)
        assert e["channel_eff_lr"] == pytest.approx((0.3 / ch**2).tolist(), rel=1e-12)
        cos = (prev * w.detach()).sum() / (prev.norm() * w.detach().norm())
        assert e["angle"] == pytest.approx(math.acos(float(cos)), rel=1e-6)
        cos_c = (prev.reshape(4, -1) * w.detach().reshape(4, -1)).sum(1) / (
            prev.reshape(4, -1).norm(dim=1) * ch)
        assert e["channel_angle"] == pytest.approx(torch.arccos(cos_c).tolist(), rel=1e-6)
        assert rec["epoch"] == 1 and rec["loss"] == 1.0
        prev = w.detach().clone()
    lines = read_norm_log(log)
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4, 5]
    assert "angle" not in lines[0]["layers"]["0.weight"]  # the initial record has no update
    assert json.loads(log.read_text().splitlines()[-1]) == tracker.history[-1]


def test_every_and_reference_norms(tmp_path) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NormTracker({"w": model[0].weight}, opt, every=3, log_path=tmp_path / "n.jsonl")
    snaps = {0: model[0].weight.detach().clone()}
    for t, (x, y) in enumerate(batches(7), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        tracker.step()
        snaps[t] = model[0].weight.detach().clone()
    assert [r["step"] for r in tracker.history] == [0, 3, 6]
    # With every=3 the angle is the rotation over the three updates.
    assert tracker.history[1]["layers"]["w"]["angle"] == pytest.approx(
        float(angle_between(snaps[0], snaps[3])), rel=1e-12)
    ref = tracker.reference_norms()
    ref2 = ReferenceNorms.from_jsonl(tmp_path / "n.jsonl")
    torch.testing.assert_close(ref.norms["w"], ref2.norms["w"])
    # Lookup returns the last record at or before the step.
    torch.testing.assert_close(ref.at("w", 4), snaps[3].reshape(4, -1).norm(dim=1))
    torch.testing.assert_close(ref.at("w", 6), snaps[6].reshape(4, -1).norm(dim=1))
    torch.testing.assert_close(ref.at("w", 100), snaps[6].reshape(4, -1).norm(dim=1))
    with pytest.raises(KeyError, match="nope"):
        ref.at("nope", 0)
    loaded = ReferenceNorms.load(ref.save(tmp_path / "ref.pt"))
    torch.testing.assert_close(loaded.norms["w"], ref.norms["w"])
    torch.testing.assert_close(loaded.steps, ref.steps)


def test_adam_rule_and_lr_scale() -> None:
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = NormTracker({"w": model[0].weight}, opt)
    n = float(model[0].weight.detach().norm())
    assert tracker.rule == "adam"
    assert tracker.history[0]["layers"]["w"]["eff_lr"] == pytest.approx(1e-3 / n, rel=1e-12)
    # A per-channel multiplier s: per channel η·s/‖w_i‖², per layer η/Σ(‖w_i‖²/s_i).
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    s = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    t2 = NormTracker({"w": model[0].weight}, opt2, lr_scale=lambda name: s)
    ch = model[0].weight.detach().reshape(4, -1).norm(dim=1)
    e = t2.history[0]["layers"]["w"]
    assert e["channel_eff_lr"] == pytest.approx((0.1 * s / ch**2).tolist(), rel=1e-12)
    assert e["eff_lr"] == pytest.approx(0.1 / float((ch**2 / s).sum()), rel=1e-12)


def test_plot_writes_png(tmp_path) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NormTracker(model, opt, log_path=tmp_path / "n.jsonl")
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        tracker.step()
    for src in (tracker, tmp_path / "n.jsonl"):
        out = plot_norm_log(src, tmp_path / "plots" / "norms.png", title="test")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="every"):
        NormTracker(model, every=0)
    with pytest.raises(ValueError, match="rule"):
        NormTracker(model, rule="lion")
    with pytest.raises(TypeError, match="params"):
        NormTracker({"w": 3.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="empty"):
        NormTracker({})
    with pytest.raises(ValueError, match="shape"):
        ReferenceNorms(torch.tensor([0, 1]), {"w": torch.ones(3, 4)})


# ---------------------------------------------------------------------------------------------
# Rotational equilibrium beside the measurement (Wan et al. 2021; Kosson et al. 2024).


def test_equilibrium_records_follow_the_schedule_and_measure_every_step(tmp_path) -> None:
    model = small_model()
    inv = scale_invariant_parameters(model, batches(1)[0][0])
    ids = {id(i.param) for i in inv.values()}
    opt = torch.optim.SGD([
        {"params": [p for p in model.parameters() if id(p) in ids], "weight_decay": 5e-4},
        {"params": [p for p in model.parameters() if id(p) not in ids]},
    ], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.25)
    tracker = NormTracker(inv, opt, every=3, equilibrium=True, log_path=tmp_path / "n.jsonl")
    w = model[0].weight
    first = tracker.history[0]["layers"]["0.weight"]
    assert first["eq_angle"] == pytest.approx(math.sqrt(2 * 0.1 * 5e-4 / 1.9), rel=1e-12)
    assert "eq_norm" not in first  # SGD: the norm depends on the gradient's size
    assert "step_angle" not in first
    angles = []
    for x, y in batches(6):
        prev = w.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        angles.append(float(angle_between(prev, w.detach(), dim=0).mean()))
        rec = tracker.step()
    e3 = tracker.history[1]["layers"]["0.weight"]
    # The mean per-step rotation of the neurons over the three steps, not the 3-step angle.
    assert e3["step_angle"] == pytest.approx(sum(angles[:3]) / 3, rel=1e-10)
    assert rec["layers"]["0.weight"]["step_angle"] == pytest.approx(sum(angles[3:]) / 3, rel=1e-10)
    # The prediction follows the learning rate: lr 0.1 → 0.025 → 0.00625, θ ∝ √η.
    assert e3["eq_angle"] == pytest.approx(math.sqrt(2 * 0.025 * 5e-4 / 1.9), rel=1e-12)
    assert rec["layers"]["0.weight"]["eq_angle"] == pytest.approx(
        math.sqrt(2 * 0.00625 * 5e-4 / 1.9), rel=1e-12)
    assert e3["neuron_norm"] == pytest.approx(
        sum(e3["channel_norm"]) / len(e3["channel_norm"]), rel=1e-12)
    out = plot_norm_log(tmp_path / "n.jsonl", tmp_path / "eq.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equilibrium_norm_for_adamw_and_none_without_decay() -> None:
    model = small_model()
    opt = torch.optim.AdamW([
        {"params": [model[0].weight], "weight_decay": 0.1},
        {"params": [model[4].weight], "weight_decay": 0.0},
    ], lr=1e-3)
    tracker = NormTracker({"conv": model[0].weight, "fc": model[4].weight}, opt,
                          equilibrium=True)
    conv = tracker.history[0]["layers"]["conv"]
    # √(ηC/(2λ)) with C = 1·3·3 = 9 weights per output channel.
    assert conv["eq_norm"] == pytest.approx(math.sqrt(1e-3 * 9 / 0.2), rel=1e-12)
    assert conv["eq_angle"] == pytest.approx(math.sqrt(2 * 1e-4 * 0.1 / 1.9), rel=1e-12)
    fc = tracker.history[0]["layers"]["fc"]
    assert "eq_angle" not in fc and "eq_norm" not in fc and "neuron_norm" in fc
    with pytest.raises(ValueError, match="equilibrium=True needs the optimizer"):
        NormTracker(model, equilibrium=True)


def test_equilibrium_neurons_are_groups_of_channels() -> None:
    # Group norm: a neuron is a group of channels, measured and predicted as one block.
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    x, y = batches(1)[0]
    inv = scale_invariant_parameters(model, x)
    assert inv["0.weight"].groups == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tracker = NormTracker({"0.weight": inv["0.weight"]}, opt, equilibrium=True)
    w = model[0].weight
    prev = w.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    e = tracker.step()["layers"]["0.weight"]
    assert e["step_angle"] == pytest.approx(
        float(angle_between(prev.reshape(2, -1), w.detach().reshape(2, -1), dim=0).mean()),
        rel=1e-10)
    assert e["eq_norm"] == pytest.approx(math.sqrt(1e-2 * 18 / 0.2), rel=1e-12)  # C = 2·9
