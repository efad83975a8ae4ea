"""Norm scheduling instead of learning-rate scheduling (claim C1).

For a scale-invariant weight, ``L(c·w) = L(w)`` and ``∇L(c·w) = ∇L(w)/c``. Where an LR schedule
would divide the learning rate by ``a``, one can instead keep the rate and multiply the weight
by ``√a``: the gradient shrinks by ``√a``, so the step ``η∇L(√a·w) = η∇L(w)/√a`` is, relative
to ``‖√a·w‖``, ``1/a`` times as large — the direction ``ŵ`` follows exactly the LR-scheduled
trajectory (Hoffer et al. 2018, §2). Proof by induction on the steps, for SGD with momentum
``μ``, dampening, Nesterov and weight decay ``λ``: with ``v = √a·w`` and buffer ``b' = b/√a``,

.. math::

    b' ← μ b' + ∇L(v) + λ' v = \\tfrac{1}{\\sqrt a}(μ b + ∇L(w) + λ w) \\quad\\text{iff}\\quad
    λ' = λ / a,

    v - η b' = \\sqrt a\\,(w - \\tfrac{η}{a} b),

so the weights stay ``√a`` times the LR-scheduled ones, the buffers ``1/√a`` times, provided the
momentum buffers are multiplied by ``1/√a`` and the weight decay divided by ``a`` at the
boundary. Adam's update ``m̂/(√v̂ + ε)`` does not scale with the gradient, so there the weight
is multiplied by ``a`` (``exp_avg`` by ``1/a``, ``exp_avg_sq`` by ``1/a²``; AdamW's decoupled
decay divided by ``a``, Adam's coupled L2 decay by ``a²``); the identity is then exact up to
``ε``.

Evaluation. The identity concerns training (batch statistics). A batch norm's *running*
statistics estimate its input's mean and variance, which jump with the weight: right after a
rescaling by ``√a`` they would lag by that factor for the ~1/momentum steps they need to catch
up, and a model evaluated right at the boundary would be off. Pass ``model=`` and the schedules
rescale the running mean by ``r`` and the running variance by ``r²`` in the batch norms that
absorb a bias-free, per-channel-invariant weight (exact there; other norms are left alone).

Parameters that are not scale invariant (the last layer, biases, normalization gains) keep the
ordinary LR schedule: :class:`NormSchedule` sets their learning rate like
:class:`torch.optim.lr_scheduler.LambdaLR` would.

:class:`ReferenceNormSchedule` is the other form of norm scheduling: after every update (or
every few), set each channel's norm to the one recorded in a weight-decay run, times
``f(t)^{-1/2}`` where ``f(t)`` is that run's LR multiplier — with a fixed learning rate and no
weight decay this reproduces the reference run's effective learning rate ``η f(t)/‖w_ref‖²``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from normmatters.optim._common import (
    check_invariant,
    check_optimizer,
    optimizer_family,
    rescale,
    rescale_running_stats,
    step_power,
)
from normmatters.optim.invariance import ScaleInvariantParam
from normmatters.optim.lr_correction import reference_group_norms
from normmatters.optim.tracker import ReferenceNorms

__all__ = ["NormSchedule", "ReferenceNormSchedule", "multistep_lambda"]


def multistep_lambda(milestones: Sequence[int], gamma: float = 0.1) -> Callable[[int], float]:
    """``f(t) = gamma ** (number of milestones <= t)``, like ``MultiStepLR``."""
    ms = sorted(int(m) for m in milestones)

    def f(t: int) -> float:
        return float(gamma ** sum(1 for m in ms if m <= t))

    return f


def _split_groups(
    optimizer: torch.optim.Optimizer, invariant: Mapping[str, ScaleInvariantParam], who: str
) -> list[bool]:
    ids = {id(i.param) for i in invariant.values()}
    flags = []
    for k, g in enumerate(optimizer.param_groups):
        inv = [id(p) in ids for p in g["params"]]
        if any(inv) and not all(inv):
            raise ValueError(
                f"{who}: param_groups[{k}] mixes scale-invariant and other parameters; their "
                "learning rates must follow different schedules — build the groups with "
                "normmatters.optim.split_param_groups"
            )
        flags.append(bool(inv) and all(inv))
    return flags


class NormSchedule:
    """Replace an LR schedule by a norm schedule on the scale-invariant weights.

    Use it exactly where a :class:`~torch.optim.lr_scheduler.LambdaLR` with the same
    ``lr_lambda`` would be used (``step()`` once per epoch or per iteration). Non-invariant
    groups get ``lr = initial_lr · f(t)``; invariant groups keep ``initial_lr`` and their
    weights are multiplied by ``(f(t-1)/f(t))^{1/power}`` (momentum / moment buffers and weight
    decay adjusted, see the module docstring).

    Args:
        optimizer: SGD (``power=2``) or Adam/AdamW (``power=1``); others need ``power``.
        invariant: from :func:`~normmatters.optim.scale_invariant_parameters`; they must sit
            in their own parameter groups (:func:`~normmatters.optim.split_param_groups`).
        lr_lambda: the LR multiplier ``f(t)`` of the schedule being replaced (``f(0)`` is
            applied at construction, as ``LambdaLR`` does).
        power: the exponent of the angular step (2 for SGD, 1 for Adam).
        adjust_weight_decay: divide the invariant groups' weight decay as the derivation
            requires (exact identity with weight decay); ``False`` keeps it.
        model: the model, to rescale batch-norm running statistics with the weights (see
            "Evaluation" in the module docstring).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        invariant: Mapping[str, ScaleInvariantParam],
        lr_lambda: Callable[[int], float],
        *,
        power: float | None = None,
        adjust_weight_decay: bool = True,
        model: torch.nn.Module | None = None,
    ) -> None:
        who = "NormSchedule"
        check_optimizer(optimizer, who)
        check_invariant(invariant, optimizer, who)
        if not callable(lr_lambda):
            raise TypeError(f"{who}: lr_lambda must be callable, got {type(lr_lambda).__name__}")
        self.optimizer = optimizer
        self.invariant = dict(invariant)
        self.lr_lambda = lr_lambda
        self.power = step_power(optimizer, power, who)
        self.adjust_weight_decay = adjust_weight_decay
        self.model = model
        self._by_param = {id(i.param): i for i in self.invariant.values()}
        self._inv_groups = _split_groups(optimizer, self.invariant, who)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        # Coupled L2 decay in Adam enters the moments, which scale like the gradient (1/a);
        # SGD's and AdamW's decay multiply the weight by (1 - η λ): both need λ/a.
        fam = optimizer_family(optimizer)
        decoupled = fam != "adam" or bool(optimizer.defaults.get("decoupled_weight_decay")) or (
            "AdamW" in {c.__name__ for c in type(optimizer).__mro__}
        )
        self._wd_power = 1.0 if decoupled else 2.0
        self.last_epoch = 0
        self.applied = 1.0  # the LR factor the invariant weights currently emulate
        self.history: list[dict[str, float]] = []
        self._apply(float(lr_lambda(0)))

    @torch.no_grad()
    def _apply(self, f: float) -> None:
        if not f > 0:
            raise ValueError(f"NormSchedule: lr_lambda must stay > 0, got {f} at t={self.last_epoch}")
        a = self.applied / f  # the LR would be divided by a
        r = a ** (1.0 / self.power)
        for g, inv in zip(self.optimizer.param_groups, self._inv_groups):
            if not inv:
                g["lr"] = g["initial_lr"] * f
                continue
            g["lr"] = g["initial_lr"]
            if a != 1.0:
                for p in g["params"]:
                    rescale(self.optimizer, p, r, "NormSchedule")
                    if self.model is not None:
                        rescale_running_stats(self.model, self._by_param[id(p)], r)
                if self.adjust_weight_decay and g.get("weight_decay"):
                    g["weight_decay"] = g["weight_decay"] / a**self._wd_power
        self.applied = f
        self.history.append({"t": self.last_epoch, "lr_factor": f, "weight_scale": r})

    def step(self) -> None:
        """Advance the schedule by one epoch (or iteration): like ``LambdaLR.step()``."""
        self.last_epoch += 1
        self._apply(float(self.lr_lambda(self.last_epoch)))

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "applied": self.applied}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.applied = float(state["applied"])


