"""Swap the normalization layers of any model between torch's and normmatters' Lp kinds.

Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: walk the model, build the
replacement with the same configuration, copy parameters, buffers and the ``training`` flag, and
return the (possibly new) root module. Converting between p's keeps ``running_var`` meaningful
because every p stores σ̂² there (SPEC §2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..functional.constants import normalize_p
from ..nn.batchnorm import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, _LpNormBase
from ..nn.layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm
from ..nn.sync import SyncLpBatchNorm

__all__ = ["convert_norms", "to_torch_norms"]

_KINDS = ("batch", "layer", "group", "rms")

_TORCH_BN = {nn.BatchNorm1d: LpBatchNorm1d, nn.BatchNorm2d: LpBatchNorm2d, nn.BatchNorm3d: LpBatchNorm3d}
_LP_BN_TO_TORCH = {LpBatchNorm1d: nn.BatchNorm1d, LpBatchNorm2d: nn.BatchNorm2d, LpBatchNorm3d: nn.BatchNorm3d}


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name in ("weight", "bias"):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if s is not None and d is not None:
                d.copy_(s)
                d.requires_grad_(s.requires_grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if s is not None and d is not None:
                d.copy_(s)
    dst.train(src.training)
    return dst


def _factory(module: nn.Module) -> dict[str, Any]:
    ref = next(iter(list(module.parameters()) + list(module.buffers())), None)
    if ref is None:
        return {}
    dtype = ref.dtype if ref.is_floating_point() else None
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            dtype = t.dtype
            break
    return {"device": ref.device, "dtype": dtype}


def _bn_class(module: nn.Module) -> type | None:
    for torch_cls, lp_cls in _TORCH_BN.items():
        if type(module) is torch_cls or isinstance(module, lp_cls):
            return lp_cls
    for torch_cls, lp_cls in _TORCH_BN.items():
        if isinstance(module, torch_cls) and not isinstance(module, nn.SyncBatchNorm):
            return lp_cls
    return None


def _convert_one(module: nn.Module, kinds: tuple[str, ...], opts: dict[str, Any]) -> nn.Module | None:
    fk = _factory(module)
    if "batch" in kinds and isinstance(module, SyncLpBatchNorm):
        sync_opts = {k: v for k, v in opts.items() if k in ("p", "k", "constant")}
        new = SyncLpBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, module.process_group,
                              bias=module.bias is not None or not module.affine, **fk, **sync_opts)
        return _copy_state(module, new)
    lp_cls = _bn_class(module) if "batch" in kinds else None
    if lp_cls is not None:
        extra = {k: getattr(module, k) for k in ("ghost_batch_size", "compute_dtype", "accumulate_dtype")
                 if isinstance(module, _LpNormBase)}
        extra.update({k: v for k, v in opts.items()})
        new = lp_cls(module.num_features, module.eps, module.momentum, module.affine,
                     module.track_running_stats, bias=getattr(module, "bias", None) is not None or not module.affine,
                     **fk, **extra)
        return _copy_state(module, new)
    layer_opts = {k: v for k, v in opts.items() if k in ("p", "k", "constant")}
    if "layer" in kinds and isinstance(module, (nn.LayerNorm, LpLayerNorm)):
        new = LpLayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                          bias=module.bias is not None or not module.elementwise_affine, **fk, **layer_opts)
        return _copy_state(module, new)
    if "group" in kinds and isinstance(module, (nn.GroupNorm, LpGroupNorm)):
        new = LpGroupNorm(module.num_groups, module.num_channels, module.eps, module.affine,
                          bias=module.bias is not None or not module.affine, **fk, **layer_opts)
        return _copy_state(module, new)
    if "rms" in kinds and hasattr(nn, "RMSNorm") and isinstance(module, (nn.RMSNorm, LpRMSNorm)):
        new = LpRMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, **fk, **layer_opts)
        return _copy_state(module, new)
    return None


def _walk(module: nn.Module, fn) -> nn.Module:
    replaced = fn(module)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        new_child = _walk(child, fn)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def convert_norms(
    model: nn.Module,
    p: float | int | str = 1,
    *,
    k: int | None = None,
    constant: str = "calibrated",
    kinds: tuple[str, ...] | list[str] = _KINDS,
    **layer_kwargs: Any,
) -> nn.Module:
    """Replace every batch / layer / group / RMS norm in ``model`` by the Lp kind ``p`` (and ``k``).

    Torch's ``nn.BatchNorm{1,2,3}d``, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm`` and
    normmatters' own Lp layers are converted; affine parameters, running statistics,
    ``num_batches_tracked``, ``requires_grad`` and the ``training`` flag are copied. The model is
    modified in place and returned (a norm passed as ``model`` itself is returned replaced).
    ``nn.SyncBatchNorm`` is left alone (see ``convert_sync_lp_batchnorm``); a ``SyncLpBatchNorm``
    becomes one of the new kind with the same process group.

    Args:
        model: any module.
        p, k, constant: the Lp kind of the new layers (see :class:`~normmatters.nn.LpBatchNorm2d`).
        kinds: which families to convert, a subset of ``("batch", "layer", "group", "rms")``.
        layer_kwargs: further keyword options for the new batch norms (``ghost_batch_size``,
            ``compute_dtype``, ``accumulate_dtype``).

    Raises:
        ValueError: bad ``p`` / ``k`` / ``kinds``, or a model with no norm layer to convert.

    Example::

        >>> model = convert_norms(resnet, p=1)           # every BatchNorm2d -> LpBatchNorm2d(p=1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_norms: expected an nn.Module, got {type(model).__name__}")
    p = normalize_p(p)
    if k is not None and p != math.inf:
        raise ValueError(f"convert_norms: k={k} selects Top(k), which needs p=inf, got p={p}")
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        raise ValueError(f"convert_norms: unknown kinds {sorted(unknown)}; choose from {_KINDS}")
    opts = {"p": p, "k": k, "constant": constant, **layer_kwargs}
    count = 0

    def fn(m: nn.Module) -> nn.Module | None:
        nonlocal count
        new = _convert_one(m, tuple(kinds), opts)
        count += new is not None
        return new

    out = _walk(model, fn)
    if count == 0:
        raise ValueError(f"convert_norms: {type(model).__name__} has no {'/'.join(kinds)} norm layer to convert")
    return out


