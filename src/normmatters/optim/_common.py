"""Helpers shared by the LR correction and the norm schedules: which update rule an optimizer
follows, and rescaling a weight together with the optimizer state that depends on its scale."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from normmatters.optim.invariance import ScaleInvariantParam

_SGD_LIKE = ("SGD",)
_ADAM_LIKE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam")


def optimizer_family(optimizer: torch.optim.Optimizer) -> str:
    """``"sgd"``, ``"adam"`` or ``"other"`` from the optimizer's class (and its bases)."""
    names = {c.__name__ for c in type(optimizer).__mro__}
    if names & set(_ADAM_LIKE):
        return "adam"
    if names & set(_SGD_LIKE):
        return "sgd"
    return "other"


def step_power(optimizer: torch.optim.Optimizer, power: float | None, who: str) -> float:
    """Exponent ``p`` of the angular step ``∝ η/‖w‖^p``: 2 for SGD (the gradient of a
    scale-invariant weight scales as 1/‖w‖), 1 for Adam (its update does not scale with the
    gradient). Anything else must be told."""
    if power is not None:
        if not power > 0:
            raise ValueError(f"{who}: power must be > 0, got {power!r}")
        return float(power)
    fam = optimizer_family(optimizer)
    if fam == "sgd":
        return 2.0
    if fam == "adam":
        return 1.0
    raise TypeError(
        f"{who}: cannot tell how {type(optimizer).__name__}'s step scales with ‖w‖; pass "
        "power=2 for an SGD-like update (step ∝ gradient) or power=1 for an Adam-like one "
        "(step independent of the gradient's scale)"
    )


def check_optimizer(optimizer: Any, who: str) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{who}: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")


def group_of(optimizer: torch.optim.Optimizer, p: Tensor) -> dict[str, Any] | None:
    for g in optimizer.param_groups:
        if any(q is p for q in g["params"]):
            return g
    return None


def check_invariant(
    invariant: Mapping[str, ScaleInvariantParam], optimizer: torch.optim.Optimizer, who: str
) -> None:
    if not isinstance(invariant, Mapping) or not all(
        isinstance(v, ScaleInvariantParam) for v in invariant.values()
    ):
        raise TypeError(
            f"{who}: invariant must be the mapping returned by scale_invariant_parameters "
            "({name: ScaleInvariantParam})"
        )
    if not invariant:
        raise ValueError(f"{who}: no scale-invariant parameters given")
    for name, info in invariant.items():
        if group_of(optimizer, info.param) is None:
            raise ValueError(f"{who}: parameter {name!r} is not in the optimizer")


@torch.no_grad()
def rescale(optimizer: torch.optim.Optimizer, p: Tensor, r: Tensor | float, who: str) -> None:
    """Multiply ``p`` by ``r`` (> 0, broadcastable) and the optimizer state so that the next
    steps act on ``r·p`` as they would have acted on ``p``, up to the rescaled step size.

    For a scale-invariant ``p`` the gradient at ``r·p`` is ``∇/r``: buffers that accumulate
    gradients (SGD's ``momentum_buffer``, Adam's ``exp_avg``) are divided by ``r``, buffers of
    squared gradients (``exp_avg_sq``, ``max_exp_avg_sq``) by ``r²``.
    """
    p.mul_(r)
    state = optimizer.state.get(p, {})
    fam = optimizer_family(optimizer)
    for key, v in state.items():
        if not isinstance(v, Tensor) or v.shape != p.shape:
            continue  # step counters and scalars
        if fam == "sgd" and key == "momentum_buffer":
            v.div_(r)
        elif fam == "adam" and key == "exp_avg":
            v.div_(r)
        elif fam == "adam" and key in ("exp_avg_sq", "max_exp_avg_sq"):
            v.div_(r * r if isinstance(r, Tensor) else r**2)
        elif fam == "adam" and key == "exp_inf":  # Adamax: a running max of |gradient|
            v.div_(r)
        else:
            raise TypeError(
                f"{who}: do not know how to rescale the state {key!r} of "
                f"{type(optimizer).__name__} when the weight is rescaled"
            )


@torch.no_grad()
def rescale_running_stats(model: torch.nn.Module, info: ScaleInvariantParam, r: Tensor | float) -> bool:
    """Rescale the running statistics of the batch norms that absorb ``info``'s scale after the
    weight was multiplied by ``r`` (per channel), so that evaluation mode sees the same function.

    Exact when the weight's module has no bias and the path to the norm is per-channel
    homogeneous (``groups`` equals the number of channels): the norm's input then scales by
    ``r_i`` in channel ``i``, its mean by ``r_i`` and its variance by ``r_i²``. Returns whether
    anything was rescaled (nothing is when those conditions do not hold).
    """
    p = info.param
    if p.dim() == 0:
        return False
    n = p.shape[info.channel_dim]
    if info.groups != n:
        return False
    owner_name = info.name.rpartition(".")[0]
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        return False
    if getattr(owner, "bias", None) is not None:
        return False
    r_ch = torch.as_tensor(r, dtype=torch.float64).reshape(-1)
    if r_ch.numel() == 1:
        r_ch = r_ch.expand(n)
    elif r_ch.numel() != n:
        r_ch = r_ch.repeat_interleave(n // r_ch.numel())
    done = False
    for norm_name in info.norms:
        try:
            bn = model.get_submodule(norm_name)
        except AttributeError:
            continue
        rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if not isinstance(rm, Tensor) or not isinstance(rv, Tensor) or rm.shape != (n,):
            continue
        rm.mul_(r_ch.to(rm.dtype))
        rv.mul_(r_ch.pow(2).to(rv.dtype))
        done = True
    return done
