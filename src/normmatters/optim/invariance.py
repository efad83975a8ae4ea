"""Finding the scale-invariant weights of a model (claim C1, SPEC §4).

A weight ``w`` whose output reaches a normalization only through operations that are
positively homogeneous in ``w`` (reshapes, permutations, ReLU, pooling, dropout, ...) is
*scale invariant*: for every ``c > 0``

.. math::

    L(c\\,w) = L(w), \\qquad \\nabla L(c\\,w) = \\nabla L(w) / c,

because a normalization divides by a dispersion that is homogeneous of degree one
(``BN(c·x) = BN(x)``, Hoffer et al. 2018, §2). Its norm then only sets the effective step
size ``η/‖w‖²``. The invariance is usually finer than the whole tensor: a convolution followed
by batch norm is invariant to scaling each *output channel* separately, a linear layer followed
by layer norm (over its features) only to scaling the whole matrix, one followed by group norm
to scaling each group of channels.

:func:`scale_invariant_parameters` finds these weights automatically. It traces the model with
:mod:`torch.fx`, propagates the shapes of ``example_input`` through the graph, and for each
parameter follows an abstract state through the graph:

* ``CONST``  — the value does not depend on the parameter (or is invariant to its scale);
* ``HOM(a)`` — positively homogeneous of degree one; scaling output channel ``i`` of the
  parameter scales only slice ``i`` along tensor axis ``a`` (``a=None``: only a scaling of the
  whole parameter is known to scale the value);
* ``AFF(a)`` — ``c·h + b`` with ``h`` in ``HOM(a)`` and an offset ``b`` that is constant along every
  axis but ``a`` (a convolution's bias): removed by a normalization that centres over axes
  that exclude ``a`` (batch norm), not by one that reduces over ``a`` (layer norm);
* ``OTHER``  — anything else.

A normalization maps ``HOM``/``AFF`` to ``CONST``; the parameter is scale invariant when the
model's outputs are ``CONST`` and at least one normalization absorbed it. Modules the analysis
does not understand (e.g. :class:`torch.nn.MultiheadAttention`, traced as a leaf) are treated
conservatively: their parameters are reported as *opaque* and never as invariant.

Models that :mod:`torch.fx` cannot trace (control flow on tensor values) are handled by
``method="probe"``: each parameter is checked numerically in float64 — scaling it (per channel,
then as a whole) must leave the training-mode output unchanged while a random perturbation must
change it. ``method="auto"`` (the default) traces and falls back to the probe with a logged
warning; ``method="fx"`` raises :class:`ScaleInvarianceTraceError` instead.

Invariance is a property of the *training-mode* function (batch statistics); in evaluation mode
a batch norm with running statistics is an affine map and nothing is invariant. The ``eps`` of a
normalization breaks the invariance by a relative ``O(eps/σ²)``, which is ignored here.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False),
    ...                             torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    >>> inv = scale_invariant_parameters(model, torch.randn(4, 3, 8, 8))
    >>> list(inv)
    ['0.weight']
    >>> inv['0.weight'].groups      # one group per output channel
    8
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = [
    "ScaleInvariantParam",
    "InvarianceReport",
    "ScaleInvarianceTraceError",
    "analyze_scale_invariance",
    "scale_invariant_parameters",
    "grouped_norms",
    "last_layer_parameters",
    "split_param_groups",
]

logger = logging.getLogger(__name__)


class ScaleInvarianceTraceError(RuntimeError):
    """Raised when :mod:`torch.fx` cannot trace a model (``method="fx"``)."""


@dataclass(frozen=True)
class ScaleInvariantParam:
    """A scale-invariant parameter and the granularity of its invariance.

    Args:
        name: qualified parameter name, as in ``model.named_parameters()``.
        param: the parameter itself.
        channel_dim: the parameter's output-channel dimension (0 for convolutions and linear
            layers, 1 for transposed convolutions and embeddings).
        groups: number of blocks along ``channel_dim`` that are *separately* scale invariant:
            the number of output channels after batch norm, the number of groups after group
            norm, 1 when only the whole tensor is invariant (layer norm).
        norms: names of the normalizations (modules or functions) that absorb its scale.
    """

    name: str
    param: Tensor = field(repr=False, compare=False)
    channel_dim: int
    groups: int
    norms: tuple[str, ...] = ()

    def group_norms(self, tensor: Tensor | None = None) -> Tensor:
        """‖w_g‖₂ for each of the ``groups`` blocks of ``tensor`` (default: the parameter)."""
        t = self.param if tensor is None else tensor
        return grouped_norms(t.detach(), self.channel_dim, self.groups)

    def expand(self, per_group: Tensor) -> Tensor:
        """Broadcastable view of a per-group tensor ``(groups,)`` against the parameter."""
        return _expand_groups(per_group, self.param, self.channel_dim, self.groups)


@dataclass
class InvarianceReport:
    """Result of :func:`analyze_scale_invariance`.

    Attributes:
        invariant: scale-invariant parameters by name, in ``named_parameters()`` order.
        opaque: parameters inside modules the analysis cannot see into (never invariant).
        method: ``"fx"`` or ``"probe"`` — what produced the answer.
        trace_error: the tracing error when the probe was used as a fallback.
    """

    invariant: dict[str, ScaleInvariantParam]
    opaque: list[str]
    method: str
    trace_error: str | None = None


# ----------------------------------------------------------------------------------------------
# Grouping helpers shared by the tracker, the LR correction and the norm schedules.


def _channels_first(t: Tensor, channel_dim: int) -> Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


def grouped_norms(t: Tensor, channel_dim: int = 0, groups: int | None = None) -> Tensor:
    """Euclidean norms of ``groups`` contiguous blocks of channels along ``channel_dim``.

    ``groups=None`` means one group per channel (per-channel norms ‖w_i‖₂).
    """
    rows = _channels_first(t, channel_dim)
    n = rows.shape[0]
    g = n if groups is None else groups
    if g <= 0 or n % g:
        raise ValueError(f"grouped_norms: {n} channels cannot be split into groups={g}")
    return torch.linalg.vector_norm(rows.reshape(g, -1), dim=1)


def _expand_groups(per_group: Tensor, like: Tensor, channel_dim: int, groups: int) -> Tensor:
    if like.dim() == 0:
        return per_group.reshape(())
    n = like.shape[channel_dim]
    per_channel = per_group.repeat_interleave(n // groups)
    shape = [1] * like.dim()
    shape[channel_dim] = n
    return per_channel.reshape(shape)


# ----------------------------------------------------------------------------------------------
# Abstract states.

_CONST, _HOM, _AFF, _OTHER = 0, 1, 2, 3


@dataclass(frozen=True)
class _S:
    kind: int
    axis: int | None = None
    per: int = 1  # output channels per index along `axis` (> 1 after a split, e.g. into heads)


CONST = _S(_CONST)
OTHER = _S(_OTHER)


def _join(states: Iterable[_S]) -> _S:
    """State of a container (tuple/list) of values: the worst of its members."""
    out = CONST
    for s in states:
        if s.kind == _OTHER:
            return OTHER
        if s.kind != _CONST:
            out = s if out.kind == _CONST or out == s else _S(max(out.kind, s.kind), None)
            if out.kind == _AFF and out.axis is None:
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
        fns: list[Callable[..., Any]] = []
        try:  # the library's own functional norms, when present
            from normmatters import functional as nmF

            fns = [getattr(nmF, n) for n in _FUNCTIONAL_NORMS if hasattr(nmF, n)]
        except Exception:  # pragma: no cover - the functional package is optional here
            fns = []
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


def _shape(node: Any) -> tuple[int, ...] | None:
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


def _const_is_per_axis(const_shape: tuple[int, ...] | None, out_ndim: int, axis: int) -> bool:
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
    def _source_state(self, node: torch.fx.Node, pname: str) -> tuple[_S, int, bool] | None:
        """State of ``node`` if it *introduces* the parameter, its channel dim, and whether the
        owning module is opaque. ``None`` when the node does not own the parameter."""
        if node.op == "get_attr" and node.target == pname:
            return _S(_HOM, 0), 0, False
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
        if any(s.kind != _CONST for s in ins):
            return OTHER, 0, False
        if attr == "weight" and ndim:
            bias = getattr(m, "bias", None)
            if isinstance(m, nn.Linear):
                return _S(_AFF if bias is not None else _HOM, ndim - 1), 0, False
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                if m.groups == 1 and ndim >= 2:
                    axis = 1 if ndim == len(m.kernel_size) + 2 else 0
                    return _S(_AFF if bias is not None else _HOM, axis), 1, False
                return (OTHER if bias is not None else _S(_HOM, None)), 1, False
            if isinstance(m, nn.modules.conv._ConvNd):
                axis = 1 if ndim == len(m.kernel_size) + 2 else 0
                return _S(_AFF if bias is not None else _HOM, axis), 0, False
            if isinstance(m, nn.Embedding):
                if m.max_norm is not None:  # renormalizes rows: not linear in the table
                    return OTHER, 1, False
                return _S(_HOM, ndim - 1), 1, False
        # Parameters of modules the analysis does not model, or reached through a
        # parametrization (weight norm's `parametrizations.weight.original`), are opaque.
        known = _understood_leaf(m) and attr in ("weight", "bias")
        return OTHER, 0, not known

    # -- propagation --------------------------------------------------------------------------
    def state_of(self, a: Any) -> _S:
        if isinstance(a, torch.fx.Node):
            return self.states.get(a, CONST)
        if isinstance(a, (list, tuple)):
            return _join(self.state_of(x) for x in a)
        if isinstance(a, dict):
            return _join(self.state_of(x) for x in a.values())
        return CONST

    def run(self, pname: str) -> tuple[bool, list[_Site], int, bool, bool]:
        """Returns (invariant, sites, channel_dim, opaque, used)."""
        self.states: dict[torch.fx.Node, _S] = {}
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
                return out.kind == _CONST and bool(sites), sites, channel_dim, opaque, used
            if node.op in ("placeholder", "get_attr"):
                continue
            ins = [self.state_of(a) for a in node.args] + [
                self.state_of(v) for v in node.kwargs.values()
            ]
            if all(s.kind == _CONST for s in ins):
                continue  # independent of the parameter
            self.states[node] = self._transfer(node, sites)
        return False, sites, channel_dim, opaque, used

    def _transfer(self, node: torch.fx.Node, sites: list[_Site]) -> _S:
        if node.op == "call_module":
            m = self.modules[node.target]
            x = node.args[0] if node.args else None
            sx = self.state_of(x)
            if any(self.state_of(a).kind != _CONST for a in node.args[1:]) or any(
                self.state_of(v).kind != _CONST for v in node.kwargs.values()
            ):
                return OTHER
            nk = _norm_kind(m)
            if nk is not None:
                return self._norm(sx, nk, _shape(x), str(node.target), sites)
            if _is_mean_only_bn(m):
                # Subtracting the per-channel mean keeps per-channel homogeneity along the
                # channel axis and removes a per-channel offset, then a bias is added back.
                if sx.kind in (_HOM, _AFF) and sx.axis == 1:
                    return _S(_AFF if getattr(m, "bias", None) is not None else _HOM, 1)
                return OTHER
            if isinstance(m, _ELEMENTWISE_MODULES):
                if isinstance(m, nn.Identity):
                    return sx
                return sx if sx.kind == _HOM else OTHER
            if isinstance(m, tuple(_POOL_MODULES)):
                return self._pool(sx, _POOL_MODULES[type(m)], _shape(x))
            if isinstance(m, _RESHAPE_MODULES):
                return self._reshape(sx, _shape(x), _shape(node))
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                # A fixed linear map of a homogeneous signal: homogeneous, channels mixed.
                if sx.kind == _HOM and getattr(m, "bias", None) is None:
                    return _S(_HOM, None)
                return OTHER
            return OTHER
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        args = list(node.args)
        x = args[0] if args else None
        sx = self.state_of(x)
        if name in _FUNCTIONAL_NORMS:
            return self._functional_norm(node, name, sites)
        if name in _ELEMENTWISE_FNS:
            if any(self.state_of(a).kind != _CONST for a in args[1:]):
                return OTHER
            return sx if sx.kind == _HOM or name in {"clone", "contiguous", "detach"} else OTHER
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
            return _S(_HOM, None) if sx.kind == _HOM else OTHER
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
    def _norm(self, sx: _S, nk: _NormKind, in_shape: tuple[int, ...] | None, name: str,
              sites: list[_Site]) -> _S:
        if sx.kind == _CONST:
            return CONST
        if sx.kind == _OTHER or in_shape is None:
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
                    if sx.kind == _AFF or not nk.centers:
                        return OTHER
                    sites.append(_Site(name, "group", nk.num_groups, ch))
                    return CONST
            else:
                reduced_axis = True
                ch = None
        if sx.kind == _AFF:
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

    def _functional_norm(self, node: torch.fx.Node, name: str, sites: list[_Site]) -> _S:
        args = list(node.args)
        x = args[0] if args else node.kwargs.get("input")
        sx = self.state_of(x)
        others = [a for a in args[1:]] + [v for k, v in node.kwargs.items() if k != "input"]
        if any(self.state_of(a).kind != _CONST for a in others):
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
    def _pool(sx: _S, k: int, in_shape: tuple[int, ...] | None) -> _S:
        if sx.kind != _HOM:
            # A pooled offset stays per-channel only without padding effects: be conservative.
            return CONST if sx.kind == _CONST else OTHER
        if in_shape is None or sx.axis is None:
            return _S(_HOM, None)
        return sx if sx.axis < len(in_shape) - k else _S(_HOM, None)

    @staticmethod
    def _reshape(sx: _S, in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...] | None) -> _S:
        if sx.kind not in (_HOM, _AFF):
            return sx
        if sx.axis is None or in_shape is None or out_shape is None:
            return _S(_HOM, None) if sx.kind == _HOM else OTHER
        found = _reshape_axis(in_shape, out_shape, sx.axis)
        if found is None or (found[1] != 1 and sx.kind == _AFF):
            return _S(_HOM, None) if sx.kind == _HOM else OTHER
        return _S(sx.kind, found[0], sx.per * found[1])

    @staticmethod
    def _permute(node: torch.fx.Node, name: str, sx: _S, in_shape: tuple[int, ...] | None) -> _S:
        if sx.kind not in (_HOM, _AFF) or sx.axis is None or in_shape is None:
            return sx if sx.kind != _AFF else OTHER
        ndim = len(in_shape)
        a = sx.axis
        args = list(node.args[1:])
        try:
            if name == "permute":
                dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
                dims = [int(d) % ndim for d in dims]
                return _S(sx.kind, dims.index(a), sx.per)
            if name == "t":
                return _S(sx.kind, {0: 1, 1: 0}.get(a, a) if ndim == 2 else a, sx.per)
            d0, d1 = (int(args[0]) % ndim, int(args[1]) % ndim)
            return _S(sx.kind, d1 if a == d0 else d0 if a == d1 else a, sx.per)
        except (TypeError, ValueError, IndexError):
            return _S(_HOM, None) if sx.kind == _HOM else OTHER

    def _reduce(self, node: torch.fx.Node, sx: _S, in_shape: tuple[int, ...] | None) -> _S:
        if sx.kind not in (_HOM, _AFF) or in_shape is None:
            return OTHER
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        ndim = len(in_shape)
        red = _norm_dims(dims, ndim)
        if red is None or sx.axis is None or sx.axis in red:
            return _S(_HOM, None) if sx.kind == _HOM else OTHER
        if keep:
            return sx
        return _S(sx.kind, sx.axis - sum(1 for d in red if d < sx.axis), sx.per)

    def _add(self, node: torch.fx.Node, args: list[Any]) -> _S:
        if len(args) < 2:
            return OTHER
        a, b = args[0], args[1]
        sa, sb = self.state_of(a), self.state_of(b)
        out = _shape(node)
        if out is None:
            return OTHER
        if sa.kind == _CONST:
            a, b, sa, sb = b, a, sb, sa
        if sa.kind == _OTHER or sb.kind == _OTHER:
            return OTHER
        if sb.kind == _CONST:
            # A constant offset survives only if it is constant along every axis but the
            # channel axis (a bias), and only if `a` covers the whole result.
            if sa.axis is None or _shape(a) != out:
                return OTHER
            if _const_is_per_axis(_shape(b), len(out), sa.axis):
                return _S(_AFF, sa.axis, sa.per) if sa.per == 1 else OTHER
            return OTHER
        # Both depend on the parameter: sums of homogeneous terms along the same axis.
        if _shape(a) != out or _shape(b) != out:
            return _S(_HOM, None) if sa.kind == sb.kind == _HOM else OTHER
        same = (sa.axis, sa.per) == (sb.axis, sb.per)
        kind = max(sa.kind, sb.kind)
        if kind == _AFF and not same:
            return OTHER
        return _S(kind, sa.axis, sa.per) if same else _S(kind, None)

    def _mul(self, node: torch.fx.Node, name: str, args: list[Any]) -> _S:
        if len(args) < 2:
            return OTHER
        a, b = args[0], args[1]
        sa, sb = self.state_of(a), self.state_of(b)
        out = _shape(node)
        if sb.kind != _CONST:
            if name in ("truediv", "div", "itruediv", "div_") or sa.kind != _CONST:
                return OTHER  # c / f(w) or a product of two parameter-dependent factors
            a, b, sa, sb = b, a, sb, sa
        if sa.kind not in (_HOM, _AFF) or out is None:
            return OTHER
        if sa.axis is None or _shape(a) != out:
            return _S(_HOM, None) if sa.kind == _HOM else OTHER
        if sa.kind == _AFF and not _const_is_per_axis(_shape(b), len(out), sa.axis):
            return OTHER
        return sa

    def _functional_linear(self, node: torch.fx.Node, name: str, args: list[Any]) -> _S:
        x = args[0] if args else node.kwargs.get("input")
        w = args[1] if len(args) > 1 else node.kwargs.get("weight")
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        sx, sw, sb = self.state_of(x), self.state_of(w), self.state_of(bias)
        out = _shape(node)
        if sb.kind != _CONST or out is None:
            return OTHER
        has_bias = bias is not None
        if sx.kind == _CONST and sw.kind == _HOM:
            if sw.axis != 0:
                return _S(_HOM, None) if not has_bias else OTHER
            axis = len(out) - 1 if name == "linear" else (1 if len(out) >= 3 else 0)
            return _S(_AFF if has_bias else _HOM, axis)
        if sw.kind == _CONST and sx.kind == _HOM and not has_bias:
            return _S(_HOM, None)
        return OTHER


# ----------------------------------------------------------------------------------------------
# Public API.


def _as_args(example_input: Any) -> tuple[Any, ...]:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError(
        "scale_invariant_parameters: example_input must be a Tensor or a tuple of positional "
        f"inputs, got {type(example_input).__name__}"
    )


def _fx_analysis(model: nn.Module, args: tuple[Any, ...]) -> InvarianceReport:
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


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def _probe_analysis(model: nn.Module, args: tuple[Any, ...], rtol: float) -> InvarianceReport:
    work = copy.deepcopy(model).train().double()
    for m in work.modules():  # remove the eps that breaks exact invariance
        if isinstance(getattr(m, "eps", None), float) and m.eps > 0:
            m.eps = 1e-30
    dargs = tuple(a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    gen = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in work.state_dict().items()}
    # Test at a generic point, not at the initialization: a zero bias (batch norm's beta)
    # would make its layer's gain look scale invariant.
    for name, _ in work.named_parameters():
        t = state[name]
        spread = float(t.abs().mean()) if bool(t.abs().max() > 0) else 0.1
        state[name] = t + 0.3 * spread * torch.randn(t.shape, generator=gen, dtype=t.dtype)

    def forward() -> list[Tensor]:
        work.load_state_dict(state)  # batch-norm running statistics must not drift
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return [o.detach().clone() for o in _flat_outputs(work(*dargs))]

    def close(a: list[Tensor], b: list[Tensor]) -> bool:
        return all(
            torch.allclose(x, y, rtol=rtol, atol=rtol * max(float(x.abs().max()), 1e-30))
            for x, y in zip(a, b)
        )

    with torch.no_grad():
        ref = forward()
        invariant: dict[str, ScaleInvariantParam] = {}
        orig = dict(model.named_parameters())
        for name in dict(work.named_parameters()):
            keep = state[name].clone()
            noise = torch.randn(keep.shape, generator=gen, dtype=keep.dtype)
            state[name] = keep + 0.5 * noise * keep.abs().mean()
            relevant = not close(forward(), ref)
            found: int | None = None
            if relevant and keep.dim() >= 1 and keep.shape[0] > 1:
                # The finest partition of the output channels (dim 0) into equal blocks that
                # may be scaled separately: channels, then groups (group norm, heads).
                n = keep.shape[0]
                for g in [d for d in range(n, 1, -1) if n % d == 0]:
                    f = torch.rand(g, generator=gen, dtype=keep.dtype) * 1.5 + 0.5
                    state[name] = keep * _expand_groups(f, keep, 0, g)
                    if close(forward(), ref):
                        found = g
                        break
            if relevant:
                if found is None:
                    state[name] = keep * 2.5
                    if close(forward(), ref):
                        found = 1
            state[name] = keep
            if found is not None:
                invariant[name] = ScaleInvariantParam(
                    name=name, param=orig[name], channel_dim=0, groups=found, norms=()
                )
    return InvarianceReport(invariant=invariant, opaque=[], method="probe")


def analyze_scale_invariance(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...],
    *,
    method: str = "auto",
    rtol: float = 1e-7,
) -> InvarianceReport:
    """Find the scale-invariant parameters of ``model`` and report how they were found.

    Args:
        model: the network; it is copied, never modified.
        example_input: a tensor (or a tuple of positional inputs) with a batch of at least two
            samples, used to propagate shapes (``"fx"``) or to evaluate the model (``"probe"``).
        method: ``"fx"`` (trace; raise :class:`ScaleInvarianceTraceError` if tracing fails),
            ``"probe"`` (numerical test of every parameter in float64) or ``"auto"`` (trace, and
            fall back to the probe with a logged warning).
        rtol: relative tolerance of the probe.

    Returns:
        :class:`InvarianceReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"scale_invariant_parameters: model must be an nn.Module, got {type(model).__name__}"
        )
    if method not in ("auto", "fx", "probe"):
        raise ValueError(
            f"scale_invariant_parameters: method must be 'auto', 'fx' or 'probe', got {method!r}"
        )
    args = _as_args(example_input)
    if method == "probe":
        return _probe_analysis(model, args, rtol)
    try:
        return _fx_analysis(model, args)
    except ScaleInvarianceTraceError as exc:
        if method == "fx":
            raise
        logger.warning("%s; falling back to the numerical probe", exc)
        report = _probe_analysis(model, args, rtol)
        report.trace_error = str(exc)
        return report


def scale_invariant_parameters(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...],
    *,
    method: str = "auto",
) -> dict[str, ScaleInvariantParam]:
    """The scale-invariant parameters of ``model``, by name (see the module docstring).

    A parameter ``w`` is reported when ``L(c·w) = L(w)`` for every ``c > 0`` in training mode,
    because every path from ``w`` to the model's output passes a normalization through
    positively homogeneous operations. ``groups`` says how finely: each of ``groups`` blocks of
    output channels may be scaled separately.

    Args:
        model: the network (not modified).
        example_input: a batch the model accepts (tensor or tuple of positional inputs).
        method: ``"auto"`` (default), ``"fx"`` or ``"probe"``; see
            :func:`analyze_scale_invariance`.

    Returns:
        ``{name: ScaleInvariantParam}`` in ``model.named_parameters()`` order.
    """
    return analyze_scale_invariance(model, example_input, method=method).invariant


# ----------------------------------------------------------------------------------------------
# Parameter groups for WD-off / LR-correction / norm-schedule training.


def last_layer_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of the model's last ``Linear`` / convolution module (in
    registration order): the classifier, which keeps its weight decay in the paper's WD-off
    runs."""
    last: str | None = None
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            last = mname
    if last is None:
        return []
    prefix = f"{last}." if last else ""
    return [
        n for n, _ in model.named_parameters()
        if n.startswith(prefix) and "." not in n[len(prefix):]
    ]


def split_param_groups(
    model: nn.Module,
    invariant: Mapping[str, ScaleInvariantParam] | Iterable[str],
    *,
    weight_decay: float,
    decay: str = "all",
    last_layer: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups that keep the scale-invariant weights apart.

    The learning-rate correction and the norm schedules change the scale-invariant weights
    only, so they must sit in groups of their own. Each group carries ``"names"`` (parameter
    names) and ``"scale_invariant"`` (bool); torch optimizers keep such extra keys.

    Args:
        model: the network.
        invariant: the result of :func:`scale_invariant_parameters` (or parameter names).
        weight_decay: the weight-decay coefficient λ.
        decay: ``"all"`` — λ on every parameter (the paper's *WD on*); ``"invariant"`` — λ on
            the scale-invariant weights and the last layer, none on normalization gains, biases
            and the rest (the common "no decay on norm and bias" practice; it isolates the weight
            decay that acts only through the effective LR); ``"last_layer"`` — λ on the last
            layer only (*WD off*, the paper keeps it on the classifier, which no normalization
            follows); ``"none"`` — no weight decay at all.
        last_layer: names of the last layer's parameters; default
            :func:`last_layer_parameters`.

    Returns:
        A list of up to three groups: scale-invariant weights, last layer, the rest.
    """
    if decay not in ("all", "invariant", "last_layer", "none"):
        raise ValueError(
            "split_param_groups: decay must be 'all', 'invariant', 'last_layer' or 'none', got "
            f"{decay!r}"
        )
    inv = set(invariant.keys() if isinstance(invariant, Mapping) else invariant)
    params = dict(model.named_parameters())
    unknown = inv - set(params)
    if unknown:
        raise ValueError(f"split_param_groups: not parameters of the model: {sorted(unknown)}")
    last = set(last_layer_parameters(model) if last_layer is None else last_layer) - inv
    wd_inv = weight_decay if decay in ("all", "invariant") else 0.0
    wd_last = 0.0 if decay == "none" else weight_decay
    wd_rest = weight_decay if decay == "all" else 0.0
    buckets: list[tuple[list[str], float, bool]] = [
        ([n for n in params if n in inv], wd_inv, True),
        ([n for n in params if n in last], wd_last, False),
        ([n for n in params if n not in inv and n not in last], wd_rest, False),
    ]
    return [
        {"params": [params[n] for n in names], "names": names, "weight_decay": wd,
         "scale_invariant": flag}
        for names, wd, flag in buckets
        if names
    ]