class ReferenceNormSchedule:
    """Set each scale-invariant channel's norm to a recorded reference after each update.

    After update ``t`` (counted by :meth:`step`), each group ``g`` of each invariant weight is
    rescaled to ``‖w_ref,g(t)‖ · f(t)^{-1/power}``.

    Optimizer buffers. Following the reference's norm is a radial correction, like the weight
    decay it replaces, and it leaves the momentum buffer alone: after it the weight has the
    reference's scale, so the gradients in the buffer are on the right scale already.
    (Dividing the buffer by every per-step ratio ``r`` feeds back — the momentum grows the
    norm, the projection shrinks it, the buffer grows by ``1/r`` — and diverges within a few
    hundred steps.) Only the jump of the LR factor, ``(f(t-1)/f(t))^{1/power}``, is applied to
    the buffers as in :class:`NormSchedule`. With the invariant weights trained at a fixed learning rate ``η`` and without
    weight decay, the effective rate becomes ``η f(t)/‖w_ref,g(t)‖^power``: that of the
    reference run, trained with weight decay and the LR schedule ``η f(t)``. This replaces both
    weight decay and the LR schedule by norms (the paper's norm scheduling, Figure 1).

    Args:
        optimizer: SGD (``power=2``) or Adam/AdamW (``power=1``).
        invariant: from :func:`~normmatters.optim.scale_invariant_parameters`.
        reference: per-channel norms of the reference run, by optimizer step.
        lr_factor: ``f(t)`` of the reference run's LR schedule as a function of the update
            count (default: constant 1, i.e. copy the reference norms).
        every: rescale after every ``every`` updates.
        power: exponent of the angular step (2 for SGD, 1 for Adam).
        model: the model, to rescale batch-norm running statistics with the weights.

    The learning rate of the invariant groups must stay fixed (do not schedule it).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        invariant: Mapping[str, ScaleInvariantParam],
        reference: ReferenceNorms,
        *,
        lr_factor: Callable[[int], float] | None = None,
        every: int = 1,
        power: float | None = None,
        step_offset: int = 0,
        apply_now: bool = True,
        model: torch.nn.Module | None = None,
    ) -> None:
        who = "ReferenceNormSchedule"
        check_optimizer(optimizer, who)
        check_invariant(invariant, optimizer, who)
        if not isinstance(reference, ReferenceNorms):
            raise TypeError(f"{who}: reference must be ReferenceNorms, got "
                            f"{type(reference).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"{who}: every must be a positive int, got {every!r}")
        for name, info in invariant.items():
            if name not in reference.norms:
                raise ValueError(f"{who}: the reference has no norms for {name!r}")
            n_ch = info.param.shape[info.channel_dim] if info.param.dim() else 1
            if reference.norms[name].shape[1] != n_ch:
                raise ValueError(
                    f"{who}: reference for {name!r} has {reference.norms[name].shape[1]} "
                    f"channels, the parameter has {n_ch}"
                )
        self.optimizer = optimizer
        self.invariant = dict(invariant)
        self.reference = reference
        self.lr_factor = lr_factor
        self.every = every
        self.power = step_power(optimizer, power, who)
        self.num_steps = int(step_offset)
        self.model = model
        self._applied_factor = self._factor(self.num_steps)
        if apply_now:
            self.apply()

    def _factor(self, t: int) -> float:
        f = 1.0 if self.lr_factor is None else float(self.lr_factor(t))
        if not f > 0:
            raise ValueError(f"ReferenceNormSchedule: lr_factor must be > 0, got {f} at t={t}")
        return f

    def target(self, name: str, step: int | None = None) -> Tensor:
        """Target norm of each group of ``name`` after ``step`` updates."""
        t = self.num_steps if step is None else step
        info = self.invariant[name]
        ref = reference_group_norms(self.reference.at(name, t), info.groups)
        return ref * self._factor(t) ** (-1.0 / self.power)

    @torch.no_grad()
    def apply(self) -> None:
        """Rescale every invariant weight to its target norms now."""
        f = self._factor(self.num_steps)
        jump = (self._applied_factor / f) ** (1.0 / self.power)
        self._applied_factor = f
        for name, info in self.invariant.items():
            cur = info.group_norms().double()
            r = self.target(name) / cur.clamp_min(1e-300)
            r = torch.where(cur > 0, r, torch.ones_like(r))  # a zero channel stays zero
            p = info.param
            if jump != 1.0:
                # The LR factor changed: the identity of NormSchedule, buffers included.
                rescale(self.optimizer, p, jump, "ReferenceNormSchedule")
                r = r / jump
            p.mul_(info.expand(r).to(p.dtype))
            if self.model is not None:
                rescale_running_stats(self.model, info, r * jump)

    def step(self) -> None:
        """Count one optimizer update (call after ``optimizer.step()``) and rescale."""
        self.num_steps += 1
        if self.num_steps % self.every == 0:
            self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "applied_factor": self._applied_factor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self._applied_factor = float(state.get("applied_factor", self._factor(self.num_steps)))
