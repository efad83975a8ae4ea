r"""The report of ``normmatters reproduce``: one table per claim beside the paper's numbers, a verdict
per claim computed from the measured numbers, figures, configs, versions, hardware and wall times.

Inputs are the dicts the claim modules return (``{"claim", "rows", "figures", "notes"}``, see
:mod:`normmatters.experiments.claims`) wrapped by the reproduce command with its status and wall
time; outputs are ``REPORT.md`` (for people) and ``results.json`` (for programs) in the report
folder.

Verdicts (never written by hand: each is a function of the measured rows). Runs are compared on
their primary metric: final test accuracy for classifiers (higher is better), test bits per
character for language models (lower is better). Over several seeds a run's number is the mean
over seeds and s its sample standard deviation. Two runs *match* when

* accuracy: \|a − b\| ≤ tol, tol = max(1 percentage point, 2·max(s_a, s_b));
* bits per character: \|a − b\| ≤ tol, tol = max(2 % of the reference, 2·max(s_a, s_b)).

A run *fails* when its number is not finite (the training diverged) or it is worse than its
reference by more than tol. A claim is ``supported`` when all of its core checks pass,
``partly supported`` when some do, ``not supported`` when none do, and ``inconclusive`` when a
check lacks its runs. Secondary findings (e.g. what removing C_L1 does) are reported beside the
verdict but do not decide it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import platform
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, atomic_write_text

__all__ = [
    "ACC_TOL",
    "BPC_REL_TOL",
    "PAPER",
    "Agg",
    "Check",
    "Verdict",
    "aggregate",
    "primary_metric",
    "match_check",
    "fail_check",
    "not_worse_check",
    "decide",
    "verdict_for",
    "environment",
    "write_report",
    "render_report",
]

log = logging.getLogger(__name__)

#: Base tolerance of an accuracy comparison: 1 percentage point (accuracies are fractions).
ACC_TOL = 0.01
#: Base tolerance of a bits-per-character comparison: 2 % of the reference run's value.
BPC_REL_TOL = 0.02

# ---------------------------------------------------------------------------------------------
# The paper's and the reproduction's numbers (SPEC §1)
# ---------------------------------------------------------------------------------------------
#: claim -> rows of (setting, paper's number, independent reproduction's (seed 003) number).
PAPER: dict[str, list[tuple[str, str, str]]] = {
    "C1": [
        ("CIFAR-10 (VGG11 / ResNet): WD on vs WD off + per-channel LR correction",
         "corrected run matches WD on (curves)", "corrected run diverged (NaN) in their code"),
        ("CIFAR-10: norm scheduling instead of LR scheduling", "matches WD on with LR schedule (curves)",
         "WD on ≈ norm schedule"),
    ],
    "C2": [
        ("ResNet-56, CIFAR-10: L2 BN / L1 BN (top-1 %)", "93.03 / 93.07", "92.40 / 92.05"),
        ("ResNet-18, ImageNet: L2 BN / L1 BN (top-1 %)", "69.8 / 69.74", "—"),
        ("ResNet-50, ImageNet: L2 BN / L1 BN (top-1 %)", "75.3 / 75.32", "—"),
        ("Transformer, WMT14: L2 LN / L1 LN (perplexity)", "5.1 / 5.2", "—"),
        ("ResNet-56, CIFAR-10: L1 BN without C_L1", "—", "higher error than with C_L1"),
    ],
    "C3": [
        ("ResNet-56, CIFAR-10: L2 / L∞ BN (top-1 %)", "—", "92.40 / 91.91"),
        ("ResNet-18/50, ImageNet: L∞ BN", "slightly lower than L2 (curves)", "—"),
        ("ImageNet: Top(10) BN", "close to L2 (curves)", "—"),
        ("ResNet-56 training time L2 / L1 / L∞ (GPU)", "—", "93 / 83 / 85 min"),
    ],
    "C4": [
        ("ResNet-18, ImageNet: L2 BN in fp16", "diverges", "—"),
        ("ResNet-18, ImageNet: L1 BN in fp16", "matches fp32", "—"),
        ("ResNet-18, ImageNet: 8-bit bottleneck ops (Banner et al.)", "trains in int8", "—"),
    ],
    "C5": [
        ("ResNet-56, CIFAR-10: BN / WN / BWN (top-1 %)", "93.03 / 92.5 / 92.88", "92.40 / — / 92.37"),
        ("ResNet-50, ImageNet: BN / WN / BWN (top-1 %)", "75.3 / 67 / 73.8", "—"),
        ("Transformer, WMT14: LN / BWN (BLEU)", "27.3 / 26.5", "—"),
        ("2-layer LSTM, WMT14: baseline / BWN (BLEU)", "21.5 / 21.2", "—"),
    ],
}


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds
# ---------------------------------------------------------------------------------------------
@dataclass
class Agg:
    """One metric of one run over its seeds.

    :ivar mean: mean over seeds (NaN if any seed is not finite).
    :ivar std: sample standard deviation (ddof = 1) of the finite values; ``None`` for one seed.
    :ivar n: number of seeds.
    :ivar values: the per-seed values.
    :ivar nonfinite: how many seeds gave a NaN or infinity.
    """

    mean: float
    std: float | None
    n: int
    values: list[float]
    nonfinite: int = 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Agg]]:
    """Group rows by ``"run"`` (first-seen order) and aggregate every numeric key but ``"seed"``.

    A ``None`` value counts as not finite (a metric that was never reached, e.g. a diverged run).
    """
    grouped: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        name = str(r.get("run", "?"))
        g = grouped.setdefault(name, {})
        for k, v in r.items():
            if k in ("seed", "run"):
                continue
            if _is_number(v):
                g.setdefault(k, []).append(float(v))
            elif v is None and k in g:
                g[k].append(float("nan"))
            elif v is None and (k.startswith(("test_", "best_", "final_"))):
                g.setdefault(k, []).append(float("nan"))
    out: dict[str, dict[str, Agg]] = {}
    for name, metrics in grouped.items():
        out[name] = {}
        for k, vals in metrics.items():
            finite = [v for v in vals if math.isfinite(v)]
            bad = len(vals) - len(finite)
            mean = sum(vals) / len(vals) if vals and not bad else float("nan")
            std = None
            if len(finite) > 1:
                m = sum(finite) / len(finite)
                std = math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1))
            out[name][k] = Agg(mean, std, len(vals), vals, bad)
    return out


def primary_metric(metrics: dict[str, Agg]) -> tuple[str | None, bool]:
    """The metric runs are judged on, and whether higher is better.

    Language-model runs (those reporting ``test_bpc``) are judged on test bits per character;
    classifiers on the final test accuracy (``test_acc``, else ``final_test_acc``, else
    ``best_test_acc``).
    """
    for key, higher in (("test_bpc", False), ("final_test_bpc", False), ("test_acc", True),
                        ("final_test_acc", True), ("best_test_acc", True)):
        if key in metrics:
            return key, higher
    return None, True


# ---------------------------------------------------------------------------------------------
# Checks and verdicts
# ---------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One comparison of two runs.

    :ivar name: what is checked, in words.
    :ivar a, b: the run and its reference.
    :ivar metric: the compared metric.
    :ivar diff: a − b (NaN when either is not finite, ``None`` when a run is missing).
    :ivar tol: the tolerance used.
    :ivar passed: ``True``/``False``, or ``None`` when it could not be checked.
    :ivar text: the evidence in a sentence.
    :ivar core: whether it decides the verdict.
    """

    name: str
    a: str
    b: str
    metric: str | None
    diff: float | None
    tol: float | None
    passed: bool | None
    text: str
    core: bool = True


