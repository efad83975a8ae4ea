"""Detection of scale-invariant weights by abstract interpretation of a :mod:`torch.fx` graph.

For one parameter at a time, every node of the traced graph gets an :class:`AbstractValue`: its
:class:`Dependence` on the parameter (``CONST``, ``HOM(axis)``, ``AFF(axis)`` or ``OTHER``, defined in
:mod:`normmatters.optim.invariance`) and the axis along which the parameter's output channels
travel. Transfer rules cover the modules and functions listed below; a normalization maps
``HOM`` / ``AFF`` to ``CONST`` and records where it absorbed the scale (a :class:`_Site`), from which
the granularity of the invariance (per channel, per group, whole tensor) is derived.
"""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from normmatters import functional as nm_functional
from normmatters.optim.results import InvarianceReport, ScaleInvarianceTraceError, ScaleInvariantParam

__all__ = ["Dependence", "AbstractValue", "fx_analysis"]


# ----------------------------------------------------------------------------------------------
# Abstract states.


class Dependence(enum.IntEnum):
    """How a value depends on the parameter under analysis, from harmless to unknown (the order
    is used: joining two dependences keeps the worse)."""

    CONST = 0  # independent of the parameter, or invariant to its scale
    HOM = 1  # positively homogeneous of degree one in the parameter
    AFF = 2  # c·h + b: homogeneous h plus an offset constant along every axis but one (a bias)
    OTHER = 3  # anything else


@dataclass(frozen=True)
class AbstractValue:
    """The abstract value of one graph node: its :class:`Dependence` on the parameter and, for
    ``HOM`` / ``AFF``, the tensor axis along which output channel ``i`` of the parameter scales
    slice ``i`` only (``None``: only a scaling of the whole parameter is known to scale it)."""

    kind: Dependence
    axis: int | None = None
    per: int = 1  # output channels per index along `axis` (> 1 after a split, e.g. into heads)


def _with_offset(has_offset: bool) -> Dependence:
    """``AFF`` for a layer with a bias, ``HOM`` for one without."""
    return Dependence.AFF if has_offset else Dependence.HOM


CONST = AbstractValue(Dependence.CONST)
OTHER = AbstractValue(Dependence.OTHER)
HOM_ANY_AXIS = AbstractValue(Dependence.HOM, None)  # homogeneous, only as a whole tensor

Shape = tuple[int, ...]


def _forget_axis(v: AbstractValue) -> AbstractValue:
    """What is left of ``v`` when the axis of its channels is lost: a homogeneous value stays
    homogeneous as a whole tensor; an offset can no longer be told from the signal."""
    return HOM_ANY_AXIS if v.kind == Dependence.HOM else OTHER


def _join(states: Iterable[AbstractValue]) -> AbstractValue:
    """State of a container (tuple/list) of values: the worst of its members."""
    out = CONST
    for s in states:
        if s.kind == Dependence.OTHER:
            return OTHER
        if s.kind != Dependence.CONST:
            if out.kind != Dependence.CONST and out != s:
                s = AbstractValue(max(out.kind, s.kind), None)
            out = s
            if out.kind == Dependence.AFF and out.axis is None:
                return OTHER
    return out


# ----------------------------------------------------------------------------------------------
# What the analysis knows about modules and functions.

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.Identity,
)
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}
_RESHAPE_MODULES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten)

# Positively homogeneous elementwise functions / methods (f(c·x) = c·f(x) for c > 0).
_ELEMENTWISE_FNS = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "neg", "clone", "contiguous", "detach", "prelu",
}
_POOL_FNS = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2,
    "avg_pool3d": 3, "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2,
    "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2,
    "adaptive_max_pool3d": 3,
}
_RESHAPE_FNS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                "reshape_as"}
_PERMUTE_FNS = {"permute", "transpose", "t", "swapaxes", "swapdims"}
_REDUCE_FNS = {"mean", "sum"}
_ADD_FNS = {"add", "sub", "iadd", "isub", "add_", "sub_"}
_MUL_FNS = {"mul", "truediv", "div", "imul", "itruediv", "mul_", "div_"}
_FUNCTIONAL_NORMS = {
    "batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm",
    "lp_batch_norm", "lp_layer_norm", "lp_group_norm", "lp_rms_norm",
}

