r"""Fold batch norms into the preceding convolution and bake weight normalizations in.

In evaluation a batch norm of any p is a per-channel affine map of its input (docs/math.md):

.. math::
    y = \gamma\,(x - \mu)\,s + \beta,\qquad
    s = \begin{cases} 1/\sqrt{\sigma^2_{run} + \epsilon} & p = 2 \text{ (torch's formula)}\\
                      1/(\sqrt{\sigma^2_{run}} + \epsilon) & p \in \{1, \infty\}, \text{Top}(k)\\
                      1 & \text{mean-only batch norm}\end{cases}

with :math:`\mu` = ``running_mean`` and :math:`\sigma^2_{run}` = ``running_var`` (these are the
eval formulas of :func:`normmatters.functional.lp_batch_norm` and
:class:`~normmatters.nn.MeanOnlyBatchNorm2d`). A convolution or linear layer ``W x + b`` followed
by it is therefore one convolution with

.. math::
    W'_i = \gamma_i s_i W_i,\qquad b'_i = \gamma_i s_i (b_i - \mu_i) + \beta_i

per output channel i. Weight normalizations (WN, Lp WN, BWN: Hoffer et al. 2018, Sec. 5) are computed once and
stored as plain weights.

Pairs are found by tracing with :mod:`torch.fx` (norm and conv modules are leaves), never by module
order: a norm is folded only when its single input is the output of a ``Conv{1,2,3}d`` /
``Linear`` call that nothing else reads, both modules are called exactly once and registered
once, and the norm has running statistics. Everything else is left as it is and reported.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..convert.layers import ForeignLpNorm
from ..convert.recognise import MEAN_ONLY, NormSpec, recognise, warn_left
from ..nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, LpGroupNorm, LpLayerNorm, LpRMSNorm, SyncLpBatchNorm
from ..parametrizations import is_weight_normalized
from .freeze import FrozenNorm

__all__ = ["fold_norms", "FoldReport", "bake_weight_norms", "norm_eval_affine", "check_eval_mode", "flatten_outputs"]

logger = logging.getLogger(__name__)

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, LpBatchNorm1d, LpBatchNorm2d,
          LpBatchNorm3d, SyncLpBatchNorm) + MEAN_ONLY
_PER_SAMPLE = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
               LpLayerNorm, LpGroupNorm, LpRMSNorm, ForeignLpNorm)

# What each module of the model being folded computes: ("batch" | "sample" | "left", spec or reason).
# Filled once per fold_norms call (probing a module is not free) and emptied after it.
_CLASSES: dict[int, tuple[nn.Module, tuple[str, NormSpec | str | None] | None]] = {}


def _classify(m: nn.Module) -> tuple[str, NormSpec | str | None] | None:
    got = _CLASSES.get(id(m))
    if got is not None and got[0] is m:
        return got[1]
    return _classify_now(m)


def _classify_now(m: nn.Module) -> tuple[str, NormSpec | str | None] | None:
    t = type(m)
    if t is FrozenNorm:
        return ("batch" if m.kind in ("batch", "mean") else "sample", None)
    if t in _BATCH:
        return ("batch", None)
    if t in _PER_SAMPLE:
        return ("sample", None)
    if isinstance(m, MEAN_ONLY + (FrozenNorm,)):
        return ("left", "a subclass of a normmatters layer that is not known to compute the same")
    spec = recognise(m)
    if spec is None:
        return None
    if isinstance(spec, str):
        return ("left", spec)
    return ("batch" if spec.kind == "batch" else "sample", spec)


def _is_batch_norm(m: nn.Module) -> bool:
    c = _classify(m)
    return c is not None and c[0] == "batch"


def _is_norm(m: nn.Module) -> bool:
    return _classify(m) is not None


@dataclass
class FoldReport:
    """What :func:`fold_norms` did.

    :ivar folded: ``(conv_name, norm_name)`` pairs merged into one layer.
    :ivar baked: ``module.tensor`` names whose weight normalization was computed into a plain weight.
    :ivar skipped: ``(module_name, reason)`` for every norm (and parametrization) left in place.
    :ivar untraced: ``(module_name, reason)`` for modules whose own ``forward`` torch.fx could not
        trace; their children were searched instead, the code of their ``forward`` kept as it is.
    :ivar max_abs_diff: the largest |original − folded| on ``example_inputs`` (``None`` without).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    baked: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} norm(s), baked {len(self.baked)} weight norm(s)"]
        lines += [f"  folded  {n} into {c}" for c, n in self.folded]
        lines += [f"  baked   {b}" for b in self.baked]
        lines += [f"  skipped {n}: {r}" for n, r in self.skipped]
        lines += [f"  untraced {n}: {r}" for n, r in self.untraced]
        if self.max_abs_diff is not None:
            lines.append(f"  max |original - folded| on the example inputs: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


class _NormLeafTracer(fx.Tracer):
    """Keeps every norm layer (ours and torch's) a leaf: their forwards branch on shapes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_norm(m) or super().is_leaf_module(m, module_qualified_name)


def check_eval_mode(model: nn.Module, where: str) -> None:
    """Raise ``ValueError`` naming the modules of ``model`` that are in training mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(repr(n) for n in training[:5]) + (" ..." if len(training) > 5 else "")
        raise ValueError(
            f"{where}: the model must be in evaluation mode (call model.eval() first): "
            f"{len(training)} module(s) are in training mode: {shown}"
        )


def norm_eval_affine(norm: nn.Module, *, eps: float | None = None) -> tuple[Tensor, Tensor] | str:
    """The per-channel ``(scale, shift)`` with ``norm(x) = scale·x + shift`` in evaluation (float64).

    ``eps`` defaults to ``norm.eps``. Returns a reason (a string) when the norm is not such a map:
    no running statistics, or low-precision emulation. Formulas in the module docstring.
    """
    eps = getattr(norm, "eps", None) if eps is None else eps
    rm = getattr(norm, "running_mean", None)
    if rm is None:
        return "has no running statistics (track_running_stats=False): evaluation uses batch statistics"
    if getattr(norm, "compute_dtype", None) is not None:
        return (f"emulates low-precision arithmetic (compute_dtype={norm.compute_dtype}); folding would "
                f"compute it in {rm.dtype}")
    mu = rm.detach().double()
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    gamma = torch.ones_like(mu) if w is None else w.detach().double()
    beta = torch.zeros_like(mu) if b is None else b.detach().double()
    if isinstance(norm, MEAN_ONLY) or getattr(norm, "kind", None) == "mean":
        s = torch.ones_like(mu)
    else:
        rv = getattr(norm, "running_var", None)
        if rv is None:
            return "has no running_var: evaluation uses batch statistics"
        rv = rv.detach().double()
        if float(getattr(norm, "p", 2.0)) == 2.0:
            s = torch.rsqrt(rv + eps)
        else:
            s = 1.0 / (rv.sqrt() + eps)
    scale = gamma * s
    return scale, beta - mu * scale


def _fuse(conv: nn.Module, scale: Tensor, shift: Tensor) -> nn.Module:
    new = copy.deepcopy(conv)
    w = conv.weight.detach()
    view = [-1] + [1] * (w.dim() - 1)
    sc = scale.to(w.device)
    w64 = w.double() * sc.reshape(view)
    b64 = torch.zeros_like(sc) if conv.bias is None else conv.bias.detach().double()
    b64 = b64 * sc + shift.to(w.device)
    with torch.no_grad():
        new.weight = nn.Parameter(w64.to(w.dtype), requires_grad=conv.weight.requires_grad)
        new.bias = nn.Parameter(b64.to(w.dtype), requires_grad=conv.weight.requires_grad)
    return new


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a class of its own before its parametrizations are removed: a deep copy
    shares torch's generated ``Parametrized<Cls>`` class with the original, and removing the
    parametrization deletes the weight property from that class, which would break the original."""
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def _bakeable(m: nn.Module, tname: str) -> bool:
    """One of normmatters' weight norms, or torch's ``parametrizations.weight_norm`` (stacked alone)."""
    plist = m.parametrizations[tname]  # type: ignore[index, union-attr]
    if len(plist) == 1 and is_weight_normalized(m, tname):
        return True
    return all(isinstance(p, torch.nn.utils.parametrizations._WeightNorm) for p in plist)


def bake_weight_norms(model: nn.Module, report: FoldReport | None = None) -> int:
    """Compute every weight normalization of ``model`` into a plain weight, in place.

    Handles normmatters' ``weight_norm`` / ``lp_weight_norm`` / ``bounded_weight_norm`` (both
    gains), torch's ``parametrizations.weight_norm`` and torch's deprecated hook-based
    ``torch.nn.utils.weight_norm``. Other parametrizations are left and, with a ``report``,
    recorded as skipped. Returns the number of tensors baked.
    """
    count = 0
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if parametrize.is_parametrized(m):
            for tname in list(m.parametrizations.keys()):  # type: ignore[union-attr]
                plist = m.parametrizations[tname]  # type: ignore[index]
                if _bakeable(m, tname):
                    _own_class(m)
                    parametrize.remove_parametrizations(m, tname, leave_parametrized=True)
                    count += 1
                    if report is not None:
                        report.baked.append(prefix + tname)
                elif report is not None:
                    kinds = ", ".join(type(p).__name__ for p in plist)
                    report.skipped.append((prefix + tname, f"parametrization ({kinds}) is not a weight norm; left as it is"))
        for key, hook in list(m._forward_pre_hooks.items()):
            if type(hook).__module__ == "torch.nn.utils.weight_norm" and type(hook).__name__ == "WeightNorm":
                torch.nn.utils.remove_weight_norm(m, hook.name)
                count += 1
                if report is not None:
                    report.baked.append(prefix + hook.name)
    return count


def _module_calls(model: nn.Module, args: tuple[Any, ...]) -> Counter:
    """How many times each module is called in one forward pass (catches reuse fx cannot see)."""
    counts: Counter = Counter()
    handles = [m.register_forward_hook(lambda mod, i, o: counts.update([id(mod)]))
               for m in model.modules() if isinstance(m, _FOLD_INTO) or _is_norm(m)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return counts


class _LiveModules:
    """``gm``'s submodules by qualified name, always current (fusions replace them)."""

    def __init__(self, gm: nn.Module) -> None:
        self.gm = gm

    def __getitem__(self, target: str) -> nn.Module:
        return self.gm.get_submodule(target)


