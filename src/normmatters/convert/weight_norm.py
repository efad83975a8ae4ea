r"""Turn a batch-norm network into its weight-normalized, BN-free counterpart (Hoffer et al. 2018, Sec. 5; C5).

The official BWN ResNet replaces every *convolution → batch norm* by *weight-normalized
convolution → mean-only batch norm*: the weight normalization takes over the scale control that
the batch norm's division by σ̂ provided, and the mean-only batch norm keeps the centring and the
learned per-channel bias (and, for BWN with a fixed ρ, the learned per-channel scale).

:func:`to_weight_normalized` does that to any model:

1. find every ``Linear`` / ``Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d`` whose output goes *only*
   into a batch norm (:class:`torch.nn.BatchNorm{1,2,3}d`, :class:`torch.nn.SyncBatchNorm`,
   :class:`normmatters.nn.LpBatchNorm{1,2,3}d`) with as many features as the layer has output
   channels (:func:`find_weight_norm_pairs`). The data flow is read from a :mod:`torch.fx`
   trace. Where the model cannot be traced (data-dependent control flow, ``range(x.dim())``,
   ...) and ``example_inputs`` are given, it is run once on them (in training mode, without
   gradients; buffers and the random state are restored afterwards) and the data flow is
   recorded: which module's output each batch norm receives, and whether any other operation
   reads it (``method="example"``, logged at INFO level). Without example inputs, an un-traceable module's children
   are traced one by one, and among the children of the un-traceable module itself a layer
   and the batch norm registered right after it are paired by registration order: exact for
   :class:`torch.nn.Sequential`, which runs its children in that order, a guess for any other
   module (``method="sequential"`` / ``"registration"``), logged as a warning.
2. apply :func:`~normmatters.parametrizations.bounded_weight_norm` (``kind="bwn"``),
   :func:`~normmatters.parametrizations.weight_norm` (``"wn"``) or
   :func:`~normmatters.parametrizations.lp_weight_norm` (``"lpwn"``) to the layer's weight;
3. replace the batch norm by :class:`normmatters.nn.MeanOnlyBatchNorm{1,2,3}d` with the same
   ``eps``, ``momentum``, ``affine``, ``track_running_stats``, device and dtype, its bias, running
   mean and ``num_batches_tracked`` copied, and the ``training`` flag kept.

Everything else is left alone. The scale: with ``scale=True`` the mean-only batch norm learns a
per-channel scale, initialised to the batch norm's γ. With ``scale=False`` γ is multiplied into
the layer's output channels (weight and bias) *before* the weight normalization is applied, so
WN's gain starts at :math:`|\gamma_i|\,\|w_i\|`; for BWN with a fixed ρ the per-channel
differences of γ cannot be represented and are dropped (a warning says so when γ ≠ 1). The default
``scale=None`` follows the official code: a scale for BWN with ``gain="fixed"`` (its weight has no
per-channel gain of its own), none for WN, Lp WN and BWN with ``gain="bounded"`` (their gain g is
already a per-channel scale).

Example::

    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
    >>> net = to_weight_normalized(net, kind="bwn")
    >>> type(net[1]).__name__
    'MeanOnlyBatchNorm2d'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import Tracer
from torch.overrides import TorchFunctionMode

from ..nn.meanbn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d
from ..parametrizations import (
    bounded_weight_norm,
    is_weight_normalized,
    lp_weight_norm,
    weight_norm,
)

from ..functional import normalize_p
from ..nn import BatchNormBase, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, SyncLpBatchNorm
from .recognise import NormSpec, recognise, warn_left

__all__ = ["to_weight_normalized", "find_weight_norm_pairs", "WeightNormPair"]

logger = logging.getLogger(__name__)

_WEIGHT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
# Converted by their exact class; any other batch-norm-like module only if it computes what a
# batch norm computes (a probe, normmatters.convert.recognise), else left with a warning.
_EXACT_BN: dict[type, int | None] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: None,
                                     LpBatchNorm1d: 1, LpBatchNorm2d: 2, LpBatchNorm3d: 3, SyncLpBatchNorm: None}
_BN_LIKE = (nn.modules.batchnorm._BatchNorm, BatchNormBase)
_SEEN: dict[int, tuple[nn.Module, NormSpec | str | None]] = {}
_MEAN_BN = {1: MeanOnlyBatchNorm1d, 2: MeanOnlyBatchNorm2d, 3: MeanOnlyBatchNorm3d}
_KINDS = ("bwn", "wn", "lpwn")


@dataclass(frozen=True)
class WeightNormPair:
    """A weight layer whose output feeds a batch norm.

    :ivar weight: qualified name of the ``Linear`` / conv layer in the model.
    :ivar norm: qualified name of the batch norm that consumes its output.
    :ivar method: how the pair was found: ``"fx"`` (a torch.fx graph), ``"example"`` (the data
        flow of one run on example inputs), ``"sequential"`` (registration order inside an
        ``nn.Sequential`` that torch.fx could not trace) or ``"registration"`` (registration
        order of the children of another un-traceable module: a guess).
    """

    weight: str
    norm: str
    method: Literal["fx", "example", "sequential", "registration"]


# ----------------------------------------------------------------------------------------
# finding the pairs
# ----------------------------------------------------------------------------------------


def _is_lazy(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.lazy.LazyModuleMixin)


def _is_weight(m: nn.Module) -> bool:
    return isinstance(m, _WEIGHT_TYPES) and not _is_lazy(m)


def _bn_spec(m: nn.Module) -> NormSpec | str | None:
    got = _SEEN.get(id(m))
    if got is None or got[0] is not m:
        got = (m, recognise(m) if isinstance(m, _BN_LIKE) and type(m) not in _EXACT_BN and not _is_lazy(m) else None)
        _SEEN[id(m)] = got
    return got[1]


def _is_bn(m: nn.Module) -> bool:
    if _is_lazy(m):
        return False
    if type(m) in _EXACT_BN:
        return True
    spec = _bn_spec(m)
    return isinstance(spec, NormSpec) and spec.kind == "batch"


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _compatible(w: nn.Module, bn: nn.Module) -> bool:
    return _is_weight(w) and _is_bn(bn) and _out_channels(w) == getattr(bn, "num_features", None)


class _LeafTracer(Tracer):
    """Keep weight layers and norms opaque so the graph shows which module feeds which."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_weight(m) or _is_bn(m) or isinstance(m, tuple(_MEAN_BN.values())):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _pairs_from_graph(graph: torch.fx.Graph, root: nn.Module, prefix: str) -> list[WeightNormPair]:
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        w, bn = root.get_submodule(src.target), root.get_submodule(node.target)
        if not _compatible(w, bn):
            continue
        # the layer's output must go only into this batch norm, and neither module may be
        # called twice: otherwise another consumer would lose its normalization
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            logger.info("to_weight_normalized: %s%s feeds %s%s but is used elsewhere too; left alone",
                        prefix, src.target, prefix, node.target)
            continue
        pairs.append(WeightNormPair(prefix + src.target, prefix + node.target, "fx"))
    return pairs