_TORCH_BN = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
_TORCH_IN = (nn.modules.instancenorm._InstanceNorm,)


@dataclass(frozen=True)
class _NormKind:
    """How a normalization reduces: over every axis but the channel axis ("batch"), over the
    trailing ``n_trailing`` axes ("layer"), over channel groups and spatial axes ("group"),
    or over the spatial axes of each sample and channel ("instance")."""

    kind: str
    centers: bool = True
    n_trailing: int = 0
    num_groups: int = 0


def _class_names(m: nn.Module) -> set[str]:
    return {c.__name__ for c in type(m).__mro__}


_LP_BATCH_NORMS = {"LpBatchNorm1d", "LpBatchNorm2d", "LpBatchNorm3d", "SyncLpBatchNorm",
                   "_LpBatchNorm"}


def _norm_kind(m: nn.Module) -> _NormKind | None:
    """How ``m`` normalizes, or ``None`` if it is not a scale-invariant normalization.

    The library's own layers are recognised by class name (any class in the MRO), so this
    module does not import :mod:`normmatters.nn`; a mean-only batch norm subtracts the mean but
    does not divide, so it is not one."""
    names = _class_names(m)
    if _is_mean_only_bn(m):
        return None
    if isinstance(m, _TORCH_BN) or names & _LP_BATCH_NORMS:
        return _NormKind("batch")
    if isinstance(m, _TORCH_IN):
        return _NormKind("instance")
    if isinstance(m, nn.GroupNorm) or "LpGroupNorm" in names:
        return _NormKind("group", num_groups=int(m.num_groups))
    if isinstance(m, nn.LayerNorm) or "LpLayerNorm" in names:
        return _NormKind("layer", n_trailing=len(tuple(m.normalized_shape)))
    if isinstance(m, nn.RMSNorm) or "LpRMSNorm" in names:
        return _NormKind("layer", centers=False, n_trailing=len(tuple(m.normalized_shape)))
    return None


def _is_mean_only_bn(m: nn.Module) -> bool:
    return any(n.startswith("MeanOnlyBatchNorm") for n in _class_names(m))


def _understood_leaf(m: nn.Module) -> bool:
    return (
        _norm_kind(m) is not None
        or _is_mean_only_bn(m)
        or isinstance(m, _ELEMENTWISE_MODULES + _RESHAPE_MODULES + tuple(_POOL_MODULES))
        or isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding))
    )


_MISSING = object()


class _ValueProxy(torch.fx.Proxy):
    """A proxy that also knows its value on the example input, so that shape queries
    (``x.dim()``, ``x.shape``, ``x.size(i)``, ``x.ndim``) give concrete numbers while tracing —
    plain :mod:`torch.fx` cannot trace ``range(2, x.dim())``. The graph is only analysed for
    that input's shapes, so baking them in is what we want."""

    def _value(self, what: str) -> Tensor:
        v = self.tracer._values.get(self.node, _MISSING)  # type: ignore[attr-defined]
        if not isinstance(v, Tensor):
            raise torch.fx.proxy.TraceError(f"cannot evaluate {what} of {self.node.name} while tracing")
        return v

    def dim(self) -> int:  # type: ignore[override]
        return self._value("dim()").dim()

    def size(self, dim: int | None = None) -> Any:  # type: ignore[override]
        v = self._value("size()")
        return v.size() if dim is None else v.size(dim)

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self._value("shape").shape

    @property
    def ndim(self) -> int:  # type: ignore[override]
        return self._value("ndim").dim()


