r"""Load checkpoints of the paper's official code (``eladhoffer/norm_matters``) and of torch's
legacy ``weight_norm`` into normmatters' layers.

The official layers store what they need in evaluation under other names and meanings:

========================================  ===========================================  ==============================
official (per layer prefix)               evaluation                                   normmatters
========================================  ===========================================  ==============================
``L1BatchNorm2d``, ``LpBatchNorm2d``,     y = (x − running_mean) · running_var         ``weight`` ← ``scale``,
``TopkBatchNorm2d``,                      · scale + mean                               ``bias`` ← ``mean``,
``GhostTopkBatchNorm2d``: ``scale``,      (``running_var`` holds an *inverse* scale,   ``running_var`` ← see below,
``mean``, ``running_mean``,               an average of 1/(σ̂+eps))                     ``running_mean`` as is
``running_var`` (``meanTOPK``)
``mean_bn.L1BatchNorm``: ``weight``,      y = (x − running_mean) / running_scale        ``running_var`` ← see below
``bias``, ``running_mean``,               · weight + bias
``running_scale``
``MeanBN``: ``running_mean``, ``bias``    y = x − running_mean + bias                  :class:`MeanOnlyBatchNorm2d`
BWN (``BoundedWeighNorm``):               w = v · (‖g₀‖/‖g‖) g / ‖v‖_p                 ``bounded_weight_norm(...,
``weight_g``, ``weight_v``,                                                            gain="bounded")``
``weight_g_prenorm`` (= ‖g₀‖)
torch's legacy ``weight_norm``:           w = g · v / ‖v‖₂                              ``weight_norm``
``weight_g``, ``weight_v``
========================================  ===========================================  ==============================

Our batch norm evaluates y = γ (x − μ)/(√running_var + eps) + β for p ≠ 2 and
γ (x − μ)/√(running_var + eps) + β at p = 2 (docs/math.md), so an official inverse scale r becomes

.. math::
    \text{running\_var} = (1/r - \epsilon)^2 \;(p \ne 2),\qquad
    \text{running\_var} = 1/r^2 - \epsilon \;(p = 2),

and a stored scale s (``running_scale``) becomes (s − ε)² or s² − ε. These are exact (up to
rounding): the converted layer gives the official layer's evaluation output. An inverse scale
that our layer cannot reproduce with its eps (the bracket would be negative) is an error naming
the key. The official code's momentum is reversed (the new batch has weight 1 − momentum); that
is a training setting, not part of a state dict.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..functional.constants import normalize_p
from ..nn import BatchNormBase, LpBatchNormBase, MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d

_MEAN_ONLY = (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d)

__all__ = ["from_official_state_dict"]

_WHERE = "from_official_state_dict"
_OFFICIAL_BN = {"scale", "mean", "running_mean", "running_var"}
_OFFICIAL_BN_EXTRA = {"meanTOPK"}  # GhostTopkBatchNorm2d: a training-only smoothing buffer
_OFFICIAL_L1 = {"running_mean", "running_scale"}
_WN_RE = re.compile(r"^(?P<name>.+?)_(?P<part>g_prenorm|g|v)$")


def _split(key: str) -> tuple[str, str]:
    prefix, _, leaf = key.rpartition(".")
    return (prefix + "." if prefix else ""), leaf


def _floating(leaves: dict[str, Tensor], prefix: str, names: Any) -> None:
    """Statistics and weights are floating point: an integer tensor would be truncated to nonsense."""
    for leaf in names:
        t = leaves.get(leaf)
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{_WHERE}: {prefix + leaf!r} is a {t.dtype} tensor; the official layers store "
                             "floating-point values there (was the checkpoint altered?)")


def _check_gain_shape(g: Tensor, v: Tensor, key_g: str, key_v: str) -> None:
    """A weight norm's gain has one value per slice of v along one axis (or one in all)."""
    if g.dim() == v.dim():
        ok = all(a in (1, b) for a, b in zip(g.shape, v.shape))
    elif g.dim() <= 1:
        ok = g.numel() == 1 or (v.dim() > 0 and g.numel() in v.shape)
    else:
        ok = False
    if not ok:
        raise ValueError(f"{_WHERE}: {key_g!r} has shape {tuple(g.shape)}, which does not fit {key_v!r} of "
                         f"shape {tuple(v.shape)} (a gain per output channel: {(v.shape[0],) if v.dim() else ()} "
                         f"or {tuple([v.shape[0]] + [1] * (v.dim() - 1)) if v.dim() else ()})")