@dataclass
class Verdict:
    """A claim's verdict: ``supported``, ``partly supported``, ``not supported``, ``inconclusive``
    or ``not run``, the rule that produced it and the checks behind it."""

    verdict: str
    rule: str
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "rule": self.rule, "checks": [asdict(c) for c in self.checks]}


def _fmt(metric: str | None, v: float | None, *, signed: bool = False, delta: bool = False) -> str:
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("+inf" if v > 0 else "-inf")
    sign = "+" if signed else ""
    m = metric or ""
    if m.endswith("acc"):
        return f"{100 * v:{sign}.2f}" + (" pt" if (signed or delta) else "%")
    if "bpc" in m or "ppl" in m or "loss" in m:
        return f"{v:{sign}.4f}"
    if "time" in m:
        return f"{v:{sign}.1f} s"
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):{sign}d}"
    return f"{v:{sign}.4g}"


def _tolerance(metric: str, ref: Agg, other: Agg, factor: float = 1.0) -> float:
    if "bpc" in metric or "ppl" in metric or "loss" in metric:
        base = BPC_REL_TOL * abs(ref.mean) if math.isfinite(ref.mean) else BPC_REL_TOL
    else:
        base = ACC_TOL
    spread = max(ref.std or 0.0, other.std or 0.0)
    return factor * max(base, 2.0 * spread)


