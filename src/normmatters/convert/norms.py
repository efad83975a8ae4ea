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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..functional import normalize_p
from ..nn import (
    BatchNormBase,
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpGatedRMSNorm,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    SyncLpBatchNorm,
)
from .layers import (
    ForeignLpGatedRMSNorm,
    ForeignLpNorm,
    copy_attributes,
    move_hooks,
    original_of,
    reads_eps_of,
    remember_original,
    restore_original,
    update_transformer_fast_paths,
)
from .recognise import MEAN_ONLY, NormSpec, build, copy_into, recognise, registered_norm, warn_left
from .report import ConversionReport, ConversionRow

__all__ = ["convert_norms", "to_torch_norms", "replace_modules"]

_KINDS = ("batch", "layer", "group", "rms")

_LP_TO_TORCH = {LpBatchNorm1d: nn.BatchNorm1d, LpBatchNorm2d: nn.BatchNorm2d, LpBatchNorm3d: nn.BatchNorm3d,
                SyncLpBatchNorm: nn.SyncBatchNorm, LpLayerNorm: nn.LayerNorm, LpGroupNorm: nn.GroupNorm,
                LpRMSNorm: nn.RMSNorm}
_OURS = tuple(_LP_TO_TORCH) + (ForeignLpNorm, LpGatedRMSNorm, ForeignLpGatedRMSNorm)


