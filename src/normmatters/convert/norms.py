"""Swap the normalization layers of any model between torch's (or another library's) and
normmatters' Lp kinds.

Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: walk the model, build the
replacement with the same configuration, copy parameters, buffers and the ``training`` flag, and
return the (possibly new) root module. Converting between p's keeps ``running_var`` meaningful
because every p stores σ̂²·n/(n−1) there (docs/math.md).

Which modules are converted is decided by what they compute (:mod:`normmatters.convert.recognise`):
a module is replaced by a layer computing the same function at p=2 (its Lp version at another p),
or left as it is with one :class:`~normmatters.convert.NormConversionWarning` naming it.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..functional import normalize_p
from ..nn import (
    BatchNormBase,
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    SyncLpBatchNorm,
)
from .layers import ForeignLpNorm, original_of, remember_original, restore_original, update_transformer_fast_paths
from .recognise import MEAN_ONLY, build, copy_into, recognise, registered_norm, warn_left

__all__ = ["convert_norms", "to_torch_norms"]

_KINDS = ("batch", "layer", "group", "rms")

_LP_TO_TORCH = {LpBatchNorm1d: nn.BatchNorm1d, LpBatchNorm2d: nn.BatchNorm2d, LpBatchNorm3d: nn.BatchNorm3d,
                SyncLpBatchNorm: nn.SyncBatchNorm, LpLayerNorm: nn.LayerNorm, LpGroupNorm: nn.GroupNorm,
                LpRMSNorm: nn.RMSNorm}
_OURS = tuple(_LP_TO_TORCH) + (ForeignLpNorm,)


def factory_of(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of a module's own tensors (the first floating one sets the dtype)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if not tensors:
        return {}
    ref = next((t for t in tensors if t.is_floating_point()), tensors[0])
    return {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None}


def walk(module: nn.Module, fn, name: str = "") -> nn.Module:
    """Apply ``fn(module, qualified_name)`` top-down: a module returned stops the descent there."""
    replaced = fn(module, name)
    if replaced is not None:
        return replaced
    for child_name, child in module.named_children():
        new_child = walk(child, fn, f"{name}.{child_name}" if name else child_name)
        if new_child is not child:
            module.add_module(child_name, new_child)
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

    Converted: torch's ``nn.BatchNorm{1,2,3}d``, ``nn.SyncBatchNorm`` (to
    :class:`~normmatters.nn.SyncLpBatchNorm`), ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``,
    normmatters' own Lp layers, and every other norm-like module (subclasses, other libraries'
    classes such as transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``,
    ``ConvNextLayerNorm``) that computes one of these formulas on a probe input
    (:mod:`normmatters.convert.recognise`), and classes registered with
    :func:`~normmatters.convert.register_norm`. A norm-like module that computes something else
    (e.g. a batch norm subclass whose ``forward`` adds an activation) is left as it is with one
    :class:`~normmatters.convert.NormConversionWarning` naming it and saying why.

    Affine parameters (under the original's names: state dicts keep their keys), running
    statistics, ``num_batches_tracked``, ``requires_grad`` and the ``training`` flag are copied.
    Layers of other classes remember their original, which :func:`to_torch_norms` gives back.
    torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` whose norms are converted
    have their fused fast path turned off (it would compute L2 layer norm from the weights). The
    model is modified in place and returned (a norm passed as ``model`` is returned replaced).
    Mean-only batch norms have no p and are left as they are.

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
    where = "convert_norms"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    p = normalize_p(p)
    if k is not None and p != math.inf:
        raise ValueError(f"{where}: k={k} selects Top(k), which needs p=inf, got p={p}")
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        raise ValueError(f"{where}: unknown kinds {sorted(unknown)}; choose from {_KINDS}")
    count = 0
    left: list[str] = []

    def fn(m: nn.Module, name: str) -> nn.Module | None:
        nonlocal count
        reg = registered_norm(m)
        if reg is not None:
            if reg.to_lp is None:
                warn_left(where, name, m, "its class is registered without a to_lp converter")
                left.append(name or "<root>")
                return m
            count += 1
            return reg.to_lp(m, p=p, k=k, constant=constant)
        spec = recognise(m)
        if spec is None:
            return None
        if isinstance(spec, str):
            warn_left(where, name, m, spec)
            left.append(name or "<root>")
            return m
        if spec.kind not in kinds:
            return m
        sync = type(m) in (SyncLpBatchNorm, nn.SyncBatchNorm)
        options = {**spec.options, **layer_kwargs} if spec.kind == "batch" else None
        if sync and options:
            options = {}
        new = build(spec, p=p, k=k, constant=constant, options=options, sync=sync,
                    process_group=getattr(m, "process_group", None), **factory_of(m))
        copy_into(m, spec, new)
        if original_of(m) is not None or not spec.exact:
            remember_original(new, m)
        count += 1
        return new

    out = walk(model, fn)
    update_transformer_fast_paths(out)
    if count == 0:
        why = f" (left: {', '.join(left)}; see the warnings)" if left else ""
        raise ValueError(f"{where}: {type(model).__name__} has no {'/'.join(kinds)} norm layer to convert{why}")
    return out


def to_torch_norms(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace normmatters' Lp norm layers by torch's own (``nn.BatchNorm2d`` etc.), the reverse
    of :func:`convert_norms`; a layer that :func:`convert_norms` made from another class (a
    subclass, transformers' ``LlamaRMSNorm``, ...) becomes a layer of that class again.

    Only p=2 layers (without ghost batches or low-precision emulation) compute the same function
    as torch's; with ``strict=True`` (default) another layer is an error naming it, with
    ``strict=False`` it is converted anyway (the parameters and running statistics carry over;
    the dispersion becomes L2). Layers with no torch counterpart (mean-only batch norms, Range BN,
    subclasses of the Lp layers, a :class:`~normmatters.convert.ForeignLpNorm` built by hand) are
    left with one :class:`~normmatters.convert.NormConversionWarning` each.
    """
    where = "to_torch_norms"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    count = 0

    def fn(m: nn.Module, name: str) -> nn.Module | None:
        nonlocal count
        reg = registered_norm(m)
        if reg is not None:
            if reg.to_torch is None:
                warn_left(where, name, m, "its class is registered without a to_torch converter")
                return m
            count += 1
            return reg.to_torch(m)
        t = type(m)
        if t in _OURS:
            l2 = m.p == 2.0 and getattr(m, "ghost_batch_size", None) is None \
                and getattr(m, "compute_dtype", None) is None
            if strict and not l2:
                raise ValueError(
                    f"{where}: module {name or '<root>'!r} ({m.extra_repr()}) is not an L2 norm without "
                    f"ghost batches or low-precision emulation; torch's layer would compute a different "
                    f"function (pass strict=False to convert anyway)"
                )
            if original_of(m) is not None:
                count += 1
                return restore_original(m)
            if t is ForeignLpNorm:
                warn_left(where, name, m, "no torch layer computes a layer / RMS norm of this form "
                                          "and it keeps no original class")
                return m
            new = _torch_layer(m)
            count += 1
            return new
        if isinstance(m, MEAN_ONLY):
            warn_left(where, name, m, "a mean-only batch norm has no torch counterpart")
            return m
        if isinstance(m, (BatchNormBase, LpLayerNorm, LpGroupNorm, LpRMSNorm)):
            warn_left(where, name, m, "it is not exactly one of normmatters' Lp layers (a subclass or "
                                      "another kind); no torch layer is known to compute the same")
            return m
        return None

    out = walk(model, fn)
    update_transformer_fast_paths(out)
    if count == 0:
        raise ValueError(f"{where}: {type(model).__name__} has no normmatters norm layer to convert")
    return out


def _torch_layer(m: nn.Module) -> nn.Module:
    fk = factory_of(m)
    cls = _LP_TO_TORCH[type(m)]
    if cls is nn.SyncBatchNorm:
        new = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                               m.process_group, **fk)
    elif cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        kw = {"bias": m.bias is not None or not m.affine} if "bias" in cls.__init__.__code__.co_varnames else {}
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **fk, **kw)
    elif cls is nn.LayerNorm:
        new = nn.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine,
                           bias=m.bias is not None or not m.elementwise_affine, **fk)
    elif cls is nn.GroupNorm:
        new = nn.GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, **fk)
    else:
        new = nn.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, **fk)
    spec = recognise(m)
    return copy_into(m, spec, new)
