r"""Recognise normalization layers by what they compute, not by their class names.

Every converter of normmatters follows one rule: a module is either replaced by one that computes
the same function at p=2 (and its Lp version at another p), or left as it is with one
:class:`NormConversionWarning` naming it (its qualified name and class) and saying why.

A module is described by a :class:`NormSpec`: its kind (batch, layer, RMS or group norm), the axes
it normalizes (the last ones, or the channel axis 1 of a channels-first layer norm), its ``eps``,
the names of its scale and shift parameters and whether the scale is stored as an offset from 1
(Gemma's RMS norm computes :math:`x/\mathrm{rms}(x)\cdot(1 + w)`).

* torch's own classes (``nn.BatchNorm{1,2,3}d``, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``)
  and normmatters' Lp layers are known by their exact class;
* convolutions (weight-standardized ones too), linear layers, embeddings, recurrent layers and
  attention are never norms and are passed over before any probe (:func:`is_norm_like`);
* every other *norm-like* module — a subclass of a norm class, or a module without children that
  hold state, with per-channel tensors (or none, and a ``normalized_shape``: a norm without
  parameters) and an ``eps``-like attribute (``eps``, ``variance_epsilon``, ``epsilon``) or ``Norm``
  in its class name — is probed: its ``forward``'s signature says how it is called (one tensor, or
  a tensor and a gate: ``norm(x, gate)``; anything more cannot be replaced), then a float64 copy
  with seeded random parameters and no hooks runs its ``forward`` (never ``__call__``: user hooks do
  not run) on seeded random inputs (at scale 1, and at scale √eps where the placement of eps
  matters), in training and in evaluation mode, and its outputs (and, for batch norms, its updated
  running statistics) are compared with those of each formula it could compute. It is recognised
  only on agreement within ``1e-4 · max(1, max|y|)``; otherwise the reason quotes the closest
  formula. An eps kept in code rather than an attribute (OLMo's layer norm) is found among common
  values by the same probe. The outcome is remembered for modules alike in class, attributes and
  tensor shapes (the probe sets the values), so a deep model pays for one probe per kind of norm;
* classes registered with :func:`register_norm` are converted by the functions given there.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import (
    BatchNormBase,
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpBatchNormBase,
    LpGatedRMSNorm,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    SyncLpBatchNorm,
)
from .layers import ForeignLpGatedRMSNorm, ForeignLpNorm

__all__ = [
    "NormConversionWarning",
    "NormSpec",
    "recognise",
    "register_norm",
    "unregister_norm",
    "registered_norm",
    "is_norm_like",
    "call_form",
    "warn_left",
]


class NormConversionWarning(UserWarning):
    """A converter left a normalization layer as it is (the message names it and says why)."""


def warn_left(where: str, name: str, module: nn.Module, why: str) -> None:
    """Emit the one warning for a module a converter leaves as it is."""
    warnings.warn(f"{where}: left {name or '<root>'!r} ({type(module).__name__}) as it is: {why}",
                  NormConversionWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Registered:
    to_lp: Callable[..., nn.Module] | None
    to_torch: Callable[[nn.Module], nn.Module] | None


_REGISTRY: dict[type, _Registered] = {}


def register_norm(cls: type, to_lp: Callable[..., nn.Module] | None = None,
                  to_torch: Callable[[nn.Module], nn.Module] | None = None) -> type:
    """Tell the converters how to convert modules of class ``cls`` (exactly that class).

    Args:
        cls: a module class. Registration takes precedence over recognition by probing.
        to_lp: ``to_lp(module, p=..., k=..., constant=...) -> nn.Module`` used by
            :func:`~normmatters.convert_norms`; it must return a module that computes the same
            function as ``module`` at p=2. ``None``: :func:`convert_norms` leaves such modules
            (with a warning).
        to_torch: ``to_torch(module) -> nn.Module`` used by :func:`~normmatters.to_torch_norms`
            for a registered class of Lp layers. ``None``: left (with a warning).

    Returns:
        ``cls`` (so it can be used as a decorator: ``@register_norm``... with ``functools.partial``).

    Example::

        >>> register_norm(MyScaleNorm, to_lp=lambda m, p, k, constant: MyLpScaleNorm.from_module(m, p))
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_norm: expected an nn.Module subclass, got {cls!r}")
    for f, what in ((to_lp, "to_lp"), (to_torch, "to_torch")):
        if f is not None and not callable(f):
            raise TypeError(f"register_norm: {what} must be callable or None, got {f!r}")
    _REGISTRY[cls] = _Registered(to_lp, to_torch)
    return cls


