r"""C1's modern form: rotational equilibrium, predicted, measured and controlled.

Beyond the paper (Hoffer et al. 2018 say weight decay acts on scale-invariant weights only
through the effective learning rate): with weight decay each scale-invariant neuron settles, after
a few time constants τ, at an angular update per step fixed by the hyperparameters — for SGD with
momentum α, √(2ηλ/(1+α)) (Wan et al. 2021; Kosson, Messmer & Jaggi 2024; derivations in
docs/equilibrium.md). C1's WD-on run measures it: its :class:`~normmatters.optim.NormTracker`
records every step each layer's mean per-neuron rotation beside the prediction at the current
learning rate, and :class:`EquilibriumWindow` averages both over the steps from 3τ to the first
learning-rate milestone (the equilibrium of the initial rate, reached by then).

The same holds for every p of an Lp batch norm: a sixth run, ``wd_on_l1``, is WD on with L1 batch
norm, trained only to the first milestone (the window's end: its accuracy is not comparable).

A fifth run, ``wd_on_rotational``, wraps WD on's SGD in
:class:`~normmatters.optim.RotationalOptimizer`: every scale-invariant neuron turns at the
equilibrium rate from the first step with its norm fixed, everything else as WD on.

Checks, stated before the runs; both are reported beside C1's verdict and do not vote in it (they
are not the paper's claim):

* **equilibrium** — the measured / predicted rotation of WD on (L2 batch norm, and L1 batch norm),
  averaged over the layers of a seed, matches 1: the 95 % t interval across seeds of (ratio − 1)
  inside ±20 %.
* **rotational** — WD on with the rotational wrapper is as good as WD on: non-inferiority of
  the paired per-seed test accuracy with the report's accuracy margin.

Cost at the embedded scale: one more C1 run per seed (the rotational arm) and half of one (the
L1 arm, to the first milestone); measuring the rotation every step adds well under a second per
run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..plots import save_figure
from .stats import mean_interval
from .verdicts import (
    ACC_MARGIN,
    INCONCLUSIVE,
    NOT_SUPPORTED,
    ONE_SEED,
    SUPPORTED,
    Check,
    non_inferior,
)

__all__ = ["RATIO_MARGIN", "ROTATIONAL", "L1_RUN", "l1_settings", "EquilibriumWindow", "window_for", "equilibrium_check",
           "rotational_check", "plot_ratios", "summary_text"]

#: The run that wraps WD on's optimizer in RotationalOptimizer.
ROTATIONAL = "wd_on_rotational"
#: WD on with L1 batch norm, trained to the end of the equilibrium window only.
L1_RUN = "wd_on_l1"
#: |measured / predicted − 1| allowed for the equilibrium rotation (stated before the runs).
RATIO_MARGIN = 0.2
#: The window starts this many time constants into the run.
SETTLE_TAUS = 3.0


class EquilibriumWindow:
    """Per layer, sums of the measured per-step rotation (``step_angle``) and of the predicted
    one (``eq_angle``) over the steps ``start <= step < stop`` of NormTracker records."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)
        self.measured: dict[str, float] = {}
        self.predicted: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, step: int, record: Mapping[str, Any] | None) -> None:
        if record is None or not self.start <= step < self.stop:
            return
        for name, e in record["layers"].items():
            if "step_angle" in e and "eq_angle" in e:
                self.measured[name] = self.measured.get(name, 0.0) + float(e["step_angle"])
                self.predicted[name] = self.predicted.get(name, 0.0) + float(e["eq_angle"])
                self.count[name] = self.count.get(name, 0) + 1

    def ratios(self) -> dict[str, float]:
        """Measured / predicted mean rotation per layer (empty when the window saw no step)."""
        return {n: self.measured[n] / self.predicted[n] for n in self.measured
                if self.predicted[n] > 0}


def window_for(config: Any, steps_per_epoch: int) -> tuple[int, int]:
    """``(start, stop)`` steps: from ``SETTLE_TAUS`` time constants τ = (1−α)/(ηλ) (SGD's) to the
    first LR milestone (a step schedule) or the end of training (any other schedule)."""
    lam = float(config.weight_decay)
    alpha = float(getattr(config, "momentum", 0.0) or 0.0)
    total = int(config.epochs) * steps_per_epoch
    if lam <= 0 or float(config.lr) <= 0:
        return total, total
    tau = (1 - alpha) / (float(config.lr) * lam)
    stop = total
    milestones = list(getattr(config, "lr_milestones", None) or [])
    if getattr(config, "lr_schedule", None) == "step" and milestones:
        stop = min(total, int(min(milestones)) * steps_per_epoch)
    return min(int(math.ceil(SETTLE_TAUS * tau)), stop), stop


