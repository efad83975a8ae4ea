"""The dispatcher: run a checked normalization call on a fused backend where one applies, else on
the reference path of :mod:`normmatters.functional.norm`.

Arguments reach these functions already checked (by the module's ``forward`` or the public
function of :mod:`normmatters.functional`), with ``p`` and ``k`` parsed; nothing here re-checks
them. A fused backend runs when

* the backend switch is ``"auto"`` (:func:`set_backend`) and no exporter is tracing;
* the call is one the fused kernels compute: p ≠ 2, a non-empty input, k ≤ ``MAX_K``, batch norm
  in training without ghost batches (evaluation: one fused per-channel affine, see
  :func:`batch_norm`);
* the device has a backend (:func:`autograd.backend_for`: the CPU kernels, Triton on CUDA) whose
  ``supports(dtype, layout, affine)`` accepts the call, built for this dtype;
* :func:`selfcheck.trusted` trusts it for this device, dtype and layout. A fused call that raises
  marks the combination untrusted (:func:`selfcheck.distrust`) and the reference runs instead.

Every decision is a dictionary lookup after the first call of a combination.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from ..functional import norm as fn
from ..functional.constants import lp_constant
from . import autograd, cpu, selfcheck
from .enums import Layout

__all__ = ["set_backend", "get_backend", "use_backend", "fused_available", "batch_norm",
           "layer_norm", "group_norm", "rms_norm", "eager_args", "eager_ready", "eager_norm",
           "eager_bn_eval"]

logger = logging.getLogger("normmatters.kernels")

BACKENDS = ("auto", "reference")
_ALIASES = {"auto": "auto", "fused": "auto", "on": "auto", "1": "auto", "": "auto",
            "reference": "reference", "ref": "reference", "off": "reference", "0": "reference",
            "torch": "reference"}


def parse_backend(name: str, where: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in _ALIASES:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {name!r}")
    return _ALIASES[name.strip().lower()]


# The process default (set_backend, NORMMATTERS_KERNELS) and each thread's override (use_backend).
# A thread-local rather than a context variable: torch.compile reads it (and guards on it) where
# ContextVar.get is unsupported. A new thread starts without an override: one thread's block never
# changes another thread's path, and the self-check's helper thread chooses its own.
_state = {"backend": parse_backend(os.environ.get("NORMMATTERS_KERNELS", "auto"), "NORMMATTERS_KERNELS")}
_local = threading.local()
_compiling = torch.compiler.is_compiling


def _backend() -> str:
    if _compiling():
        # Traced by dynamo, which guards on this read (a change recompiles); it does not guard a
        # read through __dict__.
        override = getattr(_local, "backend", None)
        return _state["backend"] if override is None else override
    return _eager_backend()


def _eager_backend() -> str:
    """The backend in force for eager calls: a dictionary lookup (getattr with a default raises
    and catches inside)."""
    override = _local.__dict__.get("backend")
    return _state["backend"] if override is None else override


def set_backend(name: str) -> None:
    """Select the process-wide default: ``"auto"`` (fused kernels where they apply, the default) or
    ``"reference"``. A :func:`use_backend` block of a thread takes precedence in that thread."""
    _state["backend"] = parse_backend(name, "set_backend")


def get_backend() -> str:
    """The backend this thread uses now, ``"auto"`` or ``"reference"``."""
    return _backend()


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend for its body, in this thread only, and restores the
    previous choice of this thread on exit (blocks in other threads are independent)."""
    chosen = parse_backend(name, "use_backend")
    previous = getattr(_local, "backend", None)
    _local.backend = chosen
    try:
        yield
    finally:
        _local.backend = previous


_available: dict[tuple[str, torch.dtype], bool] = {}


