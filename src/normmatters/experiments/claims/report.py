r"""The report of ``normmatters reproduce``: REPORT.md for people and results.json for programs.

This module only renders. Each claim module owns its runs, its paper rows (``PAPER``) and its
verdict rule (``verdict(rows)``, see :mod:`~normmatters.experiments.claims.verdicts`); the Speed
section's rule is :mod:`~normmatters.experiments.claims.speed`'s; the environment comes from
:mod:`~normmatters.experiments.claims.env`. Inputs are the dicts the claim modules return
(``{"claim", "rows", "figures", "notes"}``) wrapped by the reproduce command with its status and
wall time.

REPORT.md: a summary table (one line per voting check: the verdict, the mean paired difference
with its 95 % interval, and the margin δ), then per claim the paper's and seed 003's numbers, the
measured table (mean ± sample std over seeds), the verdict with its rule and every check, notes and
figures; the Speed section; paper-scale data; environment; the resolved configuration of every run.
results.json carries the same, every check with its interval, margin and rule.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import tomllib  # the standard library's, or the tomli backport on Python 3.10
from ..io import atomic_write_bytes, atomic_write_text
from . import CLAIMS, claim_module, verdict_for
from . import speed as speed_mod
from .env import environment
from .stats import Agg, aggregate
from .verdicts import ACC_MARGIN, BPC_MARGIN, SPEED_MARGIN, Check, Verdict, fmt_interval, fmt_margin, fmt_power

__all__ = [
    "primary_metric",
    "measured_table",
    "summary_table",
    "speed_section",
    "paper_rows",
    "render_report",
    "write_report",
]

log = logging.getLogger(__name__)


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


def paper_rows(claim_id: str) -> list[tuple[str, str, str]]:
    """The claim module's rows of (setting, paper, seed 003); none if the module does not import."""
    try:
        return list(getattr(claim_module(claim_id), "PAPER", []))
    except Exception as exc:  # a broken claim module is that claim's error, not the report's
        log.warning("%s: no paper rows (%s)", claim_id, exc)
        return []


def _check_cells(c: Check) -> tuple[str, str, str]:
    """(difference with its interval, δ, outcome) of a check, for the tables."""
    if c.outcome == "not measured":
        return "—", fmt_margin(c.kind, c.metric, c.margin), c.outcome
    margin = fmt_margin(c.kind, c.metric, c.margin)
    if c.rule == "equivalence":
        margin = "±" + margin
    if c.kind == "ratio" and c.margin is not None:
        margin += f" (ratio ≤ {1 + c.margin:g})"
    diff = fmt_interval(c)
    if c.nonfinite:
        diff += f"; non-finite in {c.nonfinite}/{c.n} seeds"
    return diff, margin, c.outcome


def summary_table(results: dict[str, dict[str, Any]], verdicts: dict[str, Verdict],
                  speed: Verdict | None = None) -> str:
    """One line per voting check: claim, verdict, check, paired difference [95% interval], its half-width and
    minimum detectable difference, δ, outcome."""
    lines = ["| claim | verdict | check (voting) | mean paired difference [95% CI] | half-width / MDD | δ | outcome "
             "| wall time |",
             "|---|---|---|---|---|---|---|---|"]
    sections = [(cid, verdicts[cid], results[cid]) for cid in results]
    if speed is not None:
        sections.append(("Speed", speed, None))
    for cid, v, res in sections:
        anchor = f"[{cid}](#{cid.lower()})"
        wall = ""
        if res is not None:
            wall = _fmt_seconds(res.get("wall_time")) + (" (reused)" if res.get("reused") else "")
        core = v.core
        if not core:
            lines.append(f"| {anchor} | {v.verdict} | — | — | — | — | — | {wall} |")
            continue
        for i, c in enumerate(core):
            diff, margin, outcome = _check_cells(c)
            head = f"{anchor} | **{v.verdict}**" if i == 0 else " | "
            lines.append(f"| {head} | {c.name} | {diff} | {fmt_power(c)} | {margin} | {outcome} | "
                         f"{wall if i == 0 else ''} |")
    return "\n".join(lines)