def unregister_norm(cls: type) -> None:
    """Remove ``cls`` from the registry (no error if it is not registered)."""
    _REGISTRY.pop(cls, None)


def registered_norm(module: nn.Module) -> _Registered | None:
    """The registration of ``type(module)``, or ``None``."""
    return _REGISTRY.get(type(module))


# ------------------------------------------------------------------------------------------
# what a norm computes
# ------------------------------------------------------------------------------------------

_TORCH_BN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_LP_BN = {LpBatchNorm1d: 1, LpBatchNorm2d: 2, LpBatchNorm3d: 3}
_LP_BN_BY_DIM = {1: LpBatchNorm1d, 2: LpBatchNorm2d, 3: LpBatchNorm3d}
MEAN_ONLY = (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d)
_BN_OPTIONS = ("ghost_batch_size", "compute_dtype", "accumulate_dtype", "precision_kwargs")
_LN_OPTIONS = ("compute_dtype", "accumulate_dtype", "precision_kwargs")


@dataclass
class NormSpec:
    """What a normalization layer computes, enough to build its exact or Lp counterpart.

    :ivar kind: ``"batch"``, ``"layer"``, ``"rms"`` or ``"group"``.
    :ivar shape: ``normalized_shape`` (layer / RMS norm) or ``(num_features,)`` (batch / group).
    :ivar eps: the ε of the formula.
    :ivar p, k, constant: the Lp kind it computes (2 for every layer that is not ours).
    :ivar axis: ``"last"`` or ``"channels_first"`` (layer / RMS norm over axis 1).
    :ivar offset: the scale is ``offset + weight`` (1 for Gemma's RMS norm).
    :ivar weight, bias: the names of its scale and shift parameters (``None``: absent).
    :ivar dims: batch norm: 1, 2 or 3 (``LpBatchNorm{dims}d``).
    :ivar gate: gated RMS norm (``norm(x, gate)``): ``"before"`` (``norm(x·a(gate))``) or
        ``"after"`` (``norm(x)·a(gate)``) the norm; ``None``: not gated.
    :ivar activation: the gate's activation, ``"silu"`` or ``"sigmoid"``.
    :ivar group_size: gated RMS norm: σ̂ per group of this many channels (``None``: one group).
    :ivar gate_name: the name of the gate argument of its ``forward``.
    :ivar exact: the module is one of the classes the converters know (no probe was needed).
    """

    kind: str
    shape: tuple[int, ...]
    eps: float | None
    p: float = 2.0
    k: int | None = None
    constant: str = "calibrated"
    axis: str = "last"
    offset: float = 0.0
    weight: str | None = "weight"
    bias: str | None = "bias"
    dims: int = 2
    momentum: float | None = 0.1
    track_running_stats: bool = True
    num_groups: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    gate: str | None = None
    activation: str = "silu"
    group_size: int | None = None
    gate_name: str = "gate"
    exact: bool = False

    @property
    def standard(self) -> bool:
        """Computable by normmatters' own layer class with the same state-dict keys."""
        if self.kind in ("batch", "group"):
            return self.weight in ("weight", None) and self.bias in ("bias", None)
        names = self.weight in ("weight", None) and self.bias in ("bias", None)
        if self.kind == "rms" and self.bias is not None:
            return False
        return names and self.axis == "last" and self.offset == 0.0

    @property
    def size(self) -> int | None:
        """How many values each statistic is taken over, where the layer fixes it (layer, RMS and
        gated RMS norms); ``None`` where it depends on the input (batch and group norms)."""
        if self.kind in ("batch", "group"):
            return None
        if self.gate is not None and self.group_size is not None:
            return self.group_size
        return math.prod(self.shape)

    def describe(self) -> str:
        what = {"batch": f"batch norm ({self.dims}d)", "layer": "layer norm", "rms": "RMS norm",
                "group": f"group norm ({self.num_groups} groups)"}[self.kind]
        if self.axis == "channels_first":
            what += " over the channel axis"
        if self.offset:
            what += f" with scale ({self.offset:g} + weight)"
        if self.gate is not None:
            what = (f"gated RMS norm ({self.activation} gate {self.gate} the norm"
                    + (f", groups of {self.group_size}" if self.group_size else "") + ")")
        if self.weight is None and self.bias is None:
            what += " without parameters"
        return what


