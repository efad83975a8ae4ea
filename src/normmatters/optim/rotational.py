"""Rotational variants of torch optimizers: each scale-invariant neuron turns at its equilibrium
rate from the first step, with its norm held fixed (Kosson, Messmer & Jaggi 2024).

With weight decay, a scale-invariant neuron (a weight followed by a normalization; Hoffer et al.
2018, §2) reaches, after a few time constants ``1/(ηλ)``, a rotational equilibrium where it turns
through an angle per step fixed by the hyperparameters (Wan et al. 2021; see
:func:`~normmatters.optim.rotational_equilibrium`). Before it gets there, neurons rotate too fast
or too slow, one reason for learning-rate warm-up. :class:`RotationalOptimizer` skips the
transient: for the scale-invariant parameters of groups with weight decay, it

1. removes the decay from the wrapped optimizer's step (coupled L2 decay by subtracting ``λw``
   from the gradient first, so that the optimizer's ``g + λw`` gives ``g`` back; decoupled decay
   is radial and disappears in step 3);
2. lets the wrapped optimizer step, and takes its displacement ``Δ`` of each neuron as the
   direction;
3. turns each neuron from ``w`` by exactly ``θ_t`` towards the tangent part of ``Δ``:

   .. math::

       w ← r\\,(\\cos θ_t\\, \\hat w + \\sin θ_t\\, Δ_⊥/‖Δ_⊥‖), \\qquad
       θ_t = θ_{eq}(η_0, λ)\\, η_t / η_0,

   with ``r`` the neuron's norm when wrapped, ``θ_eq`` the equilibrium rate at the initial
   learning rate ``η₀`` and ``η_t`` the current one (so a learning-rate schedule scales the
   rotation). A neuron whose displacement has no tangent part does not move.

Every other parameter (not scale invariant, or in a group without weight decay) is stepped
exactly as the wrapped optimizer steps it. A neuron is a block of output channels that a
normalization makes separately invariant (``ScaleInvariantParam.groups``).

Kosson et al. normalize the update by a running average of its size, so that only the *average*
rotation is the equilibrium's; here every step turns by exactly ``θ_t``.

Example::

    >>> inv = scale_invariant_parameters(model, x)
    >>> opt = RotationalOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3,
    ...                                             weight_decay=0.1), inv)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    >>> loss_fn(model(x), y).backward(); opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from normmatters.optim._common import check_invariant
from normmatters.optim.equilibrium import (
    COVERED,
    equilibrium_theory,
    neuron_equilibrium,
)
from normmatters.optim.results import ScaleInvariantParam

__all__ = ["RotationalOptimizer"]

_WRAPPABLE = ("SGD", "Adam", "AdamW", "Lion")
_WHO = "RotationalOptimizer"


def _kind(optimizer: torch.optim.Optimizer) -> str | None:
    for c in type(optimizer).__mro__:
        if c.__name__ in _WRAPPABLE:
            return c.__name__
    return None


def _neurons(p: Tensor, channel_dim: int, groups: int) -> Tensor:
    """(groups, -1) view-or-copy of ``p``'s blocks of output channels."""
    if p.dim() == 0:
        return p.reshape(1, 1)
    return p.movedim(channel_dim, 0).reshape(groups, -1)