def _lookup(agg: dict[str, dict[str, Agg]], a: str, b: str, metric: str | None):
    ra, rb = agg.get(a), agg.get(b)
    if ra is None or rb is None:
        missing = [x for x, r in ((a, ra), (b, rb)) if r is None]
        return None, None, None, f"run{'s' if len(missing) > 1 else ''} {', '.join(missing)} not measured"
    m = metric or primary_metric(rb)[0]
    if m is None or m not in ra or m not in rb:
        return None, None, None, f"no common metric for {a} and {b}"
    return ra[m], rb[m], m, None


def match_check(agg: dict[str, dict[str, Agg]], a: str, b: str, name: str, *, metric: str | None = None,
                factor: float = 1.0, core: bool = True) -> Check:
    """``a`` matches ``b``: \\|a − b\\| ≤ tol (see the module docstring); ``factor`` widens tol."""
    xa, xb, m, why = _lookup(agg, a, b, metric)
    if why:
        return Check(name, a, b, metric, None, None, None, why, core)
    tol = _tolerance(m, xb, xa, factor)
    diff = xa.mean - xb.mean
    if not math.isfinite(diff):
        return Check(name, a, b, m, float("nan"), tol, False,
                     f"{a}: {_fmt(m, xa.mean)} vs {b}: {_fmt(m, xb.mean)} (a run diverged)", core)
    ok = abs(diff) <= tol
    side = "" if ok else f" ({a} {'better' if _better(m, diff) > 0 else 'worse'})"
    return Check(name, a, b, m, diff, tol, ok,
                 f"{a} {_fmt(m, xa.mean)} vs {b} {_fmt(m, xb.mean)}: difference {_fmt(m, diff, signed=True)}, "
                 f"|difference| {'≤' if ok else '>'} tol {_fmt(m, tol, delta=True)}{side}", core)


def _better(m: str, diff: float) -> float:
    """``diff`` = a − b turned into "how much better a is" (positive = better)."""
    return -diff if ("bpc" in m or "ppl" in m or "loss" in m) else diff


def not_worse_check(agg: dict[str, dict[str, Agg]], a: str, b: str, name: str, *, metric: str | None = None,
                    factor: float = 1.0, core: bool = True) -> Check:
    """``a`` is not worse than ``b`` by more than tol."""
    xa, xb, m, why = _lookup(agg, a, b, metric)
    if why:
        return Check(name, a, b, metric, None, None, None, why, core)
    tol = _tolerance(m, xb, xa, factor)
    diff = xa.mean - xb.mean
    if not math.isfinite(diff):
        ok = math.isfinite(xa.mean)  # b diverged and a did not: a is not worse
        return Check(name, a, b, m, float("nan"), tol, ok,
                     f"{a}: {_fmt(m, xa.mean)} vs {b}: {_fmt(m, xb.mean)}", core)
    ok = _better(m, diff) >= -tol
    return Check(name, a, b, m, diff, tol, ok,
                 f"{a} {_fmt(m, xa.mean)} vs {b} {_fmt(m, xb.mean)}: difference {_fmt(m, diff, signed=True)} "
                 f"({'within' if ok else 'worse by more than'} tol {_fmt(m, tol, delta=True)})", core)


def fail_check(agg: dict[str, dict[str, Agg]], a: str, b: str, name: str, *, metric: str | None = None,
               factor: float = 1.0, core: bool = True) -> Check:
    """``a`` fails against ``b``: not finite, or worse than ``b`` by more than tol."""
    xa, xb, m, why = _lookup(agg, a, b, metric)
    if why:
        return Check(name, a, b, metric, None, None, None, why, core)
    tol = _tolerance(m, xb, xa, factor)
    if xa.nonfinite or not math.isfinite(xa.mean):
        return Check(name, a, b, m, float("nan"), tol, True,
                     f"{a} diverged ({xa.nonfinite}/{xa.n} seeds not finite)", core)
    diff = xa.mean - xb.mean
    failed = _better(m, diff) < -tol
    return Check(name, a, b, m, diff, tol, failed,
                 f"{a} {_fmt(m, xa.mean)} vs {b} {_fmt(m, xb.mean)}: difference {_fmt(m, diff, signed=True)} "
                 f"({'worse by more than' if failed else 'within'} tol {_fmt(m, tol, delta=True)})", core)


