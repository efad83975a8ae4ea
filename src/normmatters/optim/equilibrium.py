"""Rotational equilibrium: the angular update and norm that weight decay settles a
scale-invariant neuron at (Wan et al. 2021; Kosson, Messmer & Jaggi 2024).

A weight followed by a normalization is scale invariant (Hoffer et al. 2018, §2): its gradient is
orthogonal to it and shrinks as ``1/‖w‖``. The optimizer's updates are then (nearly) orthogonal
to ``w`` and make its norm grow like a random walk, while weight decay shrinks it by a fixed
fraction per step. The two balance at an *equilibrium* where each neuron (output channel, or
whatever block of the weight a normalization makes separately invariant) turns through a fixed
expected angle per step that depends on the hyperparameters only:

=====================================  ==============================================================
optimizer (torch semantics)            expected angular update per step at equilibrium
=====================================  ==============================================================
SGD, momentum α, dampening d           ``√(2ηλ(1−d)/(1+α))``            (Wan et al. 2021, SMD)
SGD, Nesterov momentum α               ``√(2ηλ(1+2α−2α³)/(1+α))``       (derived in docs/equilibrium.md)
AdamW (decoupled decay), β₁            ``√(2ηλ(1−β₁)/(1+β₁))``          (Kosson et al. 2024)
Lion (decoupled decay), β₁, β₂         ``√(2ηλ/S(β₁, β₂))``, S the sum of the sign updates'
                                       autocorrelations (derived in docs/equilibrium.md)
Adam with L2 decay (coupled)           per neuron, from its gradient scale (see below)
=====================================  ==============================================================

The equilibrium norm of a neuron with ``C`` weights is ``√(ηC/(2λ))`` for AdamW and
``√(ηCS/(2λ))`` for Lion; for SGD it depends on the gradient's size
(``‖w‖⁴ = ηG²/(2λ(1−α))`` with ``G`` the gradient norm on the unit sphere), which the
hyperparameters do not fix, so none is given. Adam with L2 decay divides the decay by Adam's
second moment, so its equilibrium depends on each neuron's gradient scale (Kosson et al. 2024:
the source of its unbalanced rotation); it is estimated here from the optimizer's ``exp_avg_sq``
state, so it exists only after the first step.

The time constant is ``τ = 1/δ`` steps, with ``δ`` the fraction of the weight removed by the
decay per step (``ηλ`` for AdamW and Lion, ``ηλ(1−d)/(1−α)`` for SGD with momentum). ``‖w‖²``
approaches its equilibrium like ``e^{−2t/τ}`` (AdamW, Lion), ``‖w‖⁴`` like ``e^{−4t/τ}`` (SGD); a
few ``τ`` are enough. The predictions hold for every p of an Lp normalization, which makes its
input weights scale invariant as L2 does. The full derivations are in ``docs/equilibrium.md``.

Example::

    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    >>> eq = rotational_equilibrium(opt)
    >>> round(eq[0].angular_update, 5)        # √(2·1e-3·0.1·0.1/1.9)
    0.00324
    >>> round(eq[0].time_constant)           # 1/(ηλ) steps
    10000
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from normmatters.optim.results import ScaleInvariantParam

__all__ = ["GroupEquilibrium", "rotational_equilibrium", "lion_correlation_sum",
           "equilibrium_theory"]

#: the optimizers the predictions cover, by theory key
COVERED = {
    "sgd": "SGD (with or without momentum, with dampening)",
    "sgd_nesterov": "SGD with Nesterov momentum",
    "adamw": "AdamW (and Adam with decoupled_weight_decay=True)",
    "adam_l2": "Adam with L2 weight decay (per neuron, from its second moments)",
    "lion": "Lion (decoupled weight decay; Chen et al. 2023)",
}


@dataclass(frozen=True)
class GroupEquilibrium:
    """The predicted rotational equilibrium of one parameter group.

    Attributes:
        index: the group's position in ``optimizer.param_groups``.
        theory: which derivation applies (a key of ``COVERED``: ``"sgd"``, ``"sgd_nesterov"``,
            ``"adamw"``, ``"adam_l2"``, ``"lion"``), or ``None`` when none does.
        lr: the group's current learning rate ``η`` (the prediction follows the schedule).
        weight_decay: the group's ``λ``.
        angular_update: expected angle (radians) a scale-invariant neuron turns through per step
            at equilibrium; for Adam + L2 the mean of ``neuron_angular_update``. ``None`` when the
            group has no weight decay or no theory (see ``reason``).
        time_constant: ``τ`` in steps, the inverse of the fraction of the weight the decay
            removes per step (for Adam + L2 the slowest neuron's); ``None`` as above.
        norm: ``{name: (blocks,) tensor}``, the equilibrium norm of each neuron of each
            scale-invariant parameter of the group, where the theory gives one (AdamW, Lion,
            Adam + L2); ``None`` otherwise (SGD: it depends on the gradient's size).
        neuron_angular_update: ``{name: (blocks,) tensor}`` per-neuron angular updates where
            they differ between neurons (Adam + L2), else ``None``.
        reason: why a value is ``None``, or the assumptions behind the prediction.
    """

    index: int
    theory: str | None
    lr: float
    weight_decay: float
    angular_update: float | None
    time_constant: float | None
    norm: dict[str, Tensor] | None = field(default=None, repr=False)
    neuron_angular_update: dict[str, Tensor] | None = field(default=None, repr=False)
    reason: str = ""


def lion_correlation_sum(beta1: float, beta2: float) -> float:
    """``S = Σ_{j∈ℤ} corr(u_t, u_{t+j})`` for Lion's sign update ``u_t = sign(β₁m + (1−β₁)g_t)``
    with i.i.d. Gaussian gradients: ``S = 1 + 2Σ_{j≥1} (2/π)·arcsin(ρ_j)``, ``ρ_j = A·β₂^{j−1}``
    the correlation of the interpolated momenta ``j`` steps apart (Sheppard's formula for the
    signs of Gaussians). See docs/equilibrium.md for ``A``.
    """
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"lion_correlation_sum: betas must lie in [0, 1), got ({beta1}, {beta2})")
    b1, b2 = float(beta1), float(beta2)
    var = (1 - b1) ** 2 + b1 * b1 * (1 - b2) / (1 + b2)
    if var == 0.0:
        return 1.0
    cov1 = b1 * (1 - b2) * ((1 - b1) + b1 * b2 / (1 + b2))
    a = cov1 / var
    total, rho = 0.0, a
    # Sum exactly while arcsin is nonlinear, then the geometric tail of arcsin(x) ≈ x + x³/6.
    while rho > 1e-4:
        total += math.asin(rho)
        rho *= b2
    if rho > 0.0 and b2 > 0.0:
        total += rho / (1 - b2) + rho**3 / (6 * (1 - b2**3))
    return 1.0 + 2.0 * (2.0 / math.pi) * total


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    names = [c.__name__ for c in type(optimizer).__mro__]
    for n in names:  # the most derived known class decides (AdamW before its base Adam)
        if n in ("SGD", "Adam", "AdamW", "Lion"):
            return n
    return type(optimizer).__name__


def equilibrium_theory(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> tuple[str | None, str]:
    """Which derivation applies to ``group`` of ``optimizer``: ``(theory key or None, reason)``."""
    kind = _optimizer_kind(optimizer)
    if float(group.get("weight_decay", 0.0) or 0.0) <= 0.0:
        return None, "no weight decay: the norm grows without bound and there is no equilibrium"
    if group.get("maximize", False):
        return None, "maximize=True is not covered"
    if kind == "SGD":
        if group.get("nesterov", False):
            return "sgd_nesterov", ""
        return "sgd", ""
    if kind in ("Adam", "AdamW"):
        if group.get("amsgrad", False):
            return None, "AMSGrad (a running maximum of the second moment) is not covered"
        decoupled = kind == "AdamW" or bool(group.get("decoupled_weight_decay", False))
        return ("adamw", "") if decoupled else ("adam_l2", "")
    if kind == "Lion":
        return "lion", ""
    return None, (f"{kind} is not covered; covered: "
                  + "; ".join(COVERED.values()))


def _sgd_rates(group: Mapping[str, Any], nesterov: bool) -> tuple[float, float]:
    """(angular update, decay fraction per step δ) for SGD."""
    eta, lam = float(group["lr"]), float(group["weight_decay"])
    alpha = float(group.get("momentum", 0.0) or 0.0)
    damp = float(group.get("dampening", 0.0) or 0.0) if alpha > 0 else 0.0
    delta = eta * lam * (1 - damp) / (1 - alpha)
    if nesterov:
        ang2 = 2 * eta * lam * (1 + 2 * alpha - 2 * alpha**3) / (1 + alpha)
    else:
        ang2 = 2 * eta * lam * (1 - damp) / (1 + alpha)
    return math.sqrt(ang2), delta


def _decoupled_constants(theory: str, group: Mapping[str, Any]) -> tuple[float, float]:
    """(S, e₁) of a decoupled-decay optimizer: ``e₁·C`` is the expected squared norm of one
    step's update of a neuron with ``C`` weights (in units of η²), ``S·e₁·C`` the long-run sum
    of the updates' autocovariances. AdamW: ``e₁ = (1−β₁)/(1+β₁)``, ``S = 1/e₁`` (each gradient's
    momentum contributions add up to the gradient itself); Lion: ``e₁ = 1`` (a sign per weight),
    ``S`` from :func:`lion_correlation_sum`."""
    b1 = float(group["betas"][0])
    if theory == "adamw":
        e1 = (1 - b1) / (1 + b1)
        return 1.0 / e1, e1
    return lion_correlation_sum(b1, float(group["betas"][1])), 1.0


def _blocks(p: Tensor, channel_dim: int, groups: int | None) -> tuple[Tensor, int]:
    """(rows (blocks, C) of ``p``, C)."""
    if p.dim() == 0:
        rows = p.reshape(1, 1)
    else:
        rows = p.movedim(channel_dim, 0).reshape(p.shape[channel_dim], -1)
    n = rows.shape[0]
    g = n if groups is None else groups
    rows = rows.reshape(g, -1)
    return rows, rows.shape[1]


@torch.no_grad()
def _adam_l2_neuron(
    optimizer: torch.optim.Optimizer, group: Mapping[str, Any], p: Tensor, channel_dim: int,
    groups: int | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Per-neuron (angular update, norm, time constant) of Adam + L2 from ``exp_avg_sq``."""
    st = optimizer.state.get(p, {})
    v = st.get("exp_avg_sq")
    if not isinstance(v, Tensor) or "step" not in st:
        return None
    step = float(st["step"])
    if step < 1:
        return None
    eta, lam = float(group["lr"]), float(group["weight_decay"])
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group.get("eps", 1e-8))
    k = (1 - beta1) / (1 + beta1)
    w, c = _blocks(p.detach().double(), channel_dim, groups)
    vv, _ = _blocks(v.detach().double(), channel_dim, groups)
    vhat = vv / (1 - beta2**step)
    norm_now = torch.linalg.vector_norm(w, dim=1).clamp_min(1e-300)
    # Radial shrink per step of the decay term ηλw/(√v̂+ε), per unit ηλ: S = Σ ŵ_j²/(√v̂_j+ε).
    s_now = ((w / norm_now[:, None]) ** 2 / (vhat.sqrt() + eps)).sum(1).clamp_min(1e-300)
    # S ∝ ‖w‖ (the gradient, hence √v̂, scales as 1/‖w‖); balance 2ηλS‖w‖² = η²C.
    norm_eq = (eta * c * norm_now / (2 * lam * s_now)).pow(1.0 / 3.0)
    s_eq = s_now * norm_eq / norm_now
    ang = eta * math.sqrt(c * k) / norm_eq
    tau = 1.0 / (eta * lam * s_eq)
    return ang, norm_eq, tau


