r"""Mean-only batch normalization: the companion of weight normalization (Hoffer et al. 2018, Sec. 5).

y = x − E[x] + β per channel (optionally ·γ): the batch mean in training, the running mean in
evaluation. Salimans & Kingma (2016) pair it with weight normalization; the paper's BWN ResNet is
BWN convolution → mean-only BN → ReLU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from .batchnorm import _check_dtype

__all__ = ["MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d"]


class _MeanOnlyBatchNorm(nn.Module):
    _version = 2
    _dims: tuple[int, ...] = ()
    _shape_text = ""

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
        scale: bool = False,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps  # accepted so the layer swaps in for a batch norm; no division happens
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine and scale:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ndims:
            raise ValueError(
                f"{type(self).__name__}: expected {self._shape_text} input, got {input.dim()}D "
                f"input of shape {list(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        _check_dtype(name, input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected input with {self.num_features} channels (dim 1), got "
                f"{input.shape[1]} channels in input of shape {list(input.shape)}"
            )
        view = [1, -1] + [1] * (input.dim() - 2)
        use_batch = self.training or self.running_mean is None
        if use_batch:
            if input.numel() == 0:
                return input.clone()
            dims = (0,) + tuple(range(2, input.dim()))
            mean = input.mean(dims, keepdim=True)
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                with torch.no_grad():
                    self.running_mean.mul_(1.0 - factor).add_(  # type: ignore[union-attr]
                        mean.detach().flatten().to(self.running_mean.dtype), alpha=factor)
        else:
            mean = self.running_mean.reshape(view).to(input.dtype)  # type: ignore[union-attr]
        y = input - mean
        if self.weight is not None:
            y = y * self.weight.reshape(view).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.reshape(view).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, momentum={self.momentum}, affine={self.affine}, "
                f"scale={self.weight is not None}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MeanOnlyBatchNorm1d(_MeanOnlyBatchNorm):
    """Mean-only batch norm for (N, C) or (N, C, L) input: y = x − E[x] + β (·γ if ``scale``).

    Examples::

        >>> m = MeanOnlyBatchNorm1d(16)
        >>> y = m(torch.randn(8, 16))
    """

    _ndims = (2, 3)
    _shape_text = "2D or 3D (N, C) or (N, C, L)"


class MeanOnlyBatchNorm2d(_MeanOnlyBatchNorm):
    """Mean-only batch norm for (N, C, H, W) input: y = x − E[x] + β (·γ if ``scale``).

    Examples::

        >>> m = MeanOnlyBatchNorm2d(16, scale=True)
        >>> y = m(torch.randn(8, 16, 5, 5))
    """

    _ndims = (4,)
    _shape_text = "4D (N, C, H, W)"


class MeanOnlyBatchNorm3d(_MeanOnlyBatchNorm):
    """Mean-only batch norm for (N, C, D, H, W) input: y = x − E[x] + β (·γ if ``scale``)."""

    _ndims = (5,)
    _shape_text = "5D (N, C, D, H, W)"
