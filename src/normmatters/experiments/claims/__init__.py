"""The paper's five claims (Hoffer et al. 2018), each a module that owns its runs, its paper rows and its
verdict rule, and the run cache they share.

Every claim module ``normmatters.experiments.claims.c<N>`` defines::

    run(out_dir, *, seeds=(0,), scale="embedded", progress=True, **options) -> dict
    verdict(rows) -> Verdict        # its rule, stated before the runs (see .verdicts)
    PAPER                           # rows of (setting, the paper's number, seed 003's number)

returning ``{"claim": "C<N>", "rows": [{"run": name, "seed": s, "test_acc": ..., ...}, ...],
"figures": [PNG paths, relative to out_dir], "notes": str}``. Options a module may accept (the
reproduce command passes them only where the signature takes them): ``cache_dir`` (the shared run
cache, see :func:`cached_train`) and ``data_root`` (paper-scale data, see :func:`paper_data`).

The registry :data:`CLAIMS` names the module, the claim in words and the data each scale needs;
:func:`load_claim` imports a module lazily, so a missing or broken claim module is an error of
that claim alone; :func:`verdict_for` applies a claim module's rule to a claim's result. The
other modules of the package: :mod:`.stats` (t intervals), :mod:`.verdicts` (the paired rules),
:mod:`.timing` (time per step), :mod:`.speed` (the Speed section), :mod:`.env` (versions and
hardware) and :mod:`.report` (REPORT.md and results.json).

Run cache. :func:`cached_train` trains a :class:`~normmatters.experiments.config.TrainConfig` in
a folder named after the config's hash. A folder holding ``summary.json`` (written by
:func:`~normmatters.experiments.trainer.train` when a run ends) is a finished run and is read
back instead of trained again; a folder holding only a checkpoint is resumed where it stopped.
Two claims that ask for the same configuration (C2's and C3's L2 baseline) therefore train it
once::

    from normmatters.experiments.claims import cached_train
    summary = cached_train(config, "reports/embedded/runs")        # trains
    summary = cached_train(config, "reports/embedded/runs")        # reads summary.json back
    summary["reused"]                                              # True
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .verdicts import Verdict

__all__ = [
    "ClaimInfo",
    "CLAIMS",
    "SCALES",
    "parse_claims",
    "check_run_args",
    "load_claim",
    "claim_module",
    "verdict_for",
    "run_key",
    "run_folder",
    "cached_train",
    "completed_summary",
    "DataStatus",
    "paper_data",
    "missing_paper_data",
    "PAPER_TEXT_FILE",
]

log = logging.getLogger(__name__)

SCALES = ("embedded", "paper")


@dataclass(frozen=True)
class ClaimInfo:
    """One claim of the paper.

    :ivar id: ``"C1"`` … ``"C5"``.
    :ivar module: the module that runs it (defines ``run``).
    :ivar title: the claim in a line.
    :ivar embedded: what the embedded scale trains.
    :ivar paper: what the paper scale trains.
    :ivar paper_data: dataset names (keys of :func:`paper_data`) the paper scale needs.
    :ivar cost: rough CPU minutes of its default run at the embedded scale (measured);
        ``reproduce --jobs`` starts the costliest claims first so that parallel workers finish together.
    :ivar seeds: the seeds ``normmatters reproduce`` gives it when ``--seeds`` is not given: the
        number its verdict needs (C2's core comparisons are designed for 5, see
        :data:`~normmatters.experiments.claims.c2.DESIGN`); ``--seeds N`` sets every claim's.
    """

    id: str
    module: str
    title: str
    embedded: str
    paper: str
    paper_data: tuple[str, ...]
    cost: float = 1.0
    seeds: int = 3


_PKG = __name__

CLAIMS: dict[str, ClaimInfo] = {
    "C1": ClaimInfo(
        "C1", f"{_PKG}.c1",
        "Weight decay acts only through the effective learning rate η/‖w‖²: WD off with a per-channel LR "
        "correction, or norm scheduling, matches WD on.",
        "1-D ResNet-8 on MNIST-1D: WD on, WD off, WD off + LR correction, norm scheduling instead of LR scheduling; "
        "rotational equilibrium (measured vs predicted angular update, L2 and L1 batch norm) and the rotational optimizer",
        "ResNet-56 / VGG11 on CIFAR-10: the same four runs",
        ("cifar10",),
        cost=3.2,
    ),
    "C2": ClaimInfo(
        "C2", f"{_PKG}.c2",
        "L1 batch norm with C_L1 = √(π/2) is as good as L2 batch norm (and L1 layer norm as good as L2 layer norm).",
        "1-D ResNet-20 on MNIST-1D: L2 vs L1 vs L1 without C_L1; Transformer LM on the embedded text: L2 vs L1 LN",
        "ResNet-56 on CIFAR-10, ResNet-18/50 on ImageNet, Transformer LM on a text corpus",
        ("cifar10", "imagenet", "text"),
        cost=11.0,
        seeds=5,
    ),
    "C3": ClaimInfo(
        "C3", f"{_PKG}.c3",
        "L∞ and Top(10) batch norm are cheaper and nearly as accurate as L2.",
        "1-D ResNet-20 on MNIST-1D: L∞ and Top(10), calibrated vs the paper's constant, beside C2's L2 runs",
        "ResNet-56 on CIFAR-10, ResNet-18 on ImageNet",
        ("cifar10", "imagenet"),
        cost=2.9,
    ),
    "C4": ClaimInfo(
        "C4", f"{_PKG}.c4",
        "L1 batch norm works in low precision where L2 fails; with 8-bit ops the network trains in int8.",
        "ResNet-8 on scikit-learn's digits, standardized and raw-intensity inputs side by side: fp32 vs emulated "
        "fp16/fp8 L2 and L1 batch norm (float32 sums; fp16 sums, plain or as pairwise/blocked means that cannot "
        "overflow), and int8 training",
        "ResNet-18 on ImageNet",
        ("imagenet",),
        cost=6.4,
    ),
    "C5": ClaimInfo(
        "C5", f"{_PKG}.c5",
        "Bounded weight normalization (norm fixed at its initial value) is as good as batch norm where WN falls "
        "short.",
        "ResNet-8 on scikit-learn's digits: BN vs WN vs BWN; 2-layer LSTM LM on the embedded text: plain vs WN vs BWN, "
        "each at the learning rate that won the same search on a validation split",
        "ResNet-56 on CIFAR-10, ResNet-50 on ImageNet, 2-layer LSTM LM on a text corpus",
        ("cifar10", "imagenet", "text"),
        cost=4.0,
    ),
}


def parse_claims(text: str | Iterable[str] | None) -> list[str]:
    """Claim ids from ``"C1,C3"`` (case-insensitive, spaces allowed) or a list; ``None``/``"all"`` is every claim.

    :raises ConfigError: an unknown id, naming the valid ones.
    """
    if text is None:
        return list(CLAIMS)
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        cid = str(item).strip().upper()
        if not cid:
            continue
        if cid == "ALL":
            return list(CLAIMS)
        if cid.isdigit():
            cid = "C" + cid
        if cid not in CLAIMS:
            raise ConfigError(f"--claims: unknown claim {item.strip()!r}; expected a comma-separated list of "
                              f"{', '.join(CLAIMS)}")
        if cid not in out:
            out.append(cid)
    if not out:
        raise ConfigError(f"--claims: no claim given; expected a comma-separated list of {', '.join(CLAIMS)}")
    return out


def check_run_args(claim: str, scale: str, seeds: Iterable[int]) -> tuple[int, ...]:
    """Check a claim module's ``scale`` and ``seeds`` arguments; return the seeds as a tuple of ints.

    :raises ConfigError: an unknown scale, no seed, or a seed that is not an integer.
    """
    if scale not in SCALES:
        raise ConfigError(f"{claim}: scale must be one of {', '.join(SCALES)}, got {scale!r}")
    try:
        out = tuple(int(s) for s in seeds)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{claim}: seeds must be integers, got {seeds!r}") from exc
    if not out:
        raise ConfigError(f"{claim}: seeds must name at least one seed")
    return out


def claim_module(claim_id: str) -> Any:
    """The module of a claim (imported on first use).

    :raises ConfigError: an unknown claim id.
    """
    info = CLAIMS.get(str(claim_id).upper())
    if info is None:
        raise ConfigError(f"claim: unknown claim {claim_id!r}; expected one of {', '.join(CLAIMS)}")
    return importlib.import_module(info.module)


def verdict_for(claim_id: str, result: dict[str, Any]) -> Any:
    """The :class:`~.verdicts.Verdict` of one claim's result (``status`` ``"ok"`` and ``rows``), by its module's rule."""
    if result.get("status") != "ok":
        return Verdict(f"not run: {result.get('error', 'unknown error')}", "the claim did not run")
    return claim_module(claim_id).verdict(list(result.get("rows", [])))


def load_claim(claim_id: str) -> Callable[..., dict[str, Any]]:
    """The ``run`` function of a claim's module.

    :raises ConfigError: an unknown claim id.
    :raises ImportError: the module is missing or fails to import (reported as "not run").
    :raises AttributeError: the module has no ``run``.
    """
    mod = claim_module(claim_id)
    fn = getattr(mod, "run", None)
    if not callable(fn):
        raise AttributeError(f"{mod.__name__} defines no run(out_dir, *, seeds, scale, progress)")
    return fn


# ---------------------------------------------------------------------------------------------
# The run cache
# ---------------------------------------------------------------------------------------------
#: Config fields that change how a run is carried out or logged but not its numbers.
_NOT_IN_KEY = ("plots", "checkpoint", "threads", "num_workers")


def run_key(config: Any, variant: str = "") -> str:
    """A 12-hex-digit hash of everything that determines a run's numbers.

    :param config: a :class:`~normmatters.experiments.config.TrainConfig`.
    :param variant: what the config does not say but changes the run (an optimizer factory, a model
        transform), as a stable string such as ``"lr-correction"``.
    """
    d = dict(config.to_dict())
    for k in _NOT_IN_KEY:
        d.pop(k, None)
    blob = json.dumps({"config": d, "variant": variant}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "run"


def run_folder(config: Any, cache_dir: str | os.PathLike, variant: str = "") -> Path:
    """The folder of ``config`` in the run cache: ``<model>-<dataset>-<norm>[-<variant>]-s<seed>-<key>``."""
    extra = "".join(f"-{v}" for _, v in sorted((config.norm_kwargs or {}).items()))
    name = f"{config.model}-{config.dataset}-{config.norm}{extra}{'-' + variant if variant else ''}-s{config.seed}"
    return Path(cache_dir) / f"{_slug(name)}-{run_key(config, variant)}"


def completed_summary(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The summary of a finished run in ``folder``, or ``None`` if it has not finished.

    A run has finished when :func:`~normmatters.experiments.trainer.train` wrote its
    ``summary.json`` (after its last epoch, or after a callback stopped it); an unreadable summary
    counts as unfinished, so the run is resumed from its checkpoint instead of trusted.
    """
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return None
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is unreadable; the run will be resumed", path)
        return None
    return s if isinstance(s, dict) else None


