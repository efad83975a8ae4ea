"""Claim C2: L1 batch norm with C_L1 = √(π/2) is as good as L2 batch norm (Hoffer et al. 2018, Sec. 4).

The same network is trained with each normalization, with the same seeds, data order and
hyperparameters; only the dispersion σ̂ of every norm layer changes:

=================  ===========================================================================
``bn-l2``          L2 batch norm, σ̂ = √(mean d² + ε) (torch's batch norm)
``bn-l1``          L1 batch norm, σ̂ = C_L1 · mean|d|, C_L1 = √(π/2)
``bn-l1-noconst``  L1 batch norm without its constant, σ̂ = mean|d| (seed 003's ablation)
``ln-l2``          Transformer language model with L2 layer norm
``ln-l1``          the same with L1 layer norm (the paper's Transformer experiment)
=================  ===========================================================================

Embedded scale: the 1-D ResNet-20 on MNIST-1D (4000 training, 20 000 test sequences, generated
together; SGD with momentum, cosine schedule) and a 2-layer character-level Transformer on the
embedded text corpus (CPython's pydoc topics: the first 270 k characters to train, the rest, ~195 k,
to test). Paper scale: ResNet-56 on CIFAR-10 (He et al.'s schedule), ResNet-18 on
ImageNet and a 6-layer Transformer on ``<data-root>/lm_corpus.txt``, each where its data is present.

Every run goes through the shared run cache (:func:`~normmatters.experiments.claims.cached_train`):
claim C3 reuses the ``bn-l2`` runs, and a finished run is never trained twice. Every run also
records its time per training step (:class:`~normmatters.experiments.claims.timing.StepTimer`),
the measurement of the report's Speed section.

Verdict (:func:`verdict`, stated before the runs): L1 is *as good as* L2 — non-inferiority of the
paired per-seed difference, margin 1 point of test accuracy for batch norm and 2 % of the test
bits per character for layer norm (see :mod:`~normmatters.experiments.claims.verdicts`). The
ablation without C_L1 is reported beside it and does not vote.

Power (:data:`DESIGN`). The default run is sized to decide: its 95 % interval's half-width should be
at most half the margin, so that no difference at all is declared non-inferior almost surely and a
shortfall of the whole margin is not. A pilot measured the standard deviation of the per-seed
paired difference: for batch norm 0.41 points with 1000 test sequences (the former default: the
test set's own sampling noise dominated) and 0.14 points with 20 000; for layer norm 0.64 % of
bits/char on the long test text (the runs' own spread dominates there; 0.81 % on a 24 k-character
test text). Five seeds give the half-widths in :data:`DESIGN`; the report states each
comparison's realised half-width and minimum detectable difference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError, DataNotFoundError
from . import cached_train, check_run_args, paper_data
from .timing import StepTimer, run_step_times
from .stats import half_width, min_detectable_difference
from .verdicts import ACC_MARGIN, BPC_MARGIN, Verdict, decide, fmt_power, non_inferior

__all__ = [
    "run",
    "verdict",
    "PAPER",
    "BN_L2",
    "BN_L1",
    "BN_L1_NOCONST",
    "LN_L2",
    "LN_L1",
    "BN_RUNS",
    "LN_RUNS",
    "image_config",
    "lm_config",
    "image_settings",
    "train_rows",
    "plot_histories",
]

log = logging.getLogger(__name__)

# Run names (claim C3 and the Speed section use these too).
BN_L2 = "bn-l2"
BN_L1 = "bn-l1"
BN_L1_NOCONST = "bn-l1-noconst"
LN_L2 = "ln-l2"
LN_L1 = "ln-l1"

#: run name -> (norm, norm_kwargs) of the batch-norm comparison.
BN_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    BN_L2: ("l2", {}),
    BN_L1: ("l1", {}),
    BN_L1_NOCONST: ("l1", {"constant": "none"}),
}
#: run name -> (norm, norm_kwargs) of the layer-norm comparison (Transformer).
LN_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    LN_L2: ("l2", {}),
    LN_L1: ("l1", {}),
}

#: Rows of (setting, the paper's number, the independent reproduction's (seed 003) number).
PAPER: list[tuple[str, str, str]] = [
    ("ResNet-56, CIFAR-10: L2 BN / L1 BN (top-1 %)", "93.03 / 93.07", "92.40 / 92.05"),
    ("ResNet-18, ImageNet: L2 BN / L1 BN (top-1 %)", "69.8 / 69.74", "—"),
    ("ResNet-50, ImageNet: L2 BN / L1 BN (top-1 %)", "75.3 / 75.32", "—"),
    ("Transformer, WMT14: L2 LN / L1 LN (perplexity)", "5.1 / 5.2", "—"),
    ("ResNet-56, CIFAR-10: L1 BN without C_L1", "—", "higher error than with C_L1"),
]

#: The default embedded run's design: per comparison the pilot's standard deviation of the per-seed
#: paired difference (accuracy as a fraction; bits/char relative to L2), its seeds and test size,
#: and the seeds chosen (:func:`~normmatters.experiments.claims.stats.seeds_for_half_width` of half the margin).
DESIGN: dict[str, dict[str, Any]] = {
    "bn": {"pilot_sd": 0.0014, "pilot_seeds": 6, "test": "20 000 sequences", "margin": ACC_MARGIN, "seeds": 5},
    "ln": {"pilot_sd": 0.0064, "pilot_seeds": 3, "test": "~195 k characters", "margin": BPC_MARGIN, "seeds": 5},
}
#: The seeds the ablation without C_L1 (not voted) runs with: the first three.
ABLATION_SEEDS = 3

RULE = (f"L1 is as good as L2 (non-inferiority of the paired per-seed difference, 95% t interval over seeds): "
        f"as batch norm with margin δ = {100 * ACC_MARGIN:g} point of test accuracy, as layer norm in the "
        f"Transformer with δ = {100 * BPC_MARGIN:g}% of the L2 run's test bits per character. Supported when "
        "both intervals' worse ends are within δ; being better than L2 is not a failure. The ablation without "
        "C_L1 is reported, not voted.")


def _suffixes(rows: Sequence[dict[str, Any]], base: str) -> list[str]:
    """The setting suffixes of ``base`` among the rows' run names (``""`` at the embedded scale)."""
    out: list[str] = []
    for r in rows:
        name = str(r.get("run", ""))
        if name == base or name.startswith(base + "-"):
            sfx = name[len(base):]
            if sfx not in out:
                out.append(sfx)
    return out


