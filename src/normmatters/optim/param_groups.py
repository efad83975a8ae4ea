"""Optimizer parameter groups: which weights decay, and the scale-invariant weights kept apart.

One function, :func:`split_param_groups`, builds the groups of every training in the project:
``normmatters train`` (its ``wd_exclude_norm_bias`` / ``wd_last_layer_only`` options) and the
WD-on / WD-off / LR-correction / norm-schedule runs of claim C1. The "last layer" both keep
decayed in a WD-off run is :func:`last_layer_module`: the classifier, which no normalization
follows, so its weight decay acts on the function and not only on the effective learning rate
(Hoffer et al. 2018, Sec. 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["last_layer_module", "last_layer_parameters", "split_param_groups", "DECAY_MODES"]

#: What ``decay=`` of :func:`split_param_groups` accepts.
DECAY_MODES = ("all", "invariant", "last_layer", "none")

# Normalization layers are recognised by class name as well as by torch's classes, so that the
# library's own layers (and any package's) are found without importing them here. ``Affine`` is
# the per-feature gain and bias that follows a weight-normalized layer.
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def last_layer_module(model: nn.Module) -> nn.Module | None:
    """The model's classifier: ``model.get_classifier()`` when the model has one (the timm
    convention, which every model of :mod:`normmatters.experiments.models` follows), else its last
    registered ``Linear`` or convolution; ``None`` when it has neither."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module):
            return head
    last: nn.Module | None = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            last = m
    return last


def last_layer_parameters(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``, in that order) of the parameters of
    :func:`last_layer_module`: the classifier, which keeps its weight decay in the paper's WD-off
    runs. A head tied to the embedding gives the embedding's name (the tensor is the same)."""
    head = last_layer_module(model)
    if head is None:
        return []
    ids = {id(p) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _norm_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that belong to normalization layers (torch's, ours, an ``Affine``)."""
    ids: set[int] = set()
    for m in model.modules():
        name = type(m).__name__
        if isinstance(m, _TORCH_NORMS) or "Norm" in name or name == "Affine":
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def _per_channel(p: Tensor) -> bool:
    """A gain or bias: one number per channel, 1-D or ``(C, 1, 1, …)`` like weight norm's g."""
    return p.ndim < 2 or p.numel() == p.shape[0]


def split_param_groups(
    model: nn.Module,
    invariant: Mapping[str, Any] | Iterable[str] = (),
    *,
    weight_decay: float,
    decay: str = "all",
    last_layer: Sequence[str] | None = None,
    exclude_norm_bias: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the weight decay of each parameter, the scale-invariant
    weights apart.

    The learning-rate correction and the norm schedules change the scale-invariant weights
    only, so they sit in groups of their own. Each group carries ``"name"``, ``"names"``
    (parameter names) and ``"scale_invariant"`` (bool); torch optimizers keep such extra keys.

    Args:
        model: the network. Parameters with ``requires_grad=False`` are left out.
        invariant: the result of :func:`~normmatters.optim.scale_invariant_parameters` (or
            parameter names); empty when no group needs to know.
        weight_decay: the weight-decay coefficient λ.
        decay: ``"all"`` — λ on every parameter (the paper's *WD on*); ``"invariant"`` — λ on
            the scale-invariant weights and the last layer, none on normalization gains, biases
            and the rest (the common "no decay on norm and bias" practice; it isolates the weight
            decay that acts only through the effective LR); ``"last_layer"`` — λ on the last
            layer only (*WD off*, the paper keeps it on the classifier, which no normalization
            follows); ``"none"`` — no weight decay at all.
        last_layer: names of the last layer's parameters; default :func:`last_layer_parameters`.
        exclude_norm_bias: in addition, no weight decay on normalization parameters (γ, β) and
            on any per-channel parameter (biases, gains such as weight norm's g).

    Returns:
        Non-empty groups, one per (scale invariant or not, weight decay), the scale-invariant
        ones first and, within each, the decayed one first; parameters in
        ``named_parameters()`` order. Their names: ``"scale_invariant_decay"``,
        ``"scale_invariant_no_decay"``, ``"decay"``, ``"no_decay"``.
    """
    if decay not in DECAY_MODES:
        raise ValueError(
            "split_param_groups: decay must be 'all', 'invariant', 'last_layer' or 'none', got "
            f"{decay!r}"
        )
    inv = set(invariant.keys() if isinstance(invariant, Mapping) else invariant)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = inv - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"split_param_groups: not parameters of the model: {sorted(unknown)}")
    last = set(last_layer_parameters(model) if last_layer is None else last_layer) - inv
    wd_inv = weight_decay if decay in ("all", "invariant") else 0.0
    wd_last = 0.0 if decay == "none" else weight_decay
    wd_rest = weight_decay if decay == "all" else 0.0
    norm_ids = _norm_parameter_ids(model) if exclude_norm_bias else set()

    groups: dict[tuple[bool, float], list[str]] = {}
    for n, p in params.items():
        wd = wd_inv if n in inv else wd_last if n in last else wd_rest
        if exclude_norm_bias and (id(p) in norm_ids or _per_channel(p)):
            wd = 0.0
        groups.setdefault((n in inv, wd), []).append(n)
    order = sorted(groups, key=lambda key: (not key[0], key[1] == 0.0))
    return [
        {"name": ("scale_invariant_" if flag else "") + ("decay" if wd else "no_decay"),
         "params": [params[n] for n in groups[flag, wd]], "names": groups[flag, wd],
         "weight_decay": wd, "scale_invariant": flag}
        for flag, wd in order
    ]