def _find(module: nn.Module, prefix: str, out: list[WeightNormPair]) -> None:
    if _is_weight(module) or _is_bn(module):
        return
    try:
        graph = _LeafTracer().trace(module)
    except Exception as err:  # any failure of symbolic tracing: fall back, never give up
        name = prefix[:-1] or "the model"
        seq = isinstance(module, nn.Sequential)
        children = list(module.named_children())
        found = [
            WeightNormPair(prefix + n1, prefix + n2, "sequential" if seq else "registration")
            for (n1, m1), (n2, m2) in zip(children, children[1:]) if _compatible(m1, m2)
        ]
        if found or seq:
            logger.warning(
                "to_weight_normalized: torch.fx could not trace %s (%s: %s); pairing each layer "
                "with the batch norm registered right after it among its children%s: %s",
                name, type(err).__name__, err,
                "" if seq else " (a guess for a module that is not nn.Sequential: pass "
                "example_inputs to read the data flow instead)",
                ", ".join(f"{p.weight} -> {p.norm}" for p in found) or "none")
        else:
            logger.info("to_weight_normalized: torch.fx could not trace %s (%s: %s); tracing its "
                        "children one by one", name, type(err).__name__, err)
        out.extend(found)
        for child_name, child in children:
            _find(child, f"{prefix}{child_name}.", out)
        return
    out.extend(_pairs_from_graph(graph, module, prefix))


