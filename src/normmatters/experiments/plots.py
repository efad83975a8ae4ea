"""PNG plots of a run: loss, accuracy (or bits per character) and learning rate against epochs/steps.

Uses matplotlib's non-interactive Agg canvas directly (no pyplot global state), so plotting works
without a display and from threads. Files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes

__all__ = ["plot_run", "plot_curves", "save_figure"]


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def save_figure(fig, path: Path, dpi: float | None = None) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(Path(path), buf.getvalue())


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(series: dict[str, tuple[list[float], list[float]]], path: str | Path, *, title: str = "",
                xlabel: str = "epoch", ylabel: str = "", logy: bool = False) -> Path:
    """Plot named (x, y) series on one axis and write a PNG to ``path``."""
    fig, ax = _figure(title, xlabel, ylabel)
    for label, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    return _save(fig, Path(path))


def _col(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    rows = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    return [r[0] for r in rows], [r[1] for r in rows]


def plot_run(history: list[dict[str, Any]], lr_history: list[list[float]], out_dir: str | Path, *,
             task: str = "classification") -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` (``bpc.png`` for language models) and ``lr.png``."""
    out = Path(out_dir)
    paths = [plot_curves({"train": _col(history, "train_loss"), "test": _col(history, "test_loss")},
                         out / "loss.png", title="cross-entropy loss", ylabel="loss (nats)")]
    if task == "lm":
        paths.append(plot_curves({"train": _col(history, "train_bpc"), "test": _col(history, "test_bpc")},
                                 out / "bpc.png", title="bits per character", ylabel="bits"))
    paths.append(plot_curves({"train": _col(history, "train_acc"), "test": _col(history, "test_acc")},
                             out / "accuracy.png", title="accuracy" if task != "lm" else "next-token accuracy",
                             ylabel="accuracy"))
    if lr_history:
        steps, lrs = [r[0] for r in lr_history], [r[1] for r in lr_history]
    else:
        steps, lrs = _col(history, "lr")
    paths.append(plot_curves({"lr": (steps, lrs)}, out / "lr.png", title="learning rate",
                             xlabel="step" if lr_history else "epoch", ylabel="learning rate"))
    return paths