class _Tracer(torch.fx.Tracer):
    """FX tracer that keeps normalizations (ours included) and layers it understands as leaves,
    traces into everything else, keeps functional normalizations as single calls, and evaluates
    every node on the example input as it goes (see :class:`_ValueProxy`)."""

    def __init__(self, inputs: Sequence[Any] = ()) -> None:
        # The library's own functional norms stay single calls, as torch's do.
        fns = [getattr(nm_functional, n) for n in sorted(_FUNCTIONAL_NORMS) if hasattr(nm_functional, n)]
        super().__init__(autowrap_functions=tuple(fns))
        self._inputs = list(inputs)
        self._values: dict[torch.fx.Node, Any] = {}
        self._computing = False  # evaluating a node on real tensors: no tracing inside

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _understood_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _concrete(self, a: Any) -> Any:
        def one(x: Any) -> Any:
            if isinstance(x, torch.fx.Proxy):
                v = self._values.get(x.node, _MISSING)
                if v is _MISSING:
                    raise LookupError(x.node.name)
                return v
            return x

        return torch.fx.node.map_aggregate(a, one)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any,
                     **kw: Any) -> torch.fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        value: Any = _MISSING
        try:
            if kind == "placeholder":
                idx = sum(1 for n in self._values if n.op == "placeholder")
                value = self._inputs[idx] if idx < len(self._inputs) else _MISSING
            elif kind == "get_attr":
                value = self.root
                for part in str(target).split("."):
                    value = getattr(value, part)
            elif kind in ("call_function", "call_method", "call_module"):
                a, k = self._concrete(tuple(args)), self._concrete(dict(kwargs))
                self._computing = True
                if kind == "call_function":
                    value = target(*a, **k)
                elif kind == "call_method":
                    value = getattr(a[0], target)(*a[1:], **k)
                else:
                    value = self.root.get_submodule(target)(*a, **k)
        except Exception:  # a value we cannot compute only matters if its shape is asked for
            value = _MISSING
        finally:
            self._computing = False
        self._values[proxy.node] = value
        return proxy


# ----------------------------------------------------------------------------------------------
# Shape helpers.


def _shape(node: Any) -> Shape | None:
    if isinstance(node, torch.fx.Node):
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape)
        return None
    if isinstance(node, (int, float, bool)):
        return ()
    if isinstance(node, Tensor):
        return tuple(node.shape)
    return None


def _reshape_axis(
    in_shape: Sequence[int], out_shape: Sequence[int], axis: int
) -> tuple[int, int] | None:
    """Where channel slices along ``axis`` land after a memory-order-preserving reshape.

    Slice ``i`` of ``axis`` (size ``S``) occupies the flat positions ``p·S·R + i·R + r``. It
    lands on slice ``i`` of output axis ``j`` when the prefix products and the sizes agree
    (returns ``(j, 1)``); when the axis is split into ``out[j] × out[j+1] × ...`` (heads), slice
    ``k`` of axis ``j`` holds the ``S/out[j]`` consecutive channels of block ``k`` (returns
    ``(j, S // out[j])``).
    """
    prefix = math.prod(in_shape[:axis])
    size = in_shape[axis]
    for j in range(len(out_shape)):
        if math.prod(out_shape[:j]) != prefix:
            continue
        if out_shape[j] == size:
            return j, 1
        for k in range(j + 1, len(out_shape)):
            if math.prod(out_shape[j:k + 1]) == size and size % out_shape[j] == 0:
                return j, size // out_shape[j]
    return None


def _norm_dims(dims: Any, ndim: int) -> list[int] | None:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return [d % ndim if ndim else 0 for d in dims]


def _const_is_per_axis(const_shape: Shape | None, out_ndim: int, axis: int) -> bool:
    """True when a broadcast constant of ``const_shape`` is constant along every axis but
    ``axis`` of an ``out_ndim``-dimensional result."""
    if const_shape is None:
        return False
    offset = out_ndim - len(const_shape)
    for i, s in enumerate(const_shape):
        if i + offset != axis and s != 1:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# The per-parameter analysis.