def verdict(rows: Sequence[dict[str, Any]]) -> Verdict:
    """C2's verdict from its rows, by :data:`RULE`."""
    checks = []
    for sfx in _suffixes(rows, BN_L2) or [""]:
        checks.append(non_inferior(rows, BN_L1 + sfx, BN_L2 + sfx, f"L1 batch norm as good as L2{sfx}",
                                   metric="test_acc", margin=ACC_MARGIN))
    checks.append(non_inferior(rows, LN_L1, LN_L2, "L1 layer norm as good as L2 (Transformer LM)",
                               metric="test_bpc", margin=BPC_MARGIN, higher_is_better=False, kind="relative"))
    for sfx in _suffixes(rows, BN_L2) or [""]:
        checks.append(non_inferior(rows, BN_L1_NOCONST + sfx, BN_L1 + sfx,
                                   f"ablation: L1 batch norm without C_L1 vs with it{sfx}", metric="test_acc",
                                   margin=ACC_MARGIN, core=False))
    return decide(checks, RULE)

# -- embedded scale: the hyperparameters, in one place --------------------------------------------
# ResNet-20 (1-D) on MNIST-1D: 32 steps of 128 sequences per epoch, ~1 CPU-second per epoch.
IMAGE_EPOCHS = 15
IMAGE_BATCH = 128
IMAGE_TRAIN = 4000          # training sequences (the package's default training split's size)
IMAGE_TEST = 20000          # test sequences, generated with them: one = 0.005 points, not 0.1
IMAGE_EVAL_EVERY = 5        # epochs between evaluations (20 k sequences cost ~1.5 epochs to evaluate)
IMAGE_LR = 0.1              # per batch of 128, cosine to 0, no warm-up
IMAGE_WD = 5e-4             # coupled L2 (SGD), on every parameter as in the paper's code
# Transformer LM: 2 layers, width 64, 4 heads, context 64 characters, trained on the first 270 k
# characters of the corpus; the rest of it (~195 k characters of CPython 3.11's pydoc topics) is the
# test split (evaluation is a fraction of training's cost, and a long test text steadies bits/char).
LM_EPOCHS = 8            # at 3 epochs both runs are still falling ~0.5 bit/char per epoch
LM_BATCH = 16               # sequences of 64 characters per step
LM_LR = 3e-3                # AdamW, cosine to 0 after 0.2 epochs of warm-up
LM_TRAIN_CHARS = 270_000
LM_EVAL_EVERY = 4           # epochs between evaluations
LM_MODEL = {"n_layer": 2, "d_model": 64, "n_head": 4, "dropout": 0.0}