def decide(checks: Sequence[Check], rule: str) -> Verdict:
    """Turn checks into a verdict.

    Over the core checks that could be made: all pass → ``supported``, some → ``partly
    supported``, none → ``not supported``; none could be made → ``inconclusive``. When some core
    checks lack their runs the verdict says on how many it rests.
    """
    core = [c for c in checks if c.core]
    known = [c for c in core if c.passed is not None]
    if not known:
        return Verdict("inconclusive", rule, list(checks))
    if all(c.passed for c in known):
        v = "supported"
    elif any(c.passed for c in known):
        v = "partly supported"
    else:
        v = "not supported"
    if len(known) < len(core):
        v += f" (on {len(known)} of {len(core)} checks; the others lack their runs)"
    return Verdict(v, rule, list(checks))


def _rule_c1(agg: dict[str, dict[str, Agg]]) -> Verdict:
    checks = [
        match_check(agg, "wd_off_lr_correction", "wd_on", "WD off + per-channel LR correction matches WD on"),
        match_check(agg, "norm_schedule", "wd_on", "norm scheduling instead of LR scheduling matches WD on"),
        match_check(agg, "wd_off", "wd_on", "WD off without correction vs WD on (context)", core=False),
    ]
    rule = ("supported if both substitutes for weight decay — WD off with the per-channel LR correction, and norm "
            "scheduling instead of LR scheduling — match the WD-on run (|Δacc| ≤ max(1 pt, 2·seed std)); partly "
            "if one does. WD off without correction is reported as context, not voted.")
    return decide(checks, rule)


def _rule_c2(agg: dict[str, dict[str, Agg]]) -> Verdict:
    checks = [
        match_check(agg, "bn-l1", "bn-l2", "L1 batch norm matches L2 batch norm (ResNet)"),
        match_check(agg, "ln-l1", "ln-l2", "L1 layer norm matches L2 layer norm (Transformer)"),
        not_worse_check(agg, "bn-l1-noconst", "bn-l1", "L1 batch norm without C_L1 vs with it (ablation)",
                        core=False),
        match_check(agg, "bn-l1-noconst", "bn-l2", "L1 batch norm without C_L1 vs L2 (ablation)", core=False),
    ]
    extra = sorted(n for n in agg if n.startswith("bn-l1-") and n != "bn-l1-noconst")
    for n in extra:
        checks.append(match_check(agg, n, n.replace("-l1-", "-l2-"), f"{n} vs its L2 run", core=False))
    rule = ("supported if L1 matches L2 both as batch norm (|Δacc| ≤ max(1 pt, 2·seed std)) and as layer norm "
            "in the Transformer (|Δbpc| ≤ max(2% of L2, 2·seed std)); partly if one of them. The no-C_L1 "
            "ablation is reported, not voted.")
    return decide(checks, rule)


def _rule_c3(agg: dict[str, dict[str, Agg]]) -> Verdict:
    checks = [
        match_check(agg, "bn-top10", "bn-l2", "Top(10) batch norm (calibrated C) matches L2"),
        not_worse_check(agg, "bn-linf", "bn-l2", "L∞ batch norm (calibrated C) nearly as accurate as L2 "
                        "(within 2×tol)", factor=2.0),
        match_check(agg, "bn-linf-paper", "bn-linf", "L∞: the paper's constant vs calibrated", core=False),
        match_check(agg, "bn-top10-paper", "bn-top10", "Top(10): the paper's constant vs calibrated", core=False),
        match_check(agg, "bn-linf-paper", "bn-l2", "L∞ with the paper's constant vs L2", core=False),
    ]
    rule = ("supported if Top(10) matches L2 (|Δacc| ≤ tol = max(1 pt, 2·seed std)) and L∞ is nearly as "
            "accurate (acc_L∞ ≥ acc_L2 − 2·tol), both with the calibrated constants; partly if one of them. "
            "The paper-constant runs are reported beside them, not voted.")
    return decide(checks, rule)