@dataclass
class _Site:
    """A normalization that absorbed the parameter's scale."""

    name: str
    granularity: str  # "channel", "group", "tensor"
    num_groups: int = 0
    channels: int | None = None  # size of the normalized channel axis (group norm)


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule, modules: Mapping[str, nn.Module]) -> None:
        self.gm = gm
        self.modules = modules
        self.nodes = list(gm.graph.nodes)

    # -- sources ------------------------------------------------------------------------------
    def _source_state(self, node: torch.fx.Node, pname: str) -> tuple[AbstractValue, int, bool] | None:
        """State of ``node`` if it *introduces* the parameter, its channel dim, and whether the
        owning module is opaque. ``None`` when the node does not own the parameter."""
        if node.op == "get_attr" and node.target == pname:
            return AbstractValue(Dependence.HOM, 0), 0, False
        if node.op != "call_module":
            return None
        prefix = f"{node.target}."
        if not pname.startswith(prefix):
            return None
        m = self.modules[node.target]
        attr = pname[len(prefix):]
        out = _shape(node)
        ndim = len(out) if out is not None else None
        ins = [self.state_of(a) for a in node.args]
        if any(s.kind != Dependence.CONST for s in ins):
            return OTHER, 0, False
        if attr == "weight" and ndim:
            bias = getattr(m, "bias", None)
            if isinstance(m, nn.Linear):
                return AbstractValue(_with_offset(bias is not None), ndim - 1), 0, False
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                if m.groups == 1 and ndim >= 2:
                    axis = 1 if ndim == len(m.kernel_size) + 2 else 0
                    return AbstractValue(_with_offset(bias is not None), axis), 1, False
                return (OTHER if bias is not None else HOM_ANY_AXIS), 1, False
            if isinstance(m, nn.modules.conv._ConvNd):
                axis = 1 if ndim == len(m.kernel_size) + 2 else 0
                return AbstractValue(_with_offset(bias is not None), axis), 0, False
            if isinstance(m, nn.Embedding):
                if m.max_norm is not None:  # renormalizes rows: not linear in the table
                    return OTHER, 1, False
                return AbstractValue(Dependence.HOM, ndim - 1), 1, False
        # Parameters of modules the analysis does not model, or reached through a
        # parametrization (weight norm's `parametrizations.weight.original`), are opaque.
        known = _understood_leaf(m) and attr in ("weight", "bias")
        return OTHER, 0, not known

    # -- propagation --------------------------------------------------------------------------
    def state_of(self, a: Any) -> AbstractValue:
        if isinstance(a, torch.fx.Node):
            return self.states.get(a, CONST)
        if isinstance(a, (list, tuple)):
            return _join(self.state_of(x) for x in a)
        if isinstance(a, dict):
            return _join(self.state_of(x) for x in a.values())
        return CONST

    def run(self, pname: str) -> tuple[bool, list[_Site], int, bool, bool]:
        """Returns (invariant, sites, channel_dim, opaque, used)."""
        self.states: dict[torch.fx.Node, AbstractValue] = {}
        sites: list[_Site] = []
        channel_dim = 0
        opaque = False
        used = False
        for node in self.nodes:
            src = self._source_state(node, pname)
            if src is not None:
                st, channel_dim, op = src
                opaque |= op
                used = True
                self.states[node] = st
                continue
            if node.op == "output":
                out = self.state_of(node.args)
                return out.kind == Dependence.CONST and bool(sites), sites, channel_dim, opaque, used
            if node.op in ("placeholder", "get_attr"):
                continue
            ins = [self.state_of(a) for a in node.args] + [
                self.state_of(v) for v in node.kwargs.values()
            ]
            if all(s.kind == Dependence.CONST for s in ins):
                continue  # independent of the parameter
            self.states[node] = self._transfer(node, sites)
        return False, sites, channel_dim, opaque, used

    def _transfer(self, node: torch.fx.Node, sites: list[_Site]) -> AbstractValue:
        if node.op == "call_module":
            m = self.modules[node.target]
            x = node.args[0] if node.args else None
            sx = self.state_of(x)
            if any(self.state_of(a).kind != Dependence.CONST for a in node.args[1:]) or any(
                self.state_of(v).kind != Dependence.CONST for v in node.kwargs.values()
            ):
                return OTHER
            nk = _norm_kind(m)
            if nk is not None:
                return self._norm(sx, nk, _shape(x), str(node.target), sites)
            if _is_mean_only_bn(m):
                # Subtracting the per-channel mean keeps per-channel homogeneity along the
                # channel axis and removes a per-channel offset, then a bias is added back.
                if sx.kind in (Dependence.HOM, Dependence.AFF) and sx.axis == 1:
                    return AbstractValue(_with_offset(getattr(m, "bias", None) is not None), 1)
                return OTHER
            if isinstance(m, _ELEMENTWISE_MODULES):
                if isinstance(m, nn.Identity):
                    return sx
                return sx if sx.kind == Dependence.HOM else OTHER
            if isinstance(m, tuple(_POOL_MODULES)):
                return self._pool(sx, _POOL_MODULES[type(m)], _shape(x))
            if isinstance(m, _RESHAPE_MODULES):
                return self._reshape(sx, _shape(x), _shape(node))
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                # A fixed linear map of a homogeneous signal: homogeneous, channels mixed.
                if sx.kind == Dependence.HOM and getattr(m, "bias", None) is None:
                    return HOM_ANY_AXIS
                return OTHER
            return OTHER
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        args = list(node.args)
        x = args[0] if args else None
        sx = self.state_of(x)
        if name in _FUNCTIONAL_NORMS:
            return self._functional_norm(node, name, sites)
        if name in _ELEMENTWISE_FNS:
            if any(self.state_of(a).kind != Dependence.CONST for a in args[1:]):
                return OTHER
            return sx if sx.kind == Dependence.HOM or name in {"clone", "contiguous", "detach"} else OTHER
        if name in _POOL_FNS:
            return self._pool(sx, _POOL_FNS[name], _shape(x))
        if name in _RESHAPE_FNS:
            return self._reshape(sx, _shape(x), _shape(node))
        if name in _PERMUTE_FNS:
            return self._permute(node, name, sx, _shape(x))
        if name == "getitem":
            xs = _shape(x)
            if xs is None:  # indexing a tuple / list of values
                return sx
            if xs == _shape(node):
                return sx
            return _forget_axis(sx)
        if name in ("to", "float", "double", "half", "bfloat16", "type"):
            return sx
        if name in _REDUCE_FNS:
            return self._reduce(node, sx, _shape(x))
        if name in _ADD_FNS:
            return self._add(node, args)
        if name in _MUL_FNS:
            return self._mul(node, name, args)
        if name in ("linear", "conv1d", "conv2d", "conv3d"):
            return self._functional_linear(node, name, args)
        return OTHER

    # -- rules ----------------------------------------------------------------------------------
    def _norm(self, sx: AbstractValue, nk: _NormKind, in_shape: Shape | None, name: str,
              sites: list[_Site]) -> AbstractValue:
        if sx.kind == Dependence.CONST:
            return CONST
        if sx.kind == Dependence.OTHER or in_shape is None:
            return OTHER
        ndim = len(in_shape)
        a = sx.axis
        if nk.kind == "batch":
            reduced_axis = a is None or a != 1 % max(ndim, 1)
            ch = None
        elif nk.kind == "instance":
            reduced_axis = a is None or a >= ndim - (ndim - 2 if ndim > 2 else 1)
            ch = None
        elif nk.kind == "layer":
            reduced_axis = a is None or a >= ndim - nk.n_trailing
            ch = None
        else:  # group norm: channel axis 1 in groups, plus every spatial axis
            if a == 1 and ndim >= 2 and sx.per == 1:
                ch = in_shape[1]
                if nk.num_groups == ch:
                    reduced_axis = False
                else:
                    if sx.kind == Dependence.AFF or not nk.centers:
                        return OTHER
                    sites.append(_Site(name, "group", nk.num_groups, ch))
                    return CONST
            else:
                reduced_axis = True
                ch = None
        if sx.kind == Dependence.AFF:
            # The offset is constant along every axis but `a`; centring over a set of axes that
            # excludes `a` removes it, anything else keeps it.
            if reduced_axis or not nk.centers:
                return OTHER
        if reduced_axis:
            sites.append(_Site(name, "tensor"))
        elif sx.per == 1:
            sites.append(_Site(name, "channel"))
        else:  # each index along the axis holds a block of `per` channels (a head)
            sites.append(_Site(name, "group", in_shape[a], None))
        return CONST

    def _functional_norm(self, node: torch.fx.Node, name: str, sites: list[_Site]) -> AbstractValue:
        args = list(node.args)
        x = args[0] if args else node.kwargs.get("input")
        sx = self.state_of(x)
        others = [a for a in args[1:]] + [v for k, v in node.kwargs.items() if k != "input"]
        if any(self.state_of(a).kind != Dependence.CONST for a in others):
            return OTHER
        base = name[3:] if name.startswith("lp_") else name
        xs = _shape(x)
        if base == "batch_norm":
            nk = _NormKind("batch")
        elif base == "instance_norm":
            nk = _NormKind("instance")
        elif base in ("layer_norm", "rms_norm"):
            shape = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
            if isinstance(shape, int):
                shape = (shape,)
            if not isinstance(shape, (list, tuple)):
                return OTHER
            nk = _NormKind("layer", centers=base == "layer_norm", n_trailing=len(shape))
        else:
            g = args[1] if len(args) > 1 else node.kwargs.get("num_groups")
            if not isinstance(g, int):
                return OTHER
            nk = _NormKind("group", num_groups=g)
        return self._norm(sx, nk, xs, name, sites)

    @staticmethod
    def _pool(sx: AbstractValue, k: int, in_shape: Shape | None) -> AbstractValue:
        if sx.kind != Dependence.HOM:
            # A pooled offset stays per-channel only without padding effects: be conservative.
            return CONST if sx.kind == Dependence.CONST else OTHER
        if in_shape is None or sx.axis is None:
            return HOM_ANY_AXIS
        return sx if sx.axis < len(in_shape) - k else HOM_ANY_AXIS

    @staticmethod
    def _reshape(sx: AbstractValue, in_shape: Shape | None, out_shape: Shape | None) -> AbstractValue:
        if sx.kind not in (Dependence.HOM, Dependence.AFF):
            return sx
        if sx.axis is None or in_shape is None or out_shape is None:
            return _forget_axis(sx)
        found = _reshape_axis(in_shape, out_shape, sx.axis)
        if found is None or (found[1] != 1 and sx.kind == Dependence.AFF):
            return _forget_axis(sx)
        return AbstractValue(sx.kind, found[0], sx.per * found[1])

    @staticmethod
    def _permute(node: torch.fx.Node, name: str, sx: AbstractValue, in_shape: Shape | None) -> AbstractValue:
        if sx.kind not in (Dependence.HOM, Dependence.AFF) or sx.axis is None or in_shape is None:
            return sx if sx.kind != Dependence.AFF else OTHER
        ndim = len(in_shape)
        a = sx.axis
        args = list(node.args[1:])
        try:
            if name == "permute":
                dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
                dims = [int(d) % ndim for d in dims]
                return AbstractValue(sx.kind, dims.index(a), sx.per)
            if name == "t":
                return AbstractValue(sx.kind, {0: 1, 1: 0}.get(a, a) if ndim == 2 else a, sx.per)
            d0, d1 = (int(args[0]) % ndim, int(args[1]) % ndim)
            return AbstractValue(sx.kind, d1 if a == d0 else d0 if a == d1 else a, sx.per)
        except (TypeError, ValueError, IndexError):
            return _forget_axis(sx)

    def _reduce(self, node: torch.fx.Node, sx: AbstractValue, in_shape: Shape | None) -> AbstractValue:
        if sx.kind not in (Dependence.HOM, Dependence.AFF) or in_shape is None:
            return OTHER
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        ndim = len(in_shape)
        red = _norm_dims(dims, ndim)
        if red is None or sx.axis is None or sx.axis in red:
            return _forget_axis(sx)
        if keep:
            return sx
        return AbstractValue(sx.kind, sx.axis - sum(1 for d in red if d < sx.axis), sx.per)

    def _add(self, node: torch.fx.Node, args: list[Any]) -> AbstractValue:
        if len(args) < 2:
            return OTHER
        a, b = args[0], args[1]
        sa, sb = self.state_of(a), self.state_of(b)
        out = _shape(node)
        if out is None:
            return OTHER
        if sa.kind == Dependence.CONST:
            a, b, sa, sb = b, a, sb, sa
        if sa.kind == Dependence.OTHER or sb.kind == Dependence.OTHER:
            return OTHER
        if sb.kind == Dependence.CONST:
            # A constant offset survives only if it is constant along every axis but the
            # channel axis (a bias), and only if `a` covers the whole result.
            if sa.axis is None or _shape(a) != out:
                return OTHER
            if _const_is_per_axis(_shape(b), len(out), sa.axis):
                return AbstractValue(Dependence.AFF, sa.axis, sa.per) if sa.per == 1 else OTHER
            return OTHER
        # Both depend on the parameter: sums of homogeneous terms along the same axis.
        if _shape(a) != out or _shape(b) != out:
            return HOM_ANY_AXIS if sa.kind == sb.kind == Dependence.HOM else OTHER
        same = (sa.axis, sa.per) == (sb.axis, sb.per)
        kind = max(sa.kind, sb.kind)
        if kind == Dependence.AFF and not same:
            return OTHER
        return AbstractValue(kind, sa.axis, sa.per) if same else AbstractValue(kind, None)

    def _mul(self, node: torch.fx.Node, name: str, args: list[Any]) -> AbstractValue:
        if len(args) < 2:
            return OTHER
        a, b = args[0], args[1]
        sa, sb = self.state_of(a), self.state_of(b)
        out = _shape(node)
        if sb.kind != Dependence.CONST:
            if name in ("truediv", "div", "itruediv", "div_") or sa.kind != Dependence.CONST:
                return OTHER  # c / f(w) or a product of two parameter-dependent factors
            a, b, sa, sb = b, a, sb, sa
        if sa.kind not in (Dependence.HOM, Dependence.AFF) or out is None:
            return OTHER
        if sa.axis is None or _shape(a) != out:
            return _forget_axis(sa)
        if sa.kind == Dependence.AFF and not _const_is_per_axis(_shape(b), len(out), sa.axis):
            return OTHER
        return sa

    def _functional_linear(self, node: torch.fx.Node, name: str, args: list[Any]) -> AbstractValue:
        x = args[0] if args else node.kwargs.get("input")
        w = args[1] if len(args) > 1 else node.kwargs.get("weight")
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        sx, sw, sb = self.state_of(x), self.state_of(w), self.state_of(bias)
        out = _shape(node)
        if sb.kind != Dependence.CONST or out is None:
            return OTHER
        has_bias = bias is not None
        if sx.kind == Dependence.CONST and sw.kind == Dependence.HOM:
            if sw.axis != 0:
                return HOM_ANY_AXIS if not has_bias else OTHER
            axis = len(out) - 1 if name == "linear" else (1 if len(out) >= 3 else 0)
            return AbstractValue(_with_offset(has_bias), axis)
        if sw.kind == Dependence.CONST and sx.kind == Dependence.HOM and not has_bias:
            return HOM_ANY_AXIS
        return OTHER


