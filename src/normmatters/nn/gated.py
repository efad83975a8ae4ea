r"""Lp gated RMS normalization: the norm of the state-space and hybrid model families.

Mamba2-style mixers normalize their scan output ``x`` together with a gate ``z`` taken from the
input projection: ``norm(x, z)``. Two placements are in use,

.. math::
    y = \frac{x \cdot a(z)}{\hat\sigma_p(x \cdot a(z)) + \epsilon}\,\gamma \quad(\text{gate before the norm}),
    \qquad
    y = \frac{x}{\hat\sigma_p(x) + \epsilon}\,\gamma \cdot a(z) \quad(\text{gate after the norm}),

with ``a`` = SiLU (Mamba2, Bamba, Zamba2, NemotronH, FalconH1, Qwen3-Next) or the sigmoid
(Kimi-Linear), and σ̂ taken per group of ``group_size`` channels where the original has groups
(Mamba2's ``n_groups``). At ``p=2`` it is the original's formula (ε inside the root, as
:func:`torch.nn.functional.rms_norm`); other p replace the root mean square by the Lp dispersion
of docs/math.md (Hoffer et al. 2018, Sec. 4).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from ..functional import lp_rms_norm
from .batchnorm import _check_options, _p_repr

__all__ = ["LpGatedRMSNorm"]

_ACTIVATIONS = {"silu": nn.functional.silu, "sigmoid": torch.sigmoid}


class LpGatedRMSNorm(nn.Module):
    r"""Lp RMS norm with a multiplicative gate: ``forward(input, gate=None)``.

    Args:
        normalized_shape: the size of the last axis (one int).
        eps: ε added inside the root at p=2 (outside at other p); ``None``: the input dtype's
            machine epsilon, as :class:`torch.nn.RMSNorm`.
        elementwise_affine: learn a scale ``weight`` (ones at start).
        group_size: σ̂ per group of this many channels (``None``: over the whole axis).
        norm_before_gate: ``True``: ``norm(x) · a(gate)``; ``False``: ``norm(x · a(gate))``
            (Mamba2's mixer).
        activation: ``"silu"`` or ``"sigmoid"``, applied to the gate.
        p, k, constant: the Lp kind (see :class:`~normmatters.nn.LpRMSNorm`).

    Shape:
        input and gate ``(*, normalized_shape)``; output as the input. ``gate=None``: no gating.

    Half-precision inputs are normalized and gated in float32 and cast back, as the originals do.

    Example::

        >>> norm = LpGatedRMSNorm(64, 1e-6, group_size=32, norm_before_gate=False, p=1)
        >>> y = norm(torch.randn(2, 10, 64), torch.randn(2, 10, 64))
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine", "group_size", "norm_before_gate",
                     "activation", "p", "k", "constant"]

    def __init__(
        self,
        normalized_shape: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        activation: str = "silu",
        p: float | int | str = 2,
        k: int | None = None,
        constant: str = "calibrated",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"{name}: a gated RMS norm normalizes the last axis, got normalized_shape="
                                 f"{tuple(normalized_shape)}")
            normalized_shape = normalized_shape[0]
        size = int(normalized_shape)
        gs = size if group_size is None else int(group_size)
        if gs < 1 or size % gs != 0:
            raise ValueError(f"{name}: group_size={group_size} must divide normalized_shape={size}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.p, self.k = _check_options(name, p, k, constant)
        if self.k is not None and self.k > gs:
            raise ValueError(f"{name}: k={self.k} is larger than the {gs} values each statistic is taken over")
        self.constant = constant
        self.normalized_shape = (size,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.group_size = None if group_size is None else gs
        self.norm_before_gate = bool(norm_before_gate)
        self.activation = activation
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)

    def forward(self, input: Tensor, gate: Tensor | None = None) -> Tensor:
        dtype = input.dtype
        low = dtype in (torch.float16, torch.bfloat16)
        x = input.float() if low else input
        act = _ACTIVATIONS[self.activation]
        if gate is not None and not self.norm_before_gate:
            x = x * act(gate.to(x.dtype))
        gs = self.group_size or self.normalized_shape[0]
        if x.shape[-1:] != self.normalized_shape:
            raise ValueError(f"{type(self).__name__}: expected input whose last dimension is "
                             f"{self.normalized_shape[0]}, got input of shape {list(input.shape)}")
        groups = x.unflatten(-1, (-1, gs))
        y = lp_rms_norm(groups, (gs,), None, self.eps, p=self.p, k=self.k, constant=self.constant).flatten(-2)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        if gate is not None and self.norm_before_gate:
            y = y * act(gate.to(y.dtype))
        return y.to(dtype)

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.group_size is not None:
            s += f", group_size={self.group_size}"
        s += f", norm_before_gate={self.norm_before_gate}, activation={self.activation!r}, {_p_repr(self.p, self.k)}"
        if self.p != 2.0:
            s += f", constant={self.constant!r}"
        return s