def _rule_c4(agg: dict[str, dict[str, Agg]]) -> Verdict:
    checks: list[Check] = [
        match_check(agg, "fp16-l1", "fp32-l1", "L1 batch norm in fp16 matches fp32"),
        fail_check(agg, "fp16-l2", "fp32-l2", "L2 batch norm in fp16 fails (diverges or loses more than tol)"),
    ]
    int8 = [n for n in agg if n.lower().startswith("int8")]

    def score(n: str) -> float:
        m = primary_metric(agg[n])[0]
        v = agg[n][m].mean if m else float("nan")
        return v if math.isfinite(v) else -math.inf

    if int8:
        best = max(int8, key=score)
        checks.append(not_worse_check(agg, best, "fp32-l2", f"the network trains in int8 (best int8 run, {best}, "
                                      "within 2×tol of fp32 L2)", factor=2.0))
    else:
        checks.append(Check("the network trains in int8", "int8-*", "fp32-l2", None, None, None, None,
                            "no int8 run was measured"))
    # every other format, reported beside the voted fp16 pair
    for n in agg:
        low = n.lower()
        if low.startswith(("fp32", "int8")) or low in ("fp16-l1", "fp16-l2"):
            continue
        ref = "fp32-l1" if low.endswith("-l1") else "fp32-l2"
        if low.endswith("-l2"):
            checks.append(fail_check(agg, n, ref, f"{n} fails", core=False))
        else:
            checks.append(match_check(agg, n, ref, f"{n} matches {ref}", core=False))
    rule = ("supported if, with the batch norm's arithmetic in fp16, L1 batch norm matches its fp32 run "
            "(|Δacc| ≤ max(1 pt, 2·seed std)) while L2 batch norm fails (not finite, or worse than fp32 by more "
            "than that), and the best int8 run is within 2×tol of fp32; partly if some of these hold. Other "
            "formats (fp16 sums, fp8) are reported, not voted.")
    return decide(checks, rule)


def _rule_c5(agg: dict[str, dict[str, Agg]]) -> Verdict:
    checks: list[Check] = [
        match_check(agg, "cnn-bwn", "cnn-bn", "CNN: BWN matches batch norm"),
        match_check(agg, "lstm-bwn", "lstm-plain", "LSTM LM: BWN matches the unnormalized LSTM"),
    ]
    for model, ref in (("cnn", "cnn-bn"), ("lstm", "lstm-plain")):
        for other in (f"{model}-bounded-bwn", f"{model}-wn"):
            if other in agg:
                checks.append(match_check(agg, other, ref, f"{other} vs {ref}", core=False))
        if f"{model}-wn" in agg:
            checks.append(not_worse_check(agg, f"{model}-bwn", f"{model}-wn", f"{model}: BWN not worse than WN",
                                          core=False))
    rule = ("supported if BWN (ρ fixed, SPEC §3) matches its baseline in both models: batch norm in the CNN "
            "(|Δacc| ≤ max(1 pt, 2·seed std)) and the plain LSTM in the language model (|Δbpc| ≤ max(2% of the "
            "baseline, 2·seed std)); partly if in one. WN and the official code's bounded-gain BWN are reported "
            "beside them, not voted.")
    return decide(checks, rule)


_RULES: dict[str, Callable[[dict[str, dict[str, Agg]]], Verdict]] = {
    "C1": _rule_c1, "C2": _rule_c2, "C3": _rule_c3, "C4": _rule_c4, "C5": _rule_c5,
}


def verdict_for(claim_id: str, result: dict[str, Any]) -> Verdict:
    """The verdict of one claim from its result (``status`` ``"ok"`` and ``rows``), by its rule."""
    if result.get("status") != "ok":
        return Verdict(f"not run: {result.get('error', 'unknown error')}", "the claim did not run")
    rule = _RULES.get(claim_id)
    agg = aggregate(result.get("rows", []))
    if rule is None:
        return Verdict("inconclusive", f"no verdict rule for {claim_id}")
    return rule(agg)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # not installed, or no metadata
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """Versions and hardware of this process: python, torch, numpy, normmatters, CPU, cores, GPU."""
    import numpy
    import torch

    import normmatters

    gpu = None
    if torch.cuda.is_available():
        gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "normmatters": getattr(normmatters, "__version__", _version("normmatters") or "unknown"),
        "matplotlib": _version("matplotlib"),
        "scikit-learn": _version("scikit-learn"),
        "mnist1d": _version("mnist1d"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.version.cuda,
        "gpu": gpu,
    }


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
_COLUMN_ORDER = ("test_acc", "best_test_acc", "test_bpc", "test_ppl", "test_loss", "final_train_loss",
                 "nonfinite", "time_per_epoch", "wall_time")


def _cell(metric: str, a: Agg) -> str:
    s = _fmt(metric, a.mean)
    if a.nonfinite and a.n > 1:
        s += f" ({a.nonfinite}/{a.n} not finite)"
    if a.std is not None:
        s += f" ± {_fmt(metric, a.std).rstrip('%').replace(' s', '')}"
    return s


def _header(metric: str) -> str:
    names = {"test_acc": "test acc (%)", "best_test_acc": "best test acc (%)", "test_bpc": "test bits/char",
             "test_ppl": "test ppl", "test_loss": "test loss", "final_train_loss": "train loss",
             "nonfinite": "non-finite", "time_per_epoch": "s/epoch", "wall_time": "wall (s)"}
    if metric in names:
        return names[metric]
    return metric.replace("_", " ") + (" (%)" if metric.endswith("acc") else "")


