r"""Lp batch normalization modules: drop-in replacements for ``nn.BatchNorm{1,2,3}d``.

The base class mirrors ``torch.nn.modules.batchnorm._NormBase`` (same constructor, parameters,
buffers, ``reset_parameters``, versioned ``_load_from_state_dict``) without subclassing torch's
``_BatchNorm``: ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts any ``_BatchNorm`` subclass
and would silently turn an L1 layer into an L2 one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from ..functional.constants import parse_norm_options
from ..functional.emulated import emulated_batch_norm
from ..functional.norm import check_batch_norm_input, check_float, check_k
from ..kernels.dispatch import batch_norm as dispatch_batch_norm
from ..kernels.dispatch import eager_args, eager_bn_eval, eager_norm, eager_ready

__all__ = ["BatchNormBase", "LpBatchNormBase", "LpBatchNorm1d", "LpBatchNorm2d", "LpBatchNorm3d"]

def _check_options(cls_name: str, p: Any, k: Any, constant: Any) -> tuple[float, int | None]:
    return parse_norm_options(p, k, constant, cls_name)


def _check_dtype(cls_name: str, input: Tensor) -> None:
    check_float(input, cls_name)


def _p_repr(p: float, k: int | None) -> str:
    if p == math.inf:
        return "p=inf" if k is None else f"p=inf, k={k}"
    return f"p={int(p)}"


class BatchNormBase(nn.Module):
    """What every batch norm of this package shares with ``torch.nn.modules.batchnorm._NormBase``.

    The constructor arguments, parameters (``weight``, ``bias``), buffers (``running_mean``,
    ``running_var``, ``num_batches_tracked``), :meth:`reset_parameters`, the momentum factor and
    train/eval decision of torch's ``_BatchNorm.forward`` (:meth:`batch_norm_state`), the channel
    check and the versioned ``_load_from_state_dict``. It says nothing about how the statistics are
    computed: :class:`LpBatchNormBase` adds p, k and the constant; Range BN
    (:mod:`normmatters.precision`) is another kind built on the same base.
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive integer, got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.running_mean: Tensor | None
            self.running_var: Tensor | None
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            self.num_batches_tracked: Tensor | None
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def check_channels(self, input: Tensor) -> None:
        """Refuse an input whose dim 1 is not ``num_features``."""
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels (dim 1), "
                f"got {input.shape[1]} channels in input of shape {list(input.shape)}"
            )

    _check_channels = check_channels

    def batch_norm_state(self) -> tuple[bool, float, Tensor | None, Tensor | None]:
        """``(bn_training, momentum factor, running_mean, running_var)`` for this call.

        Exactly torch's ``_BatchNorm.forward``: a training call counts the batch in
        ``num_batches_tracked``; ``momentum=None`` is a cumulative average; batch statistics are
        used in training and in evaluation without running statistics; the buffers are passed for
        updating only when they are tracked.
        """
        # The buffer and parameter dictionaries directly: nn.Module's attribute fallback costs
        # about a microsecond per name, a visible part of a small layer's call.
        buffers = self._buffers
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        training = self.training
        tracked = buffers["num_batches_tracked"]
        if training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            factor = 1.0 / float(tracked) if momentum is None else momentum
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        bn_training = training or (running_mean is None and running_var is None)
        use_buffers = not training or self.track_running_stats
        return (bn_training, factor, running_mean if use_buffers else None,
                running_var if use_buffers else None)

    _batch_norm_state = batch_norm_state

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # As torch: version 2 added num_batches_tracked, which defaults to 0.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None
                    and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class LpBatchNormBase(BatchNormBase):
    """:class:`BatchNormBase` with the Lp options: ``p``, ``k``, ``constant``, ghost batches and
    low-precision emulation. Every Lp batch norm (1d/2d/3d and synchronized) is one."""

    __constants__ = BatchNormBase.__constants__ + ["p", "k", "constant"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        p: float | int | str = 2,
        k: int | None = None,
        constant: str = "calibrated",
        ghost_batch_size: int | None = None,
        compute_dtype: torch.dtype | str | None = None,
        accumulate_dtype: torch.dtype | str | None = None,
        precision_kwargs: dict[str, Any] | None = None,
    ) -> None:
        name = type(self).__name__
        p, k = _check_options(name, p, k, constant)
        if ghost_batch_size is not None and (not isinstance(ghost_batch_size, int) or ghost_batch_size < 2):
            raise ValueError(f"{name}: ghost_batch_size must be an integer >= 2 or None, got {ghost_batch_size!r}")
        if precision_kwargs and compute_dtype is None:
            raise ValueError(f"{name}: precision_kwargs={precision_kwargs!r} need a compute_dtype")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.p, self.k = p, k
        self.constant = constant
        self.ghost_batch_size = ghost_batch_size
        self.compute_dtype = compute_dtype
        self.accumulate_dtype = accumulate_dtype
        self.precision_kwargs = dict(precision_kwargs or {})

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, {_p_repr(self.p, self.k)}"
        if self.p != 2.0:
            s += f", constant={self.constant!r}"
        if self.ghost_batch_size is not None:
            s += f", ghost_batch_size={self.ghost_batch_size}"
        if self.compute_dtype is not None:
            s += f", compute_dtype={self.compute_dtype}"
        if self.accumulate_dtype is not None:
            s += f", accumulate_dtype={self.accumulate_dtype}"
        return s


