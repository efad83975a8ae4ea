"""C1's modern form (claims.c1_equilibrium): the window, the checks and the figure, on synthetic
records and rows (the training itself is C1's, tested in test_optim_experiment_c1.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

eqc = pytest.importorskip("normmatters.experiments.claims.c1_equilibrium")


def test_window_from_time_constants_to_the_first_milestone() -> None:
    cfg = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=1e-2, epochs=30,
                          lr_schedule="step", lr_milestones=[25, 15])
    # τ = (1−α)/(ηλ) = 100 steps; from 3τ to epoch 15 at 32 steps per epoch.
    assert eqc.window_for(cfg, 32) == (300, 480)
    cfg.lr_schedule = "cosine"
    assert eqc.window_for(cfg, 32) == (300, 960)
    cfg.weight_decay = 0.0
    assert eqc.window_for(cfg, 32) == (960, 960)  # empty: no equilibrium without decay
    cfg.weight_decay, cfg.epochs = 1e-2, 2
    assert eqc.window_for(cfg, 32) == (64, 64)  # too short: empty


def test_l1_arm_stops_at_the_window_end() -> None:
    cfg = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=1e-2, epochs=30,
                          lr_schedule="step", lr_milestones=[15, 25])
    assert eqc.l1_settings(cfg, 32) == {"norm": "l1", "epochs": 15}
    cfg.epochs, cfg.lr_milestones = 2, [1]  # no window: the whole (short) run
    assert eqc.l1_settings(cfg, 32) == {"norm": "l1"}


def test_window_averages_measured_and_predicted_per_layer() -> None:
    w = eqc.EquilibriumWindow(2, 4)
    rec = lambda m, p: {"layers": {"a": {"step_angle": m, "eq_angle": p}, "b": {"norm": 1.0}}}  # noqa: E731
    w.add(1, rec(9.0, 1.0))  # before the window
    w.add(2, rec(1.0, 1.0))
    w.add(3, rec(2.0, 2.0 / 3.0))
    w.add(3, None)
    w.add(4, rec(9.0, 1.0))  # the window's end is excluded
    assert w.ratios() == {"a": pytest.approx(3.0 / (5.0 / 3.0))}


def _rows(ratios: dict[int, float], acc: dict[str, list[float]] | None = None) -> list[dict]:
    rows = [{"run": "wd_on", "seed": s, "eq_angle_ratio": r,
             "eq_angle_ratio_layers": {"0.weight": r, "3.weight": r}} for s, r in ratios.items()]
    for run, accs in (acc or {}).items():
        for s, a in enumerate(accs):
            if run == "wd_on":
                rows[s]["test_acc"] = a
            else:
                rows.append({"run": run, "seed": s, "test_acc": a})
    return rows


def test_equilibrium_check_outcomes() -> None:
    c = eqc.equilibrium_check(_rows({0: 0.97, 1: 0.99, 2: 0.98}))
    assert c.outcome == "supported" and c.passed is True and not c.core
    assert c.diff["mean"] == pytest.approx(-0.02) and c.kind == "relative"  # ratio − 1
    assert "0.980×" in c.text
    c = eqc.equilibrium_check(_rows({0: 0.5, 1: 0.52, 2: 0.49}))
    assert c.outcome == "not supported" and c.passed is False
    assert eqc.equilibrium_check(_rows({0: 0.97})).outcome == "inconclusive (1 seed)"
    assert eqc.equilibrium_check(_rows({0: 0.7, 1: 1.3, 2: 1.0})).outcome == "inconclusive"
    assert eqc.equilibrium_check([]).outcome == "not measured"


def test_rotational_check_is_non_inferiority_on_accuracy() -> None:
    rows = _rows({0: 1.0, 1: 1.0, 2: 1.0},
                 {"wd_on": [0.80, 0.81, 0.82], eqc.ROTATIONAL: [0.805, 0.812, 0.821]})
    c = eqc.rotational_check(rows)
    assert c.rule == "non-inferiority" and c.outcome == "supported" and not c.core


def test_ratio_figure_and_summary(tmp_path) -> None:
    rows = _rows({0: 0.97, 1: 1.02})
    out = eqc.plot_ratios(rows, tmp_path / "eq.png", "test")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert eqc.plot_ratios([], tmp_path / "none.png", "test") is None
    assert "L2 BN 0.970–1.020 over 4 layer-seeds" in eqc.summary_text(rows)
    rows.append({"run": eqc.L1_RUN, "seed": 0, "eq_angle_ratio": 0.9,
                 "eq_angle_ratio_layers": {"0.weight": 0.9, "3.weight": 0.9}})
    assert "L1 BN 0.900–0.900 over 2 layer-seeds" in eqc.summary_text(rows)
    assert eqc.equilibrium_check(rows, eqc.L1_RUN, "L1").seeds == [0]
    assert eqc.plot_ratios(rows, tmp_path / "eq2.png", "test") is not None
