r"""A measured precision map of the Lp dispersions (beyond Hoffer et al. 2018, Sec. 5).

For each norm (L1, L2, L∞, Top(10)), each format configuration (the elementwise format, the
accumulation format and the reduction order of
:func:`~normmatters.functional.emulated.emulated_dispersion`), each number of values n per
statistic and each input scale s, draw x = s·z with z ~ N(0, 1) (``channels`` independent
statistics of n values), and compare the dispersion computed in the format with the float64
dispersion of the *same* input:

.. math::
    \mathrm{err}(s, n) = \max_{\text{channels}}
        \frac{|\hat\sigma_{\text{format}}(x_F) - \hat\sigma_{64}(x_F)|}{\hat\sigma_{64}(x_F)},

where x_F is x as the format holds it. The reference uses x_F, not x, so the map measures the
*arithmetic* (centring, squares or absolute values, sums, the constant) and not the input's own
rounding, which every p shares; an input that underflows to all-zero or overflows counts as a
failure (error = inf). A cell passes when err ≤ ``tol`` (1%).

The default rows: each format with float32 sums (what the layers do by default, and where L2
fails only by its squares overflowing or underflowing), fp16 and bf16 with sums in the format
(where plain sums overflow in fp16, and lose precision in bf16, for every p), and fp16 with the averaging reduction
``"pairwise_mean"`` (fp16 sums that cannot overflow). fp8 sums are not among them: with 2 or 3
fraction bits they miss 1% at every scale and size of the default grid, as pairwise sums and as
pairwise means (measured).

Everything is vectorised over the scales (they are stacked as extra statistics): one pass per
(format, norm, size), a few seconds per format row at the default grid on a CPU.

Example::

    >>> pm = precision_map(sizes=(64, 1024), scales=np.logspace(-6, 6, 13))
    >>> rows = pm.table()       # one row per (format, p, n): the passing scale range
    >>> pm.plot("precision_map.png")
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..functional import lp_dispersion
from ..functional.emulate import Arithmetic
from ..functional.emulated import emulated_statistics
from ..functional.formats import get_format

__all__ = ["PrecisionMap", "precision_map", "DEFAULT_FORMATS", "DEFAULT_NORMS"]

#: (label, compute format, accumulate format or None = float32[, summation]); the summation,
#: when given, overrides :func:`precision_map`'s ``summation`` for that row
DEFAULT_FORMATS: tuple[tuple, ...] = (
    ("fp16", "fp16", None),
    ("bf16", "bf16", None),
    ("fp8_e5m2", "fp8_e5m2", None),
    ("fp8_e4m3", "fp8_e4m3", None),
    ("fp16, fp16 sums", "fp16", "fp16"),
    ("bf16, bf16 sums", "bf16", "bf16"),
    ("fp16, fp16 pairwise mean", "fp16", "fp16", "pairwise_mean"),
)
#: (label, p, k)
DEFAULT_NORMS: tuple[tuple[str, float, int | None], ...] = (
    ("L1", 1.0, None),
    ("L2", 2.0, None),
    ("Linf", math.inf, None),
    ("Top10", math.inf, 10),
)


@dataclass
class PrecisionMap:
    """Relative errors ``errors[format, norm, size, scale]`` and what they mean."""

    formats: list[str]
    norms: list[str]
    sizes: list[int]
    scales: list[float]
    errors: np.ndarray
    tol: float = 0.01
    summation: str = "pairwise"
    notes: list[str] = field(default_factory=list)

    def passes(self) -> np.ndarray:
        """Boolean mask of the cells within ``tol``."""
        return np.nan_to_num(self.errors, nan=np.inf) <= self.tol

    def table(self) -> list[dict]:
        """One row per (format, norm, n): the widest contiguous range of passing scales.

        Keys: ``format``, ``norm``, ``n``, ``scale_min``, ``scale_max`` (None when no scale
        passes), ``decades`` (log10 of their ratio) and ``passing`` (the number of passing
        grid scales).
        """
        ok = self.passes()
        rows = []
        for fi, f in enumerate(self.formats):
            for pi, p in enumerate(self.norms):
                for ni, n in enumerate(self.sizes):
                    lo, hi = _widest_run(ok[fi, pi, ni])
                    rows.append({
                        "format": f, "norm": p, "n": n,
                        "scale_min": None if lo is None else self.scales[lo],
                        "scale_max": None if hi is None else self.scales[hi],
                        "decades": 0.0 if lo is None else math.log10(self.scales[hi] / self.scales[lo]),
                        "passing": int(ok[fi, pi, ni].sum()),
                    })
        return rows

    def to_markdown(self) -> str:
        """The table as Markdown: one line per (format, n), one column per norm."""
        rows = {(r["format"], r["n"], r["norm"]): r for r in self.table()}
        head = "| format | n | " + " | ".join(self.norms) + " |"
        lines = [head, "|" + "---|" * (2 + len(self.norms))]
        for f in self.formats:
            for n in self.sizes:
                cells = []
                for p in self.norms:
                    r = rows[(f, n, p)]
                    cells.append("—" if r["scale_min"] is None else f"{r['scale_min']:.0e} … {r['scale_max']:.0e}")
                lines.append(f"| {f} | {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> str:
        """Write a PNG: one panel per (format, norm), log10 error over (scale, n), 1% contour."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        nf, npn = len(self.formats), len(self.norms)
        fig, axes = plt.subplots(nf, npn, figsize=(3.0 * npn, 1.9 * nf + 0.8), sharex=True, sharey=True,
                                 squeeze=False, constrained_layout=True)
        logs = np.log10(np.clip(np.nan_to_num(self.errors, nan=np.inf, posinf=1e3), 1e-8, 1e3))
        x = np.log10(np.asarray(self.scales))
        y = np.log2(np.asarray(self.sizes, dtype=float))
        from matplotlib.colors import TwoSlopeNorm

        # Diverging at the tolerance: blue passes, red fails.
        cnorm = TwoSlopeNorm(vcenter=math.log10(self.tol), vmin=-8, vmax=1)
        mesh = None
        for fi, f in enumerate(self.formats):
            for pi, p in enumerate(self.norms):
                ax = axes[fi, pi]
                mesh = ax.pcolormesh(x, y, logs[fi, pi], norm=cnorm, cmap="RdBu_r", shading="nearest")
                ok = self.passes()[fi, pi].astype(float)
                if 0 < ok.sum() < ok.size and len(self.sizes) > 1:
                    ax.contour(x, y, ok, levels=[0.5], colors="black", linewidths=1.0)
                ax.set_title(f"{f} · {p}", fontsize=8)
                if pi == 0:
                    ax.set_ylabel("log2 n")
                if fi == nf - 1:
                    ax.set_xlabel("log10 input scale")
                ax.tick_params(labelsize=7)
        if mesh is not None:
            fig.colorbar(mesh, ax=axes, shrink=0.6, label="log10 relative error of σ̂ (black: the 1% boundary)")
        fig.suptitle(f"Dispersion computed in low precision vs float64 (pass: error ≤ {self.tol:.0%})", fontsize=10)
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.remove(tmp)
        return path