# reading tensor metadata is not a use of the values
_METADATA_OPS = {"dim", "size", "__get__", "numel", "ndimension", "stride", "is_contiguous",
                 "element_size", "nelement", "get_device", "data_ptr", "__len__"}


class _FlowRecorder(TorchFunctionMode):
    """Counts, for each tracked tensor, the operations outside layers and norms that read it."""

    def __init__(self) -> None:
        super().__init__()
        self.produced: dict[int, str] = {}  # id(output tensor) -> layer name
        self.keep: list[torch.Tensor] = []  # keep outputs alive so their ids are not reused
        self.other_uses: dict[str, int] = {}
        self.depth = 0  # > 0 while inside a layer's or a norm's own forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and getattr(func, "__name__", "") not in _METADATA_OPS:
            for t in _tensors((args, kwargs)):
                name = self.produced.get(id(t))
                if name is not None:
                    self.other_uses[name] = self.other_uses.get(name, 0) + 1
        return func(*args, **kwargs)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _pairs_from_example(model: nn.Module, example_inputs: tuple) -> list[WeightNormPair]:
    """Run ``model`` once and read which layer's output each batch norm receives."""
    rec = _FlowRecorder()
    calls: dict[str, int] = {}
    fed: list[tuple[str, str]] = []  # (layer, norm)
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def pre(m, args):
        name = names[id(m)]
        calls[name] = calls.get(name, 0) + 1
        if _is_bn(m) and args and isinstance(args[0], torch.Tensor) and id(args[0]) in rec.produced:
            fed.append((rec.produced[id(args[0])], name))
        rec.depth += 1

    def post(m, args, output):
        rec.depth -= 1
        if _is_weight(m) and isinstance(output, torch.Tensor):
            rec.produced[id(output)] = names[id(m)]
            rec.keep.append(output)

    for m in model.modules():
        if _is_weight(m) or _is_bn(m):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    modes = {m: m.training for m in model.modules()}
    devices = sorted({b.device.index for b in buffers if b.device.type == "cuda"})
    ref = next(iter(list(model.parameters()) + buffers), None)
    if ref is not None:  # example inputs made on the CPU for a model on an accelerator
        example_inputs = tuple(a.to(ref.device) if isinstance(a, torch.Tensor) else a for a in example_inputs)
    try:
        model.train()  # the data flow of training, the mode the conversion is for
        with torch.random.fork_rng(devices=devices), torch.no_grad(), rec:
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():  # undo running-statistics updates
            for b, old in zip(buffers, saved):
                b.copy_(old)
    pairs = []
    for layer, norm in fed:
        w, bn = model.get_submodule(layer), model.get_submodule(norm)
        if not _compatible(w, bn):
            continue
        if calls.get(layer) != 1 or calls.get(norm) != 1 or rec.other_uses.get(layer, 0) or \
                sum(1 for lyr, _ in fed if lyr == layer) != 1:
            logger.info("to_weight_normalized: %s feeds %s but is used elsewhere too; left alone", layer, norm)
            continue
        pairs.append(WeightNormPair(layer, norm, "example"))
    return pairs