def _checks_table(v: Verdict) -> str:
    lines = ["| check | runs (a vs b) | rule | mean paired difference [95% CI] | seeds | half-width / MDD | δ | "
             "outcome | votes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in v.checks:
        diff, margin, outcome = _check_cells(c)
        lines.append(f"| {c.name} | {c.a} vs {c.b} | {c.rule} | {diff} | {c.n} | {fmt_power(c)} | {margin} | "
                     f"{outcome} | {'yes' if c.core else 'no'} |")
    return "\n".join(lines)


def speed_section(results: dict[str, dict[str, Any]], v: Verdict | None) -> list[str]:
    """The lines of the Speed section."""
    L = ["## Speed", ""]
    L.append("**Claim.** L1 and L∞ batch norm remove the squares and the square root of L2; the independent "
             "reproduction (seed 003) trained ResNet-56 on CIFAR-10 on a GPU in 83 min (L1), 85 min (L∞) and 93 min "
             "(L2).")
    L.append("")
    L.append("| setting | paper | seed 003 |")
    L.append("|---|---|---|")
    for s, p, r in speed_mod.PAPER:
        L.append(f"| {s} | {p} | {r} |")
    L.append("")
    if v is None:
        L.append("Not measured: claims C2 and C3 (whose runs are timed) did not run.")
        return L
    rows = speed_mod.speed_rows(results)
    L.append("**Measured** (this machine's CPU, from the claims' own runs: per run the median over epochs of "
             "the mean CPU seconds per training step; per seed the ratio to L2 of the same seed):")
    L.append("")
    L.append("| comparison | ms/step (CPU), norm vs L2 | ratio per seed | mean ratio [95% CI] | wall-clock ratio | "
             "seed 003 (GPU) | outcome |")
    L.append("|---|---|---|---|---|---|---|")
    by = {(c.a, c.b): c for c in v.checks}
    agg = aggregate(rows)
    for a, b, label, ref, _ in speed_mod.COMPARISONS:
        c = by.get((a, b))
        if c is None:
            continue
        ta = agg.get(a, {}).get("step_cpu_time")
        tb = agg.get(b, {}).get("step_cpu_time")
        ms = (f"{1e3 * ta.mean:.1f} vs {1e3 * tb.mean:.1f}" if ta and tb and math.isfinite(ta.mean)
              and math.isfinite(tb.mean) else "—")
        per_seed = ", ".join(f"{r:.3f}" for r in c.per_seed) or "—"
        wa, wb = agg.get(a, {}).get("step_time"), agg.get(b, {}).get("step_time")
        wall = f"{wa.mean / wb.mean:.3f}" if wa and wb and wb.mean and math.isfinite(wa.mean / wb.mean) else "—"
        diff, _, outcome = _check_cells(c)
        L.append(f"| {label} | {ms} | {per_seed} | {diff} | {wall} | {'—' if ref is None else f'{ref:.2f}'} | "
                 f"{outcome}{'' if c.core else ' (not voted)'} |")
    L.append("")
    L.append(f"**Verdict: {v.verdict}.** Rule: {v.rule}")
    L.append("")
    L.append("The embedded networks are small (a 1-D ResNet-20 on sequences of 40, batches of 128) and run on a "
             "CPU, where a norm layer is a small share of a step and host overhead weighs more than on a GPU; "
             "seed 003's ratios are GPU times of ResNet-56 on CIFAR-10. The timings come from runs that share the "
             "machine with whatever else runs on it (other claims in parallel, other work): CPU time is less "
             "affected than wall time, but not immune.")
    return L


_COLUMN_ORDER = ("test_acc", "best_test_acc", "test_bpc", "test_ppl", "test_loss", "final_train_loss",
                 "nonfinite", "step_cpu_time", "time_per_epoch", "wall_time")
#: Row keys that are bookkeeping, not measurements.
_NOT_SHOWN = ("steps", "timed_steps", "eval_nonfinite", "first_nonfinite_step", "step_time", "test_examples")


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
             "nonfinite": "non-finite", "time_per_epoch": "s/epoch", "wall_time": "wall (s)",
             "step_cpu_time": "CPU ms/step"}
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
            if k not in keys and k not in _NOT_SHOWN:
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
            elif k == "step_cpu_time":
                cells.append(f"{1e3 * a.mean:.1f}" + (f" ± {1e3 * a.std:.1f}" if a.std is not None else ""))
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


def _seeds_text(meta: dict[str, Any]) -> str:
    """``0, 1, 2`` when every claim ran the same seeds, else ``C2 0–4; C1, C3–C5 0–2``-like groups."""
    per = meta.get("claim_seeds") or {}
    groups: dict[tuple[int, ...], list[str]] = {}
    for cid, ss in per.items():
        groups.setdefault(tuple(ss), []).append(cid)
    if len(groups) <= 1:
        return ", ".join(map(str, meta.get("seeds", [])))

    def span(ss: tuple[int, ...]) -> str:
        return f"{ss[0]}–{ss[-1]}" if len(ss) > 2 and list(ss) == list(range(ss[0], ss[-1] + 1)) else ", ".join(map(str, ss))

    return "; ".join(f"{', '.join(cids)}: {span(ss)}" for ss, cids in sorted(groups.items(), key=lambda kv: -len(kv[0])))