def measured_table(agg: dict[str, dict[str, Agg]], max_columns: int = 8) -> str:
    """A markdown table: one line per run, mean ± std over seeds of its numeric metrics."""
    if not agg:
        return "(no runs)"
    keys: list[str] = []
    for metrics in agg.values():
        for k in metrics:
            if k not in keys:
                keys.append(k)
    ordered = [k for k in _COLUMN_ORDER if k in keys] + [k for k in keys if k not in _COLUMN_ORDER]
    cols = ordered[:max_columns]
    lines = ["| run | seeds | " + " | ".join(_header(k) for k in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, metrics in agg.items():
        n = max((a.n for a in metrics.values()), default=0)
        cells = []
        for k in cols:
            a = metrics.get(k)
            if a is None:
                cells.append("—")
            elif "time" in k:
                cells.append(f"{a.mean:.1f}" + (f" ± {a.std:.1f}" if a.std is not None else ""))
            else:
                cells.append(_cell(k, a).replace("%", ""))
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary_figure(claim_id: str, agg: dict[str, dict[str, Agg]], path: Path) -> Path | None:
    """A bar chart of every run's primary metric (mean over seeds, error bar = std)."""
    series: dict[str, list[tuple[str, Agg]]] = {}
    for name, metrics in agg.items():
        m, _ = primary_metric(metrics)
        if m is not None:
            series.setdefault(m, []).append((name, metrics[m]))
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(series), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, (m, items) in enumerate(series.items()):
        ax = fig.add_subplot(1, len(series), i + 1)
        scale = 100.0 if m.endswith("acc") else 1.0
        vals = [a.mean * scale if math.isfinite(a.mean) else 0.0 for _, a in items]
        errs = [(a.std or 0.0) * scale for _, a in items]
        ax.bar(range(len(items)), vals, yerr=errs, capsize=3,
               color=["tab:red" if not math.isfinite(a.mean) else "tab:blue" for _, a in items])
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([n for n, _ in items], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(_header(m))
        finite = [v for v, (_, a) in zip(vals, items) if math.isfinite(a.mean)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(0.5, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - 4 * pad) if m.endswith("acc") else 0.0, hi + pad)
        ax.set_title(f"{claim_id}: {_header(m)}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _rel_figure(fig: str, claim_dir: Path, root: Path) -> str | None:
    """A figure path relative to the report folder, wherever the claim module said it is."""
    p = Path(fig)
    candidates = [p] if p.is_absolute() else [claim_dir / p, root / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            try:
                return os.path.relpath(c.resolve(), root.resolve())
            except ValueError:  # another drive (Windows)
                return str(c.resolve())
    return None


def _configs(root: Path) -> list[dict[str, Any]]:
    """Every run folder under the report folder: its config.toml and a few key fields."""
    out = []
    for cfg in sorted(root.rglob("config.toml")):
        try:
            d = tomllib.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(d.get("train"), dict):
            d = d["train"]
        summary = cfg.parent / "summary.json"
        wall = None
        if summary.is_file():
            try:
                wall = json.loads(summary.read_text(encoding="utf-8")).get("wall_time")
            except (OSError, ValueError):
                pass
        out.append({"path": os.path.relpath(cfg, root), "config": d, "finished": summary.is_file(), "wall_time": wall})
    return out


def _config_line(c: dict[str, Any]) -> str:
    d = c["config"]
    kw = d.get("norm_kwargs") or {}
    norm = d.get("norm", "?") + (f" {kw}" if kw else "")
    wall = f"{c['wall_time']:.1f}" if isinstance(c.get("wall_time"), (int, float)) else "—"
    return (f"| [{c['path']}]({c['path']}) | {d.get('model', '?')} | {d.get('dataset', '?')} | {norm} | "
            f"{d.get('epochs', '?')} | {d.get('batch_size', '?')} | {d.get('optimizer', '?')} {d.get('lr', '?')} "
            f"({d.get('lr_schedule', '?')}) | {d.get('weight_decay', '?')} | {d.get('seed', '?')} | "
            f"{'yes' if c['finished'] else 'no'} | {wall} |")


def _fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    return f"{s:.0f} s ({s / 60:.1f} min)" if s >= 60 else f"{s:.1f} s"


def render_report(results: dict[str, dict[str, Any]], meta: dict[str, Any], root: Path,
                  verdicts: dict[str, Verdict], figures: dict[str, list[str]],
                  configs: list[dict[str, Any]]) -> str:
    """The text of REPORT.md."""
    from . import CLAIMS

    scale = meta.get("scale", "embedded")
    L: list[str] = []
    L.append(f"# Norm matters — reproduction report ({scale} scale)")
    L.append("")
    L.append(f"Command: `{meta.get('command', 'normmatters reproduce')}`  ")
    jobs = meta.get("jobs", 1)
    L.append(f"Finished: {meta.get('finished', '—')}; seeds: {', '.join(map(str, meta.get('seeds', [])))}; "
             f"{jobs} claim{'s' if jobs != 1 else ''} at a time"
             + (f" ({meta['threads_per_job']} torch thread(s) each)" if meta.get("threads_per_job") else "")
             + "; total wall time "
             f"{_fmt_seconds(meta.get('wall_time'))} in this invocation; the claims' own wall times add up to "
             f"{_fmt_seconds(meta.get('claim_wall_time_total'))} (a reused claim counts the time it took when it "
             "ran; with several claims at a time they overlap).")
    L.append("")
    L.append("Paper: Hoffer, Banner, Golan, Soudry, *Norm matters: efficient and accurate normalization schemes "
             "in deep networks*, NeurIPS 2018 (arXiv 1803.01814). Independent reproduction: seed 003 (UVA CS 6316, "
             "2019), ResNet-56 on CIFAR-10.")
    if scale == "embedded":
        L.append("")
        L.append("The embedded scale trains small networks on real data that needs no network access (MNIST-1D, "
                 "scikit-learn's digits, CPython's pydoc text). Its numbers test whether each claim's effect "
                 "shows at this scale; they are not the paper's numbers and are not expected to equal them.")
    L.append("")
    L.append("## Summary")
    L.append("")
    L.append("| claim | verdict | wall time | CPU time | runs |")
    L.append("|---|---|---|---|---|")
    for cid, res in results.items():
        v = verdicts[cid].verdict
        reused = " (reused)" if res.get("reused") else ""
        nruns = len({r.get("run") for r in res.get("rows", [])}) if res.get("status") == "ok" else 0
        L.append(f"| [{cid}](#{cid.lower()}) | {v.splitlines()[0]} | {_fmt_seconds(res.get('wall_time'))}{reused} | "
                 f"{_fmt_seconds(res.get('cpu_time'))} | {nruns} |")
    L.append("")
    L.append("Verdict rule (the same for every claim, details per claim): runs are compared on final test "
             f"accuracy (classifiers) or test bits per character (language models). Two runs match when the "
             f"difference is within tol = max({100 * ACC_TOL:g} percentage point, 2 × seed std) for accuracy, "
             f"or max({100 * BPC_REL_TOL:g}% of the reference, 2 × seed std) for bits per character. With one "
             "seed the spread is unknown and only the base tolerance applies. CPU time is the process's CPU "
             "seconds over all its threads: on a machine shared with other work it stays near what the claim "
             "costs, while the wall time grows.")

    for cid, res in results.items():
        info = CLAIMS.get(cid)
        v = verdicts[cid]
        L.append("")
        L.append(f"## {cid}")
        L.append("")
        if info:
            L.append(f"**Claim.** {info.title}")
            L.append("")
            L.append(f"**Runs ({scale} scale).** {info.embedded if scale == 'embedded' else info.paper}")
            L.append("")
        L.append("**The paper and the reproduction (seed 003).**")
        L.append("")
        L.append("| setting | paper | seed 003 |")
        L.append("|---|---|---|")
        for setting, paper, seed in PAPER.get(cid, []):
            L.append(f"| {setting} | {paper} | {seed} |")
        L.append("")
        if res.get("status") != "ok":
            L.append(f"**Not run:** {res.get('error', 'unknown error')}")
            if res.get("missing_data"):
                L.append("")
                for d in res["missing_data"]:
                    L.append(f"- {d['name']}: {d['detail']} at `{d['path']}` — {d['how']}")
            L.append("")
            L.append(f"Wall time: {_fmt_seconds(res.get('wall_time'))}.")
            continue
        agg = aggregate(res.get("rows", []))
        L.append(f"**Measured** ({len(res.get('seeds', []) or [0])} seed(s); mean ± sample std over seeds):")
        L.append("")
        L.append(measured_table(agg))
        L.append("")
        L.append(f"**Verdict: {v.verdict}.** Rule: {v.rule}")
        L.append("")
        for c in v.checks:
            mark = {True: "✓", False: "✗", None: "?"}[c.passed]
            tag = "" if c.core else " *(not voted)*"
            L.append(f"- {mark} {c.name}{tag}: {c.text}")
        if res.get("notes"):
            L.append("")
            L.append(f"**Notes.** {res['notes']}")
        figs = figures.get(cid, [])
        if figs:
            L.append("")
            L.append("**Figures.**")
            L.append("")
            for f in figs:
                L.append(f"![{cid} {Path(f).stem}]({f})")
        L.append("")
        L.append(f"Wall time: {_fmt_seconds(res.get('wall_time'))}"
                 + (" (reused from an earlier invocation)." if res.get("reused") else "."))

    if meta.get("paper_data"):
        L.append("")
        L.append("## Paper-scale data")
        L.append("")
        L.append("| dataset | present | where | what to do |")
        L.append("|---|---|---|---|")
        for d in meta["paper_data"].values():
            L.append(f"| {d['name']} | {'yes' if d['present'] else 'no: ' + d['detail']} | `{d['path']}` | "
                     f"{'—' if d['present'] else d['how']} |")

    env = meta.get("environment", {})
    L.append("")
    L.append("## Environment")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, val in env.items():
        if isinstance(val, list):
            val = ", ".join(map(str, val))
        L.append(f"| {k} | {'—' if val is None else val} |")

    L.append("")
    L.append("## Resolved configurations")
    L.append("")
    if configs:
        L.append("Every run folder under this report, with its `config.toml` (the complete resolved "
                 "configuration; `normmatters train --config PATH` reruns it).")
        L.append("")
        L.append("| config | model | dataset | norm | epochs | batch | optimizer, lr (schedule) | weight decay | seed "
                 "| finished | wall (s) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        L.extend(_config_line(c) for c in configs)
    else:
        L.append("(no run folders with a config.toml)")
    L.append("")
    L.append("Machine-readable results: [results.json](results.json).")
    return "\n".join(L) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, float):
        return x
    if isinstance(x, Path):
        return str(x)
    return str(x)


def write_report(out_dir: str | os.PathLike, results: dict[str, dict[str, Any]],
                 meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``REPORT.md``, ``results.json`` and the summary figures into ``out_dir``.

    :param results: claim id → the claim's result (``status`` ``"ok"`` with ``rows``, ``figures``,
        ``notes``; or ``status`` ``"error"`` with ``error``), plus ``wall_time``, ``seeds``,
        ``reused`` and ``dir`` (the claim's folder) as the reproduce command sets them.
    :param meta: ``scale``, ``seeds``, ``command``, ``wall_time``, ``environment``, and
        ``paper_data`` at the paper scale.
    :returns: the paths of REPORT.md and results.json.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("finished", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    meta.setdefault("environment", environment())
    verdicts = {cid: verdict_for(cid, res) for cid, res in results.items()}
    figures: dict[str, list[str]] = {}
    for cid, res in results.items():
        if res.get("status") != "ok":
            continue
        claim_dir = root / str(res.get("dir") or cid.lower())
        figs = []
        try:
            p = _summary_figure(cid, aggregate(res.get("rows", [])), root / "figures" / f"{cid.lower()}_summary.png")
            if p is not None:
                figs.append(os.path.relpath(p, root))
        except Exception as exc:  # a plotting problem must not cost the report
            log.warning("%s: summary figure failed: %s", cid, exc)
        for f in res.get("figures", []) or []:
            rel = _rel_figure(str(f), claim_dir, root)
            if rel is not None and rel not in figs:
                figs.append(rel)
        figures[cid] = figs
    configs = _configs(root)
    text = render_report(results, meta, root, verdicts, figures, configs)
    report = atomic_write_text(root / "REPORT.md", text)
    payload = {
        "meta": meta,
        "tolerances": {"accuracy_points": ACC_TOL, "bpc_relative": BPC_REL_TOL, "spread_factor": 2.0},
        "claims": {
            cid: {
                **{k: v for k, v in res.items() if k != "table"},
                "verdict": verdicts[cid].to_dict(),
                "aggregate": {run: {k: asdict(a) for k, a in m.items()}
                              for run, m in aggregate(res.get("rows", [])).items()} if res.get("status") == "ok" else {},
                "report_figures": figures.get(cid, []),
                "paper": [{"setting": s, "paper": p, "seed003": r} for s, p, r in PAPER.get(cid, [])],
            }
            for cid, res in results.items()
        },
        "configs": [{"path": c["path"], "finished": c["finished"], "config": c["config"]} for c in configs],
    }
    js = atomic_write_text(root / "results.json", json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")
    return report, js