def _describe(node: Any, modules: _LiveModules) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant {type(node).__name__}"
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return f"the input {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target}"


def _fold_graph(gm: fx.GraphModule, prefix: str, report: FoldReport, registered: Counter,
                calls: Counter | None) -> None:
    # Looked up afresh at each use: a conv already fused with one norm may meet a second one.
    modules = _LiveModules(gm)
    node_calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        norm = modules[node.target]
        name = prefix + node.target
        cls = _classify(norm)
        if cls is None:
            continue
        if cls[0] == "left":
            if all(n != name for n, _ in report.skipped):
                report.skipped.append((name, cls[1]))
                warn_left("fold_norms", name, norm, cls[1])
            continue
        if not _is_batch_norm(norm):
            if all(n != name for n, _ in report.skipped):
                report.skipped.append((name, f"{type(norm).__name__} normalizes with per-sample "
                                             "statistics; it is not an affine map to fold"))
            continue

        def skip(reason: str) -> None:
            if any(n == name for n, _ in report.skipped):
                return  # a norm called at several places is reported once
            report.skipped.append((name, reason))
            logger.warning("fold_norms: %s not folded: %s", name, reason)

        if node_calls[node.target] > 1 or registered[id(norm)] > 1 or (calls and calls[id(norm)] > 1):
            skip("the norm is used at more than one place")
            continue
        if len(node.args) != 1 or node.kwargs:
            skip("called with more than one argument")
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and type(modules[src.target]) in _FOLD_INTO):
            skip(f"fed by {_describe(src, modules)}, not by a Conv1d/2d/3d or Linear")
            continue
        conv = modules[src.target]
        conv_name = prefix + src.target
        if node_calls[src.target] > 1 or registered[id(conv)] > 1 or (calls and calls[id(conv)] > 1):
            skip(f"its input layer {conv_name!r} is used at more than one place")
            continue
        if len(src.users) != 1:
            others = [u.name for u in src.users if u is not node]
            skip(f"the output of {conv_name!r} is also read by {others}")
            continue
        if parametrize.is_parametrized(conv):
            skip(f"{conv_name!r} keeps a parametrization that is not a weight norm")
            continue
        out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
        channels = getattr(norm, "num_features", None) or norm.running_mean.numel()
        if out != channels:
            skip(f"{conv_name!r} has {out} outputs but the norm has {channels} channels")
            continue
        spec = cls[1]
        affine = norm_eval_affine(norm, eps=spec.eps if isinstance(spec, NormSpec) else None)
        if isinstance(affine, str):
            skip(affine)
            continue
        scale, shift = affine
        parent, _, leaf = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, _fuse(conv, scale, shift))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        report.folded.append((conv_name, name))
        changed = True
    if changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()