def _float(t: Tensor | None) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _factory(module: nn.Module) -> dict[str, Any]:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    ref = next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else None)
    if ref is None:
        return {}
    return {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None}


def exact_spec(module: nn.Module) -> NormSpec | None:
    """The spec of a module of a class the converters know exactly, else ``None``."""
    t = type(module)
    if t in _TORCH_BN or t in _LP_BN or t is SyncLpBatchNorm or t is nn.SyncBatchNorm:
        dims = _TORCH_BN.get(t) or _LP_BN.get(t) or 2
        spec = NormSpec("batch", (module.num_features,), module.eps, dims=dims, momentum=module.momentum,
                        track_running_stats=module.track_running_stats,
                        weight="weight" if module.weight is not None else None,
                        bias="bias" if module.bias is not None else None, exact=True)
        if isinstance(module, LpBatchNormBase):
            spec.p, spec.k, spec.constant = float(module.p), module.k, module.constant
            spec.options = {o: getattr(module, o) for o in _BN_OPTIONS if getattr(module, o, None)}
        return spec
    if t in (nn.LayerNorm, LpLayerNorm):
        spec = NormSpec("layer", tuple(module.normalized_shape), module.eps,
                        weight="weight" if module.weight is not None else None,
                        bias="bias" if module.bias is not None else None, exact=True)
        if t is LpLayerNorm:
            spec.p, spec.k, spec.constant = float(module.p), module.k, module.constant
            spec.options = {o: getattr(module, o) for o in _LN_OPTIONS if getattr(module, o, None)}
        return spec
    if t in (nn.GroupNorm, LpGroupNorm):
        spec = NormSpec("group", (module.num_channels,), module.eps, num_groups=module.num_groups,
                        weight="weight" if module.weight is not None else None,
                        bias="bias" if module.bias is not None else None, exact=True)
        if t is LpGroupNorm:
            spec.p, spec.k, spec.constant = float(module.p), module.k, module.constant
        return spec
    if t in (nn.RMSNorm, LpRMSNorm):
        spec = NormSpec("rms", tuple(module.normalized_shape), module.eps,
                        weight="weight" if module.weight is not None else None, bias=None, exact=True)
        if t is LpRMSNorm:
            spec.p, spec.k, spec.constant = float(module.p), module.k, module.constant
        return spec
    if t in (LpGatedRMSNorm, ForeignLpGatedRMSNorm):
        return NormSpec("rms", tuple(module.normalized_shape), module.eps, p=float(module.p), k=module.k,
                        constant=module.constant, weight="weight" if module.weight is not None else None,
                        bias=None, gate="after" if module.norm_before_gate else "before",
                        activation=module.activation, group_size=module.group_size,
                        gate_name=getattr(module, "gate_name", "gate"), exact=True)
    if t is ForeignLpNorm:
        return NormSpec(module.kind, tuple(module.normalized_shape), module.eps, p=float(module.p),
                        k=module.k, constant=module.constant, axis=module.axis, offset=module.offset,
                        weight=module.weight_name, bias=module.bias_name, exact=True)
    return None


def build(spec: NormSpec, *, p: float | None = None, k: int | None = None, constant: str | None = None,
          options: dict[str, Any] | None = None, process_group: Any = None, sync: bool = False,
          device: Any = None, dtype: Any = None) -> nn.Module:
    """A new layer computing ``spec`` at the Lp kind ``p`` / ``k`` / ``constant`` (default: the spec's)."""
    if p is None:
        p, k, constant = spec.p, spec.k, spec.constant
    constant = spec.constant if constant is None else constant
    lp = {"p": p, "k": k, "constant": constant}
    fk = {"device": device, "dtype": dtype}
    affine = spec.weight is not None
    if spec.kind == "batch":
        opts = dict(spec.options if options is None else options)
        if sync:
            return SyncLpBatchNorm(spec.shape[0], spec.eps, spec.momentum, affine, spec.track_running_stats,
                                   process_group, bias=spec.bias is not None or not affine, **fk, **lp)
        cls = _LP_BN_BY_DIM[spec.dims]
        return cls(spec.shape[0], spec.eps, spec.momentum, affine, spec.track_running_stats,
                   bias=spec.bias is not None or not affine, **fk, **lp, **opts)
    if spec.gate is not None:
        gated = {"group_size": spec.group_size, "norm_before_gate": spec.gate == "after", "activation": spec.activation}
        if spec.gate_name != "gate":
            return ForeignLpGatedRMSNorm(spec.shape[0], spec.eps, affine, gate_name=spec.gate_name, **gated, **fk, **lp)
        return LpGatedRMSNorm(spec.shape[0], spec.eps, affine, **gated, **fk, **lp)
    if spec.kind == "group":
        return LpGroupNorm(spec.num_groups, spec.shape[0], spec.eps, affine,
                           bias=spec.bias is not None or not affine, **fk, **lp)
    if not spec.standard:
        return ForeignLpNorm(spec.kind, spec.shape, spec.eps, axis=spec.axis, offset=spec.offset,
                             weight_name=spec.weight, bias_name=spec.bias, **fk, **lp)
    if spec.kind == "layer":
        opts = dict(spec.options if options is None else options)
        return LpLayerNorm(spec.shape, spec.eps, affine, bias=spec.bias is not None or not affine,
                           **fk, **lp, **{o: v for o, v in opts.items() if o in _LN_OPTIONS})
    return LpRMSNorm(spec.shape, spec.eps, affine, **fk, **lp)


