r"""Fused Lp normalization kernels: the default path of :mod:`normmatters.functional` for p ≠ 2.

:func:`~normmatters.functional.lp_batch_norm`, ``lp_layer_norm``, ``lp_group_norm`` and
``lp_rms_norm`` (and so every module of :mod:`normmatters.nn`) first offer their call to this
package. When it applies — training-mode batch norm, or layer/group/RMS norm, with p = 1, ∞ or
Top(k ≤ 64), on a CPU (compiled C++ kernels, :mod:`.cpu`) or a CUDA device with Triton
(:mod:`.triton_kernels`) — one fused kernel computes the statistics and the output, and the
backward is the closed form of SPEC §2 (:mod:`.autograd`) instead of autograd through a chain of
ops. Otherwise (p = 2, evaluation mode, ghost batches, empty input, other devices, arguments the
reference refuses) the call falls through to the reference path, plain torch ops, which stays the
definition the kernels are tested against.

The switch: :func:`set_backend` (``"auto"``, the default, or ``"reference"``), or the environment
variable ``NORMMATTERS_KERNELS=reference`` (also ``off``/``0``) read at import. The first use on a
machine compiles the CPU kernels once (a few seconds, announced by a log message, cached on
disk); :func:`prepare` does that ahead of time.

Limitations of the fused path: no double backward (use the reference backend for gradient
penalties); for tied maxima the L∞/Top(k) gradient goes to one of the tied positions (see
:mod:`.autograd`).

Example::

    >>> import normmatters.kernels as K
    >>> K.set_backend("reference")   # plain torch ops everywhere
    >>> K.set_backend("auto")        # fused kernels where available (default)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["set_backend", "get_backend", "use_backend", "prepare", "available",
           "try_batch_norm", "try_layer_norm", "try_group_norm", "try_rms_norm"]

logger = logging.getLogger("normmatters.kernels")

_BACKENDS = ("auto", "reference")
_ALIASES = {"auto": "auto", "fused": "auto", "on": "auto", "1": "auto", "": "auto",
            "reference": "reference", "ref": "reference", "off": "reference", "0": "reference",
            "torch": "reference"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _parse(name: str, where: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in _ALIASES:
        raise ValueError(f"{where}: backend must be one of {_BACKENDS}, got {name!r}")
    return _ALIASES[name.strip().lower()]


_backend = _parse(os.environ.get("NORMMATTERS_KERNELS", "auto"), "NORMMATTERS_KERNELS")
_triton_ok: bool | None = None


def set_backend(name: str) -> None:
    """Select ``"auto"`` (fused kernels where they apply, the default) or ``"reference"``."""
    global _backend
    _backend = _parse(name, "set_backend")


def get_backend() -> str:
    """The current backend name, ``"auto"`` or ``"reference"``."""
    return _backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend for its body and restores the previous one."""
    global _backend
    previous, _backend = _backend, _parse(name, "use_backend")
    try:
        yield
    finally:
        _backend = previous


def _cpu_available(dtype: torch.dtype = torch.float32) -> bool:
    from . import cpu
    return cpu.library(dtype) is not None


# Both availability checks are constants of the process. Marked the way
# torch.compiler.assume_constant_result marks a function (without importing torch._dynamo at import
# time), so torch.compile evaluates them once while tracing instead of tracing the lock and the
# build inside.
_cpu_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _exporting() -> bool:
    # torch.export / ONNX export get the reference path: plain ATen ops that every exporter knows,
    # instead of the normmatters:: custom ops.
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            from . import triton_kernels
            _triton_ok = triton_kernels.available()
        except Exception as exc:  # an optional dependency: any import failure means "no"
            logger.info("normmatters: Triton kernels unavailable (%s)", exc)
            _triton_ok = False
    return _triton_ok


