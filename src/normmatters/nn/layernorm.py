r"""Lp layer, group and RMS normalization: drop-in replacements for ``nn.LayerNorm``,
``nn.GroupNorm`` and ``nn.RMSNorm`` (Hoffer et al. 2018, Sec. 4). At ``p=2`` each is exactly torch's layer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from ..functional.emulated import emulated_layer_norm
from ..functional.norm import check_float, check_k
from ..kernels.dispatch import eager_args, eager_norm, eager_ready
from ..kernels.dispatch import group_norm as dispatch_group_norm
from ..kernels.dispatch import layer_norm as dispatch_layer_norm
from ..kernels.dispatch import rms_norm as dispatch_rms_norm
from .batchnorm import _check_options, _p_repr

__all__ = ["LpLayerNorm", "LpGroupNorm", "LpRMSNorm"]


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def _check_trailing(name: str, input: Tensor, shape: tuple[int, ...]) -> None:
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{name}: expected input whose trailing dimensions are normalized_shape={list(shape)}, "
            f"got input of shape {list(input.shape)}"
        )


def _check_k(name: str, k: int | None, n: int) -> None:
    check_k(k, n, name)


class LpLayerNorm(nn.Module):
    r"""Lp layer normalization over the trailing ``normalized_shape`` axes.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\hat\sigma_p + \epsilon} \gamma + \beta

    Arguments, parameters (``weight``, ``bias``) and state dict as :class:`torch.nn.LayerNorm`;
    ``p``, ``k`` and ``constant`` are keyword-only and mean what they mean for
    :class:`~normmatters.nn.LpBatchNorm2d`. The paper uses L1 layer norm in its Transformer.

    Examples::

        >>> ln = LpLayerNorm(64, p=1)
        >>> y = ln(torch.randn(8, 10, 64))
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine", "p", "k", "constant"]

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        p: float | int | str = 2,
        k: int | None = None,
        constant: str = "calibrated",
        compute_dtype: torch.dtype | str | None = None,
        accumulate_dtype: torch.dtype | str | None = None,
        precision_kwargs: dict[str, Any] | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.p, self.k = _check_options(type(self).__name__, p, k, constant)
        self.constant = constant
        self.normalized_shape = _shape(normalized_shape)
        self._n = math.prod(self.normalized_shape)  # values per statistic
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.compute_dtype = compute_dtype
        self.accumulate_dtype = accumulate_dtype
        if precision_kwargs and compute_dtype is None:
            raise ValueError(f"{type(self).__name__}: precision_kwargs={precision_kwargs!r} need a compute_dtype")
        self.precision_kwargs = dict(precision_kwargs or {})
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        shape = self.normalized_shape
        if self.compute_dtype is None and input.shape[-len(shape):] == shape \
                and eager_ready(input, 0):
            args = eager_args(self.p, self.k, self.constant, self._n, self.eps)
            if args is not None:
                params = self._parameters
                try:
                    return eager_norm(input, params["weight"], params["bias"], None, None, 1,
                                      len(shape), *args, self.eps, 0.0)
                except Exception:  # noqa: BLE001 - the checked path below decides (and warns)
                    pass
        name = type(self).__name__
        check_float(input, name)
        _check_trailing(name, input, self.normalized_shape)
        if self.k is not None:
            _check_k(name, self.k, math.prod(self.normalized_shape))
        if self.compute_dtype is not None:
            return emulated_layer_norm(
                input, self.normalized_shape, self.weight, self.bias, self.eps, p=self.p, k=self.k,
                constant=self.constant, compute_dtype=self.compute_dtype,
                accumulate_dtype=self.accumulate_dtype, **self.precision_kwargs,
            )
        return dispatch_layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                                   self.p, self.k, self.constant)

    def extra_repr(self) -> str:
        s = (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
             f"{_p_repr(self.p, self.k)}")
        if self.p != 2.0:
            s += f", constant={self.constant!r}"
        if self.compute_dtype is not None:
            s += f", compute_dtype={self.compute_dtype}"
        return s


class LpGroupNorm(nn.Module):
    r"""Lp group normalization: statistics per sample over groups of channels.

    Arguments, parameters and state dict as :class:`torch.nn.GroupNorm`; ``p``, ``k`` and
    ``constant`` keyword-only.

    Examples::

        >>> gn = LpGroupNorm(4, 32, p=1)
        >>> y = gn(torch.randn(8, 32, 6, 6))
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine", "p", "k", "constant"]

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        p: float | int | str = 2,
        k: int | None = None,
        constant: str = "calibrated",
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        name = type(self).__name__
        self.p, self.k = _check_options(name, p, k, constant)
        if num_channels % num_groups != 0:
            raise ValueError(f"{name}: num_channels={num_channels} must be divisible by num_groups={num_groups}")
        self.constant = constant
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() >= 2 and input.shape[1] == self.num_channels and eager_ready(input, 0):
            g = self.num_groups
            args = eager_args(self.p, self.k, self.constant, input.numel() // (input.shape[0] * g),
                              self.eps)
            if args is not None:
                params = self._parameters
                try:
                    return eager_norm(input, params["weight"], params["bias"], None, None, 2, g,
                                      *args, self.eps, 0.0)
                except Exception:  # noqa: BLE001 - the checked path below decides (and warns)
                    pass
        name = type(self).__name__
        check_float(input, name)
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"{name}: expected input (N, {self.num_channels}, *) with {self.num_channels} "
                f"channels, got input of shape {list(input.shape)}"
            )
        if self.k is not None:
            n = input[0].numel() // self.num_groups if input.shape[0] else 1
            _check_k(name, self.k, n)
        return dispatch_group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                                   self.p, self.k, self.constant)

    def extra_repr(self) -> str:
        s = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, {_p_repr(self.p, self.k)}"
        if self.p != 2.0:
            s += f", constant={self.constant!r}"
        return s


class LpRMSNorm(nn.Module):
    r"""Lp RMS normalization: y = x / (σ̂_p(x) + ε) · γ with no centring.

    At ``p=2`` σ̂ = √mean(x²) and the layer is exactly :class:`torch.nn.RMSNorm` (eps inside the
    root). Arguments, parameters and state dict as :class:`torch.nn.RMSNorm`.

    Examples::

        >>> rms = LpRMSNorm(64, p=1)
        >>> y = rms(torch.randn(8, 10, 64))
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine", "p", "k", "constant"]

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        p: float | int | str = 2,
        k: int | None = None,
        constant: str = "calibrated",
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.p, self.k = _check_options(type(self).__name__, p, k, constant)
        self.constant = constant
        self.normalized_shape = _shape(normalized_shape)
        self._n = math.prod(self.normalized_shape)  # values per statistic
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        shape = self.normalized_shape
        if input.shape[-len(shape):] == shape and eager_ready(input, 0):
            eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
            args = eager_args(self.p, self.k, self.constant, self._n, eps)
            if args is not None:
                try:
                    return eager_norm(input, self._parameters["weight"], None, None, None, 3,
                                      len(shape), *args, eps, 0.0)
                except Exception:  # noqa: BLE001 - the checked path below decides (and warns)
                    pass
        name = type(self).__name__
        check_float(input, name)
        _check_trailing(name, input, self.normalized_shape)
        if self.k is not None:
            _check_k(name, self.k, math.prod(self.normalized_shape))
        return dispatch_rms_norm(input, self.normalized_shape, self.weight, self.eps, self.p,
                                 self.k, self.constant)

    def extra_repr(self) -> str:
        s = (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
             f"{_p_repr(self.p, self.k)}")
        if self.p != 2.0:
            s += f", constant={self.constant!r}"
        return s