def render_report(results: dict[str, dict[str, Any]], meta: dict[str, Any], root: Path,
                  verdicts: dict[str, Verdict], figures: dict[str, list[str]],
                  configs: list[dict[str, Any]], speed: Verdict | None = None) -> str:
    """The text of REPORT.md."""
    scale = meta.get("scale", "embedded")
    seeds = list(meta.get("seeds", []))
    L: list[str] = []
    L.append(f"# Norm matters — reproduction report ({scale} scale)")
    L.append("")
    L.append(f"Command: `{meta.get('command', 'normmatters reproduce')}`  ")
    jobs = meta.get("jobs", 1)
    L.append(f"Finished: {meta.get('finished', '—')}; seeds: {_seeds_text(meta)}; "
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
    L.append(summary_table(results, verdicts, speed))
    L.append("")
    L.append("How verdicts are decided (stated before the runs; each claim's rule below names its checks and "
             "margins). Runs of a comparison share the seed, hence the initialization and the data order, and are "
             "compared seed by seed: the mean paired difference over seeds and its 95% t interval. Accuracy "
             f"differences are in points (δ = {100 * ACC_MARGIN:g} point unless a claim says otherwise), "
             f"bits-per-character differences relative to the reference (δ = {100 * BPC_MARGIN:g}%), step times as "
             f"ratios (δ = {100 * SPEED_MARGIN:g}%). *As good as* (non-inferiority): supported when the interval's "
             "worse end is within δ, not supported when the whole interval is beyond δ; better than the reference "
             "is never a failure. *Matches* (equivalence, C1): the whole interval inside ±δ. *Fails* (C4's L2): "
             "non-finite values or divergence in a seed, or worse with an interval that excludes zero. "
             "Undecided: *inconclusive (1 seed)* — one seed gives no interval —, *inconclusive at this scale* — "
             "the interval is wider than δ, so the runs cannot resolve a difference of the margin's size —, or "
             "*inconclusive* — a narrow interval across the margin. A claim is supported when every voting check "
             "is; checks that do not vote are reported beside it. *Half-width / MDD*: the interval's half-width and "
             "the minimum detectable difference, (t₀.₉₇₅ + t₀.₈₀)·s/√n with n − 1 degrees of freedom — the true "
             "difference this many seeds with this spread would show as an interval excluding zero four times in "
             "five. A difference marked *identical in all seeds* had no observed spread; its interval uses one "
             "test example's step as the standard deviation instead of a zero width.")
    if max((len(v) for v in (meta.get("claim_seeds") or {}).values()), default=len(seeds)) < 2:
        L.append("")
        L.append("**One seed:** no interval can be computed, so every comparison is inconclusive by design; run "
                 "with `--seeds 3` (the default) for verdicts.")

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
        for setting, paper, seed in paper_rows(cid):
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
        if res.get("table") and cid == "C4":
            L.append("")
            L.append("**The two input regimes side by side** (mean over seeds; non-finite: seeds with non-finite "
                     "values in the norms during training):")
            L.append("")
            L.append(res["table"])
        L.append("")
        L.append(f"**Verdict: {v.verdict}.** Rule: {v.rule}")
        L.append("")
        L.append(_checks_table(v))
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

    L.append("")
    L.extend(speed_section(results, speed))

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
    verdicts: dict[str, Verdict] = {}
    for cid, res in results.items():
        try:
            verdicts[cid] = verdict_for(cid, res)
        except Exception as exc:  # a broken rule is that claim's problem, not the report's
            log.warning("%s: verdict failed: %s", cid, exc)
            verdicts[cid] = Verdict(f"inconclusive (the verdict rule failed: {type(exc).__name__}: {exc})", "—")
    speed = speed_mod.verdict(results)
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
    text = render_report(results, meta, root, verdicts, figures, configs, speed)
    report = atomic_write_text(root / "REPORT.md", text)
    payload = {
        "meta": meta,
        "margins": {"accuracy_points": ACC_MARGIN, "bpc_relative": BPC_MARGIN, "step_time_ratio": SPEED_MARGIN,
                    "interval": "95% t interval of the mean paired (same-seed) difference over seeds"},
        "claims": {
            cid: {
                **{k: v for k, v in res.items() if k != "table"},
                "verdict": verdicts[cid].to_dict(),
                "aggregate": {run: {k: asdict(a) for k, a in m.items()}
                              for run, m in aggregate(res.get("rows", [])).items()} if res.get("status") == "ok" else {},
                "report_figures": figures.get(cid, []),
                "paper": [{"setting": s, "paper": p, "seed003": r} for s, p, r in paper_rows(cid)],
            }
            for cid, res in results.items()
        },
        "speed": None if speed is None else {
            **speed.to_dict(),
            "seed003": {"minutes": speed_mod.SEED003,
                        "ratios": {a: r for a, _, _, r, _ in speed_mod.COMPARISONS if r is not None}},
            "paper": [{"setting": s, "paper": p, "seed003": r} for s, p, r in speed_mod.PAPER],
        },
        "configs": [{"path": c["path"], "finished": c["finished"], "config": c["config"]} for c in configs],
    }
    js = atomic_write_text(root / "results.json", json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")
    return report, js
