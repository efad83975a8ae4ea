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
* every other *norm-like* module — a subclass of those, or a module without children that hold
  state, with its own weight / bias / running statistics and an ``eps``-like attribute
  (``eps``, ``variance_epsilon``, ``epsilon``) — is probed: a copy in float64 with seeded random
  parameters runs on seeded random inputs (at scale 1, and at scale √eps where the placement of
  eps matters), in training and in evaluation mode, and its outputs (and, for batch norms, its
  updated running statistics) are compared with those of each formula it could compute. It is
  recognised only on agreement within ``1e-4 · max(1, max|y|)``;
* classes registered with :func:`register_norm` are converted by the functions given there.
"""

from __future__ import annotations

import copy
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
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    SyncLpBatchNorm,
)
from .layers import ForeignLpNorm

__all__ = [
    "NormConversionWarning",
    "NormSpec",
    "recognise",
    "register_norm",
    "unregister_norm",
    "registered_norm",
    "is_norm_like",
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

    def describe(self) -> str:
        what = {"batch": f"batch norm ({self.dims}d)", "layer": "layer norm", "rms": "RMS norm",
                "group": f"group norm ({self.num_groups} groups)"}[self.kind]
        if self.axis == "channels_first":
            what += " over the channel axis"
        if self.offset:
            what += f" with scale ({self.offset:g} + weight)"
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
    """Copy ``src``'s parameters, buffers, ``requires_grad`` and training flag into ``dst``."""
    state = state_of(src, spec)
    with torch.no_grad():
        for name, value in state.items():
            target = getattr(dst, name, None)
            if isinstance(target, Tensor):
                target.copy_(value)
                if isinstance(target, nn.Parameter):
                    target.requires_grad_(value.requires_grad)
    dst.train(src.training)
    return dst


# ------------------------------------------------------------------------------------------
# norm-like modules and their probe
# ------------------------------------------------------------------------------------------

_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
                nn.CrossMapLRN2d)
_OUR_NORMS = (BatchNormBase, LpLayerNorm, LpGroupNorm, LpRMSNorm, ForeignLpNorm)
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")
_WEIGHT_NAMES = ("weight", "scale", "gamma")
_BIAS_NAMES = ("bias", "beta")


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def is_norm_like(module: nn.Module) -> bool:
    """A subclass of a norm class of torch or normmatters, or a module whose children hold no
    state and which has its own tensors and an ``eps``-like attribute (or ``Norm`` in its name)."""
    if isinstance(module, _TORCH_NORMS + _OUR_NORMS + MEAN_ONLY):
        return True
    if any(_has_state(c) for c in module.children()):
        return False
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if not any(t.is_floating_point() for t in own):
        return False
    has_eps = any(isinstance(getattr(module, n, None), (int, float)) and not isinstance(getattr(module, n), bool)
                  for n in _EPS_NAMES)
    return has_eps or "norm" in type(module).__name__.lower()


def _eps_of(module: nn.Module) -> tuple[bool, float | None]:
    for n in _EPS_NAMES:
        if hasattr(module, n):
            v = getattr(module, n)
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                return True, None if v is None else float(v)
    return False, None


