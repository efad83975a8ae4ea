r"""Weight normalization, Lp weight normalization and bounded weight normalization.

All three are :mod:`torch.nn.utils.parametrize` parametrizations (Hoffer et al. 2018, §6; docs/math.md §3): the
weight stays an ordinary attribute of the module, computed from the stored tensors each time it
is read, so ``state_dict``/``load_state_dict``, ``copy.deepcopy``, ``torch.compile``,
``parameters()`` iteration (nothing is recomputed outside ``forward``) and
:func:`torch.nn.utils.parametrize.cached` all work as for torch's own
:func:`torch.nn.utils.parametrizations.weight_norm`.

Per output channel :math:`i` (one slice :math:`v_i` of the stored direction tensor):

* WN (Salimans & Kingma 2016): :math:`w_i = g_i\, v_i / \|v_i\|_2`, learned gain :math:`g`.
* Lp WN: the same with :math:`\|\cdot\|_p`, :math:`p \in \{1, 2, \infty\}`.
* Bounded WN (BWN, Hoffer et al. 2018 §6), ``gain="fixed"``:
  :math:`w_i = \rho\, v_i / \|v_i\|_p` with the non-learned scalar
  :math:`\rho = \|V_0\|_p / N^{1/p}` fixed when the parametrization is applied, where
  :math:`\|V_0\|_p` is the p-norm of the **whole** initial weight tensor (all entries) and
  :math:`N` the number of output channels. Since :math:`\|V_0\|_p^p = \sum_i \|v_{0,i}\|_p^p`,
  :math:`\rho` is the p-power mean of the initial channel norms (for :math:`p=\infty` their
  maximum), so a layer keeps its initial overall scale.
* BWN as in the official code, ``gain="bounded"``: a learned per-channel gain whose Euclidean
  norm is held at its initial value,
  :math:`w_i = (\|g_0\|_2 / \|g\|_2)\, g_i\, v_i / \|v_i\|_p`, with :math:`g_0` the initial
  per-channel p-norms. The official ``BoundedWeighNorm`` stores ``weight_g`` (initialised to the
  per-channel norms), ``weight_v`` and the buffer ``weight_g_prenorm = ‖g₀‖₂``; this is the same
  computation.

The "output channel" is chosen from the module: dim 0 for ``Linear``, ``Conv{1,2,3}d``,
``Bilinear``, the rows of ``Embedding`` and of recurrent weights (``weight_ih_l0``,
``weight_hh_l0``, ...: each row is one gate unit), and dim 1 for ``ConvTranspose{1,2,3}d``, whose
weight is laid out ``(in, out / groups, *kernel)`` (a grouped transposed convolution is
normalised per true output channel, i.e. per (group, column) pair). Pass ``dim=`` to override.
Note this differs from :func:`torch.nn.utils.parametrizations.weight_norm`, whose ``dim=None``
means "the whole tensor" and whose default ``dim=0`` is the *input* axis of a transposed
convolution.

A channel whose direction is exactly zero (e.g. the ``padding_idx`` row of an ``Embedding``)
stays zero: the norm is clamped below at ``eps`` = 1e-12, as :func:`torch.nn.functional.normalize`
does.

Names after registration (``name="weight"``):

========================  ============================================  ==========================
function                  learned tensors                               buffer
========================  ============================================  ==========================
``weight_norm``,          ``parametrizations.weight.original0`` (g),     —
``lp_weight_norm``        ``parametrizations.weight.original1`` (v)
``bounded_weight_norm``   ``parametrizations.weight.original`` (v)       ``parametrizations.weight.0.rho``
(``gain="fixed"``)
``bounded_weight_norm``   ``parametrizations.weight.original0`` (g),     ``parametrizations.weight.0.gain_norm``
(``gain="bounded"``)      ``parametrizations.weight.original1`` (v)      (:math:`\|g_0\|_2`)
========================  ============================================  ==========================

``g`` has the shape of a per-channel norm with ``keepdim`` (``(out, 1, 1, 1)`` for a
``Conv2d``, like torch's ``weight_norm``). :func:`remove_weight_norm` bakes the current weight
back into a plain ``weight`` parameter.

Example::

    >>> import torch.nn as nn
    >>> conv = bounded_weight_norm(nn.Conv2d(3, 8, 3))
    >>> conv.weight.flatten(1).norm(dim=1)  # every channel has norm rho
    >>> remove_weight_norm(conv)            # back to a plain Conv2d
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "weight_norm",
    "lp_weight_norm",
    "bounded_weight_norm",
    "remove_weight_norm",
    "is_weight_normalized",
    "output_channel_dim",
]

_EPS = 1e-12


# ----------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------


def _check_p(p: float | int | str, *, func: str) -> float:
    """Return p as a float in {1, 2, inf}; accept the strings "1", "2", "inf" as the foundation does."""
    if isinstance(p, bool):
        raise TypeError(f"{func}: p must be 1, 2 or float('inf'), got the bool {p!r}")
    if isinstance(p, str):
        key = p.strip().lower()
        table = {"1": 1.0, "l1": 1.0, "2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf}
        if key not in table:
            raise ValueError(f"{func}: p must be 1, 2 or 'inf', got the string {p!r}")
        return table[key]
    if not isinstance(p, (int, float)):
        raise TypeError(f"{func}: p must be 1, 2 or float('inf'), got {type(p).__name__} {p!r}")
    value = float(p)
    if value not in (1.0, 2.0, math.inf):
        raise ValueError(f"{func}: p must be 1, 2 or float('inf'), got {p!r}")
    return value


def _get_weight(module: nn.Module, name: str, func: str) -> Tensor:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{func}: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"{func}: name must be a string, got {type(name).__name__}")
    tensor = getattr(module, name, None) if hasattr(module, name) else None
    if not isinstance(tensor, Tensor):
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())  # type: ignore[union-attr]
        raise ValueError(
            f"{func}: {type(module).__name__} has no tensor named {name!r}; "
            f"its own parameters are {sorted(set(names))}"
        )
    if _existing_weight_norm(module, name) is not None:
        raise ValueError(
            f"{func}: {type(module).__name__}.{name} is already weight-normalized "
            f"({_existing_weight_norm(module, name)}); call remove_weight_norm(module, {name!r}) first"
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"{func}: {type(module).__name__}.{name} must be a floating-point tensor, got {tensor.dtype}"
        )
    if tensor.dim() < 2:
        raise ValueError(
            f"{func}: {type(module).__name__}.{name} has shape {tuple(tensor.shape)}; weight "
            "normalization needs a tensor with an output-channel axis and at least one more axis "
            "(a 1-d tensor would be normalised element by element)"
        )
    return tensor


def _existing_weight_norm(module: nn.Module, name: str) -> str | None:
    """Describe a weight normalization already on ``module.name`` (ours, torch's or the old hook)."""
    for hook in module._forward_pre_hooks.values():
        # torch.nn.utils.weight_norm (deprecated) and the paper's BoundedWeighNorm are pre-hooks
        if type(hook).__name__ in ("WeightNorm", "BoundedWeighNorm") and getattr(hook, "name", None) == name:
            return f"forward pre-hook {type(hook).__name__}"
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:  # type: ignore[index, union-attr]
            if isinstance(p, _WeightNormBase) or type(p).__name__ == "_WeightNorm":
                return f"parametrization {type(p).__name__}"
    return None


def output_channel_dim(module: nn.Module, name: str = "weight") -> int:
    """The axis of ``module.name`` that indexes output channels.

    1 for the ``weight`` of ``ConvTranspose{1,2,3}d`` (laid out ``(in, out/groups, *k)``), 0
    otherwise (``Linear``, ``Conv``, ``Bilinear``, ``Embedding`` rows, recurrent weight rows).
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and name == "weight":
        return 1
    return 0


def _resolve_dim(module: nn.Module, name: str, weight: Tensor, dim: int | None, func: str) -> tuple[int, int]:
    """Return (dim, groups); groups > 1 only for a grouped transposed convolution on its out axis."""
    if dim is None:
        dim = output_channel_dim(module, name)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{func}: dim must be an int or None, got {type(dim).__name__} {dim!r}")
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(
            f"{func}: dim={dim} is out of range for {type(module).__name__}.{name} "
            f"of shape {tuple(weight.shape)}"
        )
    dim %= weight.dim()
    groups = 1
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and name == "weight" and dim == 1:
        groups = int(module.groups)
    return dim, groups


# ----------------------------------------------------------------------------------------
# parametrization modules
# ----------------------------------------------------------------------------------------


class _WeightNormBase(nn.Module):
    """Per-channel Lp norms of a direction tensor ``v``.

    For a grouped transposed convolution (``groups > 1``, ``dim == 1``) the weight
    ``(in, out/groups, *k)`` is viewed as ``(groups, in/groups, out/groups, *k)`` and each
    ``(group, column)`` pair is one output channel.
    """

    def __init__(self, dim: int, p: float, groups: int = 1, eps: float = _EPS) -> None:
        super().__init__()
        self.dim = dim
        self.p = p
        self.groups = groups
        self.eps = eps

    def _view(self, v: Tensor) -> Tensor:
        return v if self.groups == 1 else v.unflatten(0, (self.groups, -1))

    def _norm(self, vv: Tensor) -> Tensor:
        """Channel norms of a viewed tensor, with ``keepdim`` so they broadcast against it."""
        keep = (self.dim,) if self.groups == 1 else (0, self.dim + 1)
        reduce = tuple(d for d in range(vv.dim()) if d not in keep)
        return torch.linalg.vector_norm(vv, ord=self.p, dim=reduce, keepdim=True)

    def _direction(self, vv: Tensor) -> Tensor:
        # clamp: a channel that is exactly zero (an Embedding padding row) stays zero, not NaN
        return vv / self._norm(vv).clamp_min(self.eps)

    def channel_norms(self, v: Tensor) -> Tensor:
        """The per-output-channel p-norms of ``v`` (shape of ``g``, i.e. with ``keepdim``)."""
        return self._norm(self._view(v))

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, p={self.p:g}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s


class _LpWeightNorm(_WeightNormBase):
    r""":math:`w_i = g_i\, v_i / \|v_i\|_p` (Salimans & Kingma 2016 for p = 2)."""

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        vv = self._view(weight_v)
        return (weight_g * self._direction(vv)).reshape(weight_v.shape)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self.channel_norms(weight), weight


class _BoundedWeightNorm(_WeightNormBase):
    r""":math:`w_i = \rho\, v_i / \|v_i\|_p`, :math:`\rho` a fixed buffer (Hoffer et al. 2018 §6)."""

    rho: Tensor

    def __init__(self, dim: int, p: float, rho: Tensor, groups: int = 1, eps: float = _EPS) -> None:
        super().__init__(dim, p, groups, eps)
        self.register_buffer("rho", rho.detach().clone().reshape(()))

    def forward(self, weight_v: Tensor) -> Tensor:
        vv = self._view(weight_v)
        return (self.rho * self._direction(vv)).reshape(weight_v.shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        # any tensor with this direction works; the weight itself is the natural choice
        return weight


class _BoundedGainWeightNorm(_WeightNormBase):
    r""":math:`w_i = (\|g_0\|_2 / \|g\|_2)\, g_i\, v_i / \|v_i\|_p` (the official BWN code)."""

    gain_norm: Tensor

    def __init__(self, dim: int, p: float, gain_norm: Tensor, groups: int = 1, eps: float = _EPS) -> None:
        super().__init__(dim, p, groups, eps)
        self.register_buffer("gain_norm", gain_norm.detach().clone().reshape(()))

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        vv = self._view(weight_v)
        g = weight_g * (self.gain_norm / torch.linalg.vector_norm(weight_g).clamp_min(self.eps))
        return (g * self._direction(vv)).reshape(weight_v.shape)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self.channel_norms(weight), weight


# ----------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------


def lp_weight_norm(module: nn.Module, name: str = "weight", p: float | str = 2, dim: int | None = None) -> nn.Module:
    r"""Apply Lp weight normalization to ``module.name`` (docs/math.md §3).

    .. math::
        w_i = g_i \frac{v_i}{\|v_i\|_p}, \qquad p \in \{1, 2, \infty\}

    per output channel :math:`i`, with a learned gain :math:`g` initialised to the channel norms of
    the current weight (so the weight is unchanged at application) and the direction :math:`v`
    initialised to the weight. The output is invariant to rescaling :math:`v`, and
    :math:`\partial L / \partial v_i \perp v_i`.

    Args:
        module: the module holding the weight (``Linear``, ``Conv``, ``ConvTranspose``,
            ``Embedding``, an RNN/LSTM/GRU with ``name="weight_ih_l0"`` etc.).
        name: the parameter to normalise.
        p: 1, 2 or ``float("inf")`` (strings ``"1"``, ``"2"``, ``"inf"`` accepted).
        dim: the output-channel axis; ``None`` picks it from the module type (see
            :func:`output_channel_dim`).

    Returns:
        ``module``, with ``parametrizations.<name>.original0`` (g) and ``.original1`` (v).

    Raises:
        ValueError: no such tensor, a 1-d tensor, an unsupported ``p``, a bad ``dim``, or a weight
            that is already weight-normalized.

    Example::

        >>> m = lp_weight_norm(nn.Linear(20, 40), p=1)
        >>> m.parametrizations.weight.original0.shape
        torch.Size([40, 1])
    """
    func = "lp_weight_norm"
    pf = _check_p(p, func=func)
    weight = _get_weight(module, name, func)
    dim_, groups = _resolve_dim(module, name, weight, dim, func)
    parametrize.register_parametrization(module, name, _LpWeightNorm(dim_, pf, groups))
    return module


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = None, *, p: float | str = 2) -> nn.Module:
    r"""Apply weight normalization (Salimans & Kingma 2016) to ``module.name``.

    .. math::
        w_i = g_i \frac{v_i}{\|v_i\|_2}

    with a learned per-output-channel gain :math:`g`. The same as :func:`lp_weight_norm` (which
    see for the arguments); ``p`` is keyword-only here. State dicts written by torch's deprecated
    hook-based ``torch.nn.utils.weight_norm`` (keys ``<name>_g``, ``<name>_v``) load into the
    parametrized module.

    Example::

        >>> conv = weight_norm(nn.Conv2d(3, 16, 3))
        >>> sorted(n for n, _ in conv.named_parameters())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
    """
    lp_weight_norm(module, name, p=p, dim=dim)

    def _old_names_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if g_key in state_dict and v_key in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)

    module._register_load_state_dict_pre_hook(_old_names_hook)
    return module


def bounded_weight_norm(
    module: nn.Module,
    name: str = "weight",
    p: float | str = 2,
    dim: int | None = None,
    *,
    gain: Literal["fixed", "bounded"] = "fixed",
) -> nn.Module:
    r"""Apply bounded weight normalization (BWN, Hoffer et al. 2018, §6) to ``module.name``.

    ``gain="fixed"`` (the paper's formula, default):

    .. math::
        w_i = \rho \frac{v_i}{\|v_i\|_p}, \qquad \rho = \frac{\|V_0\|_p}{N^{1/p}}

    where :math:`V_0` is the weight at application time, :math:`\|V_0\|_p` its p-norm over all
    entries, and :math:`N` the number of output channels (:math:`N^{1/\infty} = 1`, so for
    :math:`p=\infty`, :math:`\rho = \max|V_0|`). :math:`\rho` is a buffer, never trained; each
    channel of the effective weight has p-norm exactly :math:`\rho` at every step. The learned
    per-channel scale belongs to the following (mean-only) batch norm or affine layer.

    ``gain="bounded"`` (the official code's variant):

    .. math::
        w_i = \frac{\|g_0\|_2}{\|g\|_2}\, g_i \frac{v_i}{\|v_i\|_p}

    with a learned per-channel gain :math:`g` initialised to :math:`g_0`, the per-channel p-norms of
    :math:`V_0`; the overall norm of the gain vector is held at :math:`\|g_0\|_2` (buffer
    ``gain_norm``), so the weight equals :math:`V_0` at application.

    Args:
        module: the module holding the weight.
        name: the parameter to normalise.
        p: 1, 2 or ``float("inf")``.
        dim: the output-channel axis; ``None`` picks it from the module type.
        gain: ``"fixed"`` or ``"bounded"``.

    Returns:
        ``module``; ``gain="fixed"`` stores ``parametrizations.<name>.original`` (v) and the
        buffer ``parametrizations.<name>.0.rho``; ``gain="bounded"`` stores ``original0`` (g),
        ``original1`` (v) and the buffer ``parametrizations.<name>.0.gain_norm``.

    Example::

        >>> lin = bounded_weight_norm(nn.Linear(20, 40))
        >>> lin.weight.norm(dim=1)  # all equal to lin.parametrizations.weight[0].rho
    """
    func = "bounded_weight_norm"
    pf = _check_p(p, func=func)
    if gain not in ("fixed", "bounded"):
        raise ValueError(f"{func}: gain must be 'fixed' or 'bounded', got {gain!r}")
    weight = _get_weight(module, name, func)
    dim_, groups = _resolve_dim(module, name, weight, dim, func)
    with torch.no_grad():
        probe = _WeightNormBase(dim_, pf, groups)
        norms = probe.channel_norms(weight.detach())
        if gain == "fixed":
            n_channels = norms.numel()
            # ‖V₀‖_p over all entries equals the p-norm of the channel norms
            total = torch.linalg.vector_norm(norms.double(), ord=pf)
            rho = total / (1.0 if math.isinf(pf) else n_channels ** (1.0 / pf))
            par: nn.Module = _BoundedWeightNorm(dim_, pf, rho.to(weight.dtype), groups)
        else:
            par = _BoundedGainWeightNorm(dim_, pf, torch.linalg.vector_norm(norms), groups)
    par.to(device=weight.device)
    parametrize.register_parametrization(module, name, par)
    return module


def is_weight_normalized(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.name`` carries one of this module's weight normalizations."""
    if not parametrize.is_parametrized(module, name):
        return False
    return any(isinstance(p, _WeightNormBase) for p in module.parametrizations[name])  # type: ignore[index, union-attr]


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove a (Lp / bounded) weight normalization, baking the current weight back.

    ``module.name`` becomes a plain :class:`~torch.nn.Parameter` holding the effective weight
    (``g·v/‖v‖_p``, ``ρ·v/‖v‖_p``, ...), with the same ``requires_grad``.

    Raises:
        ValueError: ``module.name`` is not weight-normalized by this library, or other
            parametrizations are stacked on it (remove those with
            :func:`torch.nn.utils.parametrize.remove_parametrizations`).
    """
    if not is_weight_normalized(module, name):
        raise ValueError(
            f"remove_weight_norm: {type(module).__name__}.{name} is not weight-normalized "
            "(expected weight_norm, lp_weight_norm or bounded_weight_norm to have been applied)"
        )
    plist = module.parametrizations[name]  # type: ignore[index, union-attr]
    if len(plist) != 1:
        raise ValueError(
            f"remove_weight_norm: {type(module).__name__}.{name} has {len(plist)} stacked "
            f"parametrizations ({[type(p).__name__ for p in plist]}); remove them together with "
            "torch.nn.utils.parametrize.remove_parametrizations"
        )
    _own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a class of its own before its parametrizations are removed.

    ``copy.deepcopy`` of a parametrized module shares torch's generated ``Parametrized<Cls>``
    class with the original, and ``remove_parametrizations`` deletes the weight property from that
    class, which would break the original. A private copy of the class keeps the two apart.
    """
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)