def state_of(module: nn.Module, spec: NormSpec) -> dict[str, Tensor]:
    """The module's own tensors under the names of the layer :func:`build` makes from ``spec``."""
    out: dict[str, Tensor] = {}
    std = spec.standard or spec.kind in ("batch", "group")
    for role, name in (("weight", spec.weight), ("bias", spec.bias)):
        if name is not None:
            out[role if std else name] = getattr(module, name)
    if spec.kind == "batch":
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(module, name, None)
            if isinstance(t, Tensor):
                out[name] = t
    return out


def copy_into(src: nn.Module, spec: NormSpec, dst: nn.Module) -> nn.Module:
    """Give ``dst`` ``src``'s parameters and buffers and its training flag.

    The tensors themselves move where ``dst`` has one of the same shape, dtype and kind
    (a parameter tied between modules stays tied, and an optimizer built before the conversion
    still holds the parameters that train); otherwise their values are copied, with
    ``requires_grad``.
    """
    state = state_of(src, spec)
    with torch.no_grad():
        for name, value in state.items():
            target = getattr(dst, name, None)
            if not isinstance(target, Tensor):
                continue
            same = target.shape == value.shape and target.dtype == value.dtype and target.device == value.device
            if isinstance(target, nn.Parameter) and isinstance(value, nn.Parameter) and same \
                    and name in dst._parameters:
                dst._parameters[name] = value
            elif not isinstance(target, nn.Parameter) and not isinstance(value, nn.Parameter) and same \
                    and name in dst._buffers:
                dst._buffers[name] = value
            else:
                target.copy_(value)
                if isinstance(target, nn.Parameter):
                    target.requires_grad_(value.requires_grad)
    dst.train(src.training)
    return dst


# norm-like modules and their probe
# ------------------------------------------------------------------------------------------

_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
                nn.CrossMapLRN2d)
_OUR_NORMS = (BatchNormBase, LpLayerNorm, LpGroupNorm, LpRMSNorm, LpGatedRMSNorm, ForeignLpNorm)
# Never norms, whatever they hold (a weight-standardized convolution has an eps): skipped before any probe.
_NOT_NORMS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag,
              nn.modules.rnn.RNNBase, nn.modules.rnn.RNNCellBase, nn.MultiheadAttention)
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")
# The eps of a norm that keeps it in its code, not in an attribute (OLMo's layer norm: 1e-5):
# each is tried, and only agreement on the probe (at the scale √eps, where it matters) decides.
_EPS_GUESSES = (1e-5, 1e-6, 1e-12, 1e-8)
_WEIGHT_NAMES = ("weight", "scale", "gamma")
_BIAS_NAMES = ("bias", "beta")
_ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "sigmoid": "sigmoid"}


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _shape_attr(module: nn.Module) -> tuple[int, ...] | None:
    s = module.__dict__.get("normalized_shape")
    if isinstance(s, int) and not isinstance(s, bool):
        return (s,)
    if isinstance(s, (tuple, list, torch.Size)) and s and all(isinstance(v, int) for v in s):
        return tuple(int(v) for v in s)
    return None