# The name the rest of the package used before the split; kept importable.
_LpNormBase = LpBatchNormBase


class _LpBatchNorm(LpBatchNormBase):
    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_float(input, name)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            self.check_channels(input)
        bn_training, exponential_average_factor, running_mean, running_var = self.batch_norm_state()
        if self.compute_dtype is None:
            y = self._eager(input, bn_training, exponential_average_factor, running_mean, running_var)
            if y is not None:
                return y
        check_batch_norm_input(input, bn_training, self.eps, name)
        if bn_training and self.k is not None and input.numel() > 0:
            batch = input.shape[0]
            if self.ghost_batch_size is not None:
                batch = min(batch, self.ghost_batch_size)
            check_k(self.k, batch * (input.numel() // (input.shape[0] * input.shape[1])), name,
                    "channel")
        if self.compute_dtype is not None:
            return emulated_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training,
                exponential_average_factor, self.eps, p=self.p, k=self.k, constant=self.constant,
                compute_dtype=self.compute_dtype, accumulate_dtype=self.accumulate_dtype,
                ghost_batch_size=self.ghost_batch_size, **self.precision_kwargs,
            )
        params = self._parameters
        return dispatch_batch_norm(
            input, running_mean, running_var, params["weight"], params["bias"], bn_training,
            exponential_average_factor, self.eps, self.p, self.k, self.constant,
            self.ghost_batch_size,
        )


    def _eager(self, input: Tensor, bn_training: bool, factor: float, running_mean: Tensor | None,
               running_var: Tensor | None) -> Tensor | None:
        """The C++ eager operator on CPU where it computes exactly what the checked path below
        would (the dispatcher's fused path); ``None`` where it does not apply."""
        if input.dim() == 2:
            layout = 1
        elif input.is_contiguous():
            layout = 0
        elif input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
            layout = 1
        else:
            return None
        if not eager_ready(input, layout):
            return None
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        try:
            if bn_training:
                ghost = self.ghost_batch_size
                n = input.numel() // input.shape[1]
                if n < 2 or (ghost is not None and input.shape[0] > ghost):
                    return None
                args = eager_args(self.p, self.k, self.constant, n, self.eps)
                if args is None:
                    return None
                return eager_norm(input, weight, bias, running_mean, running_var, 0, 0, *args,
                                  self.eps, factor)
            if (self.p == 2.0 or running_mean is None or running_var is None or self.eps < 0
                    or (torch.is_grad_enabled() and (input.requires_grad
                        or (weight is not None and weight.requires_grad)
                        or (bias is not None and bias.requires_grad)))):
                return None
            return eager_bn_eval(input, running_mean, running_var, weight, bias, self.eps)
        except Exception:  # noqa: BLE001 - the checked path decides (and warns)
            return None