def _target_inverse_scale(r: Tensor, p2: bool, eps: float, key: str) -> Tensor:
    """running_var of our layer from the official inverse scale r = 1/(σ̂+eps) (or its average)."""
    r64 = r.detach().double()
    if not bool(torch.isfinite(r64).all()) or not bool((r64 > 0).all()):
        bad = r64[~(torch.isfinite(r64) & (r64 > 0))][:3].tolist()
        raise ValueError(
            f"{_WHERE}: {key!r} holds non-positive or non-finite inverse scales {bad} (the official "
            "layers start with zeros: was this layer ever trained?)"
        )
    # p=2: 1/√(rv+eps) = r;  p≠2: 1/(√rv+eps) = r.
    base = 1.0 / r64.pow(2) - eps if p2 else 1.0 / r64 - eps
    rv = base if p2 else base.pow(2)
    if bool((base < 0).any()):
        raise ValueError(
            f"{_WHERE}: {key!r} holds an inverse scale up to {float(r64.max()):.4g}, larger than a "
            f"{'p=2' if p2 else 'p!=2'} batch norm with eps={eps} can represent; build the target "
            "layer with a smaller eps"
        )
    return rv.to(r.dtype)


def _target_scale(s: Tensor, p2: bool, eps: float, key: str) -> Tensor:
    """running_var of our layer from an official scale s (σ̂ itself, no eps: ``running_scale``)."""
    s64 = s.detach().double()
    rv = s64.pow(2) - eps if p2 else (s64 - eps).pow(2)
    if bool((s64 - (eps if not p2 else math.sqrt(eps)) < 0).any()) or not bool(torch.isfinite(s64).all()):
        raise ValueError(
            f"{_WHERE}: {key!r} holds a scale as small as {float(s64.min()):.4g}, which a batch norm "
            f"with eps={eps} cannot reproduce; build the target layer with a smaller eps"
        )
    return rv.to(s.dtype)