def _candidates(module: nn.Module) -> list[NormSpec] | str:
    """The specs ``module`` might compute, most likely first, or why it cannot be any."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "normmatters has no Lp instance norm"
    if isinstance(module, (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
        return "normmatters has no Lp local response norm"
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
    if not found:
        return "it has no eps attribute (eps, variance_epsilon, epsilon) to build a norm from"
    w = params.get(weight)
    rm = getattr(module, "running_mean", None)
    lp = {}
    if isinstance(module, (LpBatchNormBase, LpLayerNorm, LpGroupNorm, LpRMSNorm)):
        lp = {"p": float(module.p), "k": module.k, "constant": module.constant}
    batch_like = isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNormBase)) or isinstance(rm, Tensor) \
        or hasattr(module, "track_running_stats")
    if batch_like:
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
    if isinstance(module, (nn.GroupNorm, LpGroupNorm)) or hasattr(module, "num_groups"):
        c = getattr(module, "num_channels", None) or (w.numel() if w is not None else None)
        g = getattr(module, "num_groups", None)
        if not isinstance(c, int) or not isinstance(g, int) or eps is None:
            return "a group norm whose num_groups / num_channels / eps cannot be read"
        return [NormSpec("group", (c,), eps, num_groups=g, weight=weight, bias=bias, **lp)]
    shape = getattr(module, "normalized_shape", None)
    if shape is None and w is not None:
        shape = tuple(w.shape)
    if shape is None:
        return "it has no weight and no normalized_shape to tell which axes it normalizes"
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if w is not None and tuple(w.shape) != shape:
        return f"its weight has shape {tuple(w.shape)}, not its normalized_shape {shape}"
    kinds = ["rms", "layer"] if isinstance(module, (nn.RMSNorm, LpRMSNorm)) else ["layer", "rms"]
    out = []
    for axis in ("last", "channels_first") if len(shape) == 1 else ("last",):
        for kind in kinds:
            if kind == "layer" and eps is None:
                continue
            for offset in (0.0, 1.0) if w is not None else (0.0,):
                out.append(NormSpec(kind, shape, eps, axis=axis, offset=offset, weight=weight, bias=bias, **lp))
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


def _disagreement(module: nn.Module, spec: NormSpec) -> str | None:
    """``None`` when ``module`` computes ``spec`` on the probe inputs, else what differs."""
    gen = torch.Generator().manual_seed(0)
    tensors = list(module.parameters()) + list(module.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "meta":
        return "it is on the meta device: there are no values to probe it with"
    try:
        cand = copy.deepcopy(module).to(torch.float64)
        ref = build(spec, dtype=torch.float64, device=device)
    except Exception as exc:  # noqa: BLE001 - a module we cannot copy is a module we cannot probe
        return f"it could not be probed ({type(exc).__name__}: {exc})"
    _randomize(cand, gen)
    ref.load_state_dict(state_of(cand, spec), strict=False)
    start_c = copy.deepcopy(cand.state_dict())
    start_r = copy.deepcopy(ref.state_dict())
    scales = [1.0] + ([math.sqrt(spec.eps)] if spec.eps else [])
    for training in (True, False):
        for shape in _probe_shapes(spec):
            for scale in scales:
                x = ((torch.randn(shape, generator=gen, dtype=torch.float64) +
                      torch.randn(shape[-1], generator=gen, dtype=torch.float64)) * scale).to(device)
                cand.load_state_dict(start_c)
                ref.load_state_dict(start_r)
                cand.train(training)
                ref.train(training)
                try:
                    with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type != "cuda" else [device]):
                        y = cand(x.clone())
                except Exception as exc:  # noqa: BLE001 - refusing the input is a disagreement
                    return f"it refuses a {list(shape)} input ({type(exc).__name__})"
                with torch.no_grad():
                    r = ref(x.clone())
                ys = _tensors(y)
                if len(ys) != 1 or ys[0].shape != r.shape:
                    return f"its output on a {list(shape)} input is not one tensor of that shape"
                bound = 1e-4 * max(1.0, float(r.abs().max()))
                diff = float((ys[0].double() - r).abs().max())
                if not diff <= bound:
                    mode = "training" if training else "evaluation"
                    return f"in {mode} mode its output differs from a {spec.describe()} by {diff:.3g}"
                if spec.kind == "batch" and training:
                    for name in ("running_mean", "running_var"):
                        a, b = getattr(cand, name, None), getattr(ref, name, None)
                        if isinstance(a, Tensor) and isinstance(b, Tensor) and \
                                not float((a.double() - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max())):
                            return f"it updates {name} unlike a batch norm"
    return None


def recognise(module: nn.Module) -> NormSpec | str | None:
    """What ``module`` computes.

    Returns:
        a :class:`NormSpec` for a module of a known class or one that agrees with a formula on
        the probe (module docstring); a string saying why a norm-like module cannot be
        converted; ``None`` for a module that is not norm-like (its children may be).
    """
    spec = exact_spec(module)
    if spec is not None:
        return spec
    if isinstance(module, MEAN_ONLY) or not is_norm_like(module):
        return None
    cands = _candidates(module)
    if isinstance(cands, str):
        return cands
    reasons = []
    for spec in cands:
        why = _disagreement(module, spec)
        if why is None:
            return spec
        reasons.append(why)
    return "it computes none of the norms normmatters can build: " + reasons[0]