def l1_settings(config: Any, steps_per_epoch: int) -> dict[str, Any]:
    """The TrainConfig changes of the L1 arm: L1 batch norm, trained to the window's end (a run
    too short to have a window trains to its end)."""
    start, stop = window_for(config, steps_per_epoch)
    if start >= stop:
        return {"norm": "l1"}
    return {"norm": "l1", "epochs": max(1, min(int(config.epochs),
                                               math.ceil(stop / steps_per_epoch)))}


def equilibrium_check(rows: Sequence[Mapping[str, Any]], run: str = "wd_on",
                      label: str = "WD on") -> Check:
    """Measured / predicted rotation of ``run`` matches 1 within ±:data:`RATIO_MARGIN` (95 % t
    interval over seeds of the per-seed mean over layers)."""
    name = (f"equilibrium rotation of {label}: measured / predicted √(2ηλ/(1+α)) within "
            f"±{100 * RATIO_MARGIN:g}% (beyond the paper; does not vote)")
    per_seed = [(int(r["seed"]), float(r["eq_angle_ratio"])) for r in rows
                if r.get("run") == run and r.get("eq_angle_ratio") is not None
                and math.isfinite(float(r["eq_angle_ratio"]))]
    per_seed.sort()
    # kind "relative": the report shows measured/predicted − 1 as a percentage, δ as ±20%.
    c = Check(name, run, "prediction", "eq_angle_ratio", "equivalence", RATIO_MARGIN, "relative",
              "not measured", None, seeds=[s for s, _ in per_seed],
              per_seed=[v - 1.0 for _, v in per_seed], core=False)
    if not per_seed:
        c.text = "no equilibrium window in these runs (too short, or no weight decay)"
        return c
    iv = mean_interval([v - 1.0 for _, v in per_seed])
    c.diff = iv.to_dict()
    d = {k: (None if c.diff.get(k) is None else c.diff[k] + 1.0) for k in ("mean", "lo", "hi")}
    if iv.lo is None:
        c.outcome = ONE_SEED
    elif -RATIO_MARGIN <= iv.lo and iv.hi <= RATIO_MARGIN:
        c.outcome, c.passed = SUPPORTED, True
    elif iv.lo > RATIO_MARGIN or iv.hi < -RATIO_MARGIN:
        c.outcome, c.passed = NOT_SUPPORTED, False
    else:
        c.outcome = INCONCLUSIVE
    shown = (f"{d['mean']:.3f}× [{d['lo']:.3f}, {d['hi']:.3f}]" if d.get("lo") is not None
             else f"{d['mean']:.3f}×")
    c.text = (f"measured / predicted rotation per step {shown} over {len(per_seed)} seed(s) "
              f"(mean over layers per seed); δ = ±{100 * RATIO_MARGIN:g}% → {c.outcome}")
    return c


def rotational_check(rows: Sequence[Mapping[str, Any]]) -> Check:
    """WD on with RotationalOptimizer is as good as WD on (non-inferiority, accuracy margin)."""
    return non_inferior(list(rows), ROTATIONAL, "wd_on",
                        "WD on with the rotational wrapper (equilibrium rotation from step 1, fixed "
                        "norms) is as good as WD on (beyond the paper; does not vote)",
                        metric="test_acc", margin=ACC_MARGIN, core=False)


def summary_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """One sentence on the measured / predicted rotation per layer."""
    parts = []
    for run, label in (("wd_on", "L2 BN"), (L1_RUN, "L1 BN")):
        ratios = [v for r in rows if r.get("run") == run
                  for v in (r.get("eq_angle_ratio_layers") or {}).values()]
        if ratios:
            parts.append(f"{label} {min(ratios):.3f}–{max(ratios):.3f} over {len(ratios)} "
                         f"layer-seeds (mean {sum(ratios) / len(ratios):.3f})")
    if not parts:
        return ""
    return ("Rotational equilibrium (WD on, from 3τ to the first LR milestone): measured / "
            "predicted rotation per step " + "; ".join(parts) + ".")


def plot_ratios(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """Measured / predicted rotation per layer (one point per seed), the ±margin band shaded."""
    runs = [r for r in rows if r.get("run") in ("wd_on", L1_RUN) and r.get("eq_angle_ratio_layers")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(runs[0]["eq_angle_ratio_layers"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(layers) + 2), 4))
    ax.axhspan(1 - RATIO_MARGIN, 1 + RATIO_MARGIN, color="tab:green", alpha=0.12,
               label=f"±{100 * RATIO_MARGIN:g}%")
    ax.axhline(1.0, color="k", lw=0.8)
    for r in runs:
        ys = [r["eq_angle_ratio_layers"].get(n, math.nan) for n in layers]
        is_l1 = r["run"] == L1_RUN
        ax.plot(range(len(layers)), ys, "^" if is_l1 else "o", alpha=0.7,
                label=f"{'L1' if is_l1 else 'L2'} BN, seed {r['seed']}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("measured / predicted rotation per step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