def image_settings(scale: str, data_root: str | os.PathLike | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The (label, base config fields) of the image classifiers a scale trains, where data is present.

    ``""`` labels the embedded setting (run names without a suffix). At the paper scale the
    settings whose data is missing are left out (see :func:`~normmatters.experiments.claims.paper_data`).
    """
    if scale == "embedded":
        return [("", dict(model="resnet1d", dataset="mnist1d", epochs=IMAGE_EPOCHS, batch_size=IMAGE_BATCH,
                          lr=IMAGE_LR, weight_decay=IMAGE_WD, lr_schedule="cosine", augment=True, amp=False,
                          plots=False, eval_every=IMAGE_EVAL_EVERY,
                          dataset_kwargs={"num_samples": IMAGE_TRAIN + IMAGE_TEST, "test_samples": IMAGE_TEST}))]
    status = paper_data(data_root)
    root = None if data_root is None else str(data_root)
    out: list[tuple[str, dict[str, Any]]] = []
    if status["cifar10"].present:
        # He et al. 2016 §4.2: 164 epochs, LR 0.1 divided by 10 at 82 and 123, WD 1e-4, batch 128.
        out.append(("resnet56-cifar10", dict(model="resnet56", dataset="cifar10", data_root=root, epochs=164,
                                             batch_size=128, lr=0.1, weight_decay=1e-4, lr_schedule="step",
                                             lr_milestones=[82, 123], augment=True, plots=True)))
    if status["imagenet"].present:
        # Goyal et al. 2017 / torchvision reference: 90 epochs, batch 256, LR 0.1 ÷10 at 30, 60, 80.
        out.append(("resnet18-imagenet", dict(model="resnet18", dataset="imagenet",
                                              data_root=str(Path(status["imagenet"].path)), epochs=90,
                                              batch_size=256, lr=0.1, weight_decay=1e-4, lr_schedule="step",
                                              lr_milestones=[30, 60, 80], augment=True, num_workers=8,
                                              plots=True)))
    return out


def image_config(base: dict[str, Any], norm: str, norm_kwargs: dict[str, Any], seed: int) -> TrainConfig:
    """The resolved config of one image run (the same object for C2's and C3's L2 runs)."""
    return TrainConfig().replace(source="C2/C3", norm=norm, norm_kwargs=dict(norm_kwargs), seed=seed, **base)


def lm_config(norm: str, norm_kwargs: dict[str, Any], seed: int, scale: str = "embedded",
              data_root: str | os.PathLike | None = None) -> TrainConfig:
    """The resolved config of one Transformer LM run."""
    if scale == "embedded":
        return TrainConfig().replace(
            source="C2", model="transformer_lm", dataset="text", norm=norm, norm_kwargs=dict(norm_kwargs),
            seed=seed, epochs=LM_EPOCHS, batch_size=LM_BATCH, optimizer="adamw", lr=LM_LR, weight_decay=0.0,
            lr_schedule="cosine", warmup_epochs=0.2, amp=False, plots=False, eval_every=LM_EVAL_EVERY,
            dataset_kwargs={"block_size": 64, "train_chars": LM_TRAIN_CHARS}, model_kwargs=dict(LM_MODEL),
        )
    text = Path(paper_data(data_root)["text"].path)
    return TrainConfig().replace(
        source="C2", model="transformer_lm", dataset="text", norm=norm, norm_kwargs=dict(norm_kwargs), seed=seed,
        epochs=10, batch_size=64, optimizer="adamw", lr=6e-4, weight_decay=0.1, lr_schedule="cosine",
        warmup_epochs=0.5, grad_clip=1.0, plots=True,
        dataset_kwargs={"block_size": 256, "path": str(text), "level": "byte"},
        model_kwargs={"n_layer": 6, "d_model": 512, "n_head": 8, "dropout": 0.1},
    )


def power_notes(rows: Sequence[dict[str, Any]]) -> str:
    """The design of the default run beside what this run's core comparisons achieved."""
    v = verdict(rows)
    lines = ["**Power.** The default sizes were chosen from a pilot so that the 95% interval's half-width is at "
             "most half the margin (then a true difference of zero is declared non-inferior almost always, and a "
             "shortfall of the whole margin almost never):", "",
             "| comparison | pilot sd of the paired difference | test set | seeds | expected half-width / MDD | "
             "half the margin | this run: sd, half-width / MDD |", "|---|---|---|---|---|---|---|"]
    for key, check in (("bn", v.checks[0]), ("ln", v.checks[len(_suffixes(rows, BN_L2) or [""])])):
        d = DESIGN[key]
        unit = (lambda x: f"{100 * x:.2f} pt") if key == "bn" else (lambda x: f"{100 * x:.2f}%")
        hw, mdd = half_width(d["pilot_sd"], d["seeds"]), min_detectable_difference(d["pilot_sd"], d["seeds"])
        sd = (check.diff or {}).get("sd")
        lines.append(f"| {check.name} | {unit(d['pilot_sd'])} ({d['pilot_seeds']} seeds) | {d['test']} | "
                     f"{d['seeds']} | ±{unit(hw)} / {unit(mdd)} | {unit(d['margin'] / 2)} | "
                     f"{'—' if sd is None else unit(sd)}, {fmt_power(check)} |")
    return "\n".join(lines)


def _row(name: str, seed: int, config: TrainConfig, s: dict[str, Any], setting: str) -> dict[str, Any]:
    row: dict[str, Any] = {"run": name, "seed": seed, "setting": setting or f"{config.model}-{config.dataset}",
                           "norm": config.norm, "constant": (config.norm_kwargs or {}).get("constant", "calibrated")}
    if s.get("task") == "lm":
        row.update(test_bpc=s.get("final_test_bpc"), test_ppl=s.get("final_test_ppl"),
                   test_loss=s.get("final_test_loss"), token_acc=s.get("final_test_acc"))
    else:
        row.update(test_acc=s.get("final_test_acc"), best_test_acc=s.get("best_test_acc"),
                   test_loss=s.get("final_test_loss"))
    row.update(final_train_loss=s.get("final_train_loss"), time_per_epoch=s.get("time_per_epoch"),
               **run_step_times(s.get("run_dir")), steps=s.get("steps"),
               wall_time=s.get("wall_time"), reused=bool(s.get("reused")), run_dir=s.get("run_dir"))
    return row


def train_rows(claim: str, jobs: Sequence[tuple[str, TrainConfig, str]], cache_dir: Path, progress: bool) -> list[dict[str, Any]]:
    """Train (or reuse) each ``(run name, config, setting)`` and return one row per job."""
    rows = []
    for i, (name, config, setting) in enumerate(jobs, 1):
        s = cached_train(config, cache_dir, progress=progress, callbacks=[StepTimer()])
        row = _row(name, config.seed, config, s, setting)
        rows.append(row)
        metric = (f"test {row['test_bpc']:.4f} bits/char" if "test_bpc" in row and row["test_bpc"] is not None
                  else f"test acc {100 * row['test_acc']:.2f}%" if row.get("test_acc") is not None else "no result")
        log.info("%s [%d/%d] %s seed %d: %s, %.1f s%s", claim, i, len(jobs), name, config.seed, metric,
                 row["wall_time"] or 0.0, " (reused)" if row["reused"] else "")
    return rows


def _history(run_dir: str | None) -> list[dict[str, Any]]:
    if not run_dir:
        return []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot_histories(rows: Sequence[dict[str, Any]], names: Sequence[str], key: str, path: Path, title: str,
                   ylabel: str) -> Path | None:
    """Plot ``key`` against epochs for the runs ``names`` (their first seed) into ``path``."""
    from ..plots import plot_curves

    series = {}
    for name in names:
        row = next((r for r in rows if r["run"] == name), None)
        if row is None:
            continue
        hist = [h for h in _history(row.get("run_dir")) if h.get(key) is not None]
        scale = 100.0 if key.endswith("acc") else 1.0
        series[name] = ([h["epoch"] for h in hist], [h[key] * scale for h in hist])
    if not any(xs for xs, _ in series.values()):
        return None
    return plot_curves(series, path, title=title, ylabel=ylabel)


def run(
    out_dir: str | os.PathLike,
    *,
    seeds: Sequence[int] = (0,),
    scale: str = "embedded",
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    runs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run claim C2: L2 vs L1 vs L1 without C_L1 batch norm, and L2 vs L1 layer norm.

    :param out_dir: the claim's folder (figures; the runs too unless ``cache_dir`` is given).
    :param seeds: one run of every configuration per seed.
    :param scale: ``"embedded"`` or ``"paper"`` (settings whose data is missing are skipped).
    :param progress: tqdm bars.
    :param cache_dir: the shared run cache (default ``out_dir/runs``).
    :param data_root: paper-scale data folder (see :func:`~normmatters.experiments.claims.paper_data`).
    :param runs: a subset of :data:`BN_RUNS` and :data:`LN_RUNS` names.
    :returns: ``{"claim": "C2", "rows", "figures", "notes"}``; a row per run and seed.
    :raises DataNotFoundError: at the paper scale, when no setting has its data.
    """
    seeds = check_run_args("C2", scale, seeds)
    names = list(BN_RUNS) + list(LN_RUNS) if runs is None else list(runs)
    unknown = [n for n in names if n not in BN_RUNS and n not in LN_RUNS]
    if unknown:
        raise ConfigError(f"C2: unknown runs {unknown}; expected names from {list(BN_RUNS) + list(LN_RUNS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "runs"

    settings = image_settings(scale, data_root)
    lm_ok = scale == "embedded" or paper_data(data_root)["text"].present
    if not settings and not lm_ok:
        missing = [d for d in paper_data(data_root).values() if not d.present]
        raise DataNotFoundError("C2: no paper-scale data: " + "; ".join(f"{d.name} ({d.path}: {d.detail})" for d in missing))

    jobs: list[tuple[str, TrainConfig, str]] = []
    for i, seed in enumerate(seeds):
        for label, base in settings:
            for name in names:
                if name == BN_L1_NOCONST and i >= ABLATION_SEEDS:
                    continue
                if name in BN_RUNS:
                    norm, kw = BN_RUNS[name]
                    jobs.append((f"{name}-{label}" if label else name, image_config(base, norm, kw, seed), label))
        if lm_ok:
            for name in names:
                if name in LN_RUNS:
                    norm, kw = LN_RUNS[name]
                    jobs.append((name, lm_config(norm, kw, seed, scale, data_root), "transformer-text"))
    rows = train_rows("C2", jobs, cache, progress)
    if scale == "embedded":
        for r in rows:  # one test example is the step of an accuracy (see verdicts, identical differences)
            if "test_acc" in r:
                r["test_examples"] = IMAGE_TEST

    figures = []
    for label, _ in settings:
        bn_names = [f"{n}-{label}" if label else n for n in names if n in BN_RUNS]
        p = plot_histories(rows, bn_names, "test_acc", out / f"c2_bn_test_acc{'_' + label if label else ''}.png",
                           "C2: batch norm, test accuracy", "test accuracy (%)")
        if p is not None:
            figures.append(p.name)
    ln_names = [n for n in names if n in LN_RUNS]
    p = plot_histories(rows, ln_names, "test_bpc", out / "c2_ln_test_bpc.png", "C2: layer norm (Transformer), test bits/char",
                       "bits per character")
    if p is not None:
        figures.append(p.name)

    if scale == "embedded":
        notes = (f"Batch norm: 1-D ResNet-20 on MNIST-1D, {IMAGE_TRAIN} training sequences, {IMAGE_EPOCHS} epochs, "
                 f"batch {IMAGE_BATCH}, SGD momentum 0.9, LR {IMAGE_LR} cosine, weight decay {IMAGE_WD}, shift "
                 f"augmentation; final test accuracy on {IMAGE_TEST:,} test sequences generated with the training "
                 f"ones (one sequence = {100 / IMAGE_TEST:g} points), the same for every run. Layer norm: pre-norm "
                 f"Transformer ({LM_MODEL['n_layer']} layers, width {LM_MODEL['d_model']}, {LM_MODEL['n_head']} "
                 f"heads), characters of CPython's pydoc topics: the first {LM_TRAIN_CHARS:,} to train, the rest "
                 f"to test, context 64, {LM_EPOCHS} epochs of batch {LM_BATCH}, AdamW LR {LM_LR}; test bits per "
                 "character. Every norm layer of the network is the named kind; everything else, including seeds "
                 f"and data order, is the same. The ablation without C_L1 (not voted) runs the first "
                 f"{ABLATION_SEEDS} seeds.\n\n" + power_notes(rows))
    else:
        missing = [d.name for d in paper_data(data_root).values() if not d.present]
        notes = ("Paper scale: " + ", ".join(lbl for lbl, _ in settings) + (" and the Transformer LM" if lm_ok else "")
                 + (f"; skipped for missing data: {', '.join(missing)}" if missing else "") + ".")
    return {"claim": "C2", "rows": rows, "figures": figures, "notes": notes}
