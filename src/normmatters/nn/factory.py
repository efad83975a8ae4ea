"""A string-keyed norm factory, in the manner of timm's ``get_norm_layer`` / ``create_norm_layer``.

``get_norm_layer("l1bn")`` returns a class or :func:`functools.partial` that can be passed as
``norm_layer=`` wherever a constructor expects ``nn.BatchNorm2d`` (called with the channel count
first). Names (case, ``_`` and ``-`` are ignored):

=======================================  ==========================================================
``bn``, ``l2bn``, ``l2``, ``batchnorm``  :class:`LpBatchNorm2d` at p=2 (torch's batch norm)
``l1bn``, ``l1``                         L1 batch norm (σ̂ = √(π/2)·mean|d|)
``linfbn``, ``linf``                     L∞ batch norm
``top{k}bn``, ``top{k}`` (``top10``)     Top(k) batch norm, any k ≥ 1
``<p>bn1d``, ``<p>bn3d``                 the 1-D / 3-D batch norms (``bn1d``, ``l1bn3d``, ...;
                                         ``batchnorm1d``/``2d``/``3d`` too)
``<p>ln``, ``layernorm``                 :class:`LpLayerNorm` over the last dim (``l1ln``, ...)
``<p>gn``, ``groupnorm``                 :class:`LpGroupNorm`, ``num_groups=32`` by default
``<p>rmsnorm``                           :class:`LpRMSNorm` (``l1rmsnorm``, ``top10rmsnorm``, ...)
``meanbn``, ``meanbn1d``, ``meanbn3d``   :class:`MeanOnlyBatchNorm2d` / 1d / 3d
``none``, ``identity``                   :class:`torch.nn.Identity`
=======================================  ==========================================================

``<p>`` is empty or ``l2`` (p=2), ``l1``, ``linf`` or ``top{k}``. A class, a partial or any other
callable is returned as it is (with ``kwargs`` bound). The name fixes p and k: passing ``p=`` or
``k=`` as well is an error rather than a silent override.

Group norm takes the channel count first, like timm's ``GroupNorm(num_channels, num_groups=32)``.
With the default group count, a channel count that 32 does not divide uses the largest divisor
below 32 (so small networks work); an explicit ``num_groups`` must divide the channels.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

from torch import nn

from .batchnorm import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from .layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm
from .meanbn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d

__all__ = ["get_norm_layer", "create_norm_layer", "norm_layer_names"]

_P_PREFIX: dict[str, dict[str, Any]] = {"": {"p": 2}, "l2": {"p": 2}, "l1": {"p": 1}, "linf": {"p": float("inf")}}
_BN = {"": LpBatchNorm2d, "2d": LpBatchNorm2d, "1d": LpBatchNorm1d, "3d": LpBatchNorm3d}
_MEAN = {"": MeanOnlyBatchNorm2d, "2d": MeanOnlyBatchNorm2d, "1d": MeanOnlyBatchNorm1d, "3d": MeanOnlyBatchNorm3d}
_PATTERN = re.compile(r"^(l1|l2|linf|top(\d+)|)(bn|ln|gn|rmsnorm)(1d|2d|3d|)$")
_MEAN_PATTERN = re.compile(r"^meanbn(1d|2d|3d|)$")
# Short and timm-style spellings, rewritten to the canonical names before parsing.
_ALIASES = {
    "l1": "l1bn", "l2": "bn", "linf": "linfbn",
    "batchnorm": "bn", "batchnorm1d": "bn1d", "batchnorm2d": "bn2d", "batchnorm3d": "bn3d",
    "layernorm": "ln", "groupnorm": "gn", "meanonlybatchnorm": "meanbn",
}
_DEFAULT_GROUPS = 32


def _group_norm(num_channels: int, num_groups: int | None = None, **kwargs: Any) -> LpGroupNorm:
    """timm's convention: the channel count first, the group count as a keyword."""
    if num_groups is None:
        num_groups = min(_DEFAULT_GROUPS, num_channels)
        while num_channels % num_groups:
            num_groups -= 1
    return LpGroupNorm(num_groups, num_channels, **kwargs)