class _Target:
    """What the optional target model says about one layer prefix."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.modules = dict(model.named_modules()) if model is not None else {}
        self.state = model.state_dict() if model is not None else None

    def module(self, prefix: str) -> nn.Module | None:
        if self.model is None:
            return None
        m = self.modules.get(prefix[:-1] if prefix else "")
        if m is None:
            raise ValueError(f"{_WHERE}: the checkpoint has a layer {prefix[:-1]!r} that the model does not have")
        return m


def _bn_options(target: nn.Module | None, prefix: str, p: float | None, eps: float) -> tuple[bool, float]:
    """(is p=2, eps) of the batch norm the converted keys will load into."""
    if target is None:
        if p is None:
            raise ValueError(
                f"{_WHERE}: {prefix[:-1]!r} is an official batch norm; its running_var converts "
                "differently for p=2 and p!=2 targets: pass model= (the model you will load into) "
                "or p= (the p of its batch norms)"
            )
        return p == 2.0, eps
    if isinstance(target, _MEAN_ONLY) or not isinstance(
        target, (LpBatchNormBase, BatchNormBase, nn.modules.batchnorm._BatchNorm)
    ):
        raise ValueError(
            f"{_WHERE}: {prefix[:-1]!r} is an official batch norm (scale, mean, running statistics) "
            f"but the model has a {type(target).__name__} there"
        )
    if not target.affine or getattr(target, "bias", None) is None:
        raise ValueError(f"{_WHERE}: {prefix[:-1]!r}: the model's {type(target).__name__} has no weight/bias "
                         "for the official layer's scale/mean")
    return float(getattr(target, "p", 2.0)) == 2.0, float(target.eps)


def _wn_kind(target: nn.Module | None, name: str) -> str:
    """How the model stores ``name``: 'bounded' (gain_norm), 'wn' (g, v), 'plain', 'fixed', or 'none'."""
    if target is None:
        return "none"
    if parametrize.is_parametrized(target, name):
        plist = target.parametrizations[name]  # type: ignore[index, union-attr]
        if len(plist) == 1:
            par = plist[0]
            if hasattr(par, "gain_norm"):
                return "bounded"
            if hasattr(par, "rho"):
                return "fixed"
            if type(par).__name__ in ("_LpWeightNorm", "_WeightNorm"):
                return "wn"
        return "other"
    if isinstance(getattr(target, name, None), Tensor):
        return "plain"
    raise ValueError(f"{_WHERE}: the model's {type(target).__name__} has no tensor {name!r}")


def _channel_norms_like(v: Tensor, g: Tensor) -> Tensor:
    """‖v‖₂ over every axis where g has size 1 (torch's legacy weight_norm layout of g)."""
    dims = tuple(i for i in range(v.dim()) if g.dim() != v.dim() or g.shape[i] == 1)
    return torch.linalg.vector_norm(v, ord=2, dim=dims, keepdim=True) if dims else v.abs()


def from_official_state_dict(
    state_dict: Mapping[str, Any],
    model: nn.Module | None = None,
    *,
    p: float | int | str | None = None,
    eps: float = 1e-5,
    strip_prefix: str | None = None,
) -> OrderedDict[str, Tensor]:
    r"""Turn a state dict of the paper's official code (or torch's legacy ``weight_norm``) into ours.

    Official batch norms (``scale``, ``mean``, ``running_mean``, ``running_var`` holding the
    inverse scale), ``MeanBN``, the official ``mean_bn.L1BatchNorm`` (``running_scale``), BWN
    (``weight_g``, ``weight_v``, ``weight_g_prenorm``) and torch's legacy weight norm
    (``weight_g``, ``weight_v``, any ``<name>_g`` / ``<name>_v`` pair) are converted as the module
    docstring's table says; every other key is kept. The result loads with
    ``model.load_state_dict(...)`` into a model built with normmatters' layers at the same places
    (:class:`~normmatters.nn.LpBatchNorm2d` with the official layer's p,
    :class:`~normmatters.nn.MeanOnlyBatchNorm2d`, ``bounded_weight_norm(..., gain="bounded")``,
    ``weight_norm``) and gives the same evaluation outputs.

    Args:
        state_dict: the official model's ``state_dict()`` (for a checkpoint file, its
            ``"state_dict"`` entry, loaded with ``torch.load(..., weights_only=True)``).
        model: the model it will load into (recommended). Each batch norm's p and eps are read from
            it; BWN / WN keys are matched to how the model stores the weight (bounded-gain BWN,
            (Lp) WN — the official BWN weight is exactly a WN weight with gain ‖g₀‖·g/‖g‖ — or a
            plain weight for torch's legacy WN); and the result is checked to have exactly the
            model's keys and shapes.
        p: without ``model``: the p of the batch norms the result will load into (the
            ``running_var`` conversion differs between p=2 and p≠2; L1, L∞ and Top(k) share one).
        eps: without ``model``: their eps (the official default and ours: 1e-5).
        strip_prefix: remove this prefix from every key (``"module."`` for a DataParallel save).

    Returns:
        A new ordered state dict; ``state_dict`` is not modified.

    Raises:
        ValueError: a key that cannot be mapped (an incomplete official layer, an orphan
            ``weight_g``, a layer the model lacks or stores differently, a shape mismatch, an inverse
            scale outside what the target's eps allows), or a state dict with no official key.
        TypeError: a value that is not a tensor.

    Example::

        >>> sd = torch.load("official_resnet_l1.pth", weights_only=True)["state_dict"]
        >>> model = create_model("resnet56", norm="l1")
        >>> model.load_state_dict(from_official_state_dict(sd, model))
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{_WHERE}: expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: model must be an nn.Module or None, got {type(model).__name__}")
    if model is not None and p is not None:
        raise TypeError(f"{_WHERE}: pass either model= or p=, not both (the model's layers carry their p)")
    pf = normalize_p(p) if p is not None else None
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        raise ValueError(f"{_WHERE}: this looks like a checkpoint; pass checkpoint['state_dict']")
    sd: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{_WHERE}: keys must be strings, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{_WHERE}: {key!r} is a {type(value).__name__}, not a tensor")
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        sd[key] = value

    target = _Target(model)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        prefix, leaf = _split(key)
        groups.setdefault(prefix, {})[leaf] = value

    out: dict[str, Tensor] = {}
    converted = 0
    for prefix, leaves in groups.items():
        names = set(leaves)
        rest = dict(leaves)
        # -- official Lp / Top(k) batch norms -------------------------------------------------------
        if {"scale", "mean"} & names and ("running_var" in names or {"scale", "mean"} <= names):
            missing = sorted(_OFFICIAL_BN - names)
            if missing:
                raise ValueError(f"{_WHERE}: {prefix + sorted(names & {'scale', 'mean'})[0]!r} looks like an "
                                 f"official batch norm but {[prefix + m for m in missing]} are missing")
            extra = names - _OFFICIAL_BN - _OFFICIAL_BN_EXTRA
            if extra:
                raise ValueError(f"{_WHERE}: cannot map {[prefix + e for e in sorted(extra)]} next to an official batch norm")
            _floating(leaves, prefix, sorted(_OFFICIAL_BN))
            p2, e = _bn_options(target.module(prefix), prefix, pf, eps)
            out[prefix + "weight"] = leaves["scale"]
            out[prefix + "bias"] = leaves["mean"]
            out[prefix + "running_mean"] = leaves["running_mean"]
            out[prefix + "running_var"] = _target_inverse_scale(leaves["running_var"], p2, e, prefix + "running_var")
            out[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
            converted += 1
            continue
        if "running_scale" in names:
            missing = sorted(_OFFICIAL_L1 - names)
            extra = names - _OFFICIAL_L1 - {"weight", "bias"}
            if missing or extra:
                raise ValueError(f"{_WHERE}: cannot map {prefix + 'running_scale'!r}: missing "
                                 f"{[prefix + m for m in missing]}, unexpected {[prefix + x for x in sorted(extra)]}")
            _floating(leaves, prefix, sorted(_OFFICIAL_L1 | {"weight", "bias"}))
            p2, e = _bn_options(target.module(prefix), prefix, pf, eps)
            for leaf in ("weight", "bias", "running_mean"):
                if leaf in leaves:
                    out[prefix + leaf] = leaves[leaf]
            out[prefix + "running_var"] = _target_scale(leaves["running_scale"], p2, e, prefix + "running_scale")
            out[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
            converted += 1
            continue
        # -- MeanBN --------------------------------------------------------------------------------
        if "running_mean" in names and names <= {"running_mean", "bias"}:
            m = target.module(prefix)
            if m is not None and not isinstance(m, _MEAN_ONLY):
                raise ValueError(f"{_WHERE}: {prefix + 'running_mean'!r} is an official MeanBN but the model "
                                 f"has a {type(m).__name__} there (expected MeanOnlyBatchNorm)")
            _floating(leaves, prefix, sorted(names))
            out.update({prefix + k: v for k, v in leaves.items()})
            out[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
            converted += 1
            continue
        # -- BWN and (legacy) weight norm: <name>_g, <name>_v, <name>_g_prenorm ---------------------
        wn: dict[str, dict[str, Tensor]] = {}
        for leaf, value in leaves.items():
            m = _WN_RE.match(leaf)
            if m:
                wn.setdefault(m.group("name"), {})[m.group("part")] = value
        for name, parts in wn.items():
            if "g_prenorm" in parts or name == "weight" or {"g", "v"} <= set(parts):
                if not {"g", "v"} <= set(parts):
                    have = [f"{prefix}{name}_{k}" for k in sorted(parts)]
                    raise ValueError(f"{_WHERE}: cannot map {have}: a weight norm needs both "
                                     f"{prefix}{name}_g and {prefix}{name}_v")
                for k in parts:
                    rest.pop(f"{name}_{k}")
                out.update(_convert_wn(prefix, name, parts, target))
                converted += 1
        out.update({prefix + k: v for k, v in rest.items()})

    if converted == 0:
        raise ValueError(
            f"{_WHERE}: no key of the official code's layers (scale/mean/running_var batch norms, "
            "MeanBN, running_scale) or of a weight norm (<name>_g, <name>_v) was found: is this "
            "already a torch / normmatters state dict? First keys: " + ", ".join(list(sd)[:5])
        )
    if model is not None:
        _check_against(out, target.state)
    return OrderedDict(out)


def _convert_wn(prefix: str, name: str, parts: dict[str, Tensor], target: _Target) -> dict[str, Tensor]:
    g, v = parts["g"], parts["v"]
    prenorm = parts.get("g_prenorm")
    key = f"{prefix}{name}_g"
    _floating({f"{name}_{k}": t for k, t in parts.items()}, prefix, [f"{name}_{k}" for k in sorted(parts)])
    _check_gain_shape(g, v, key, f"{prefix}{name}_v")
    if prenorm is not None and prenorm.numel() != 1:
        raise ValueError(f"{_WHERE}: {prefix}{name}_g_prenorm has shape {tuple(prenorm.shape)}; it holds one "
                         "number, the initial norm of the gains")
    m = target.module(prefix)
    kind = _wn_kind(m, name) if m is not None else ("bounded" if prenorm is not None else "wn")
    base = f"{prefix}parametrizations.{name}."
    if kind == "bounded":
        gn = prenorm.reshape(()) if prenorm is not None else torch.linalg.vector_norm(g.detach()).to(g.dtype)
        return {base + "original0": g, base + "original1": v, base + "0.gain_norm": gn}
    if kind == "wn":
        if prenorm is not None:
            # (‖g₀‖/‖g‖)·g is a per-channel gain like any other: a WN layer reproduces it exactly.
            g = (g.double() * (prenorm.double().reshape(()) / torch.linalg.vector_norm(g.double()))).to(g.dtype)
        return {base + "original0": g, base + "original1": v}
    if kind == "plain" and prenorm is None:
        w = (g.double() * v.double() / _channel_norms_like(v.double(), g)).to(v.dtype)
        return {prefix + name: w}
    what = {"plain": "a plain weight (the official BWN's p is not in the checkpoint)",
            "fixed": "bounded_weight_norm(gain='fixed') (a fixed rho cannot hold per-channel gains)",
            "other": "a parametrization that is not a weight norm"}[kind]
    raise ValueError(
        f"{_WHERE}: cannot map {key!r}: the model stores {prefix}{name} as {what}; build it with "
        "bounded_weight_norm(..., gain='bounded') or weight_norm"
    )


def _check_against(out: dict[str, Tensor], expected: dict[str, Tensor] | None) -> None:
    assert expected is not None
    unexpected = [k for k in out if k not in expected]
    if unexpected:
        raise ValueError(f"{_WHERE}: cannot map {unexpected[:5]}: the model has no such key")
    missing = [k for k in expected if k not in out]
    if missing:
        raise ValueError(f"{_WHERE}: the model expects keys the checkpoint does not provide: {missing[:5]}")
    for k, v in out.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{_WHERE}: {k!r} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(expected[k].shape)} in the model")
