"""Tracking weight norms, effective learning rates and angular updates (claim C1).

For a scale-invariant weight ``w`` trained by SGD with learning rate ``η``, the direction
``ŵ = w/‖w‖`` moves as

.. math::

    Δŵ ≈ -\\frac{η}{‖w‖^2} (I - ŵŵ^T) ∇L(ŵ)

(Hoffer et al. 2018, §2), so ``η/‖w‖²`` is the *effective learning rate*. With Adam the step
is normalized coordinate-wise, its size no longer depends on the gradient's scale, and the
angular step is ``∝ η/‖w‖``; the tracker then records ``η/‖w‖`` (``rule="adam"``).

:class:`NormTracker` is a small object with a :meth:`~NormTracker.step` method, to be called
after each ``optimizer.step()`` in any training loop. Each record holds, per tracked layer,
``‖w‖₂``, the effective LR and the angle (radians) the weight turned through since the
previous record, for the whole tensor and per output channel. Records are kept in memory and
appended to a JSONL file, one line per record::

    {"step": 120, "epoch": 3, "layers": {"0.weight": {"norm": 2.1, "lr": 0.1,
      "eff_lr": 0.0227, "angle": 0.0041, "channel_norm": [...], "channel_eff_lr": [...],
      "channel_angle": [...]}}}

:func:`plot_norm_log` turns such a log (or a tracker) into a PNG.

With ``equilibrium=True`` the tracker also measures every step the angle each neuron turned
through and records, beside its mean (``step_angle``) and the mean neuron norm
(``neuron_norm``), the rotational equilibrium predicted for the current learning rate
(``eq_angle``, ``eq_norm``; Wan et al. 2021, Kosson et al. 2024; see
:func:`~normmatters.optim.rotational_equilibrium`). The plot then shows both per layer.

Example::

    tracker = NormTracker(scale_invariant_parameters(model, x), optimizer, log_path="norms.jsonl")
    for x, y in loader:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        tracker.step()
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normmatters.optim.equilibrium import neuron_equilibrium
from normmatters.optim.invariance import ScaleInvariantParam

__all__ = ["NormTracker", "ReferenceNorms", "read_norm_log", "plot_norm_log", "angle_between",
           "effective_lr_rule"]

_ADAM_LIKE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam")


def effective_lr_rule(optimizer: torch.optim.Optimizer | None) -> str:
    """``"adam"`` for the Adam family (angular step ∝ η/‖w‖), ``"sgd"`` otherwise (η/‖w‖²)."""
    if optimizer is None:
        return "sgd"
    names = {c.__name__ for c in type(optimizer).__mro__}
    return "adam" if names & set(_ADAM_LIKE) else "sgd"


def angle_between(a: Tensor, b: Tensor, dim: int | None = None) -> Tensor:
    """Angle (radians) between ``a`` and ``b`` (flattened, or rows along ``dim``).

    Uses ``2·atan2(‖â − b̂‖, ‖â + b̂‖)``, which stays accurate for tiny angles where
    ``arccos`` of a cosine near one loses every digit.
    """
    if dim is None:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    else:
        a = a.movedim(dim, 0).reshape(a.shape[dim], -1)
        b = b.movedim(dim, 0).reshape(b.shape[dim], -1)
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(1e-300)
    b = b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp_min(1e-300)
    ang = 2 * torch.atan2(torch.linalg.vector_norm(a - b, dim=1),
                          torch.linalg.vector_norm(a + b, dim=1))
    return ang if dim is not None else ang[0]


@dataclass
class _Tracked:
    name: str
    param: Tensor
    channel_dim: int
    groups: int | None = None  # blocks of channels that are separately invariant (None: each)


def _normalize_params(
    params: nn.Module | Mapping[str, Any] | Iterable[tuple[str, Tensor]],
) -> list[_Tracked]:
    if isinstance(params, nn.Module):
        # Default for a whole model: every weight with at least two dimensions.
        return [_Tracked(n, p, 0) for n, p in params.named_parameters() if p.dim() >= 2]
    items = params.items() if isinstance(params, Mapping) else params
    out: list[_Tracked] = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "NormTracker: params must be a module, a mapping {name: tensor or "
                "ScaleInvariantParam} or (name, tensor) pairs; got an element of type "
                f"{type(item).__name__}"
            )
        name, v = item
        if isinstance(v, ScaleInvariantParam):
            out.append(_Tracked(name, v.param, v.channel_dim, v.groups))
        elif isinstance(v, Tensor):
            out.append(_Tracked(name, v, 0))
        else:
            raise TypeError(
                f"NormTracker: params[{name!r}] must be a Tensor or ScaleInvariantParam, got "
                f"{type(v).__name__}"
            )
    if not out:
        raise ValueError("NormTracker: nothing to track (params is empty)")
    return out


def _rows(t: Tensor, channel_dim: int) -> Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


class NormTracker:
    """Records ‖w‖₂, the effective learning rate and the angular update of weights.

    Args:
        params: what to track — the result of
            :func:`~normmatters.optim.scale_invariant_parameters` (channels along each
            parameter's ``channel_dim``), a mapping or pairs ``(name, tensor)`` (channels along
            dim 0), or a module (all its weights with ≥ 2 dimensions).
        optimizer: where the learning rate of each parameter is read (``group["lr"]``);
            without it no effective LR is recorded.
        log_path: JSONL file the records are appended to (created with its folder).
        every: record every ``every`` calls of :meth:`step` (the angle is then the rotation
            over those ``every`` updates).
        per_channel: also put per-channel values (lists) in the records; the per-channel
            norms are kept for :meth:`reference_norms` either way.
        rule: ``"sgd"`` (effective LR ``η·s/‖w‖²``), ``"adam"`` (``η·s/‖w‖``) or ``"auto"``
            (from the optimizer's class).
        lr_scale: optional ``callable(name) -> per-channel tensor or None``: a per-channel
            learning-rate multiplier ``s`` applied on top of ``η`` (e.g.
            :meth:`LRCorrection.channel_scale <normmatters.optim.LRCorrection.channel_scale>`).
        record_initial: record the initial state as step 0.
        equilibrium: also measure, every step, the angle each neuron (a block of channels that
            is separately scale invariant: ``groups`` of a
            :class:`~normmatters.optim.ScaleInvariantParam`, else one output channel) turned
            through, and record its mean over neurons and steps since the previous record
            (``step_angle``), the mean neuron norm (``neuron_norm``) and the rotational
            equilibrium predicted at the current learning rate (``eq_angle``, ``eq_norm`` where
            the theory gives them). Needs ``optimizer``; costs one copy of the tracked weights.

    The learning rate and multiplier are those of the update that produced the current
    weights' *next* step, i.e. what the optimizer will use from now on: after a scheduler's
    ``step()`` at an epoch boundary, call :meth:`step` afterwards to see the new rate.
    """

    def __init__(
        self,
        params: nn.Module | Mapping[str, Any] | Iterable[tuple[str, Tensor]],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        log_path: str | os.PathLike[str] | None = None,
        every: int = 1,
        per_channel: bool = True,
        rule: str = "auto",
        lr_scale: Callable[[str], Tensor | None] | None = None,
        record_initial: bool = True,
        equilibrium: bool = False,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"NormTracker: every must be a positive int, got {every!r}")
        if rule not in ("auto", "sgd", "adam"):
            raise ValueError(f"NormTracker: rule must be 'auto', 'sgd' or 'adam', got {rule!r}")
        if equilibrium and optimizer is None:
            raise ValueError("NormTracker: equilibrium=True needs the optimizer (its groups' lr, "
                             "weight decay and momentum give the prediction)")
        self.tracked = _normalize_params(params)
        self.equilibrium = bool(equilibrium)
        self._step_prev: dict[str, Tensor] = {}
        self._step_angle_sum: dict[str, float] = {t.name: 0.0 for t in self.tracked}
        self._step_angle_count = 0
        if self.equilibrium:
            self._step_prev = {t.name: t.param.detach().clone() for t in self.tracked}
        self.optimizer = optimizer
        self.every = every
        self.per_channel = per_channel
        self.rule = effective_lr_rule(optimizer) if rule == "auto" else rule
        self.lr_scale = lr_scale
        self.log_path = Path(log_path) if log_path is not None else None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = []
        # Per-channel norms of every record, kept as compact tensors for reference_norms()
        # even when the records themselves carry no per-channel lists.
        self._ref_steps: list[int] = []
        self._ref_epochs: list[int | None] = []
        self._ref_norms: dict[str, list[Tensor]] = {t.name: [] for t in self.tracked}
        self.num_steps = 0
        self.epoch: int | None = None
        self._prev: dict[str, Tensor] = {}
        if record_initial:
            self._record(extra={})
        else:
            self._snapshot()

    # ------------------------------------------------------------------------------------------
    def _lr_of(self, p: Tensor) -> float | None:
        if self.optimizer is None:
            return None
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return float(group["lr"])
        return None

    @staticmethod
    def _neurons(t: _Tracked, w: Tensor) -> Tensor:
        rows = _rows(w, t.channel_dim)
        return rows.reshape(t.groups, -1) if t.groups is not None else rows

    @torch.no_grad()
    def _measure_step(self) -> None:
        for t in self.tracked:
            w = t.param.detach()
            ang = angle_between(self._neurons(t, self._step_prev[t.name]).double(),
                                self._neurons(t, w).double(), dim=0)
            self._step_angle_sum[t.name] += float(ang.mean())
            self._step_prev[t.name].copy_(w)
        self._step_angle_count += 1

    def _equilibrium_entry(self, t: _Tracked, entry: dict[str, Any]) -> None:
        assert self.optimizer is not None
        neurons = torch.linalg.vector_norm(self._neurons(t, t.param.detach()).double(), dim=1)
        entry["neuron_norm"] = float(neurons.mean())
        if self._step_angle_count:
            entry["step_angle"] = self._step_angle_sum[t.name] / self._step_angle_count
        # A wrapper that controls the rotation (RotationalOptimizer) says what it holds.
        predict = getattr(self.optimizer, "neuron_equilibrium", None)
        if callable(predict):
            angle, norm = predict(t.param, t.channel_dim, t.groups)
        else:
            angle, norm = neuron_equilibrium(self.optimizer, t.param, t.channel_dim, t.groups)
        if angle is not None:
            entry["eq_angle"] = angle
        if norm is not None:
            entry["eq_norm"] = float(norm.mean())

    def _snapshot(self) -> None:
        self._prev = {t.name: t.param.detach().clone() for t in self.tracked}

    @torch.no_grad()
    def _record(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        layers: dict[str, Any] = {}
        power = 2.0 if self.rule == "sgd" else 1.0
        for t in self.tracked:
            w = t.param.detach()
            rows = _rows(w, t.channel_dim).double()
            ch_norm = torch.linalg.vector_norm(rows, dim=1)
            self._ref_norms[t.name].append(ch_norm)
            norm = float(torch.linalg.vector_norm(rows))
            entry: dict[str, Any] = {"norm": norm}
            lr = self._lr_of(t.param)
            scale = self.lr_scale(t.name) if self.lr_scale is not None else None
            if scale is not None:
                scale = scale.detach().double().reshape(-1)
                if scale.numel() == 1:
                    scale = scale.expand(rows.shape[0])
            if lr is not None:
                entry["lr"] = lr
                ch_eff = lr * (scale if scale is not None else 1.0) / ch_norm.clamp_min(1e-300) ** power
                if scale is None:
                    entry["eff_lr"] = lr / max(norm, 1e-300) ** power
                else:
                    # Per layer: η/‖w‖^power with each channel's norm divided by its multiplier
                    # s_i^(1/power); with s_i = (‖w_i‖/‖r_i‖)^power this is η/‖r‖^power, the
                    # reference layer's rate.
                    eq = torch.linalg.vector_norm(ch_norm / scale.clamp_min(1e-300) ** (1 / power))
                    entry["eff_lr"] = lr / max(float(eq), 1e-300) ** power
                    entry["lr_scale_mean"] = float(scale.mean())
            prev = self._prev.get(t.name)
            if prev is not None and self.history:
                entry["angle"] = float(angle_between(prev.double(), w.double()))
            if self.per_channel:
                entry["channel_norm"] = ch_norm.tolist()
                if lr is not None:
                    entry["channel_eff_lr"] = ch_eff.tolist()
                if prev is not None and self.history and w.dim() > 0:
                    entry["channel_angle"] = angle_between(
                        prev.double(), w.double(), dim=t.channel_dim
                    ).tolist()
            if self.equilibrium:
                self._equilibrium_entry(t, entry)
            layers[t.name] = entry
        if self.equilibrium:
            self._step_angle_sum = {t.name: 0.0 for t in self.tracked}
            self._step_angle_count = 0
        self._ref_steps.append(self.num_steps)
        self._ref_epochs.append(self.epoch)
        rec: dict[str, Any] = {"step": self.num_steps}
        if self.epoch is not None:
            rec["epoch"] = self.epoch
        rec.update(extra)
        rec["rule"] = self.rule
        rec["layers"] = layers
        self.history.append(rec)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        self._snapshot()
        return rec

    # ------------------------------------------------------------------------------------------
    def step(self, *, epoch: int | None = None, **extra: Any) -> dict[str, Any] | None:
        """Count one optimizer update; record when the count is a multiple of ``every``.

        Args:
            epoch: the current epoch, stored in the records from now on.
            **extra: JSON-serializable values stored in this record (e.g. ``loss=...``).

        Returns:
            The record, or ``None`` when this step was not recorded.
        """
        self.num_steps += 1
        if self.equilibrium:
            self._measure_step()
        if epoch is not None:
            self.epoch = int(epoch)
        if self.num_steps % self.every:
            return None
        return self._record(extra)

    def record(self, **extra: Any) -> dict[str, Any]:
        """Record now, without counting an update (e.g. at the end of an epoch)."""
        return self._record(extra)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch stored in the following records."""
        self.epoch = int(epoch)

    def reference_norms(self) -> ReferenceNorms:
        """The recorded per-channel norms, as a reference for LR correction / norm
        scheduling (see :class:`ReferenceNorms`)."""
        if not self._ref_steps:
            raise ValueError("NormTracker.reference_norms: nothing recorded yet")
        epochs = None
        if all(e is not None for e in self._ref_epochs):
            epochs = torch.tensor(self._ref_epochs, dtype=torch.int64)
        return ReferenceNorms(
            torch.tensor(self._ref_steps, dtype=torch.int64),
            {n: torch.stack(v) for n, v in self._ref_norms.items()},
            epochs,
        )

    def summary(self) -> dict[str, dict[str, float]]:
        """Last recorded ``norm``, ``eff_lr`` and ``angle`` per layer."""
        if not self.history:
            return {}
        return {
            n: {k: v for k, v in e.items() if not isinstance(v, list)}
            for n, e in self.history[-1]["layers"].items()
        }


# ----------------------------------------------------------------------------------------------


@dataclass
class ReferenceNorms:
    """Per-channel weight norms recorded over a run (usually with weight decay on).

    Attributes:
        steps: ``(R,)`` int64, increasing — the optimizer-step count of each record (0 = the
            initial weights).
        norms: ``{name: (R, C)}`` float64 — ‖w_i‖₂ of each output channel at each record.
        epochs: ``(R,)`` int64 or ``None``.
    """

    steps: Tensor
    norms: dict[str, Tensor]
    epochs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.steps.dim() != 1 or self.steps.numel() == 0:
            raise ValueError("ReferenceNorms: steps must be a non-empty 1-d tensor")
        if bool((self.steps[1:] < self.steps[:-1]).any()):
            raise ValueError("ReferenceNorms: steps must be non-decreasing")
        for n, v in self.norms.items():
            if v.dim() != 2 or v.shape[0] != self.steps.numel():
                raise ValueError(
                    f"ReferenceNorms: norms[{n!r}] must have shape (records={self.steps.numel()},"
                    f" channels), got {tuple(v.shape)}"
                )

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> ReferenceNorms:
        """Build from :class:`NormTracker` records (they need ``channel_norm``)."""
        if not records:
            raise ValueError("ReferenceNorms.from_records: no records")
        names = list(records[0]["layers"])
        norms: dict[str, list[list[float]]] = {n: [] for n in names}
        for r in records:
            for n in names:
                e = r["layers"].get(n)
                if e is None or "channel_norm" not in e:
                    raise ValueError(
                        f"ReferenceNorms.from_records: record at step {r.get('step')} lacks "
                        f"channel_norm for {n!r} (track with per_channel=True)"
                    )
                norms[n].append(e["channel_norm"])
        steps = torch.tensor([int(r["step"]) for r in records], dtype=torch.int64)
        epochs = None
        if all("epoch" in r for r in records):
            epochs = torch.tensor([int(r["epoch"]) for r in records], dtype=torch.int64)
        return cls(steps, {n: torch.tensor(v, dtype=torch.float64) for n, v in norms.items()},
                   epochs)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> ReferenceNorms:
        """Load from a :class:`NormTracker` JSONL log."""
        return cls.from_records(read_norm_log(path))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` with :func:`torch.save` (atomically: a temporary file, then
        ``os.replace``)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"steps": self.steps, "norms": self.norms, "epochs": self.epochs}, tmp)
        os.replace(tmp, out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceNorms:
        """Read a file written by :meth:`save` (tensors only: ``weights_only=True``)."""
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or "steps" not in d or "norms" not in d:
            raise ValueError(f"ReferenceNorms.load: {path} is not a saved ReferenceNorms")
        return cls(d["steps"], dict(d["norms"]), d.get("epochs"))

    def at(self, name: str, step: int) -> Tensor:
        """Norms of ``name``'s channels at the last record with ``steps <= step``."""
        if name not in self.norms:
            raise KeyError(f"ReferenceNorms: no reference for parameter {name!r}")
        i = int(torch.searchsorted(self.steps, torch.tensor([step]), right=True)[0]) - 1
        return self.norms[name][max(i, 0)]


def read_norm_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the records of a :class:`NormTracker` JSONL log."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot_equilibrium(ax_angle: Any, ax_norm: Any, records: Sequence[Mapping[str, Any]],
                      name: str) -> None:
    """Measured (solid) and predicted (dashed, same colour) rotation and neuron norm of one
    layer."""
    for ax, measured, predicted in ((ax_angle, "step_angle", "eq_angle"),
                                    (ax_norm, "neuron_norm", "eq_norm")):
        m = [(r["step"], r["layers"][name][measured]) for r in records
             if measured in r["layers"][name]]
        p = [(r["step"], r["layers"][name][predicted]) for r in records
             if predicted in r["layers"][name]]
        color = None
        if m:
            (line,) = ax.plot(*zip(*m), label=name)
            color = line.get_color()
        if p:
            ax.plot(*zip(*p), linestyle="--", color=color)


def plot_norm_log(
    source: NormTracker | Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot ‖w‖, the effective LR and the angular update per layer against the step; for a
    tracker with ``equilibrium=True`` also the measured rotation per step and neuron norm beside
    the predicted equilibrium (dashed), per layer.

    Args:
        source: a tracker, its records, or the path of its JSONL log.
        out_path: the PNG to write (written atomically).
        layers: which layers to draw (default: all).
        title: figure title.

    Returns:
        The path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(source, NormTracker):
        records = source.history
    elif isinstance(source, (str, os.PathLike)):
        records = read_norm_log(source)
    else:
        records = list(source)
    if not records:
        raise ValueError("plot_norm_log: no records to plot")
    names = list(layers) if layers is not None else list(records[0]["layers"])
    with_eq = any("step_angle" in e or "eq_angle" in e
                  for r in records for e in r["layers"].values())
    fig, axes = plt.subplots(1, 5 if with_eq else 3, figsize=(25 if with_eq else 15, 4))
    for n in names:
        rs = [r for r in records if n in r["layers"]]
        steps = [r["step"] for r in rs]
        axes[0].plot(steps, [r["layers"][n]["norm"] for r in rs], label=n)
        eff = [(r["step"], r["layers"][n]["eff_lr"]) for r in rs if "eff_lr" in r["layers"][n]]
        if eff:
            axes[1].plot(*zip(*eff), label=n)
        ang = [(r["step"], r["layers"][n]["angle"]) for r in rs if "angle" in r["layers"][n]]
        if ang:
            axes[2].plot(*zip(*ang), label=n)
        if with_eq:
            _plot_equilibrium(axes[3], axes[4], rs, n)
    rule = records[-1].get("rule", "sgd")
    axes[0].set_title("‖w‖₂")
    axes[1].set_title("effective LR " + ("η/‖w‖²" if rule == "sgd" else "η/‖w‖"))
    axes[2].set_title("angle turned since the previous record (rad)")
    if with_eq:
        axes[3].set_title("rotation per step (rad): measured —, equilibrium - -")
        axes[4].set_title("mean neuron ‖w‖: measured —, equilibrium - -")
    for ax in axes[1:]:
        if any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
    if len(names) <= 12:
        axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out

