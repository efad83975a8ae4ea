"""Mimicking weight decay by a per-channel learning-rate correction (claim C1).

For a scale-invariant weight the direction ``ŵ`` moves by ``η/‖w‖²`` times the projected
gradient (Hoffer et al. 2018, §2, Eq. 4), so weight decay acts only by shrinking ``‖w‖`` and
thereby raising the effective learning rate. Training *without* weight decay while scaling each
channel's step by

.. math::

    \\hat η_i = η \\, \\frac{‖w_i‖^2}{‖w_{i,\\mathrm{ref}}‖^2}

— ``w_ref`` the same channel in a weight-decay run at the same step or epoch — gives every
channel the effective rate ``η/‖w_ref,i‖²`` of the reference run: the paper's *WD off + LR
correction*, which matches *WD on* (Figure 1). Parameters that are not scale invariant are left
alone; in the paper the last layer keeps its weight decay (see
:func:`~normmatters.optim.split_param_groups`).

Optimizers:

* SGD, with or without momentum / Nesterov: exponent 2 as above. The correction scales each
  channel's *gradient* by the current ratio before the optimizer sees it (``apply_to=
  "gradient"``), so the momentum buffer accumulates corrected gradients. Scaling the update
  instead (``apply_to="update"``: ``-η·s_t·buffer``) is the same without momentum but unstable
  with it: without weight decay the norm of a channel with a large effective rate grows each
  step, the buffer still holds gradients from when the norm was smaller (a gradient scales as
  1/‖w‖), the current ratio (∝ ‖w‖²) amplifies them, the norm grows faster — once it grows by
  more than 1/μ per step the channel diverges to NaN. Corrected gradients keep the step
  bounded by the reference's rate.
* Adam / AdamW: Adam divides the gradient by its running RMS, so its step does not shrink when
  the gradient does and ``η/‖w‖²`` does not describe it; the angular step is ``∝ η/‖w‖``.
  The matching correction is ``η̂_i = η·‖w_i‖/‖w_ref,i‖`` (exponent 1), applied automatically
  for the Adam family (``power=1``), to the update (scaling Adam's gradient changes nothing).
  Use it against a reference recorded with AdamW (decoupled weight decay); a reference from
  SGD says nothing about Adam's step size.
* Other optimizers: pass ``power`` explicitly or a :class:`TypeError` is raised.

Exactness. The paper's ratio matches the effective rate ``η/‖w_ref‖²`` of the weights *before*
the reference's step. With plain SGD the weight-decay step is ``w ← (1-ηλ)w - η∇L(w)``, whose
direction moves by ``η/((1-ηλ)‖w‖²)``: passing ``reference_shrink=ηλ`` divides the ratio by
``1-ηλ`` and then the corrected run reproduces the reference's directions ``ŵ`` exactly (to
rounding, for the scale-invariant weights, when every other parameter is trained alike). The
default (``0``) is the paper's formula, which differs by ``O(ηλ)`` per step.

Large ratios and divergence. Without weight decay the corrected weights' norms keep growing
(their effective rate is the reference's, high, while nothing shrinks them), so the ratio grows
too; that is intended. The correction matches effective learning rates, not gradients: if the
corrected run's gradients are larger than the reference's — because the reference also decayed
the normalization gains, which scale every gradient that reaches the weights before them, or
because a channel that died (and decayed towards zero, η/‖w_ref‖² → ∞) in the reference is alive
here — its angular steps are larger, its norms grow ever faster and the run can end in NaN (one
reproduction of the paper reported NaN for this experiment; decay the same parameters in the
reference as the claim concerns, ``split_param_groups(..., decay="invariant")``).
``reference_floor=f`` floors each reference channel norm at ``f`` times the root-mean-square
channel norm of its layer at that step (a deviation from the paper's formula for such channels
only); ``max_scale`` caps the ratio itself.

Example::

    inv = scale_invariant_parameters(model, x)
    opt = torch.optim.SGD(split_param_groups(model, inv, weight_decay=5e-4,
                                             decay="last_layer"), lr=0.1, momentum=0.9)
    corr = LRCorrection(opt, inv, ReferenceNorms.load("wd_on/reference_norms.pt"))
    ...  # train as usual: the correction runs inside opt.step()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from normmatters.optim._common import (
    check_invariant,
    check_optimizer,
    group_of,
    optimizer_family,
    step_power,
)
from normmatters.optim.invariance import ScaleInvariantParam
from normmatters.optim.tracker import ReferenceNorms

__all__ = ["LRCorrection", "reference_group_norms"]


def reference_group_norms(channel_norms: Tensor, groups: int) -> Tensor:
    """Norms of ``groups`` contiguous blocks from per-channel norms: ``sqrt(Σ_block ‖w_i‖²)``."""
    c = channel_norms.shape[-1]
    if groups <= 0 or c % groups:
        raise ValueError(f"reference_group_norms: {c} channels cannot form {groups} groups")
    return channel_norms.reshape(*channel_norms.shape[:-1], groups, c // groups).pow(2).sum(-1).sqrt()


class LRCorrection:
    """Per-channel learning-rate correction installed on an optimizer's ``step``.

    Registers a pre-step hook (remember the weights and compute the ratios) and a post-step
    hook (rescale the update of each scale-invariant weight channel by
    ``(‖w_i‖/‖w_ref,i‖)^power``) on ``optimizer``; the optimizer and any LR scheduler work as
    before. Call :meth:`remove` to uninstall.

    Args:
        optimizer: a torch optimizer (SGD, Adam, AdamW, ...).
        invariant: from :func:`~normmatters.optim.scale_invariant_parameters`; the correction
            uses each entry's ``groups`` (channels for batch norm, one group for layer norm).
        reference: recorded per-channel norms of the reference run, indexed by optimizer step
            (record every step for a per-step reference, once per epoch for a per-epoch one).
        power: 2 for SGD, 1 for the Adam family (inferred); see the module docstring.
        max_scale: optional upper bound of the ratio (guards against collapsed reference
            channels); ``min_scale`` likewise from below.
        step_offset: reference step of this run's first update (to resume).
        reference_shrink: ``ηλ`` of the reference run (a float, or a function of the step
            for a scheduled LR); the ratio is divided by ``1 - ηλ`` (see "Exactness").
        require_no_weight_decay: refuse scale-invariant weights in groups with weight decay
            (the correction replaces weight decay; both at once double-count it).
        reference_floor: floor of each reference channel norm, as a fraction of its layer's
            root-mean-square channel norm at the same step (``None``: the paper's formula).
        apply_to: ``"gradient"`` (scale the gradient before the step; SGD's default),
            ``"update"`` (scale the step the optimizer made; the default for the others) or
            ``"auto"``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        invariant: Mapping[str, ScaleInvariantParam],
        reference: ReferenceNorms,
        *,
        power: float | None = None,
        max_scale: float | None = None,
        min_scale: float | None = None,
        step_offset: int = 0,
        reference_shrink: float | Callable[[int], float] = 0.0,
        require_no_weight_decay: bool = True,
        apply_to: str = "auto",
        reference_floor: float | None = None,
    ) -> None:
        who = "LRCorrection"
        check_optimizer(optimizer, who)
        check_invariant(invariant, optimizer, who)
        if not isinstance(reference, ReferenceNorms):
            raise TypeError(f"{who}: reference must be ReferenceNorms, got "
                            f"{type(reference).__name__}")
        self.optimizer = optimizer
        self.invariant = dict(invariant)
        self.reference = reference
        self.power = step_power(optimizer, power, who)
        self.max_scale = max_scale
        self.min_scale = min_scale
        self.num_steps = int(step_offset)
        self.reference_shrink = reference_shrink
        if reference_floor is not None and not 0 <= reference_floor <= 1:
            raise ValueError(f"{who}: reference_floor must be in [0, 1], got {reference_floor!r}")
        self.reference_floor = reference_floor
        if apply_to not in ("auto", "gradient", "update"):
            raise ValueError(f"{who}: apply_to must be 'auto', 'gradient' or 'update', got {apply_to!r}")
        if apply_to == "auto":
            apply_to = "gradient" if optimizer_family(optimizer) == "sgd" else "update"
        self.apply_to = apply_to
        for name, info in self.invariant.items():
            if name not in reference.norms:
                raise ValueError(f"{who}: the reference has no norms for {name!r}")
            n_ch = info.param.shape[info.channel_dim] if info.param.dim() else 1
            if reference.norms[name].shape[1] != n_ch:
                raise ValueError(
                    f"{who}: reference for {name!r} has {reference.norms[name].shape[1]} "
                    f"channels, the parameter has {n_ch}"
                )
            g = group_of(optimizer, info.param)
            if require_no_weight_decay and g is not None and g.get("weight_decay", 0.0):
                raise ValueError(
                    f"{who}: {name!r} is in a parameter group with weight_decay="
                    f"{g['weight_decay']}; the correction replaces weight decay on scale-"
                    "invariant weights (use split_param_groups(..., decay='last_layer'))"
                )
        self._before: dict[str, Tensor] = {}
        self._scales: dict[str, Tensor] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def group_scale(self, name: str, step: int | None = None) -> Tensor:
        """``(‖w_g‖/‖w_ref,g‖)^power`` per group of ``name``, for the current weights and the
        reference at ``step`` (default: the next update's)."""
        info = self.invariant[name]
        t = self.num_steps if step is None else step
        ch = self.reference.at(name, t)
        if self.reference_floor:
            ch = ch.clamp_min(self.reference_floor * float(ch.pow(2).mean().sqrt()))
        ref = reference_group_norms(ch, info.groups)
        cur = info.group_norms().double()
        s = (cur / ref.clamp_min(1e-300)) ** self.power
        shrink = self.reference_shrink(t) if callable(self.reference_shrink) else self.reference_shrink
        if shrink:
            if not 0 <= shrink < 1:
                raise ValueError(f"LRCorrection: reference_shrink must be in [0, 1), got {shrink}")
            s = s / (1.0 - shrink)
        if self.max_scale is not None or self.min_scale is not None:
            s = s.clamp(min=self.min_scale, max=self.max_scale)
        return s

    def channel_scale(self, name: str) -> Tensor | None:
        """Per-channel multiplier the next update will use (for
        :class:`~normmatters.optim.NormTracker`'s ``lr_scale``); ``None`` for other params."""
        if name not in self.invariant:
            return None
        info = self.invariant[name]
        return self.group_scale(name).repeat_interleave(
            (info.param.shape[info.channel_dim] if info.param.dim() else 1) // info.groups
        )

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            self._scales = {n: self.group_scale(n) for n in self.invariant}
            if self.apply_to == "gradient":
                for name, info in self.invariant.items():
                    g = info.param.grad
                    if g is not None:
                        g.mul_(info.expand(self._scales[name]).to(g.dtype))
                self._before = {}
            else:
                self._before = {n: i.param.detach().clone() for n, i in self.invariant.items()}

    @torch.no_grad()
    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for name, old in self._before.items():
            info = self.invariant[name]
            s = info.expand(self._scales[name]).to(old.dtype)
            p = info.param
            p.copy_(old + s * (p - old))
        self._before = {}
        self.num_steps += 1

    def remove(self) -> None:
        """Uninstall the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