def to_torch_norms(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace normmatters' Lp norm layers by torch's own (``nn.BatchNorm2d`` etc.), the reverse
    of :func:`convert_norms`.

    Only p=2 layers compute the same function as torch's; with ``strict=True`` (default) a layer
    with another p is an error naming it, with ``strict=False`` it is converted anyway (the
    parameters and running statistics carry over; the dispersion becomes L2).
    Mean-only batch norms have no torch counterpart and are left as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_torch_norms: expected an nn.Module, got {type(model).__name__}")
    names = {m: n for n, m in model.named_modules()}
    count = 0

    def fn(m: nn.Module) -> nn.Module | None:
        nonlocal count
        if not isinstance(m, (_LpNormBase, LpLayerNorm, LpGroupNorm, LpRMSNorm)):
            return None
        if strict and (m.p != 2.0 or getattr(m, "ghost_batch_size", None) is not None):
            raise ValueError(
                f"to_torch_norms: module {names.get(m, '') or '<root>'!r} ({m.extra_repr()}) is not an "
                f"L2 norm without ghost batches; torch's layer would compute a different function "
                f"(pass strict=False to convert anyway)"
            )
        fk = _factory(m)
        if isinstance(m, SyncLpBatchNorm):
            new = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                   m.process_group, **fk)
        elif isinstance(m, _LpNormBase):
            cls = _LP_BN_TO_TORCH[type(m)] if type(m) in _LP_BN_TO_TORCH else nn.BatchNorm2d
            kw = {"bias": m.bias is not None or not m.affine} if "bias" in cls.__init__.__code__.co_varnames else {}
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **fk, **kw)
        elif isinstance(m, LpLayerNorm):
            new = nn.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine,
                               bias=m.bias is not None or not m.elementwise_affine, **fk)
        elif isinstance(m, LpGroupNorm):
            new = nn.GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, **fk)
        else:
            new = nn.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, **fk)
        count += 1
        return _copy_state(m, new)

    out = _walk(model, fn)
    if count == 0:
        raise ValueError(f"to_torch_norms: {type(model).__name__} has no normmatters norm layer to convert")
    return out