_DOC_TEMPLATE = r"""Lp batch normalization over a {dims} input (Hoffer et al. 2018, Sec. 4).

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\hat\sigma_p + \epsilon}} \gamma + \beta

    with σ̂ per channel over the batch{spatial}: at ``p=2`` σ̂ = √(Var[x]+ε) and the layer is
    exactly :class:`torch.nn.{torch_name}`; at ``p=1`` σ̂ = √(π/2)·mean|x − E[x]|; at ``p=inf``
    σ̂ = C_∞(n)·max|x − E[x]|, and with ``k`` set, Top(k): C_k(n)·(mean of the k largest
    deviations). ``running_var`` holds σ̂² (Bessel-corrected like torch), so state dicts move
    between this layer and :class:`torch.nn.{torch_name}` both ways. Evaluation uses the running
    statistics and computes no squares of activations.

    Args:
        num_features: C, the number of channels.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as in
            :class:`torch.nn.{torch_name}` (``momentum=None`` is a cumulative average).
        p: 1, 2 or ``inf`` (keyword-only).
        k: with ``p=inf``, use the mean of the k largest absolute deviations (Top(k)).
        constant: ``"calibrated"`` (unit output variance for Gaussian input, default),
            ``"paper"`` (the official code's C_∞(n)) or ``"none"`` (C = 1).
        ghost_batch_size: if set, training batches are normalized in virtual batches of this size.
        compute_dtype, accumulate_dtype: run the normalization's elementwise work emulated in a
            low-precision format, with its sums in float32 (``accumulate_dtype=None``) or in
            ``accumulate_dtype`` (see :mod:`normmatters.functional.emulated`).
        precision_kwargs: further options of
            :func:`normmatters.functional.emulated.emulated_batch_norm` (``summation``: plain sums
            or the non-overflowing ``"pairwise_mean"`` / ``"blocked_mean"``; ``round_grad``,
            ``backend``, ...).

    Shape:
        - Input: {shape}
        - Output: same shape as the input.

    Examples::

        >>> m = {name}(16, p=1)
        >>> y = m(torch.randn({example}))
    """


class LpBatchNorm1d(_LpBatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: expected 2D or 3D input (N, C) or (N, C, L), got "
                f"{input.dim()}D input of shape {list(input.shape)}"
            )


class LpBatchNorm2d(_LpBatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(
                f"{type(self).__name__}: expected 4D input (N, C, H, W), got {input.dim()}D input "
                f"of shape {list(input.shape)}"
            )


class LpBatchNorm3d(_LpBatchNorm):
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(
                f"{type(self).__name__}: expected 5D input (N, C, D, H, W), got {input.dim()}D "
                f"input of shape {list(input.shape)}"
            )


LpBatchNorm1d.__doc__ = _DOC_TEMPLATE.format(
    dims="2D or 3D", spatial=" (and length)", torch_name="BatchNorm1d", shape="(N, C) or (N, C, L)",
    name="LpBatchNorm1d", example="8, 16, 10")
LpBatchNorm2d.__doc__ = _DOC_TEMPLATE.format(
    dims="4D", spatial=" and spatial axes", torch_name="BatchNorm2d", shape="(N, C, H, W)",
    name="LpBatchNorm2d", example="8, 16, 5, 5")
LpBatchNorm3d.__doc__ = _DOC_TEMPLATE.format(
    dims="5D", spatial=" and spatial axes", torch_name="BatchNorm3d", shape="(N, C, D, H, W)",
    name="LpBatchNorm3d", example="8, 16, 3, 5, 5")
