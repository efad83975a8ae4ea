r"""The Speed section: time per training step of each norm relative to L2, from the claims' own runs.

The poster's efficiency claim: L1 and L∞ batch norm remove the squares and the square root of L2,
and batch norm can take up to a quarter of a step (Gitman & Ginsburg 2017). The independent
reproduction (seed 003) timed ResNet-56 on CIFAR-10 on a GPU at 83 min (L1), 85 min (L∞) and 93 min
(L2): ratios 0.89 and 0.91.

Here the runs are claim C2's and C3's batch-norm runs (the same 1-D ResNet-20, data order and
seeds; only the norm differs) and C2's Transformer runs, each timed by
:class:`~normmatters.experiments.claims.timing.StepTimer`: the median over epochs of the mean CPU
seconds of a training step (forward, backward, update). Per seed the ratio r_s = t_norm / t_L2;
over seeds its mean and 95 % t interval.

Verdict (stated before the runs): L1 and L∞ are *no slower* than L2 — non-inferiority of the ratio
with margin 5 % (the interval's upper end ≤ 1.05); not supported when the whole interval is above
1.05. Top(10) and layer norm are reported beside them. CPU time counts every thread of the
process, so it stays close to the work done when other processes share the machine, but cache
and memory-bandwidth contention still add noise; the runs of a pair may have run at different
moments of the same invocation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .c2 import BN_L1, BN_L2, LN_L1, LN_L2
from .c3 import BN_LINF, BN_TOP10
from .verdicts import SPEED_MARGIN, Verdict, decide, no_slower

__all__ = ["SEED003", "PAPER", "RULE", "COMPARISONS", "speed_rows", "verdict"]

#: seed 003's GPU training times of ResNet-56 on CIFAR-10, minutes.
SEED003 = {"l2": 93.0, "l1": 83.0, "linf": 85.0}

#: Rows of (setting, the paper's number, the independent reproduction's (seed 003) number).
PAPER: list[tuple[str, str, str]] = [
    ("ResNet-56, CIFAR-10 training time L2 / L1 / L∞ (GPU)", "L1, L∞ cheaper than L2 (no timing given)",
     "93 / 83 / 85 min (L1 0.89×, L∞ 0.91× of L2)"),
    ("share of batch norm in a training step (Gitman & Ginsburg 2017)", "up to 25%", "—"),
]

#: (run, its L2 reference, label, seed 003's ratio or None, whether it votes)
COMPARISONS: list[tuple[str, str, str, float | None, bool]] = [
    (BN_L1, BN_L2, "L1 batch norm / L2 (ResNet)", SEED003["l1"] / SEED003["l2"], True),
    (BN_LINF, BN_L2, "L∞ batch norm / L2 (ResNet)", SEED003["linf"] / SEED003["l2"], True),
    (BN_TOP10, BN_L2, "Top(10) batch norm / L2 (ResNet)", None, False),
    (LN_L1, LN_L2, "L1 layer norm / L2 (Transformer LM)", None, False),
]

RULE = (f"L1 and L∞ batch norm are no slower than L2: per seed the ratio of CPU seconds per training step "
        f"(same network, data order and seed), over seeds its mean and 95% t interval; supported when the "
        f"interval's upper end is ≤ {1 + SPEED_MARGIN:g} (margin {100 * SPEED_MARGIN:g}%), not supported when the "
        "whole interval is above it. Top(10) and layer norm are reported, not voted.")


def speed_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The timed rows of claims C2 and C3, one per (run, seed) (C3's copy of the shared L2 run dropped)."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set()
    for cid in ("C2", "C3"):
        res = results.get(cid) or {}
        if res.get("status") != "ok":
            continue
        for r in res.get("rows", []):
            key = (str(r.get("run")), int(r.get("seed", 0)))
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def verdict(results: Mapping[str, Mapping[str, Any]]) -> Verdict | None:
    """The Speed verdict from the claims' results; ``None`` when neither C2 nor C3 ran."""
    rows = speed_rows(results)
    if not rows:
        return None
    checks = [no_slower(rows, a, b, label, core=core) for a, b, label, _, core in COMPARISONS]
    return decide(checks, RULE)