def _named_params(
    optimizer: torch.optim.Optimizer, invariant: Mapping[str, Any] | None
) -> list[list[tuple[str, Tensor, int, int | None]]]:
    """Per group: (name, param, channel_dim, groups) of the parameters a prediction is made for."""
    out: list[list[tuple[str, Tensor, int, int | None]]] = []
    if invariant is not None:
        by_id: dict[int, tuple[str, Tensor, int, int | None]] = {}
        for name, v in invariant.items():
            if isinstance(v, ScaleInvariantParam):
                by_id[id(v.param)] = (name, v.param, v.channel_dim, v.groups)
            elif isinstance(v, Tensor):
                by_id[id(v)] = (name, v, 0, None)
            else:
                raise TypeError(
                    "rotational_equilibrium: invariant must map names to ScaleInvariantParam "
                    f"(from scale_invariant_parameters) or tensors; {name!r} is "
                    f"{type(v).__name__}"
                )
        for g in optimizer.param_groups:
            out.append([by_id[id(p)] for p in g["params"] if id(p) in by_id])
        return out
    for gi, g in enumerate(optimizer.param_groups):
        out.append([(f"{gi}.{k}", p, 0, None) for k, p in enumerate(g["params"]) if p.dim() >= 2])
    return out


def rotational_equilibrium(
    optimizer: torch.optim.Optimizer,
    invariant: Mapping[str, ScaleInvariantParam | Tensor] | None = None,
) -> list[GroupEquilibrium]:
    """Predict the rotational equilibrium of every parameter group of ``optimizer``.

    Uses each group's current ``lr`` (so it follows an LR schedule: the prediction is the
    equilibrium the current rate leads to; the weights reach it after a few time constants),
    ``weight_decay`` and momentum / betas. See the module docstring for the formulas and
    docs/equilibrium.md for their derivation (Wan et al. 2021; Kosson et al. 2024).

    Args:
        optimizer: a :class:`torch.optim.SGD`, :class:`~torch.optim.Adam` (L2 or decoupled
            decay), :class:`~torch.optim.AdamW`, or a Lion optimizer (a class named ``Lion`` with
            ``betas`` and decoupled ``weight_decay``, as in lion-pytorch and timm); other
            optimizers get ``None`` predictions with a reason.
        invariant: the scale-invariant parameters (from
            :func:`~normmatters.optim.scale_invariant_parameters`), which name the parameters
            and say which blocks of channels are neurons; without it every parameter with ≥ 2
            dimensions counts, one neuron per slice along dim 0, named ``"group.position"``.

    Returns:
        One :class:`GroupEquilibrium` per parameter group, in order.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"rotational_equilibrium: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    named = _named_params(optimizer, invariant)
    result: list[GroupEquilibrium] = []
    for gi, group in enumerate(optimizer.param_groups):
        theory, reason = equilibrium_theory(optimizer, group)
        eta = float(group["lr"])
        lam = float(group.get("weight_decay", 0.0) or 0.0)
        ang: float | None = None
        tau: float | None = None
        norms: dict[str, Tensor] | None = None
        per_neuron: dict[str, Tensor] | None = None
        if theory is not None and eta <= 0:
            theory, reason = None, "lr is 0: nothing moves"
        if theory in ("sgd", "sgd_nesterov"):
            ang, delta = _sgd_rates(group, theory == "sgd_nesterov")
            tau = 1.0 / delta
            reason = ("the equilibrium norm depends on the gradient's size "
                      "(‖w‖⁴ = ηG²/(2λ(1−α))), not on the hyperparameters alone")
        elif theory in ("adamw", "lion"):
            s, e1 = _decoupled_constants(theory, group)
            ang = math.sqrt(2 * eta * lam / s)
            tau = 1.0 / (eta * lam)
            norms = {}
            for name, p, cdim, blocks in named[gi]:
                rows, c = _blocks(p.detach(), cdim, blocks)
                norms[name] = torch.full((rows.shape[0],), math.sqrt(eta * c * e1 * s / (2 * lam)),
                                         dtype=torch.float64)
        elif theory == "adam_l2":
            norms, per_neuron = {}, {}
            taus: list[float] = []
            for name, p, cdim, blocks in named[gi]:
                got = _adam_l2_neuron(optimizer, group, p, cdim, blocks)
                if got is None:
                    continue
                per_neuron[name], norms[name], t = got
                taus.append(float(t.max()))
            if per_neuron:
                ang = float(torch.cat(list(per_neuron.values())).mean())
                tau = max(taus)
                reason = ("Adam + L2: per neuron, from the optimizer's second moments "
                          "(assumes noise-dominated, stationary gradients)")
            else:
                norms, per_neuron = None, None
                reason = ("Adam + L2: the equilibrium depends on each neuron's gradient scale, "
                          "read from the optimizer's exp_avg_sq: call after at least one step")
        result.append(GroupEquilibrium(gi, theory, eta, lam, ang, tau, norms, per_neuron, reason))
    return result


def neuron_equilibrium(
    optimizer: torch.optim.Optimizer, p: Tensor, channel_dim: int = 0, groups: int | None = None
) -> tuple[float | None, Tensor | None]:
    """Predicted (angular update per step, per-neuron norm or None) of one parameter ``p`` of
    ``optimizer`` (``(None, None)`` when its group has no theory or no decay). Used by
    :class:`~normmatters.optim.NormTracker`."""
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            break
    else:
        return None, None
    theory, _ = equilibrium_theory(optimizer, group)
    eta = float(group["lr"])
    if theory is None or eta <= 0:
        return None, None
    lam = float(group["weight_decay"])
    if theory in ("sgd", "sgd_nesterov"):
        return _sgd_rates(group, theory == "sgd_nesterov")[0], None
    if theory in ("adamw", "lion"):
        s, e1 = _decoupled_constants(theory, group)
        rows, c = _blocks(p.detach(), channel_dim, groups)
        return (math.sqrt(2 * eta * lam / s),
                torch.full((rows.shape[0],), math.sqrt(eta * c * e1 * s / (2 * lam)),
                           dtype=torch.float64))
    got = _adam_l2_neuron(optimizer, group, p, channel_dim, groups)
    if got is None:
        return None, None
    return float(got[0].mean()), got[1]