def norm_layer_names() -> list[str]:
    """The names :func:`get_norm_layer` knows (``top{k}`` stands for any positive k)."""
    out = ["none", "identity", "meanbn", "meanbn1d", "meanbn2d", "meanbn3d", "l1", "l2", "linf", "top{k}"]
    for prefix in ("", "l2", "l1", "linf", "top{k}"):
        for kind in ("bn", "bn1d", "bn2d", "bn3d", "ln", "gn", "rmsnorm"):
            out.append(prefix + kind)
    out += [a for a in _ALIASES if a not in out]
    return out


def _unknown(norm: str, why: str = "") -> ValueError:
    return ValueError(
        f"get_norm_layer: unknown norm {norm!r}{why}; known names: {', '.join(norm_layer_names())}"
    )


def get_norm_layer(norm: str | type | functools.partial | Callable | None, **kwargs: Any) -> Any:
    """Resolve ``norm`` to a norm-layer class or partial taking ``num_features`` first.

    Extra ``kwargs`` (e.g. ``constant="paper"``, ``eps=1e-3``) are bound into the partial.

    Raises:
        ValueError: an unknown name (the message lists the known ones), ``top0``, a ``1d``/``3d``
            suffix on a non-batch norm, or ``p=``/``k=`` given with a name that fixes them.
        TypeError: ``norm`` is neither a name, ``None`` nor a callable.

    Examples::

        >>> norm_layer = get_norm_layer("l1bn")
        >>> bn = norm_layer(64)            # LpBatchNorm2d(64, p=1)
        >>> get_norm_layer("top10")(64).k
        10
        >>> get_norm_layer(nn.BatchNorm2d, eps=1e-3)(64).eps
        0.001
    """
    if norm is None:
        return nn.Identity
    if isinstance(norm, (type, functools.partial)) or (callable(norm) and not isinstance(norm, str)):
        return functools.partial(norm, **kwargs) if kwargs else norm
    if not isinstance(norm, str):
        raise TypeError(
            f"get_norm_layer: expected a name, a class, a partial or None, got {type(norm).__name__} {norm!r}"
        )
    key = norm.strip().lower().replace("_", "").replace("-", "")
    if key in ("none", "identity"):
        return nn.Identity
    key = _ALIASES.get(key, key)
    if key.startswith("top") and key[3:].isdigit():
        key += "bn"
    mean = _MEAN_PATTERN.match(key)
    if mean:
        cls = _MEAN[mean.group(1)]
        return functools.partial(cls, **kwargs) if kwargs else cls
    m = _PATTERN.match(key)
    if not m:
        raise _unknown(norm)
    prefix, topk, kind, nd = m.groups()
    if topk is not None:
        if int(topk) < 1:
            raise _unknown(norm, " (Top(k) needs k >= 1)")
        opts: dict[str, Any] = {"p": float("inf"), "k": int(topk)}
    else:
        opts = dict(_P_PREFIX[prefix])
    fixed = sorted(set(kwargs) & {"p", "k"})
    if fixed:
        raise ValueError(
            f"get_norm_layer: the name {norm!r} already sets p/k; got {', '.join(f'{f}={kwargs[f]!r}' for f in fixed)} "
            "as well (choose the name instead, e.g. 'l1bn', 'linfbn', 'top10bn')"
        )
    opts.update(kwargs)
    if kind == "bn":
        return functools.partial(_BN[nd], **opts)
    if nd:
        raise ValueError(f"get_norm_layer: {norm!r}: only batch norms take a 1d/2d/3d suffix")
    if kind == "ln":
        return functools.partial(LpLayerNorm, **opts)
    if kind == "gn":
        return functools.partial(_group_norm, **opts)
    return functools.partial(LpRMSNorm, **opts)


def create_norm_layer(norm: str | type | functools.partial | Callable | None, num_features: int,
                      **kwargs: Any) -> nn.Module:
    """Build one norm layer: ``create_norm_layer("l1bn", 64)`` is ``LpBatchNorm2d(64, p=1)``.

    ``kwargs`` go to the layer (see :func:`get_norm_layer`).
    """
    return get_norm_layer(norm, **kwargs)(num_features)