def find_weight_norm_pairs(model: nn.Module, example_inputs: Any = None) -> list[WeightNormPair]:
    """Find every ``Linear``/conv layer whose output goes only into a batch norm.

    The data flow comes from a :mod:`torch.fx` trace of ``model``. If that fails and
    ``example_inputs`` (a tensor or a tuple of positional arguments) are given, the model is run
    once on them and the data flow recorded instead. Otherwise, for a part that cannot be traced,
    its children are traced one by one, and among the children of the un-traceable part a layer
    and the batch norm registered right after it are paired (exact inside ``nn.Sequential``, a
    guess elsewhere; logged as a warning). The batch norm must have as many features as the layer
    has output channels; a layer whose output is also used elsewhere, or a module called twice,
    is skipped.

    Returns:
        the pairs (:class:`WeightNormPair`), in the order found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_weight_norm_pairs: expected an nn.Module, got {type(model).__name__}")
    out: list[WeightNormPair] = []
    if example_inputs is not None:
        try:
            _LeafTracer().trace(model)
        except Exception as err:
            # exact, not a guess: information, not a warning
            logger.info("to_weight_normalized: torch.fx could not trace the model (%s: %s); reading "
                        "the data flow from one run on the example inputs", type(err).__name__, err)
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            return _pairs_from_example(model, args)
    _find(model, "", out)
    # a module reachable by two names appears once
    seen, unique = set(), []
    for pair in out:
        key = (pair.weight, pair.norm)
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    return unique


# ----------------------------------------------------------------------------------------
# converting
# ----------------------------------------------------------------------------------------


def _scale_output_channels(layer: nn.Module, gamma: torch.Tensor) -> None:
    """Multiply the layer's output channels (weight and bias) by gamma, in place."""
    w = layer.weight
    with torch.no_grad():
        gamma = gamma.detach().to(w.dtype)
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            # weight (in, out/groups, *k): output channel (group, j)
            g = layer.groups
            view = w.unflatten(0, (g, -1))
            view.mul_(gamma.view(g, 1, -1, *([1] * (w.dim() - 2))))
        else:
            w.mul_(gamma.view(-1, *([1] * (w.dim() - 1))))
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(gamma.to(layer.bias.dtype))