def _widest_run(ok: np.ndarray) -> tuple[int | None, int | None]:
    best, start, best_lo, best_hi = 0, None, None, None
    for i, v in enumerate(list(ok) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start > best:
                best, best_lo, best_hi = i - start, start, i - 1
            start = None
    return best_lo, best_hi


def precision_map(
    *,
    formats: Sequence[tuple] = DEFAULT_FORMATS,
    norms: Sequence[tuple[str, float, int | None]] = DEFAULT_NORMS,
    sizes: Sequence[int] = (16, 64, 256, 1024, 4096, 16384),
    scales: Sequence[float] | np.ndarray = np.logspace(-6, 6, 25),
    channels: int = 16,
    tol: float = 0.01,
    constant: str = "calibrated",
    summation: str = "pairwise",
    seed: int = 0,
) -> PrecisionMap:
    """Measure the map (see the module doc); returns a :class:`PrecisionMap`.

    Args:
        formats: ``(label, compute, accumulate)`` triples, accumulate ``None`` = float32 (the
            layers' default); a fourth item chooses that row's summation.
        norms: ``(label, p, k)`` triples.
        sizes: values per statistic (batch × spatial size for a batch norm).
        scales: standard deviations of the input.
        channels: independent statistics per cell; the cell's error is their worst.
        tol: pass threshold on the relative error.
        summation: the reduction order of rows that accumulate in a low format (see
            :mod:`normmatters.functional.emulate`).
    """
    scales = [float(s) for s in scales]
    sizes = [int(n) for n in sizes]
    if not scales or not sizes or any(s <= 0 for s in scales) or any(n < 2 for n in sizes):
        raise ValueError("precision_map: need positive scales and sizes n >= 2")
    rows = []
    for row in formats:
        if len(row) not in (3, 4):
            raise ValueError(f"precision_map: a format row is (label, compute, accumulate[, summation]), got {row!r}")
        label, comp, acc = row[:3]
        order = row[3] if len(row) == 4 else summation
        get_format(comp)
        if acc is not None:
            get_format(acc)
        rows.append((label, comp, acc, order))
    gen = torch.Generator().manual_seed(seed)
    s_t = torch.tensor(scales, dtype=torch.float64).repeat_interleave(channels).unsqueeze(1)
    errors = np.full((len(formats), len(norms), len(sizes), len(scales)), np.inf)
    notes: list[str] = []
    with torch.no_grad():
        for ni, n in enumerate(sizes):
            z = torch.randn(channels, n, dtype=torch.float64, generator=gen)
            x = z.repeat(len(scales), 1) * s_t  # (scales·channels, n), exact scaling in float64
            x32 = x.float()
            for fi, (_, comp, acc, order) in enumerate(rows):
                ar = Arithmetic(comp, acc, summation=order)
                # float32 storage of the format's values. Rounding through float32 first may differ
                # from a direct rounding in a rare tie, which does not matter here: the reference
                # is computed from these same values x_F.
                xf = ar.comp(x32)
                x64 = xf.double()
                for pi, (plabel, p, k) in enumerate(norms):
                    if k is not None and k > n:
                        errors[fi, pi, ni] = np.nan
                        continue
                    _, sigma, _ = emulated_statistics(xf, p, k, constant, 0.0, ar)
                    ref = lp_dispersion(x64 - x64.mean(-1, keepdim=True), -1, p, k, constant)
                    rel = ((sigma.double() - ref).abs() / ref).reshape(len(scales), channels)
                    bad = ~torch.isfinite(rel) | ~(ref.reshape(len(scales), channels) > 0)
                    rel = torch.where(bad, torch.full_like(rel, math.inf), rel)
                    errors[fi, pi, ni] = rel.amax(-1).numpy()
    if any(k is not None and k > min(sizes) for _, _, k in norms):
        notes.append("Top(k) cells with n < k are undefined (NaN).")
    return PrecisionMap(
        formats=[r[0] for r in rows], norms=[p[0] for p in norms], sizes=sizes, scales=scales,
        errors=errors, tol=tol, summation=summation, notes=notes,
    )
