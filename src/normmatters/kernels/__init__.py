r"""Fused Lp normalization kernels and the dispatcher that chooses them.

:func:`~normmatters.functional.lp_batch_norm`, ``lp_layer_norm``, ``lp_group_norm`` and
``lp_rms_norm`` (and so every module of :mod:`normmatters.nn`) check their arguments once and hand
the call to :mod:`.dispatch`, which this package installs when imported. Where it applies — batch
norm (training: fused statistics, output and running statistics; evaluation: one fused
per-channel affine), layer, group and RMS norm, with p = 1, ∞ or Top(k ≤ 64), on a CPU (compiled
C++ kernels, :mod:`.cpu`) or a CUDA device with Triton (:mod:`.triton_kernels`) — one fused kernel
computes the statistics and the output, and the backward is the closed form
(:mod:`.autograd`; Hoffer et al. 2018, Sec. 4) instead of autograd through a chain of ops.
Otherwise (p = 2, ghost batches, empty input, other devices) the call runs the reference path of
:mod:`normmatters.functional.norm`, plain torch ops, which stays the definition the kernels are
tested against.

The switch: :func:`set_backend` (``"auto"``, the default, or ``"reference"``), or the environment
variable ``NORMMATTERS_KERNELS=reference`` (also ``off``/``0``) read at import. The first use on a
machine compiles the CPU kernels once (a few seconds, announced by a log message, cached on
disk); :func:`prepare` does that ahead of time.

Ties of L∞/Top(k) follow the one rule of :mod:`normmatters.functional.norm` (the lowest index
first); second-order gradients are exact on every path (see :mod:`.autograd`).

Example::

    >>> import normmatters.kernels as K
    >>> K.set_backend("reference")   # plain torch ops everywhere
    >>> K.set_backend("auto")        # fused kernels where available (default)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ..functional.constants import parse_norm_options
from . import autograd, dispatch
from .dispatch import fused_available, get_backend, set_backend, use_backend
from .enums import Affine, Layout, Mode

__all__ = ["set_backend", "get_backend", "use_backend", "prepare", "available", "Layout", "Mode",
           "Affine", "try_batch_norm", "try_layer_norm", "try_group_norm", "try_rms_norm"]

logger = logging.getLogger("normmatters.kernels")


def available(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether fused kernels can run on ``device`` (compiling the CPU kernels if needed)."""
    return fused_available(torch.device(device).type, dtype)


def prepare(dtypes: Sequence[torch.dtype] = (torch.float32,)) -> bool:
    """Build (or load from the cache) the CPU kernels for ``dtypes`` now, not on the first call.

    Returns whether all of them are available.
    """
    return all([fused_available("cpu", d) for d in dtypes])


def try_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                   eps: float, p: float | int | str, k: int | None, constant: str,
                   ghost_batch_size: int | None) -> Tensor | None:
    """The fused training-mode :func:`~normmatters.functional.lp_batch_norm` on checked arguments,
    or ``None`` where no fused backend applies."""
    p, k = parse_norm_options(p, k, constant)
    if not training or p == 2.0 or input.numel() == 0 or not available(input.device, input.dtype) \
            or get_backend() != "auto" or (k is not None and k > autograd.MAX_K) \
            or (ghost_batch_size is not None and input.shape[0] > ghost_batch_size):
        return None
    return dispatch.batch_norm(input, running_mean, running_var, weight, bias, True, momentum,
                               eps, p, k, constant, ghost_batch_size)


def try_layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                   bias: Tensor | None, eps: float, p: float | int | str, k: int | None,
                   constant: str) -> Tensor | None:
    """The fused layer norm on checked arguments, or ``None`` where it does not apply."""
    p, k = parse_norm_options(p, k, constant)
    if p == 2.0 or not available(input.device, input.dtype) or get_backend() != "auto":
        return None
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return dispatch.layer_norm(input, shape, weight, bias, eps, p, k, constant)


def try_group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                   eps: float, p: float | int | str, k: int | None, constant: str) -> Tensor | None:
    """The fused group norm on checked arguments, or ``None`` where it does not apply."""
    p, k = parse_norm_options(p, k, constant)
    if p == 2.0 or not available(input.device, input.dtype) or get_backend() != "auto":
        return None
    return dispatch.group_norm(input, num_groups, weight, bias, eps, p, k, constant)


def try_rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                 eps: float | None, p: float | int | str, k: int | None,
                 constant: str) -> Tensor | None:
    """The fused RMS norm on checked arguments, or ``None`` where it does not apply."""
    p, k = parse_norm_options(p, k, constant)
    if p == 2.0 or not available(input.device, input.dtype) or get_backend() != "auto":
        return None
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return dispatch.rms_norm(input, shape, weight, eps, p, k, constant)