def _worth_searching(m: nn.Module) -> bool:
    """A module that is neither a norm nor a conv/linear and holds a batch norm somewhere inside."""
    return (not _is_norm(m) and type(m) not in _FOLD_INTO
            and any(_is_batch_norm(x) for x in m.modules() if x is not m))


def _set_path(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _fold_tree(module: nn.Module, prefix: str, report: FoldReport, registered: Counter,
               calls: Counter | None, tracer_cls: type[fx.Tracer]) -> nn.Module:
    tracer = tracer_cls()
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # noqa: BLE001 - any trace failure means: search the children
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        report.untraced.append((prefix.rstrip(".") or "<root>", reason))
        for cname, child in list(module.named_children()):
            if _is_batch_norm(child):
                report.skipped.append((prefix + cname, "called from code torch.fx could not trace"))
            elif _worth_searching(child):
                new = _fold_tree(child, f"{prefix}{cname}.", report, registered, calls, tracer_cls)
                if new is not child:
                    setattr(module, cname, new)
        return module
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    before = len(report.folded)
    _fold_graph(gm, prefix, report, registered, calls)
    folded_here = len(report.folded) > before
    # Leaves the tracer kept opaque (a user's tracer_class, or a torch.nn module with children)
    # are searched on their own: folding inside a block does not change what the block computes.
    seen: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        sub = gm.get_submodule(node.target)
        if _worth_searching(sub):
            new = _fold_tree(sub, f"{prefix}{node.target}.", report, registered, calls, tracer_cls)
            if new is not sub:
                _set_path(gm, node.target, new)
                _set_path(module, node.target, new)
    return gm if folded_here else module


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output, in a fixed order: tuples and lists in order, mappings
    (``dict``, transformers' ``ModelOutput``) and dataclasses by field; other values are dropped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in flatten_outputs(getattr(out, f.name))]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def _max_diff(a: Any, b: Any) -> float:
    xs, ys = flatten_outputs(a), flatten_outputs(b)
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(xs, ys) if x.numel()), default=0.0)