def fused_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a fused backend exists for ``device_type`` and is built for ``dtype`` (cached)."""
    if device_type == "cpu":
        return cpu.library(dtype) is not None  # itself a dictionary lookup after the first call
    key = (device_type, dtype)
    ok = _available.get(key)
    if ok is None:
        ok = _probe(device_type, dtype)
        _available[key] = ok
    return ok


# A constant of the process: torch.compile evaluates it once while tracing instead of tracing the
# build inside (what torch.compiler.assume_constant_result marks, without importing torch._dynamo).
fused_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _probe(device_type: str, dtype: torch.dtype) -> bool:
    if device_type == "cuda":
        try:
            from . import triton_kernels  # optional dependency
        except Exception as exc:  # any import failure means "no"
            logger.info("normmatters: Triton kernels unavailable (%s)", exc)
            return False
        if not triton_kernels.available():
            return False
        autograd.register_backend("cuda", triton_kernels)
        return triton_kernels.supports(dtype)
    return False


def _exporting() -> bool:
    # torch.export / ONNX export get the reference path: plain ATen ops that every exporter knows,
    # instead of the normmatters:: custom ops.
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


_constants: dict[tuple[float, int | None, int, str], float] = {}


def _constant(p: float, k: int | None, n, constant: str) -> float:
    if torch.compiler.is_compiling():
        # While compiling, n may be symbolic: L∞ / Top(k) constants are left to the operator,
        # which computes C_k(n) for the n of each call (autograd.RUNTIME_CONSTANT).
        if p == math.inf and constant in autograd.RUNTIME_CONSTANT:
            return autograd.RUNTIME_CONSTANT[constant]
        return fn.dispersion_constant(p, k, n, constant)
    key = (p, k, n, constant)
    c = _constants.get(key)
    if c is None:
        c = _constants[key] = lp_constant(p, k, n, constant)
    return c


# torch.func transforms (vmap, grad, jacrev, per-sample gradients) run the reference path for that
# call only: the fused operators' autograd nodes do not support them, and a transformed call is no
# failure of the kernels (the fast path stays on for every other call).
_transforms_active = fn.transforms_active


def _fused(input: Tensor, layout: int, vectors: Sequence[Tensor | None]) -> bool:
    """Whether a fused backend may take this call (see the module docstring)."""
    if _backend() != "auto" or _exporting() or _transforms_active():
        return False
    dev = input.device
    if not fused_available(dev.type, input.dtype):
        return False
    for t in vectors:
        if t is not None and t.device != dev:
            return False
    # A constant of the process for torch.compile too: evaluated (and checked) once, eagerly.
    return selfcheck.trusted(dev, input.dtype, layout)


def _layout_of(input: Tensor) -> int:
    if input.dim() == 2 or input.is_contiguous():
        return Layout.NSC if input.dim() == 2 else Layout.NCS
    x3 = input.reshape(input.shape[0], input.shape[1], -1)
    return Layout.NSC if x3.transpose(1, 2).is_contiguous() else Layout.NCS


def _failed(input: Tensor, layout: int, exc: Exception) -> None:
    # distrust() warns (once) and logs what failed.
    selfcheck.distrust(input.device, input.dtype, layout, f"{type(exc).__name__}: {exc}")


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
               eps: float, p: float, k: int | None, constant: str,
               ghost_batch_size: int | None = None) -> Tensor:
    """Batch norm on checked arguments (those of :func:`normmatters.functional.lp_batch_norm`)."""
    if p != 2.0 and input.numel() > 0:
        if training:
            if ((ghost_batch_size is None or input.shape[0] <= ghost_batch_size)
                    and (k is None or k <= autograd.MAX_K)):
                layout = _layout_of(input)
                n = input.numel() // input.shape[1]
                # k > n: the reference path raises the error; a constant of a symbolic n (a
                # tensor in the graph): the traced reference path.
                c = _constant(p, k, n, constant) if k is None or k <= n else None
                if isinstance(c, float) and _fused(input, layout, (weight, bias, running_mean, running_var)):
                    try:
                        return autograd.batch_norm(input, running_mean, running_var, weight, bias,
                                                   momentum, eps, p, k, c)
                    except Exception as exc:  # noqa: BLE001 - any failure: the reference path
                        _failed(input, layout, exc)
        elif running_mean is not None and running_var is not None:
            layout = _layout_of(input)
            if _fused(input, layout, (weight, bias, running_mean, running_var)) and \
                    not torch.compiler.is_compiling():
                try:
                    y = autograd.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
                except Exception as exc:  # noqa: BLE001
                    _failed(input, layout, exc)
                    y = None
                if y is not None:
                    return y
    return fn.reference_batch_norm(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps, p, k, constant, ghost_batch_size)


def _rows_ok(input: Tensor, p: float, k: int | None, vectors: Sequence[Tensor | None]) -> bool:
    return (p != 2.0 and input.numel() > 0 and (k is None or k <= autograd.MAX_K)
            and _fused(input, Layout.NCS, vectors))


def layer_norm(input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None,
               bias: Tensor | None, eps: float, p: float, k: int | None, constant: str) -> Tensor:
    """Layer norm on checked arguments (those of :func:`normmatters.functional.lp_layer_norm`)."""
    if eps > 0 and _rows_ok(input, p, k, (weight, bias)):
        n = 1
        for s in normalized_shape:
            n *= s
        try:
            return autograd.layer_norm(input, normalized_shape, weight, bias, eps, p, k,
                                       _constant(p, k, n, constant))
        except Exception as exc:  # noqa: BLE001
            _failed(input, Layout.NCS, exc)
    return fn.reference_layer_norm(input, normalized_shape, weight, bias, eps, p, k, constant)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
               eps: float, p: float, k: int | None, constant: str) -> Tensor:
    """Group norm on checked arguments (those of :func:`normmatters.functional.lp_group_norm`)."""
    n = input.numel() // (input.shape[0] * num_groups) if input.dim() >= 2 and input.numel() else 0
    c = _constant(p, k, n, constant) if n >= 1 and (k is None or k <= n) else None
    if eps > 0 and isinstance(c, float) and _rows_ok(input, p, k, (weight, bias)):
        try:
            return autograd.group_norm(input, num_groups, weight, bias, eps, p, k, c)
        except Exception as exc:  # noqa: BLE001
            _failed(input, Layout.NCS, exc)
    return fn.reference_group_norm(input, num_groups, weight, bias, eps, p, k, constant)


def rms_norm(input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None,
             eps: float | None, p: float, k: int | None, constant: str) -> Tensor:
    """RMS norm on checked arguments (those of :func:`normmatters.functional.lp_rms_norm`)."""
    e = torch.finfo(input.dtype).eps if eps is None else eps
    if e > 0 and _rows_ok(input, p, k, (weight,)):
        n = 1
        for s in normalized_shape:
            n *= s
        try:
            return autograd.rms_norm(input, normalized_shape, weight, e, p, k,
                                     _constant(p, k, n, constant))
        except Exception as exc:  # noqa: BLE001
            _failed(input, Layout.NCS, exc)
    return fn.reference_rms_norm(input, normalized_shape, weight, eps, p, k, constant)


# The modules' short path on CPU (nn/*.py): a call whose configuration and input pass these two
# cheap tests goes straight to the C++ operator, with the checks, the dispatch above and the
# reference path behind it only when they fail. The operator computes exactly what the
# dispatcher's fused path computes (it *is* that path in eager mode, see autograd.eager_op).

_CPU = torch.device("cpu")
_eager_args: dict[tuple, tuple[int, int, float] | None] = {}


def eager_args(p: float, k: int | None, constant: str, n: int, eps: float
               ) -> tuple[int, int, float] | None:
    """``(mode, k, C)`` for the eager operators (C the dispersion's constant for n values), or
    ``None`` for a configuration they never take (p = 2, eps ≤ 0, k > MAX_K or k > n)."""
    key = (p, k, constant, n, eps)
    args = _eager_args.get(key, False)
    if args is False:
        if p == 2.0 or not eps > 0 or n < 1 or (k is not None and (k > autograd.MAX_K or k > n)):
            args = None
        else:
            args = (*autograd._mode(p, k), _constant(p, k, n, constant))
        _eager_args[key] = args
    return args


_is_compiling = torch.compiler.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_ready: dict[tuple[torch.dtype, int], int] = {}  # (dtype, layout) → selfcheck.generation when trusted
# autograd.backend_for's table, read by device type: backend_for(_CPU) costs 0.4 µs a call (the
# torch.device's .type), a tenth of a small norm's whole host time.
_cpu_backends = autograd._BACKENDS


def eager_ready(input: Tensor, layout: int) -> bool:
    """Whether the C++ eager CPU operators may take a call on ``input`` now: a non-empty CPU
    tensor of a dtype they serve, the ``"auto"`` backend, not compiling or exporting, and the
    self-check's trust for this dtype and layout (cached until a verdict changes)."""
    # Every call of a module on the CPU asks this: the cheapest tests first, each read once.
    if _is_compiling() or not input.is_cpu:
        return False
    if _eager_backend() != "auto" or _is_exporting() \
            or not input.numel() or _transforms_active():
        return False
    key = (input.dtype, layout)
    if _ready.get(key) == selfcheck.generation and _cpu_backends.get("cpu") is cpu \
            and cpu.eager_ops(key[0]):
        return True
    ok = autograd.eager_op(input) and selfcheck.trusted(_CPU, input.dtype, layout)
    if ok:
        _ready[key] = selfcheck.generation
    return ok


# The operators themselves (the modules call them after eager_ready / eager_args).
eager_norm = autograd.eager_norm
eager_bn_eval = autograd.eager_bn_eval


fn.install_dispatcher(batch=batch_norm, layer=layer_norm, group=group_norm, rms=rms_norm)