def is_norm_like(module: nn.Module) -> bool:
    """Whether ``module`` could be a norm and is worth a probe.

    A subclass of a norm class of torch or normmatters; never a convolution, linear layer,
    embedding, recurrent layer or attention (weight-standardized convolutions included); otherwise a
    module whose children hold no state and that has an ``eps``-like attribute or ``Norm`` in its
    class name, and either its own floating tensors, none of them a matrix unless shaped as its
    ``normalized_shape``, or no tensors and a ``normalized_shape`` (a norm without parameters, such
    as OLMo's layer norm) or both an eps and ``Norm`` in its name (then it is named in a warning
    when its normalized axes cannot be told).
    """
    if isinstance(module, _TORCH_NORMS + _OUR_NORMS + MEAN_ONLY):
        return True
    if isinstance(module, _NOT_NORMS):
        return False
    if any(_has_state(c) for c in module.children()):
        return False
    own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
    has_eps = any(isinstance(module.__dict__.get(n), (int, float)) and not isinstance(module.__dict__.get(n), bool)
                  for n in _EPS_NAMES)
    named = "norm" in type(module).__name__.lower()
    shape = _shape_attr(module)
    if not own:
        return (shape is not None and (has_eps or named)) or (has_eps and named)
    if not any(t.is_floating_point() for t in own):
        return False
    if any(t.dim() >= 2 and tuple(t.shape) != shape for t in own):
        return False
    return has_eps or named


def _eps_of(module: nn.Module) -> tuple[bool, float | None]:
    for n in _EPS_NAMES:
        if hasattr(module, n):
            v = getattr(module, n)
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                return True, None if v is None else float(v)
    return False, None


_P = inspect.Parameter
_FORMS: dict[type, tuple[str | None, bool] | str] = {}