def _max_abs(a: Any) -> float:
    return max((float(x.double().abs().max()) for x in flatten_outputs(a) if x.numel()), default=0.0)


def fold_norms(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    tol: float = 1e-4,
    return_report: bool = False,
    tracer_class: type[fx.Tracer] | None = None,
) -> nn.Module | tuple[nn.Module, FoldReport]:
    r"""An inference copy of ``model`` with batch norms folded into the layers that feed them.

    Every ``Conv{1,2,3}d`` or ``Linear`` followed by a batch norm in evaluation mode — torch's
    ``BatchNorm{1,2,3}d``, :class:`~normmatters.nn.LpBatchNorm2d` of any p and k, or a mean-only
    batch norm — becomes one layer with :math:`W' = \gamma s W`, :math:`b' = \gamma s (b-\mu) + \beta`
    (module docstring), and every weight normalization (WN, Lp WN, BWN, torch's ``weight_norm``) is
    baked into a plain weight. ``model`` itself is not modified.

    Pairs are found with :mod:`torch.fx`. A norm that is reused, fed by anything but a conv /
    linear whose output nothing else reads, without running statistics, or emulating low
    precision is left as it is and listed in the report (and logged). Where the model's own
    ``forward`` cannot be traced (e.g. it branches on shapes), its submodules are traced instead.

    A folded ``Linear → BatchNorm1d`` assumes the linear layer's output is ``(N, C)``: for a
    ``(N, L, C)`` output the batch norm's channel axis is L. Pass ``example_inputs`` to check.

    Args:
        model: a module in evaluation mode (every submodule: ``model.eval()``).
        example_inputs: optional input (a tensor or a tuple of positional arguments). With it,
            modules called more than once in a forward pass are not folded, and the folded model's
            output is compared with the original's: a difference above
            ``tol · max(1, max|output|)`` is an error.
        tol: relative tolerance of that check.
        return_report: also return a :class:`FoldReport`.
        tracer_class: a :class:`torch.fx.Tracer` subclass to use (its leaves are respected; norm
            layers are always leaves).

    Returns:
        The folded model (a :class:`torch.fx.GraphModule` where anything was folded at the root),
        and the report if ``return_report``.

    Raises:
        ValueError: a submodule in training mode (named), nothing to fold or bake, or a folded
            model that disagrees with the original on ``example_inputs``.

    Example::

        >>> model.eval()
        >>> folded = fold_norms(model)
        >>> torch.allclose(folded(x), model(x), atol=1e-5)
        True
    """
    where = "fold_norms"
    check_eval_mode(model, where)
    if tol <= 0:
        raise ValueError(f"{where}: tol must be positive, got {tol}")
    report = FoldReport()
    work = copy.deepcopy(model)
    _CLASSES.clear()
    for m in work.modules():
        _CLASSES[id(m)] = (m, _classify_now(m))
    try:
        return _fold(model, work, report, example_inputs, tol, return_report, tracer_class, where)
    finally:
        _CLASSES.clear()


