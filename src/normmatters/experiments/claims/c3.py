"""Claim C3: L∞ and Top(k) batch norm are cheaper reductions and nearly as accurate (SPEC §1, §2).

Runs, on the same network, seeds and data as claim C2's batch-norm runs:

==================  ==========================================================================
``bn-l2``           L2 batch norm (the baseline; the same configuration as C2's, so the run
                    cache trains it once for both claims)
``bn-linf``         L∞ batch norm, σ̂ = C_∞(n) · max|d|, calibrated C_∞(n) = 1/E[max of n |Z|]
``bn-linf-paper``   the same with the official code's constant (1 + √(π ln 4)) / (2 √(2 ln n))
``bn-top10``        Top(10) batch norm, σ̂ = C_10(n) · mean of the 10 largest |d|, calibrated
``bn-top10-paper``  the same with the official code's constant
==================  ==========================================================================

The paper's constant overestimates σ by 10–45 % (SPEC §2), so its runs show what that bias costs.
Each row also carries the seconds per epoch, the measured side of "cheaper" (on a CPU, where the
reduction is a small share of a step, expect little difference).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataNotFoundError
from . import check_run_args, paper_data
from .c2 import IMAGE_BATCH, IMAGE_EPOCHS, image_config, image_settings, plot_histories, train_rows

__all__ = ["run", "RUNS"]

#: run name -> (norm, norm_kwargs).
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "bn-l2": ("l2", {}),
    "bn-linf": ("linf", {"constant": "calibrated"}),
    "bn-linf-paper": ("linf", {"constant": "paper"}),
    "bn-top10": ("top10", {"constant": "calibrated"}),
    "bn-top10-paper": ("top10", {"constant": "paper"}),
}


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
    """Run claim C3: L∞ and Top(10) batch norm, calibrated vs the paper's constant, beside L2.

    :param out_dir: the claim's folder (figures; the runs too unless ``cache_dir`` is given).
    :param seeds: one run of every configuration per seed.
    :param scale: ``"embedded"`` (1-D ResNet-20 on MNIST-1D) or ``"paper"`` (ResNet-56 on CIFAR-10,
        ResNet-18 on ImageNet, where the data is present).
    :param progress: tqdm bars.
    :param cache_dir: the shared run cache (default ``out_dir/runs``); pass C2's to share ``bn-l2``.
    :param data_root: paper-scale data folder.
    :param runs: a subset of :data:`RUNS`.
    :returns: ``{"claim": "C3", "rows", "figures", "notes"}``.
    :raises DataNotFoundError: at the paper scale, when no setting has its data.
    """
    seeds = check_run_args("C3", scale, seeds)
    names = list(RUNS) if runs is None else list(runs)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise ConfigError(f"C3: unknown runs {unknown}; expected names from {list(RUNS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "runs"
    settings = image_settings(scale, data_root)
    if not settings:
        missing = [d for n, d in paper_data(data_root).items() if n in ("cifar10", "imagenet")]
        raise DataNotFoundError("C3: no paper-scale image data: " +
                                "; ".join(f"{d.name} ({d.path}: {d.detail})" for d in missing))

    # The L2 baseline is trained last: when C2 runs at the same time (reproduce --jobs), it has
    # usually trained that run already, and the cache then hands it over instead of this claim
    # waiting on it. The rows are put back in the order of ``names``.
    order = [n for n in names if n != "bn-l2"] + [n for n in names if n == "bn-l2"]
    jobs, keys = [], []
    for seed in seeds:
        for si, (label, base) in enumerate(settings):
            for name in order:
                norm, kw = RUNS[name]
                jobs.append((f"{name}-{label}" if label else name, image_config(base, norm, kw, seed), label))
                keys.append((seed, si, names.index(name)))
    trained = train_rows("C3", jobs, cache, progress)
    rows = [r for _, r in sorted(zip(keys, trained), key=lambda kr: kr[0])]

    figures = []
    for label, _ in settings:
        sfx = f"-{label}" if label else ""
        p = plot_histories(rows, [n + sfx for n in names], "test_acc",
                           out / f"c3_test_acc{'_' + label if label else ''}.png",
                           "C3: L∞ / Top(10) batch norm, test accuracy", "test accuracy (%)")
        if p is not None:
            figures.append(p.name)
    if scale == "embedded":
        notes = (f"1-D ResNet-20 on MNIST-1D with C2's settings ({IMAGE_EPOCHS} epochs, batch {IMAGE_BATCH}); "
                 "every batch norm of the network is the named kind. n, the values per channel, is 128·40 = 5120 "
                 "in the first stage and 1280 in the last (fewer in an epoch's last, smaller batch); the "
                 "calibrated constants are exact for each n, the paper's formula is the official code's. "
                 "s/epoch is this CPU's time per epoch, including data loading and evaluation.")
    else:
        notes = "Paper scale: " + ", ".join(lbl for lbl, _ in settings) + "."
    return {"claim": "C3", "rows": rows, "figures": figures, "notes": notes}