def _mean_only_from(bn: nn.Module, layer: nn.Module, scale: bool) -> nn.Module:
    nd = _EXACT_BN.get(type(bn)) if type(bn) in _EXACT_BN else getattr(_bn_spec(bn), "dims", None)
    if nd is None:  # SyncBatchNorm and friends: take the dimensionality from the layer
        nd = 1 if isinstance(layer, nn.Linear) else len(layer.kernel_size)
    ref = next(iter(list(bn.parameters()) + [b for b in bn.buffers() if b.is_floating_point()]), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    affine = bool(getattr(bn, "affine", True))
    has_bias = affine and getattr(bn, "bias", None) is not None
    new = _MEAN_BN[nd](
        bn.num_features, bn.eps, bn.momentum, affine, bn.track_running_stats, **factory,
        bias=has_bias, scale=scale and affine,
    )
    with torch.no_grad():
        if new.bias is not None and bn.bias is not None:
            new.bias.copy_(bn.bias)
            new.bias.requires_grad_(bn.bias.requires_grad)
        if new.weight is not None and getattr(bn, "weight", None) is not None:
            new.weight.copy_(bn.weight)
            new.weight.requires_grad_(bn.weight.requires_grad)
        if new.running_mean is not None and getattr(bn, "running_mean", None) is not None:
            new.running_mean.copy_(bn.running_mean)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _set_submodule(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_weight_normalized(
    model: nn.Module,
    kind: Literal["bwn", "wn", "lpwn"] = "bwn",
    p: float | str = 2,
    *,
    gain: Literal["fixed", "bounded"] = "fixed",
    scale: bool | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    r"""Convert every *layer → batch norm* of ``model`` into *weight-normalized layer → mean-only BN*.

    The BN-free form of the official BWN ResNet (Hoffer et al. 2018, Sec. 5; C5): for each ``Linear`` / conv layer
    whose output goes only into a batch norm (see :func:`find_weight_norm_pairs`),

    * ``kind="bwn"``: :math:`w_i = \rho\, v_i/\|v_i\|_p`, :math:`\rho = \|V_0\|_p / N^{1/p}`
      (``gain="fixed"``) or the official code's bounded learned gain (``gain="bounded"``), via
      :func:`~normmatters.parametrizations.bounded_weight_norm`;
    * ``kind="wn"``: :math:`w_i = g_i\, v_i/\|v_i\|_2` (Salimans & Kingma 2016), ``p`` must be 2;
    * ``kind="lpwn"``: :math:`w_i = g_i\, v_i/\|v_i\|_p`;

    and the batch norm becomes a :class:`~normmatters.nn.MeanOnlyBatchNorm2d` (1d/3d alike)
    carrying its bias, running mean and, if ``scale``, its γ as a learned per-channel scale.
    Everything else is left alone. The model is changed in place and returned.

    Args:
        model: the network (its weights are used as :math:`V_0`).
        kind: ``"bwn"``, ``"wn"`` or ``"lpwn"``.
        p: the weight norm's p: 1, 2 or ``float("inf")``.
        gain: for ``kind="bwn"``: ``"fixed"`` or ``"bounded"``.
        scale: whether the mean-only batch norm learns a per-channel scale; ``None`` means
            ``True`` for BWN with ``gain="fixed"`` and ``False`` otherwise. Without a scale, γ is
            multiplied into the layer's output channels before normalizing.
        example_inputs: a tensor (or tuple of positional arguments) to run the model on once
            when :mod:`torch.fx` cannot trace it, so that the data flow is read rather than
            guessed from registration order (see :func:`find_weight_norm_pairs`).

    Returns:
        ``model``.

    Raises:
        ValueError: unknown ``kind`` or ``gain``, unsupported ``p``, ``p != 2`` with
            ``kind="wn"``, or a layer that is already weight-normalized.

    Example::

        >>> net = to_weight_normalized(resnet20(), kind="bwn")
    """
    func = "to_weight_normalized"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{func}: expected an nn.Module, got {type(model).__name__}")
    if kind not in _KINDS:
        raise ValueError(f"{func}: kind must be one of {_KINDS}, got {kind!r}")
    try:
        pf = normalize_p(p)
    except ValueError as exc:
        raise ValueError(f"{func}: {exc}") from None
    if kind == "wn" and pf != 2.0:
        raise ValueError(f"{func}: kind='wn' is L2 weight normalization; got p={p!r} (use kind='lpwn')")
    if gain not in ("fixed", "bounded"):
        raise ValueError(f"{func}: gain must be 'fixed' or 'bounded', got {gain!r}")
    if gain != "fixed" and kind != "bwn":
        raise ValueError(f"{func}: gain={gain!r} applies to kind='bwn' only, got kind={kind!r}")
    if scale is None:
        scale = kind == "bwn" and gain == "fixed"

    _SEEN.clear()
    pairs = find_weight_norm_pairs(model, example_inputs)
    for name, m in model.named_modules():
        if isinstance(m, _BN_LIKE) and not _is_bn(m):
            why = _bn_spec(m)
            warn_left(func, name, m, why if isinstance(why, str) else "it is not a batch norm normmatters "
                                                                      "can replace by a mean-only batch norm")
    for pair in pairs:
        layer = model.get_submodule(pair.weight)
        if is_weight_normalized(layer):
            raise ValueError(f"{func}: {pair.weight} ({type(layer).__name__}) is already weight-normalized")
    for pair in pairs:
        layer, bn = model.get_submodule(pair.weight), model.get_submodule(pair.norm)
        gamma = getattr(bn, "weight", None) if getattr(bn, "affine", True) else None
        if not scale and gamma is not None:
            if kind == "bwn" and gain == "fixed" and not torch.allclose(gamma, gamma.flatten()[0].expand_as(gamma)):
                logger.warning(
                    "%s: %s has per-channel scales that BWN with a fixed rho and no scale cannot "
                    "keep; they are dropped (pass scale=True to keep them)", func, pair.norm)
            _scale_output_channels(layer, gamma)
        if kind == "bwn":
            bounded_weight_norm(layer, p=pf, gain=gain)
        elif kind == "wn":
            weight_norm(layer)
        else:
            lp_weight_norm(layer, p=pf)
        _set_submodule(model, pair.norm, _mean_only_from(bn, layer, scale))
        logger.debug("%s: %s -> %s (%s, found by %s)", func, pair.weight, pair.norm, kind, pair.method)
    _SEEN.clear()
    return model
