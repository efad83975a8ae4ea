"""A string-keyed norm factory, in the manner of timm's ``get_norm_layer`` / ``create_norm_layer``.

``get_norm_layer("l1bn")`` returns a class or :func:`functools.partial` that can be passed as
``norm_layer=`` wherever a constructor expects ``nn.BatchNorm2d`` (called with the channel count
first). Names:

=================  ===========================================================
``bn``, ``l2``     :class:`LpBatchNorm2d` at p=2 (torch's batch norm)
``l1bn``, ``l1``   L1 batch norm; ``linfbn``/``linf`` L∞; ``top{k}bn``/``top{k}`` Top(k)
``bn1d``, ``l1bn1d``, ``bn3d``, ...  the 1-D / 3-D batch norms
``ln``, ``l1ln``, ``linfln``, ``top{k}ln``  layer norm (``num_features`` = last dim)
``gn``, ``l1gn``, ...                        group norm (``num_groups=32`` by default)
``rmsnorm``, ``l1rmsnorm``, ...              RMS norm
``meanbn``, ``meanbn1d``, ``meanbn3d``        mean-only batch norm
``none``, ``identity``                         :class:`torch.nn.Identity`
=================  ===========================================================

A class or a partial is returned as it is.
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

_P_PREFIX = {"": {"p": 2}, "l2": {"p": 2}, "l1": {"p": 1}, "linf": {"p": float("inf")}}
_BN = {"": LpBatchNorm2d, "2d": LpBatchNorm2d, "1d": LpBatchNorm1d, "3d": LpBatchNorm3d}
_MEAN = {"": MeanOnlyBatchNorm2d, "2d": MeanOnlyBatchNorm2d, "1d": MeanOnlyBatchNorm1d, "3d": MeanOnlyBatchNorm3d}
_PATTERN = re.compile(r"^(l1|l2|linf|top(\d+)|)(bn|ln|gn|rmsnorm)(1d|2d|3d|)$")
_SHORT = {"l1": "l1bn", "l2": "bn", "linf": "linfbn"}


def _group_norm(num_channels: int, num_groups: int = 32, **kwargs: Any) -> LpGroupNorm:
    # timm's convention: a channel count first, the group count as a keyword; fall back to the
    # largest divisor so small test networks work.
    groups = min(num_groups, num_channels)
    while num_channels % groups:
        groups -= 1
    return LpGroupNorm(groups, num_channels, **kwargs)


def norm_layer_names() -> list[str]:
    """The names :func:`get_norm_layer` knows (``top{k}`` stands for any positive k)."""
    out = ["none", "identity", "meanbn", "meanbn1d", "meanbn3d", "l1", "l2", "linf", "top{k}"]
    for prefix in ("", "l1", "linf", "top{k}"):
        for kind in ("bn", "bn1d", "bn3d", "ln", "gn", "rmsnorm"):
            out.append(prefix + kind)
    return out


def get_norm_layer(norm: str | type | functools.partial | Callable | None, **kwargs: Any) -> Any:
    """Resolve ``norm`` to a norm-layer class or partial taking ``num_features`` first.

    Extra ``kwargs`` (e.g. ``constant="paper"``, ``eps=1e-3``) are bound into the partial.

    Examples::

        >>> norm_layer = get_norm_layer("l1bn")
        >>> bn = norm_layer(64)            # LpBatchNorm2d(64, p=1)
        >>> get_norm_layer("top10")(64).k
        10
    """
    if norm is None:
        return nn.Identity
    if isinstance(norm, (type, functools.partial)) or (callable(norm) and not isinstance(norm, str)):
        return functools.partial(norm, **kwargs) if kwargs else norm
    if not isinstance(norm, str):
        raise TypeError(f"get_norm_layer: expected a name, class or partial, got {type(norm).__name__}")
    key = norm.strip().lower().replace("_", "").replace("-", "")
    if key in ("none", "identity"):
        return nn.Identity
    key = _SHORT.get(key, key)
    if key.startswith("top") and key[3:].isdigit():
        key += "bn"
    mean = re.match(r"^meanbn(1d|2d|3d|)$", key)
    if mean:
        cls = _MEAN[mean.group(1)]
        return functools.partial(cls, **kwargs) if kwargs else cls
    m = _PATTERN.match(key)
    if not m:
        raise ValueError(
            f"get_norm_layer: unknown norm {norm!r}; known names: {', '.join(norm_layer_names())}"
        )
    prefix, topk, kind, nd = m.groups()
    opts = dict(_P_PREFIX.get(prefix, {}))
    if topk is not None:
        opts = {"p": float("inf"), "k": int(topk)}
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
    """Build one norm layer: ``create_norm_layer("l1bn", 64)`` is ``LpBatchNorm2d(64, p=1)``."""
    return get_norm_layer(norm, **kwargs)(num_features)