_triton_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def available(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether fused kernels can run on ``device`` (compiling the CPU kernels if needed)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_available(dtype)
    if device.type == "cuda":
        return _triton_available()
    return False


def prepare(dtypes: Sequence[torch.dtype] = (torch.float32,)) -> bool:
    """Build (or load from the cache) the CPU kernels for ``dtypes`` now, not on the first call.

    Returns whether all of them are available.
    """
    return all([_cpu_available(d) for d in dtypes])


def _device_ok(input: Tensor) -> bool:
    if input.device.type == "cpu":
        return _cpu_available(input.dtype)
    if input.device.type == "cuda":
        if not _triton_available():
            return False
        from . import triton_kernels
        return triton_kernels.supports(input.dtype)
    return False


def _p_k(p: float | int | str, k: int | None) -> tuple[float, int | None] | None:
    from ..functional.norm import _check_p_k
    try:
        p, k = _check_p_k(p, k)
    except ValueError:
        return None  # the reference path raises the error
    if p == 2.0 or (k is not None and k > _max_k()):
        return None
    return p, k


def _max_k() -> int:
    from .autograd import MAX_K
    return MAX_K


def _common(input: object, eps: object, min_dim: int = 2) -> bool:
    return (_backend == "auto" and not _exporting() and isinstance(input, Tensor) and input.dtype in _FLOATS
            and input.dim() >= min_dim and input.numel() > 0
            and isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0)


def _vector_ok(t: Tensor | None, size: int, input: Tensor) -> bool:
    return t is None or (isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == size
                         and t.device == input.device and t.dtype in _FLOATS)


def try_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                   eps: float, p: float | int | str, k: int | None, constant: str,
                   ghost_batch_size: int | None) -> Tensor | None:
    """The fused :func:`~normmatters.functional.lp_batch_norm`, or ``None`` where it does not apply."""
    if not training or not _common(input, eps):
        return None
    pk = _p_k(p, k)
    if pk is None:
        return None
    c = input.shape[1]
    n = input.numel() // c
    if n <= 1 or (pk[1] is not None and pk[1] > n):
        return None
    if ghost_batch_size is not None and input.shape[0] > ghost_batch_size:
        return None
    if not all(_vector_ok(t, c, input) for t in (weight, bias, running_mean, running_var)):
        return None
    if not _device_ok(input):
        return None
    from . import autograd
    return autograd.batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                               pk[0], pk[1], constant)


def _trailing(input: Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...] | None:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        return None
    return shape


def _affine_ok(t: Tensor | None, shape: tuple[int, ...], input: Tensor) -> bool:
    return t is None or (isinstance(t, Tensor) and tuple(t.shape) == shape
                         and t.device == input.device and t.dtype in _FLOATS)


def try_layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                   bias: Tensor | None, eps: float, p: float | int | str, k: int | None,
                   constant: str) -> Tensor | None:
    """The fused :func:`~normmatters.functional.lp_layer_norm`, or ``None`` where it does not apply."""
    if not _common(input, eps, 1):
        return None
    shape = _trailing(input, normalized_shape)
    if shape is None:
        return None
    pk = _p_k(p, k)
    if pk is None or (pk[1] is not None and pk[1] > math.prod(shape)):
        return None
    if not (_affine_ok(weight, shape, input) and _affine_ok(bias, shape, input)) or not _device_ok(input):
        return None
    from . import autograd
    return autograd.layer_norm(input, shape, weight, bias, eps, pk[0], pk[1], constant)


def try_group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                   eps: float, p: float | int | str, k: int | None, constant: str) -> Tensor | None:
    """The fused :func:`~normmatters.functional.lp_group_norm`, or ``None`` where it does not apply."""
    if not _common(input, eps) or not isinstance(num_groups, int) or num_groups < 1:
        return None
    c = input.shape[1]
    if c % num_groups != 0:
        return None
    pk = _p_k(p, k)
    if pk is None or (pk[1] is not None and pk[1] > input.numel() // (input.shape[0] * num_groups)):
        return None
    if not (_vector_ok(weight, c, input) and _vector_ok(bias, c, input)) or not _device_ok(input):
        return None
    from . import autograd
    return autograd.group_norm(input, num_groups, weight, bias, eps, pk[0], pk[1], constant)


def try_rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                 eps: float | None, p: float | int | str, k: int | None,
                 constant: str) -> Tensor | None:
    """The fused :func:`~normmatters.functional.lp_rms_norm`, or ``None`` where it does not apply."""
    if not (isinstance(input, Tensor) and input.dtype in _FLOATS):
        return None
    e = torch.finfo(input.dtype).eps if eps is None else eps
    if not _common(input, e, 1):
        return None
    shape = _trailing(input, normalized_shape)
    if shape is None:
        return None
    pk = _p_k(p, k)
    if pk is None or (pk[1] is not None and pk[1] > math.prod(shape)):
        return None
    if not _affine_ok(weight, shape, input) or not _device_ok(input):
        return None
    from . import autograd
    return autograd.rms_norm(input, shape, weight, e, pk[0], pk[1], constant)