def factory_of(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of a module's own tensors (the first floating one sets the dtype)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if not tensors:
        return {}
    ref = next((t for t in tensors if t.is_floating_point()), tensors[0])
    return {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None}


@dataclass
class _Plan:
    """What a converter decided for one module, wherever it is reachable."""

    module: nn.Module
    paths: list[str]
    parents: list[tuple[nn.Module, str]]
    action: str  # "convert", "left", "kept" or "" (not a norm: its children were visited)
    spec: Any = None
    why: str = ""


def _plan(model: nn.Module, decide: Callable[[nn.Module, str], tuple[str, Any, str] | None]
          ) -> tuple[dict[int, _Plan], list[tuple[nn.Module, str, nn.Module]], int]:
    """Decide for every module reachable from ``model`` once (a shared module is one plan with all
    its paths and parents), without changing anything. Returns the plans by ``id``, every
    (parent, name, child) edge and the number of modules that are not norms."""
    plans: dict[int, _Plan] = {}
    edges: list[tuple[nn.Module, str, nn.Module]] = []
    others = 0

    def visit(m: nn.Module, path: str, parent: nn.Module | None, name: str) -> None:
        nonlocal others
        plan = plans.get(id(m))
        if plan is not None:  # reached again: one more place (for it and everything under it)
            plan.paths.append(path or "<root>")
            if parent is not None:
                plan.parents.append((parent, name))
            if not plan.action:
                for child_name, child in m._modules.items():
                    if child is not None:
                        visit(child, f"{path}.{child_name}" if path else child_name, m, child_name)
            return
        decided = decide(m, path)
        action, spec, why = decided if decided is not None else ("", None, "")
        plans[id(m)] = _Plan(m, [path or "<root>"], [(parent, name)] if parent is not None else [], action, spec, why)
        if decided is not None:
            return
        others += 1
        for child_name, child in m._modules.items():
            if child is not None:
                edges.append((m, child_name, child))
                visit(child, f"{path}.{child_name}" if path else child_name, m, child_name)

    visit(model, "", None, "")
    return plans, edges, others


def _install(model: nn.Module, plans: dict[int, _Plan], edges: list[tuple[nn.Module, str, nn.Module]],
             new: dict[int, nn.Module]) -> nn.Module:
    """Put each replacement (``new``, by the original's ``id``) at every place its original was."""
    for parent, name, child in edges:
        replacement = new.get(id(child))
        if replacement is not None:
            parent._modules[name] = replacement
    return new.get(id(model), model)


def _take_over(old: nn.Module, new: nn.Module, attributes: bool = True) -> nn.Module:
    """The replacement takes the original's hooks and (``attributes``) the plain attributes its
    parents may read."""
    move_hooks(old, new)
    if attributes:
        copy_attributes(old, new)
    return new


def _to_convert(plans: dict[int, _Plan], where: str):
    """The plans to convert, after one warning for each module left (naming all its paths)."""
    for key, plan in plans.items():
        if plan.action == "left":
            warn_left(where, ", ".join(plan.paths), plan.module, plan.why)
        elif plan.action == "convert":
            yield key, plan


def replace_modules(model: nn.Module, fn: Callable[[nn.Module, str], nn.Module | None],
                    attributes: bool = True) -> nn.Module:
    """Apply ``fn(module, qualified_name)`` top-down (``None``: descend into its children; a
    module: stop there, replaced by it if it is another one), each module decided once however
    many places it is reachable from; every replacement is installed at all of them and takes
    over the original's hooks and (``attributes``) plain attributes."""
    results: dict[int, nn.Module] = {}

    def decide(m: nn.Module, path: str) -> tuple[str, Any, str] | None:
        out = fn(m, path)
        if out is None:
            return None
        results[id(m)] = out
        return "done", None, ""

    plans, edges, _ = _plan(model, decide)
    new = {key: out for key, out in results.items() if out is not plans[key].module}
    for key, out in new.items():
        _take_over(plans[key].module, out, attributes)
    return _install(model, plans, edges, new)


def _became(m: nn.Module) -> str:
    return f"{type(m).__name__}({m.extra_repr()})"


def _report(plans: dict[int, _Plan], new: dict[int, nn.Module], others: int, start: float) -> ConversionReport:
    rows = []
    for key, plan in plans.items():
        if not plan.action:
            continue
        became = _became(new[key]) if key in new else plan.why
        outcome = "converted" if key in new else plan.action
        rows.append(ConversionRow(plan.paths, type(plan.module).__name__, outcome, became))
    return ConversionReport(rows, others, time.perf_counter() - start)


def convert_norms(
    model: nn.Module,
    p: float | int | str = 1,
    *,
    k: int | None = None,
    constant: str = "calibrated",
    kinds: tuple[str, ...] | list[str] = _KINDS,
    report: bool = False,
    fused_parents: str = "leave",
    **layer_kwargs: Any,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace every batch / layer / group / RMS norm in ``model`` by the Lp kind ``p`` (and ``k``).

    Converted: torch's ``nn.BatchNorm{1,2,3}d``, ``nn.SyncBatchNorm`` (to
    :class:`~normmatters.nn.SyncLpBatchNorm`), ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``,
    normmatters' own Lp layers, and every other norm-like module (subclasses, other libraries'
    classes such as transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``,
    ``ConvNextLayerNorm``, OLMo's layer norm without parameters, the gated RMS norms of Mamba2-style
    models, ``norm(x, gate)``, which become :class:`~normmatters.nn.LpGatedRMSNorm`) that computes
    one of these formulas on a probe input (:mod:`normmatters.convert.recognise`; the probe calls
    the module's ``forward`` on a copy, never its hooks), and classes registered with
    :func:`~normmatters.convert.register_norm`. A norm-like module that computes something else
    (e.g. a batch norm subclass whose ``forward`` adds an activation), whose ``forward`` takes
    arguments the replacement could not take, or whose parent reads its eps to compute the norm
    itself in a fused kernel (Mamba2's mixer, at p != 2: the kernel would compute L2) is left as it
    is with one :class:`~normmatters.convert.NormConversionWarning` naming it and saying why.
    Convolutions (weight-standardized ones included), linear layers and embeddings are passed over
    without a probe.

    Affine parameters (under the original's names: state dicts keep their keys), running
    statistics, ``num_batches_tracked``, ``requires_grad``, the ``training`` flag, the original's
    forward / pre-forward / backward / state-dict hooks and its plain attributes (such as
    ``variance_epsilon``) are taken over by the replacement. A module reachable at several places
    is replaced once, and the one replacement is put at every place (ties and parameter counts
    unchanged). Layers of other classes remember their original, which :func:`to_torch_norms`
    gives back. torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` whose norms are
    converted have their fused fast path turned off (it would compute L2 layer norm from the
    weights). Nothing is changed before every decision is made and ``k`` is checked. The model is
    modified in place and returned (a norm passed as ``model`` is returned replaced). Mean-only
    batch norms have no p and are left as they are.

    Args:
        model: any module.
        p, k, constant: the Lp kind of the new layers (see :class:`~normmatters.nn.LpBatchNorm2d`).
        kinds: which families to convert, a subset of ``("batch", "layer", "group", "rms")``
            (gated RMS norms are ``"rms"``).
        report: also return a :class:`~normmatters.convert.ConversionReport`: each norm's path,
            class, and what it became or why it was left (``print(report)`` shows the table).
        fused_parents: what to do at p != 2 with a norm whose parent reads its eps to compute it
            in a fused kernel of its own: ``"leave"`` it (default, with a warning), or
            ``"convert"`` it anyway, for a run where that kernel is not installed (Mamba2-style
            mixers call the norm module when ``mamba_ssm`` is absent, always on CPU): where the
            kernel runs, it would compute L2 from the converted layer's ``weight`` and eps.
        layer_kwargs: further keyword options for the new batch norms (``ghost_batch_size``,
            ``compute_dtype``, ``accumulate_dtype``).

    Raises:
        ValueError: bad ``p`` / ``k`` / ``kinds``; ``k`` larger than the normalized size of a
            layer or RMS norm (naming the layers, their sizes and k); or a model with no norm
            layer to convert (naming the modules left; with ``report=True`` the error's
            ``report`` attribute holds the report).

    Example::

        >>> model = convert_norms(resnet, p=1)           # every BatchNorm2d -> LpBatchNorm2d(p=1)
        >>> model, report = convert_norms(llama, p=1, report=True)
        >>> print(report)
    """
    where = "convert_norms"
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    p = normalize_p(p)
    if k is not None and p != math.inf:
        raise ValueError(f"{where}: k={k} selects Top(k), which needs p=inf, got p={p}")
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        raise ValueError(f"{where}: unknown kinds {sorted(unknown)}; choose from {_KINDS}")
    if fused_parents not in ("leave", "convert"):
        raise ValueError(f"{where}: fused_parents must be 'leave' or 'convert', got {fused_parents!r}")

    def decide(m: nn.Module, name: str) -> tuple[str, Any, str] | None:
        reg = registered_norm(m)
        if reg is not None:
            if reg.to_lp is None:
                return "left", None, "its class is registered without a to_lp converter"
            return "convert", reg, ""
        spec = recognise(m, gated=True)
        if spec is None:
            return None
        if isinstance(spec, str):
            return "left", None, spec
        if spec.kind not in kinds:
            return "kept", spec, f"a {spec.describe()}; kind {spec.kind!r} not in kinds"
        return "convert", spec, ""

    plans, edges, others = _plan(model, decide)

    # A parent that computes the norm itself from its weight and eps would bypass an Lp replacement.
    if p != 2.0 and fused_parents == "leave":
        for plan in plans.values():
            if plan.action != "convert":
                continue
            for parent, child in plan.parents:
                if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                    continue
                reads = reads_eps_of(parent, child)
                if reads:
                    plan.action, plan.why = "left", (
                        f"its parent {reads} to compute the norm itself (a fused kernel, e.g. Mamba2's "
                        f"training path with mamba_ssm), which would bypass an L{'inf' if p == math.inf else int(p)} "
                        "replacement and compute L2; fused_parents='convert' converts it for runs without that kernel")
                    break

    if k is not None:
        sized = [plan for plan in plans.values()
                 if plan.action == "convert" and isinstance(plan.spec, NormSpec) and plan.spec.size is not None]
        small = [f"{', '.join(plan.paths)!r} ({type(plan.module).__name__}, {plan.spec.describe()}): "
                 f"{plan.spec.size} values per statistic" for plan in sized if plan.spec.size < k]
        if small:
            raise ValueError(f"{where}: k={k} is larger than the normalized size of " + "; ".join(small)
                             + f"; choose k <= {min(plan.spec.size for plan in sized)} or leave these layers "
                             "out (kinds=...)")

    new: dict[int, nn.Module] = {}
    for key, plan in _to_convert(plans, where):
        m = plan.module
        if not isinstance(plan.spec, NormSpec):  # registered
            out = plan.spec.to_lp(m, p=p, k=k, constant=constant)
        else:
            spec = plan.spec
            sync = type(m) in (SyncLpBatchNorm, nn.SyncBatchNorm)
            options = {**spec.options, **layer_kwargs} if spec.kind == "batch" else None
            if sync and options:
                options = {}
            out = build(spec, p=p, k=k, constant=constant, options=options, sync=sync,
                        process_group=getattr(m, "process_group", None), **factory_of(m))
            copy_into(m, spec, out)
        if out is not m:
            _take_over(m, out)
            if isinstance(plan.spec, NormSpec) and (original_of(m) is not None or not plan.spec.exact):
                remember_original(out, m)
        new[key] = out

    out_model = _install(model, plans, edges, new)
    update_transformer_fast_paths(out_model)
    if not new:
        left = [", ".join(pl.paths) + f" ({type(pl.module).__name__})" for pl in plans.values() if pl.action == "left"]
        shown = "; ".join(left[:5]) + (f"; and {len(left) - 5} more" if len(left) > 5 else "")
        why = f" (left: {shown}; see the warnings" + ("; the error's .report lists them all)" if report else ")") \
            if left else ""
        error = ValueError(f"{where}: {type(model).__name__} has no {'/'.join(kinds)} norm layer to convert{why}")
        if report:
            error.report = _report(plans, new, others, start)  # type: ignore[attr-defined]
        raise error
    if report:
        return out_model, _report(plans, new, others, start)
    return out_model


def to_torch_norms(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace normmatters' Lp norm layers by torch's own (``nn.BatchNorm2d`` etc.), the reverse
    of :func:`convert_norms`; a layer that :func:`convert_norms` made from another class (a
    subclass, transformers' ``LlamaRMSNorm``, ``MambaRMSNormGated``, ...) becomes a layer of that
    class again, with the hooks of the layer it replaces, at every place the layer is reachable.

    Only p=2 layers (without ghost batches or low-precision emulation) compute the same function
    as torch's; with ``strict=True`` (default) another layer is an error naming it, with
    ``strict=False`` it is converted anyway (the parameters and running statistics carry over;
    the dispersion becomes L2). Layers with no torch counterpart (mean-only batch norms, Range BN,
    subclasses of the Lp layers, a :class:`~normmatters.convert.ForeignLpNorm` or
    :class:`~normmatters.nn.LpGatedRMSNorm` built by hand) are left with one
    :class:`~normmatters.convert.NormConversionWarning` each.
    """
    where = "to_torch_norms"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")

    def decide(m: nn.Module, name: str) -> tuple[str, Any, str] | None:
        reg = registered_norm(m)
        if reg is not None:
            if reg.to_torch is None:
                return "left", None, "its class is registered without a to_torch converter"
            return "convert", reg, ""
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
                return "convert", "original", ""
            if t in (ForeignLpNorm, LpGatedRMSNorm, ForeignLpGatedRMSNorm):
                return "left", None, ("no torch layer computes a layer / RMS norm of this form "
                                      "and it keeps no original class")
            return "convert", "torch", ""
        if isinstance(m, MEAN_ONLY):
            return "left", None, "a mean-only batch norm has no torch counterpart"
        if isinstance(m, (BatchNormBase, LpLayerNorm, LpGroupNorm, LpRMSNorm, LpGatedRMSNorm)):
            return "left", None, ("it is not exactly one of normmatters' Lp layers (a subclass or "
                                  "another kind); no torch layer is known to compute the same")
        return None

    plans, edges, _ = _plan(model, decide)
    new: dict[int, nn.Module] = {}
    for key, plan in _to_convert(plans, where):
        m = plan.module
        holder = move_hooks(m, nn.Module())  # the user's hooks do not run during the conversion
        if plan.spec == "original":
            out = restore_original(m)
        elif plan.spec == "torch":
            out = _torch_layer(m)
        else:
            out = plan.spec.to_torch(m)
        if out is not m:
            move_hooks(holder, out)
        else:
            move_hooks(holder, m)
        new[key] = out

    out_model = _install(model, plans, edges, new)
    update_transformer_fast_paths(out_model)
    if not new:
        raise ValueError(f"{where}: {type(model).__name__} has no normmatters norm layer to convert")
    return out_model


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