def _from_neurons(rows: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    if like.dim() == 0:
        return rows.reshape(())
    return rows.reshape(like.movedim(channel_dim, 0).shape).movedim(0, channel_dim)


class RotationalOptimizer(torch.optim.Optimizer):
    """Wrap a torch ``SGD``, ``Adam``, ``AdamW`` (or a Lion) so that the scale-invariant neurons
    of its weight-decay groups rotate at the equilibrium rate with fixed norms (module docstring).

    The wrapper shares ``param_groups`` and ``state`` with the wrapped optimizer, so learning-rate
    schedulers work on either; ``zero_grad`` is the usual one.

    Args:
        optimizer: the optimizer to wrap (already constructed over all of the model's
            parameters).
        invariant: the scale-invariant parameters, from
            :func:`~normmatters.optim.scale_invariant_parameters`.
        angular_update: the rotation per step at the initial learning rate: ``None`` (each
            group's equilibrium rate, :func:`~normmatters.optim.rotational_equilibrium`), a
            float for every group, or a sequence with one entry (float or ``None``) per group.
            Needed for Adam with L2 decay, whose equilibrium depends on the gradients. Entries
            of groups that are not rotated (no weight decay or no scale-invariant parameter) are
            not used.

    Raises:
        TypeError: for an optimizer other than SGD, Adam, AdamW or Lion, or one already wrapped.
        ValueError: when a group with weight decay and scale-invariant parameters has no
            equilibrium rate (Adam + L2, AMSGrad, ``maximize=True``) and none is given, or has
            ``lr <= 0``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        invariant: Mapping[str, ScaleInvariantParam],
        *,
        angular_update: float | Sequence[float | None] | None = None,
    ) -> None:
        if isinstance(optimizer, RotationalOptimizer):
            raise TypeError(f"{_WHO}: the optimizer is already a RotationalOptimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{_WHO}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        kind = _kind(optimizer)
        if kind is None:
            raise TypeError(
                f"{_WHO}: cannot wrap {type(optimizer).__name__}: it knows how to remove the "
                "weight decay of torch's SGD, Adam and AdamW and of Lion only"
            )
        check_invariant(invariant, optimizer, _WHO)
        groups = optimizer.param_groups
        if angular_update is None or isinstance(angular_update, (int, float)):
            overrides: list[float | None] = [angular_update] * len(groups)  # type: ignore[list-item]
        else:
            overrides = list(angular_update)
            if len(overrides) != len(groups):
                raise ValueError(
                    f"{_WHO}: angular_update has {len(overrides)} entries for "
                    f"{len(groups)} parameter groups"
                )
        for a in overrides:
            if a is not None and not (0.0 < float(a) < math.pi / 2):
                raise ValueError(f"{_WHO}: angular_update must lie in (0, π/2) radians, got {a!r}")

        by_id = {id(info.param): info for info in invariant.values()}
        self.optimizer = optimizer
        self._lr0: list[float | None] = []
        self._rate: list[float | None] = []
        self._coupled: list[bool] = []
        self._members: list[list[ScaleInvariantParam]] = []
        for gi, group in enumerate(groups):
            members = [by_id[id(p)] for p in group["params"] if id(p) in by_id]
            lam = float(group.get("weight_decay", 0.0) or 0.0)
            if not members or lam <= 0.0:
                self._lr0.append(None)
                self._rate.append(None)
                self._coupled.append(False)
                self._members.append([])
                continue
            if group.get("maximize", False):
                raise ValueError(f"{_WHO}: group {gi} has maximize=True, which is not supported")
            lr0 = float(group.get("initial_lr", group["lr"]))
            if not lr0 > 0:
                raise ValueError(f"{_WHO}: group {gi} has lr={lr0!r}; the rotation is scaled by "
                                 "lr/initial lr and needs a positive initial rate")
            theory, reason = equilibrium_theory(optimizer, group)
            rate = overrides[gi]
            if rate is None:
                if theory is None or theory == "adam_l2":
                    why = reason or (
                        "Adam with L2 weight decay has no equilibrium rate fixed by the "
                        "hyperparameters (it depends on each neuron's gradient scale)")
                    raise ValueError(
                        f"{_WHO}: group {gi} of {type(optimizer).__name__}: {why}; pass "
                        "angular_update= (radians per step at the initial lr), or use one of: "
                        + "; ".join(v for k, v in COVERED.items() if k != "adam_l2")
                    )
                rate = _rate_at(optimizer, group, members[0], lr0)
            self._lr0.append(lr0)
            self._rate.append(float(rate))
            self._coupled.append(theory in ("sgd", "sgd_nesterov", "adam_l2")
                                 or (theory is None and kind in ("SGD", "Adam")
                                     and not group.get("decoupled_weight_decay", False)))
            self._members.append(members)
        # The norm each neuron is held at: its norm when wrapped.
        self._norms: dict[int, Tensor] = {}
        for members in self._members:
            for info in members:
                self._norms[id(info.param)] = torch.linalg.vector_norm(
                    _neurons(info.param.detach(), info.channel_dim, info.groups).double(), dim=1)
        # Share the groups (the same dicts) and the state with the wrapped optimizer.
        self._sharing = False
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._share()
        self._sharing = True

    # ------------------------------------------------------------------------------------------
    def _share(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (as an ordinary group: its scale-invariant
        parameters are not rotated)."""
        if not getattr(self, "_sharing", True):  # Optimizer.__init__ on the shared groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._share()
        self._lr0.append(None)
        self._rate.append(None)
        self._coupled.append(False)
        self._members.append([])

    def angular_update(self, group: int = 0) -> float | None:
        """The rotation per step (radians) the neurons of ``group`` take at the current lr
        (``None`` for a group that is not rotated)."""
        rate, lr0 = self._rate[group], self._lr0[group]
        if rate is None or lr0 is None:
            return None
        return rate * float(self.param_groups[group]["lr"]) / lr0

    def neuron_equilibrium(self, param: Tensor, channel_dim: int = 0,
                           groups: int | None = None) -> tuple[float | None, Tensor | None]:
        """(rotation per step, per-neuron norm) that ``param`` is held at: the controlled rate
        and fixed norms for a rotated parameter, the wrapped optimizer's predicted equilibrium
        (:func:`~normmatters.optim.equilibrium.neuron_equilibrium`) for any other. Read by
        :class:`~normmatters.optim.NormTracker`."""
        for gi, members in enumerate(self._members):
            if any(info.param is param for info in members):
                return self.angular_update(gi), self._norms[id(param)]
        return neuron_equilibrium(self.optimizer, param, channel_dim, groups)

    def neuron_norms(self, param: Tensor) -> Tensor:
        """The norms (float64, one per neuron) that ``param``'s neurons are held at."""
        try:
            return self._norms[id(param)]
        except KeyError:
            raise KeyError(f"{_WHO}: that parameter is not rotated") from None

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: the wrapped optimizer's, then the rotation of the scale-invariant neurons."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved: list[tuple[int, ScaleInvariantParam, Tensor, Tensor | None]] = []
        for gi, members in enumerate(self._members):
            if not members:
                continue
            lam = float(self.param_groups[gi]["weight_decay"])
            for info in members:
                p = info.param
                if p.grad is None:
                    continue
                grad0 = None
                if self._coupled[gi]:
                    if p.grad.is_sparse:
                        raise TypeError(f"{_WHO}: sparse gradients are not supported "
                                        f"({info.name})")
                    grad0 = p.grad.clone()
                    p.grad.sub_(p.detach(), alpha=lam)
                saved.append((gi, info, p.detach().clone(), grad0))
        try:
            self.optimizer.step()
        finally:
            for _, info, _, grad0 in saved:
                if grad0 is not None:
                    info.param.grad.copy_(grad0)
        for gi, info, w0, _ in saved:
            theta = self.angular_update(gi)
            assert theta is not None
            p = info.param
            rows0 = _neurons(w0, info.channel_dim, info.groups).double()
            rows1 = _neurons(p.detach(), info.channel_dim, info.groups).double()
            norm0 = torch.linalg.vector_norm(rows0, dim=1, keepdim=True).clamp_min(1e-300)
            w_hat = rows0 / norm0
            d = rows1 - rows0
            d_perp = d - w_hat * (w_hat * d).sum(1, keepdim=True)
            n_perp = torch.linalg.vector_norm(d_perp, dim=1, keepdim=True)
            moves = n_perp > 0
            direction = torch.where(moves, d_perp / n_perp.clamp_min(1e-300), torch.zeros_like(d))
            angle = torch.where(moves, torch.full_like(n_perp, theta), torch.zeros_like(n_perp))
            r = self._norms[id(p)].to(rows0.device)[:, None]
            new = r * (torch.cos(angle) * w_hat + torch.sin(angle) * direction)
            p.copy_(_from_neurons(new.to(p.dtype), p, info.channel_dim))
        return loss

    # ------------------------------------------------------------------------------------------
    def _params_in_order(self) -> list[Tensor]:
        """The parameters in the state dict's numbering (torch's: group order)."""
        seen: dict[int, Tensor] = {}
        for g in self.param_groups:
            for p in g["params"]:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict, plus ``"rotational"``: the initial learning
        rates, the rates, and the norms the neurons are held at."""
        sd = self.optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self._params_in_order())}
        sd["rotational"] = {
            "lr0": list(self._lr0),
            "rate": list(self._rate),
            "norms": {index[pid]: n.clone() for pid, n in self._norms.items()},
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict written by :meth:`state_dict` of a wrapper over the same kind of
        optimizer and the same parameters."""
        if "rotational" not in state_dict:
            raise ValueError(
                f"{_WHO}.load_state_dict: not a RotationalOptimizer state dict (no 'rotational' "
                "entry); load a plain optimizer's state into the wrapped optimizer instead"
            )
        sd = dict(state_dict)
        rot = sd.pop("rotational")
        if len(rot["lr0"]) != len(self._lr0) or len(rot["rate"]) != len(self._rate):
            raise ValueError(f"{_WHO}.load_state_dict: {len(rot['lr0'])} groups saved, "
                             f"{len(self._lr0)} here")
        params = self._params_in_order()  # the same tensors after loading
        norms: dict[int, Tensor] = {}
        for i, n in rot["norms"].items():
            if not 0 <= int(i) < len(params) or id(params[int(i)]) not in self._norms:
                raise ValueError(f"{_WHO}.load_state_dict: saved norms for parameter {i}, which "
                                 "is not rotated here")
            norms[id(params[int(i)])] = n.to(torch.float64).clone()
        if set(norms) != set(self._norms):
            raise ValueError(f"{_WHO}.load_state_dict: the saved rotated parameters differ from "
                             "these")
        self.optimizer.load_state_dict(sd)
        self._share()
        self._norms = norms
        self._lr0 = [None if v is None else float(v) for v in rot["lr0"]]
        self._rate = [None if v is None else float(v) for v in rot["rate"]]

    def __repr__(self) -> str:
        rates = ", ".join("-" if r is None else f"{r:.3g}" for r in self._rate)
        return f"{_WHO}({self.optimizer!r}, angular_update per group at initial lr: [{rates}])"


def _rate_at(optimizer: torch.optim.Optimizer, group: dict[str, Any], info: ScaleInvariantParam,
             lr0: float) -> float:
    """The group's equilibrium angular update at learning rate ``lr0``."""
    lr = group["lr"]
    group["lr"] = lr0
    try:
        rate, _ = neuron_equilibrium(optimizer, info.param, info.channel_dim, info.groups)
    finally:
        group["lr"] = lr
    if rate is None:  # pragma: no cover - equilibrium_theory said there was one
        raise ValueError(f"{_WHO}: no equilibrium rate for the group of {info.name}")
    return rate