def call_form(module: nn.Module) -> tuple[str | None, bool] | str:
    """How ``module`` is called, read from its ``forward``'s signature (never by calling it).

    Returns ``(None, False)`` for one tensor argument, ``(name, default_none)`` for a tensor and a
    second argument ``name`` (a gate candidate; ``default_none``: it may be left out), or a string
    saying which call a replacement could not take.
    """
    cls = type(module)
    if cls in _FORMS:
        return _FORMS[cls]
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a builtin or an odd wrapper: assume the usual one input
        params = [_P("input", _P.POSITIONAL_OR_KEYWORD)]
    positional = [q for q in params if q.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    rest = [q for q in params if q not in positional]
    form: tuple[str | None, bool] | str
    names = "(" + ", ".join(str(q) for q in params) + ")"
    if rest:
        form = f"its forward{names} takes more than the tensor (and gate) a replacement can take"
    elif len(positional) == 1:
        form = (None, False)
    elif len(positional) == 2:
        form = (positional[1].name, positional[1].default is None)
    else:
        form = f"its forward{names} takes more than the tensor (and gate) a replacement can take"
    _FORMS[cls] = form
    return form


def _gate_options(module: nn.Module, size: int) -> tuple[list[str], list[str], list[int | None]] | str:
    """Placements, activations and group sizes a gated norm could have, narrowed by its attributes."""
    d = module.__dict__
    places = ["before", "after"]
    if isinstance(d.get("norm_before_gate"), bool):
        places = ["after" if d["norm_before_gate"] else "before"]
    acts = ["silu", "sigmoid"]
    if isinstance(d.get("activation"), str):
        act = _ACTIVATION_NAMES.get(d["activation"].lower())
        if act is None:
            return f"its gate activation {d['activation']!r} is neither SiLU nor the sigmoid"
        acts = [act]
    groups: list[int | None] = [None]
    gs = d.get("group_size")
    ng = next((d[n] for n in ("n_groups", "ngroups", "num_groups") if isinstance(d.get(n), int)), None)
    if isinstance(gs, int) and not isinstance(gs, bool) and 0 < gs < size and size % gs == 0:
        groups = [gs]
    elif isinstance(ng, int) and 1 < ng <= size and size % ng == 0:
        groups = [size // ng]
    return places, acts, groups


def _candidates(module: nn.Module, gated: bool) -> list[NormSpec] | str:
    """The specs ``module`` might compute, most likely first, or why it cannot be any."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "normmatters has no Lp instance norm"
    if isinstance(module, (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
        return "normmatters has no Lp local response norm"
    form = call_form(module)
    if isinstance(form, str):
        return form
    gate_name, _ = form
    if gate_name is not None and not gated:
        return f"it takes a second argument {gate_name!r} (a gated norm, norm(x, {gate_name})); only " \
               "convert_norms builds gated norms"
    frozen = [n for n in _WEIGHT_NAMES + _BIAS_NAMES if module._buffers.get(n) is not None]
    if frozen:
        return f"its {'/'.join(frozen)} are buffers, not parameters (a frozen norm: unfreeze it first)"
    params = {n: t for n, t in module._parameters.items() if t is not None}
    weight = next((n for n in _WEIGHT_NAMES if n in params), None)
    bias = next((n for n in _BIAS_NAMES if n in params), None)
    other = sorted(set(params) - {weight, bias})
    if other:
        return f"it has parameters {other} that no norm formula uses"
    found, eps = _eps_of(module)
    w = params.get(weight)
    rm = getattr(module, "running_mean", None)
    lp = {}
    if isinstance(module, (LpBatchNormBase, LpLayerNorm, LpGroupNorm, LpRMSNorm)):
        lp = {"p": float(module.p), "k": module.k, "constant": module.constant}
    batch_like = isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNormBase)) or isinstance(rm, Tensor) \
        or hasattr(module, "track_running_stats")
    if gate_name is None and batch_like:
        if not found:
            return "it has no eps attribute (eps, variance_epsilon, epsilon) to build a batch norm from"
        if eps is None:
            return "a batch norm with eps=None"
        c = getattr(module, "num_features", None) or (w.numel() if w is not None else None) or \
            (rm.numel() if isinstance(rm, Tensor) else None)
        if c is None:
            return "cannot tell its number of channels"
        if weight not in ("weight", None) or bias not in ("bias", None):
            return f"a batch norm whose parameters are named {weight!r} / {bias!r}, not weight / bias"
        dims = next((d for cls, d in {**_TORCH_BN, **_LP_BN}.items() if isinstance(module, cls)), None)
        options = {o: getattr(module, o) for o in _BN_OPTIONS if getattr(module, o, None)} \
            if isinstance(module, LpBatchNormBase) else {}
        base = NormSpec("batch", (int(c),), eps, weight=weight, bias=bias,
                        momentum=getattr(module, "momentum", 0.1),
                        track_running_stats=isinstance(rm, Tensor), options=options, **lp)
        return [replace(base, dims=d) for d in ((dims,) if dims else (2, 1, 3))]
    if gate_name is None and (isinstance(module, (nn.GroupNorm, LpGroupNorm)) or hasattr(module, "num_groups")):
        c = getattr(module, "num_channels", None) or (w.numel() if w is not None else None)
        g = getattr(module, "num_groups", None)
        if not isinstance(c, int) or not isinstance(g, int) or not found or eps is None:
            return "a group norm whose num_groups / num_channels / eps cannot be read"
        return [NormSpec("group", (c,), eps, num_groups=g, weight=weight, bias=bias, **lp)]
    shape = _shape_attr(module)
    if shape is None and w is not None:
        shape = tuple(w.shape)
    if shape is None:
        return "it has no weight and no normalized_shape to tell which axes it normalizes"
    if w is not None and tuple(w.shape) != shape:
        return f"its weight has shape {tuple(w.shape)}, not its normalized_shape {shape}"
    epss: tuple[float | None, ...] = (eps,) if found else _EPS_GUESSES
    if gate_name is not None:
        if len(shape) != 1 or bias is not None or weight not in ("weight", None):
            return "a gated norm other than an RMS norm over the last axis with a scale named weight"
        options = _gate_options(module, shape[0])
        if isinstance(options, str):
            return options
        places, acts, groups = options
        return [NormSpec("rms", shape, e, weight=weight, bias=None, gate=place, activation=act, group_size=gs,
                         gate_name=gate_name)
                for e in epss for place in places for act in acts for gs in groups]
    kinds = ["rms", "layer"] if isinstance(module, (nn.RMSNorm, LpRMSNorm)) else ["layer", "rms"]
    out = []
    for axis in ("last", "channels_first") if len(shape) == 1 else ("last",):
        for kind in kinds:
            for e in epss + ((None,) if kind == "rms" and not found else ()):
                if kind == "layer" and e is None:
                    continue
                for offset in (0.0, 1.0) if w is not None else (0.0,):
                    out.append(NormSpec(kind, shape, e, axis=axis, offset=offset, weight=weight, bias=bias, **lp))
    return out


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None:
                continue
            if name == "num_batches_tracked":
                t.fill_(3)
            elif not t.is_floating_point():
                continue
            elif name == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif name in _WEIGHT_NAMES:
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.5)
            # (copy_ moves the CPU values to the module's device)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _probe_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` for the probe: its own tensors cloned, its attributes shared,
    no hooks. Never a deep copy: a hook's closure may hold a whole model (or a logger)."""
    cand = copy.copy(module)
    cand._parameters = {n: None if t is None else nn.Parameter(t.detach().to(torch.float64, copy=True),
                                                                  requires_grad=False)
                        for n, t in module._parameters.items()}
    cand._buffers = {n: None if t is None else t.detach().to(torch.float64 if t.is_floating_point() else t.dtype,
                                                             copy=True)
                     for n, t in module._buffers.items()}
    cand._modules = {n: None if c is None else _probe_copy(c) for n, c in module._modules.items()}
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            cand.__dict__[name] = type(module.__dict__[name])()
    return cand


def _probe_shapes(spec: NormSpec) -> list[tuple[int, ...]]:
    c = spec.shape[0]
    spatial = [s for s in (3, 5, 7, 2) if s != c][:2]
    if spec.kind == "batch":
        return {1: [(8, c)], 2: [(4, c, *spatial)], 3: [(2, c, 2, *spatial)]}[spec.dims]
    if spec.kind == "group" or spec.axis == "channels_first":
        return [(2, c, *spatial)]
    return [(2, 3, *spec.shape)]


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _disagreement(module: nn.Module, spec: NormSpec, gate_optional: bool = False,
                  post: Callable[[Tensor], Tensor] | None = None) -> tuple[str, float] | None:
    """``None`` when ``module`` computes ``spec`` on the probe inputs, else what differs and by how
    much (the largest difference over the tolerance; ``inf`` for a refused input or a wrong shape).

    The module's ``forward`` is called directly, never ``__call__``: its hooks do not run.
    """
    gen = torch.Generator().manual_seed(0)
    tensors = list(module.parameters()) + list(module.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "meta":
        return "it is on the meta device: there are no values to probe it with", math.inf
    try:
        cand = _probe_copy(module)
        ref = build(spec, dtype=torch.float64, device=device)
    except Exception as exc:  # noqa: BLE001 - a module we cannot copy is a module we cannot probe
        return f"it could not be probed ({type(exc).__name__}: {exc})", math.inf
    _randomize(cand, gen)
    ref.load_state_dict(state_of(cand, spec), strict=False)
    start_c = {n: t.clone() for n, t in list(cand._parameters.items()) + list(cand._buffers.items()) if t is not None}
    start_r = copy.deepcopy(ref.state_dict())
    scales = [1.0] + ([math.sqrt(spec.eps)] if spec.eps else [])
    gates = [True] + ([False] if gate_optional else []) if spec.gate is not None else [False]
    forward = type(cand).forward
    for training in (True, False):
        for shape in _probe_shapes(spec):
            for scale in scales:
                for with_gate in gates:
                    x = ((torch.randn(shape, generator=gen, dtype=torch.float64) +
                          torch.randn(shape[-1], generator=gen, dtype=torch.float64)) * scale).to(device)
                    args = (x, torch.randn(shape, generator=gen, dtype=torch.float64).to(device) * 2) \
                        if with_gate else (x,)
                    with torch.no_grad():
                        for n, t in start_c.items():
                            getattr(cand, n).copy_(t)
                    ref.load_state_dict(start_r)
                    cand.train(training)
                    ref.train(training)
                    try:
                        with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type != "cuda" else [device]):
                            y = forward(cand, *(a.clone() for a in args))
                    except Exception as exc:  # noqa: BLE001 - refusing the input is a disagreement
                        if spec.gate is not None and not with_gate:
                            continue  # a gate that defaults to None yet is required: taking more is no harm
                        return f"it refuses a {list(shape)} input ({type(exc).__name__})", math.inf
                    with torch.no_grad():
                        r = ref(*(a.clone() for a in args))
                        if post is not None:
                            r = post(r)
                    ys = _tensors(y)
                    if len(ys) != 1 or ys[0].shape != r.shape:
                        return f"its output on a {list(shape)} input is not one tensor of that shape", math.inf
                    bound = 1e-4 * max(1.0, float(r.abs().max()))
                    diff = float((ys[0].double() - r).abs().max())
                    if not diff <= bound:
                        mode = "training" if training else "evaluation"
                        return (f"in {mode} mode its output differs from a {spec.describe()} by {diff:.3g}",
                                diff / bound if math.isfinite(diff) else math.inf)
                    if spec.kind == "batch" and training:
                        for name in ("running_mean", "running_var"):
                            a, b = getattr(cand, name, None), getattr(ref, name, None)
                            if isinstance(a, Tensor) and isinstance(b, Tensor) and \
                                    not float((a.double() - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max())):
                                return f"it updates {name} unlike a batch norm", 1e6
    return None


def recognise(module: nn.Module, *, gated: bool = False) -> NormSpec | str | None:
    """What ``module`` computes.

    Args:
        module: any module; it is not run (its ``forward`` runs on a float64 copy without hooks).
        gated: also recognise gated RMS norms (``norm(x, gate)``); their spec has ``gate`` set, and
            only a converter that builds :class:`~normmatters.nn.LpGatedRMSNorm` asks for them.

    Returns:
        a :class:`NormSpec` for a module of a known class or one that agrees with a formula on
        the probe (module docstring); a string saying why a norm-like module cannot be
        converted (for an unrecognised one: its difference from the closest formula); ``None``
        for a module that is not norm-like (its children may be).
    """
    spec = exact_spec(module)
    if spec is not None:
        if spec.gate is not None and not gated:
            return "a gated RMS norm (norm(x, gate)); only convert_norms builds gated norms"
        return spec
    if isinstance(module, MEAN_ONLY) or not is_norm_like(module):
        return None
    key = _probe_key(module, gated)
    if key is not None and key in _PROBED:
        found = _PROBED[key]
        return replace(found) if isinstance(found, NormSpec) else found
    found = _recognise_by_probe(module, gated)
    if key is not None:
        if len(_PROBED) >= 4096:
            _PROBED.clear()
        _PROBED[key] = replace(found) if isinstance(found, NormSpec) else found
    return found


# What a module computes depends on its class, its plain attributes and the shapes of its tensors
# (the probe sets their values): modules alike in these are probed once (a 32-layer Llama has 65
# RMS norms of one class and configuration).
_PROBED: dict[Any, NormSpec | str] = {}
_KEY_TYPES = (int, float, str, bool, type(None))
# nn.Module's own bookkeeping (hooks, registries, the training flag) and the converters' notes;
# every other attribute, private ones included, may change what a forward computes.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"_normmatters_original", "_normmatters_fast_path"}


def _probe_key(module: nn.Module, gated: bool) -> Any:
    """A hashable description of everything the probe's outcome depends on, or ``None`` when a
    module holds attributes of other types (then it is probed every time)."""
    items = []
    for name, value in module.__dict__.items():
        if name in _MODULE_INTERNALS:
            continue
        if isinstance(value, _KEY_TYPES) or (isinstance(value, (tuple, torch.Size))
                                             and all(isinstance(v, _KEY_TYPES) for v in value)):
            items.append((name, type(value), value))
        else:
            return None
    tensors = tuple((n, None if t is None else (tuple(t.shape), t.dtype, t.device.type, type(t)))
                    for n, t in list(module._parameters.items()) + list(module._buffers.items()))
    children = []
    for name, child in module._modules.items():
        sub = None if child is None else _probe_key(child, gated)
        if child is not None and sub is None:
            return None
        children.append((name, sub))
    return (type(module), gated, tuple(sorted(items, key=lambda i: i[0])), tensors, tuple(children))


def _recognise_by_probe(module: nn.Module, gated: bool) -> NormSpec | str:
    # The probe's tensors are tiny: one thread avoids waking the intra-op pool for each call
    # (on a loaded machine that costs milliseconds per call).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe_candidates(module, gated)
    finally:
        torch.set_num_threads(threads)


def _probe_candidates(module: nn.Module, gated: bool) -> NormSpec | str:
    cands = _candidates(module, gated)
    if isinstance(cands, str):
        return cands
    form = call_form(module)
    gate_optional = not isinstance(form, str) and form[1]
    closest: tuple[str, float, NormSpec] | None = None
    for spec in cands:
        why = _disagreement(module, spec, gate_optional)
        if why is None:
            return spec
        if closest is None or why[1] < closest[1]:
            closest = (*why, spec)
    # A norm followed by an activation held as a child (BiT's BitGroupNormActivation, timm's
    # BatchNormAct2d): say so, rather than quote a difference.
    children = [(n, c) for n, c in module._modules.items() if c is not None]
    if len(children) == 1 and closest[1] < math.inf:
        name, act = children[0]
        act64 = _probe_copy(act)
        if _disagreement(module, closest[2], gate_optional, post=act64) is None:
            return (f"it computes a {closest[2].describe()} followed by its {name!r} ({type(act).__name__}); "
                    "normmatters' layers apply no activation")
    return "it computes none of the norms normmatters can build; closest: " + closest[0]