def fx_analysis(model: nn.Module, args: tuple[Any, ...]) -> InvarianceReport:
    """Trace ``model`` with :mod:`torch.fx` on ``args`` and follow each parameter's abstract value
    to the outputs (see :mod:`normmatters.optim.invariance` for the rules).

    :raises ScaleInvarianceTraceError: the model cannot be traced or run when traced.
    """
    work = copy.deepcopy(model).train()
    tracer = _Tracer(args)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            graph = tracer.trace(work)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NotImplementedError...
        raise ScaleInvarianceTraceError(
            f"scale_invariant_parameters: torch.fx could not trace {type(model).__name__} "
            f"({type(exc).__name__}: {exc}). Use method='probe' to test each parameter "
            "numerically, or list the scale-invariant parameters by hand."
        ) from exc
    gm = torch.fx.GraphModule(tracer.root, graph)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            ShapeProp(gm).propagate(*args)
        except Exception as exc:
            raise ScaleInvarianceTraceError(
                f"scale_invariant_parameters: running the traced {type(model).__name__} on "
                f"example_input failed ({type(exc).__name__}: {exc})"
            ) from exc
    modules = dict(gm.named_modules())
    analysis = _Analysis(gm, modules)
    invariant: dict[str, ScaleInvariantParam] = {}
    opaque: list[str] = []
    orig = dict(model.named_parameters())
    for name, p in orig.items():
        ok, sites, cdim, is_opaque, used = analysis.run(name)
        if is_opaque:
            opaque.append(name)
        if not ok:
            continue
        invariant[name] = ScaleInvariantParam(
            name=name, param=p, channel_dim=cdim, groups=_combine_groups(p, cdim, sites),
            norms=tuple(dict.fromkeys(s.name for s in sites)),
        )
    return InvarianceReport(invariant=invariant, opaque=opaque, method="fx")


def _combine_groups(p: Tensor, channel_dim: int, sites: list[_Site]) -> int:
    """Coarsest partition of the output channels that every absorbing norm allows."""
    if p.dim() == 0:
        return 1
    n = p.shape[channel_dim]
    block = 1
    for s in sites:
        if s.granularity == "tensor":
            return 1
        if s.granularity == "group":
            if (s.channels is not None and s.channels != n) or n % s.num_groups:
                return 1
            block = math.lcm(block, n // s.num_groups)
    return n // block if n % block == 0 else 1
