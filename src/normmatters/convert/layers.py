r"""The layers and bookkeeping the converters need beyond :mod:`normmatters.nn`.

* :class:`ForeignLpNorm` — an Lp layer or RMS norm that keeps a foreign layer's form: its
  parameter names (so state dicts keep their keys), a channels-first axis, a scale stored as an
  offset from 1 (Gemma's RMS norm: :math:`y = x/\hat\sigma(x)\cdot(1 + w)`).
* the original of a converted layer, kept on the ``meta`` device, so that
  :func:`~normmatters.to_torch_norms` gives back the original class;
* torch's Transformer fast path, which reads only a norm's weight, bias and eps: it is turned off
  on the converted layers (and on nothing else).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from ..functional import lp_layer_norm, lp_rms_norm, normalize_p
from ..nn import LpGatedRMSNorm

__all__ = ["ForeignLpNorm", "ForeignLpGatedRMSNorm", "foreign_norm", "remember_original", "original_of", "restore_original",
           "meta_template",
           "update_transformer_fast_paths", "move_hooks", "copy_attributes", "reads_eps_of"]


def foreign_norm(input: Tensor, kind: str, axis: str, normalized_shape: tuple[int, ...],
                 weight: Tensor | None, bias: Tensor | None, eps: float, offset: float, *,
                 p: float, k: int | None, constant: str) -> Tensor:
    """Layer or RMS norm (``kind``) over the last axes, or over the channel axis (``axis=
    "channels_first"``), with the weight applied as ``offset + weight`` (Gemma's ``1 + w``) and,
    for RMS norm, an optional bias: the forms a recognised foreign norm can take."""
    x = input.movedim(1, -1) if axis == "channels_first" else input
    if weight is not None and offset:
        weight = weight + offset
    if kind == "layer":
        y = lp_layer_norm(x, normalized_shape, weight, bias, eps, p=p, k=k, constant=constant)
    else:
        y = lp_rms_norm(x, normalized_shape, weight, eps, p=p, k=k, constant=constant)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.movedim(-1, 1) if axis == "channels_first" else y


class ForeignLpNorm(nn.Module):
    r"""Lp layer norm or RMS norm in the form of another library's layer.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\hat\sigma_p + \epsilon}\,(o + w) + b \quad\text{(layer)},\qquad
        y = \frac{x}{\hat\sigma_p(x) + \epsilon}\,(o + w) + b \quad\text{(RMS)}

    over the trailing ``normalized_shape`` axes (``axis="last"``) or over axis 1
    (``axis="channels_first"``, e.g. transformers' ``ConvNextLayerNorm(data_format="channels_first")``),
    with the offset ``o`` = ``offset`` (0, or 1 for Gemma's ``(1 + weight)``). At ``p=2`` it is the
    formula of torch's ``layer_norm`` / ``rms_norm`` (ε inside the root). Parameters are
    registered under ``weight_name`` / ``bias_name`` so a state dict keeps the original's keys.
    Built by :func:`~normmatters.convert_norms`; ``p``, ``k`` and ``constant`` as in
    :class:`~normmatters.nn.LpLayerNorm`.

    Example::

        >>> ln = ForeignLpNorm("layer", 16, 1e-6, axis="channels_first", p=1)
        >>> y = ln(torch.randn(2, 16, 8, 8))
    """

    def __init__(
        self,
        kind: str,
        normalized_shape: int | Sequence[int],
        eps: float | None = 1e-5,
        *,
        axis: str = "last",
        offset: float = 0.0,
        weight_name: str | None = "weight",
        bias_name: str | None = None,
        device: Any = None,
        dtype: Any = None,
        p: float | int | str = 2,
        k: int | None = None,
        constant: str = "calibrated",
    ) -> None:
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"ForeignLpNorm: kind must be 'layer' or 'rms', got {kind!r}")
        if axis not in ("last", "channels_first"):
            raise ValueError(f"ForeignLpNorm: axis must be 'last' or 'channels_first', got {axis!r}")
        shape = (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
        if axis == "channels_first" and len(shape) != 1:
            raise ValueError(f"ForeignLpNorm: a channels-first norm normalizes one axis, got {shape}")
        if kind == "layer" and eps is None:
            raise ValueError("ForeignLpNorm: a layer norm needs a number eps")
        self.p = normalize_p(p)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1 or self.p != math.inf):
            raise ValueError(f"ForeignLpNorm: k={k!r} selects Top(k): a positive integer, with p=inf (got p={p})")
        if constant not in ("calibrated", "paper", "none"):
            raise ValueError(f"ForeignLpNorm: constant must be 'calibrated', 'paper' or 'none', got {constant!r}")
        self.kind, self.normalized_shape, self.eps = kind, shape, eps
        self.axis, self.offset, self.k, self.constant = axis, float(offset), k, constant
        self.weight_name, self.bias_name = weight_name, bias_name
        fk = {"device": device, "dtype": dtype}
        if weight_name is not None:
            self.register_parameter(weight_name, nn.Parameter(torch.empty(shape, **fk)))
        if bias_name is not None:
            self.register_parameter(bias_name, nn.Parameter(torch.empty(shape, **fk)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight_name is not None:
            init.constant_(getattr(self, self.weight_name), 1.0 - self.offset)
        if self.bias_name is not None:
            init.zeros_(getattr(self, self.bias_name))

    def forward(self, input: Tensor) -> Tensor:
        w = getattr(self, self.weight_name) if self.weight_name is not None else None
        b = getattr(self, self.bias_name) if self.bias_name is not None else None
        return foreign_norm(input, self.kind, self.axis, self.normalized_shape, w, b, self.eps,
                            self.offset, p=self.p, k=self.k, constant=self.constant)

    def extra_repr(self) -> str:
        p = "inf" if self.p == math.inf else f"{int(self.p)}"
        s = f"{self.kind!r}, {self.normalized_shape}, eps={self.eps}, axis={self.axis!r}, p={p}"
        if self.k is not None:
            s += f", k={self.k}"
        if self.offset:
            s += f", offset={self.offset:g}"
        return s


class ForeignLpGatedRMSNorm(LpGatedRMSNorm):
    """:class:`~normmatters.nn.LpGatedRMSNorm` called as another library's gated norm, whose gate
    argument has another name (mamba_ssm's ``norm(x, z=None)``): ``forward(input, z)`` and
    ``forward(input, z=...)`` both work, with ``gate_name="z"``.

    Example::

        >>> norm = ForeignLpGatedRMSNorm(64, 1e-5, gate_name="z", p=1)
        >>> y = norm(torch.randn(2, 64), z=torch.randn(2, 64))
    """

    def __init__(self, *args: Any, gate_name: str = "z", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not gate_name.isidentifier() or gate_name == "input":
            raise ValueError("ForeignLpGatedRMSNorm: gate_name must name an argument other than input, "
                             f"got {gate_name!r}")
        self.gate_name = gate_name

    def forward(self, input: Tensor, *args: Tensor | None, **kwargs: Tensor | None) -> Tensor:  # type: ignore[override]
        if len(args) + len(kwargs) > 1 or (kwargs and set(kwargs) != {self.gate_name}):
            given = [type(a).__name__ for a in args] + list(kwargs)
            raise TypeError(f"{type(self).__name__}.forward() takes (input, {self.gate_name}=None), got extra {given}")
        gate = args[0] if args else kwargs.get(self.gate_name)
        return super().forward(input, gate)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gate_name={self.gate_name!r}"


# ------------------------------------------------------------------------------------------
# the original of a converted layer
# ------------------------------------------------------------------------------------------

_ORIGINAL = "_normmatters_original"


def remember_original(new: nn.Module, old: nn.Module) -> nn.Module:
    """Keep ``old``'s class and configuration with ``new`` (on the meta device: no memory, and
    outside the module tree: no state-dict keys, no device moves)."""
    template = original_of(old)
    if template is None:
        template = meta_template(old)
        template.__dict__.pop(_ORIGINAL, None)
    new.__dict__[_ORIGINAL] = template
    return new


def meta_template(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its tensors on the meta device and without its hooks (they move
    with the module that replaces it; a hook's closure may hold a whole model: never copied)."""
    hooks = {n: module.__dict__[n] for n in _HOOK_DICTS if module.__dict__.get(n)}
    for n, d in hooks.items():
        module.__dict__[n] = type(d)()
    try:
        return copy.deepcopy(module).to("meta")
    finally:
        module.__dict__.update(hooks)


def original_of(module: nn.Module) -> nn.Module | None:
    """The template :func:`remember_original` kept with ``module``, or ``None``."""
    return module.__dict__.get(_ORIGINAL)


def restore_original(module: nn.Module) -> nn.Module:
    """A layer of the original class holding ``module``'s current state (keys must match)."""
    template = original_of(module)
    if template is None:
        raise ValueError(f"{type(module).__name__} keeps no original layer")
    tensors = list(module.parameters()) + list(module.buffers())
    ref = next((t for t in tensors if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    new = copy.deepcopy(template).to_empty(device=device)
    if ref is not None:
        new = new.to(dtype=ref.dtype)
    new.load_state_dict(module.state_dict(), strict=True)
    # The tensors themselves go back where they fit, as they came (ties and optimizers survive).
    for registry, theirs in ((new._parameters, module._parameters), (new._buffers, module._buffers)):
        for name, t in list(registry.items()):
            src = theirs.get(name)
            if t is not None and src is not None and src.shape == t.shape and src.dtype == t.dtype \
                    and src.device == t.device and isinstance(src, nn.Parameter) == isinstance(t, nn.Parameter):
                registry[name] = src
    for name, p in new.named_parameters():
        src = dict(module.named_parameters()).get(name)
        if src is not None:
            p.requires_grad_(src.requires_grad)
    return new.train(module.training)


# ------------------------------------------------------------------------------------------
# torch's Transformer fast path
# ------------------------------------------------------------------------------------------

_FAST = "_normmatters_fast_path"


def _torch_norms(layer: nn.Module) -> bool:
    return type(getattr(layer, "norm1", None)) is nn.LayerNorm and type(getattr(layer, "norm2", None)) is nn.LayerNorm


def update_transformer_fast_paths(model: nn.Module) -> None:
    """Turn torch's fused Transformer fast path off where a layer's norms are no longer torch's
    ``nn.LayerNorm`` (the fused kernel would compute L2 layer norm from their weight, bias and
    eps), and back on where they are again.

    Per instance: ``TransformerEncoderLayer.activation_relu_or_gelu`` (which the fast path
    requires) and ``TransformerEncoder.use_nested_tensor`` (nested inputs bypass the layers'
    Python path); the original values are kept and restored.
    """
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            if not _torch_norms(m):
                if _FAST not in m.__dict__:
                    m.__dict__[_FAST] = m.activation_relu_or_gelu
                m.activation_relu_or_gelu = 0
            elif _FAST in m.__dict__:
                m.activation_relu_or_gelu = m.__dict__.pop(_FAST)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            converted = any(isinstance(l, nn.TransformerEncoderLayer) and not _torch_norms(l) for l in m.layers)
            if converted:
                if _FAST not in m.__dict__:
                    m.__dict__[_FAST] = m.use_nested_tensor
                m.use_nested_tensor = False
            elif _FAST in m.__dict__:
                m.use_nested_tensor = m.__dict__.pop(_FAST)


# ------------------------------------------------------------------------------------------
# what a replacement takes over from the module it replaces
# ------------------------------------------------------------------------------------------

# Each is a dict of the module's hooks (and the flags that go with some of them): moved as the same
# dict objects, so the handles the user holds still remove them from the replacement.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_SIMPLE = (int, float, str, bool, type(None))


def move_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the hooks registered on ``old`` (forward, pre-forward, their ``with_kwargs`` and
    ``always_call`` variants, backward and state-dict hooks), after any of its own; ``old`` keeps none."""
    for name in _HOOK_DICTS:
        theirs = old.__dict__.get(name)
        if not theirs:
            continue
        own = new.__dict__.get(name)
        if own:
            merged = type(theirs)()
            merged.update(own)
            for key, value in theirs.items():
                merged[key] = value
            theirs.clear()
            theirs.update(merged)
        new.__dict__[name] = theirs
        old.__dict__[name] = type(theirs)()
    if old.__dict__.get("_is_full_backward_hook") is not None:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    return new


def copy_attributes(old: nn.Module, new: nn.Module) -> nn.Module:
    """Copy ``old``'s plain public attributes (numbers, strings, tuples of them) that ``new`` lacks,
    such as transformers' ``variance_epsilon`` or ``hidden_size``: read by parents, they must not
    vanish. They are copies: the replacement computes with its own ``eps``."""
    for key, value in old.__dict__.items():
        if key.startswith("_") or key == "training" or key in new.__dict__ or hasattr(type(new), key):
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)):
            new.__dict__[key] = value
    return new


_EPS_READ: dict[tuple[type, str], str | None] = {}


def reads_eps_of(parent: nn.Module, child: str) -> str | None:
    """The attribute through which ``parent``'s class reads its child ``child``'s eps
    (``self.<child>.variance_epsilon`` / ``.eps`` / ``.epsilon`` in its source), or ``None``.

    A parent that reads a norm's eps computes that norm itself somewhere, as the fused training
    kernel of Mamba2-style mixers does (``rmsnorm_weight=self.norm.weight, rmsnorm_eps=
    self.norm.variance_epsilon``): it would bypass a converted norm. torch's Transformer layers are
    not asked (their fast path is switched per instance, :func:`update_transformer_fast_paths`).
    """
    key = (type(parent), child)
    if key in _EPS_READ:
        return _EPS_READ[key]
    found = None
    pattern = re.compile(rf"self\.{re.escape(child)}\.(variance_epsilon|epsilon|eps)\b")
    for cls in type(parent).__mro__:
        if cls is nn.Module or cls.__module__.startswith("torch."):
            break
        for fn in _functions(cls):
            # The names a function's code loads are a cheap first test; its source (not the whole
            # module's, which inspect would parse for a class) confirms the attribute chain.
            names = _code_names(fn.__code__)
            hit = sorted(names & {"variance_epsilon", "epsilon", "eps"})
            if child not in names or not hit:
                continue
            try:
                match = pattern.search(inspect.getsource(fn))
                attr = match.group(1) if match else None
            except (OSError, TypeError):
                attr = hit[0]
            if attr:
                found = f"{cls.__name__}.{fn.__name__} reads self.{child}.{attr}"
                break
        if found:
            break
    _EPS_READ[key] = found
    return found


def _functions(cls: type) -> list[Any]:
    out = []
    for value in cls.__dict__.values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        value = inspect.unwrap(value) if callable(value) else value
        if inspect.isfunction(value):
            out.append(value)
    return out


def _code_names(code: Any) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names