def _fold(model, work, report, example_inputs, tol, return_report, tracer_class, where):
    bake_weight_norms(work, report)
    registered: Counter = Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    args = _as_args(example_inputs) if example_inputs is not None else None
    calls = _module_calls(work, args) if args is not None else None
    if tracer_class is None:
        tracer_cls: type[fx.Tracer] = _NormLeafTracer
    else:
        if not (isinstance(tracer_class, type) and issubclass(tracer_class, fx.Tracer)):
            raise TypeError(f"{where}: tracer_class must be a torch.fx.Tracer subclass, got {tracer_class!r}")

        class tracer_cls(tracer_class):  # type: ignore[no-redef, valid-type, misc]
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return _is_norm(m) or super().is_leaf_module(m, qualname)

    folded = _fold_tree(work, "", report, registered, calls, tracer_cls)
    if not report.folded and not report.baked:
        details = "; ".join(f"{n}: {r}" for n, r in report.skipped) or "it has no batch norm and no weight norm"
        raise ValueError(f"{where}: nothing to fold in {type(model).__name__} ({details})")
    folded.eval()
    if args is not None:
        with torch.no_grad():
            ref = model(*args)
            out = folded(*args)
        diff = _max_diff(ref, out)
        report.max_abs_diff = diff
        bound = tol * max(1.0, _max_abs(ref))
        if not diff <= bound:
            raise ValueError(
                f"{where}: the folded model differs from the original by {diff:.3g} (> {bound:.3g}) on "
                f"the example inputs; folded pairs: {report.folded}"
            )
    for name, reason in report.untraced:
        logger.info("fold_norms: torch.fx could not trace %s (%s); searched its children", name, reason)
    return (folded, report) if return_report else folded