def cached_train(
    config: Any,
    cache_dir: str | os.PathLike,
    *,
    variant: str = "",
    progress: bool = True,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Train ``config`` once: reuse a finished run of the same config, resume an unfinished one.

    :param config: the run's :class:`~normmatters.experiments.config.TrainConfig`.
    :param cache_dir: the run cache (one sub-folder per run, see :func:`run_folder`).
    :param variant: required when ``train_kwargs`` holds an ``optimizer_factory``, ``model`` or
        ``model_transform``, which change the run without changing its config: the cache key
        must tell such runs apart.
    :param progress: tqdm bars of the training.
    :param train_kwargs: passed to :func:`~normmatters.experiments.trainer.train` (``callbacks``,
        ``optimizer_factory``, ``model_transform``, ``model``).
    :returns: the run's summary with ``"reused"`` (``True`` if read back) and ``"run_dir"``.
    :raises ValueError: a changing keyword without ``variant``.
    """
    for key in ("optimizer_factory", "model_transform", "model"):
        if train_kwargs.get(key) is not None and not variant:
            raise ValueError(f"cached_train: {key}= changes the run, so pass variant= to name it in the cache key")
    folder = run_folder(config, cache_dir, variant)
    with _run_lock(folder):
        # Under the lock: a second process asking for the same run waits for the first to finish
        # it, then reads it back instead of training it again in the same folder.
        summary = completed_summary(folder)
        if summary is not None:
            log.info("reused finished run %s", folder)
            summary.update(reused=True, run_dir=str(folder))
            return summary
        from ..trainer import CHECKPOINT_NAME, train

        resume = (folder / CHECKPOINT_NAME).is_file()
        if resume:
            log.info("resuming unfinished run %s", folder)
        summary = train(config, folder, progress=progress, resume=resume, **train_kwargs)
    summary.update(reused=False, run_dir=str(folder))
    return summary


@contextlib.contextmanager
def _run_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder/.lock`` (POSIX ``flock``; no lock where unavailable)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: runs in one process at a time only
        yield
        return
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Paper-scale data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataStatus:
    """Whether one paper-scale dataset is on disk.

    :ivar name: ``"cifar10"``, ``"imagenet"`` or ``"text"``.
    :ivar path: where it is looked for.
    :ivar present: all of it is there.
    :ivar detail: what is missing, or what was found.
    :ivar how: how to provide it.
    """

    name: str
    path: str
    present: bool
    detail: str
    how: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "present": self.present, "detail": self.detail,
                "how": self.how}


#: The text file a paper-scale language model trains on, inside ``--data-root``.
PAPER_TEXT_FILE = "lm_corpus.txt"


def paper_data(data_root: str | os.PathLike | None = None) -> dict[str, DataStatus]:
    """Check the paper-scale datasets under ``data_root`` without loading them.

    Layout: ``<root>/cifar-10-batches-py/`` (the CIFAR-10 python archive, unpacked),
    ``<root>/imagenet/train/<class>/…`` and ``<root>/imagenet/val/<class>/…``, and
    ``<root>/lm_corpus.txt`` (any UTF-8 text, e.g. the English side of WMT14) for the language
    models. ``data_root=None`` looks in ``$NORMMATTERS_CACHE_DIR/data`` (``~/.cache/normmatters/data``),
    where ``normmatters train --download`` puts CIFAR.
    """
    from ..data import cache_dir
    from ..data.cifar import CIFAR_SPECS

    root = Path(data_root) if data_root is not None else cache_dir(None, "data")
    out: dict[str, DataStatus] = {}

    spec = CIFAR_SPECS["cifar10"]
    folder = root / spec["folder"]
    needed = spec["train"] + spec["test"] + [spec["meta"]]
    missing = [f for f in needed if not (folder / f).is_file()]
    out["cifar10"] = DataStatus(
        "cifar10", str(folder), not missing,
        "all batch files present" if not missing else
        ("folder not found" if len(missing) == len(needed) else f"missing {', '.join(missing)}"),
        f"download {spec['url']} (MD5 {spec['md5']}) and unpack it in {root}, or run "
        f"`normmatters train --dataset cifar10 --download --data-root {root}` once",
    )

    inet = root / "imagenet"
    problems = []
    for split in ("train", "val"):
        d = inet / split
        if not d.is_dir():
            problems.append(f"{d} not found")
        elif not any(p.is_dir() for p in d.iterdir()):
            problems.append(f"{d} has no class folders")
    out["imagenet"] = DataStatus(
        "imagenet", str(inet), not problems, "; ".join(problems) or "train/ and val/ class folders present",
        f"put the ILSVRC-2012 images in {inet}/train/<class>/*.JPEG and {inet}/val/<class>/*.JPEG "
        "(validation images sorted into class folders)",
    )

    text = root / PAPER_TEXT_FILE
    out["text"] = DataStatus(
        "text", str(text), text.is_file(), "present" if text.is_file() else "file not found",
        f"save a large UTF-8 text corpus (e.g. the English side of WMT14 news-commentary) as {text}",
    )
    return out


def missing_paper_data(claim_id: str, data_root: str | os.PathLike | None = None) -> list[DataStatus]:
    """The paper-scale datasets claim ``claim_id`` needs that are not on disk."""
    status = paper_data(data_root)
    return [status[n] for n in CLAIMS[claim_id].paper_data if not status[n].present]
