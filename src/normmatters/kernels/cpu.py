"""Fused CPU Lp normalization: call the C++ kernels of ``csrc/lp_norm_cpu.cpp`` through ctypes.

Why a small C++ library called through ``ctypes`` rather than ``torch.compile`` or a torch C++
extension: measured on the project's 2-core machine, the ``torch.compile`` (inductor C++) version of
the same fused function needs a fresh compile per shape and tens of seconds before its first call,
and a ``torch.utils.cpp_extension`` build spends most of a minute parsing torch's headers. The
kernels here need no torch headers; :mod:`.build` compiles and caches them. The thread count is
``torch.get_num_threads()``.

If no compiler is found or a build fails, :func:`library` returns ``None`` (logged once) and
the caller uses the reference path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import torch
from torch import Tensor

from . import build
from .enums import DTYPE_CODES, Affine, Layout

__all__ = ["library", "supports", "forward", "backward", "evaluate", "eager_ops", "set_op_kernels",
           "DTYPE_CODES", "SMALL"]

logger = logging.getLogger("normmatters.kernels")

#: ``forward`` and ``backward`` take the packed statistics of the eager path.
PACKED = True

#: Tensors with fewer elements run on one thread: starting an OpenMP team costs more than it saves.
SMALL = 1 << 14

_lock = threading.RLock()
_libs: dict[torch.dtype, ctypes.CDLL | None] = {}


def library(dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The compiled kernels for ``dtype``, built on first use; ``None`` if they cannot be built.

    Each dtype is its own small library (about 2 s of compiler time). The first build on a machine
    is announced with a log message at WARNING level; the result is cached on disk, so later
    processes load it in milliseconds.
    """
    if dtype in _libs:
        return _libs[dtype]
    if dtype not in DTYPE_CODES:
        return None
    with _lock:
        if dtype not in _libs:
            try:
                _libs[dtype] = _load(DTYPE_CODES[dtype], dtype)
            except Exception as exc:  # any failure means: use the reference path
                logger.warning("normmatters: fused CPU kernels for %s unavailable (%s); using the "
                               "reference path", dtype, exc)
                _libs[dtype] = None
    return _libs[dtype]


# The eager operators of csrc/lp_norm_op.cpp (torch ops with their autograd node in C++), loaded
# once per process; False when they cannot be built (the Python path of .autograd runs instead).
# NORMMATTERS_CPU_OP=0 turns them off.
_op_loaded: bool | None = None
_registered: dict[torch.dtype, bool] = {}


def _op_enabled() -> bool:
    return os.environ.get("NORMMATTERS_CPU_OP", "1").strip().lower() not in ("0", "off", "false", "no")


def eager_ops(dtype: torch.dtype) -> bool:
    """Whether ``torch.ops.normmatters.eager_norm`` / ``eager_bn_eval`` serve CPU tensors of
    ``dtype`` (building the operator library on first use; about half a minute once per machine
    and torch version). A dictionary lookup after the first call."""
    ok = _registered.get(dtype)
    if ok is not None:
        return ok
    with _lock:
        ok = _registered.get(dtype)
        if ok is None:
            ok = _registered[dtype] = _register(dtype)
    return ok


def _register(dtype: torch.dtype) -> bool:
    global _op_loaded
    if library(dtype) is None or not _op_enabled():
        return False
    if _op_loaded is None:
        try:
            build.load_op_library("lp_norm_op.cpp")
            _op_loaded = True
        except Exception as exc:  # any failure: the Python path, which is just slower
            logger.warning("normmatters: the eager CPU operators are unavailable (%s); using the "
                           "Python path around the same kernels", exc)
            _op_loaded = False
    if not _op_loaded:
        return False
    set_op_kernels(dtype)
    return True


def set_op_kernels(dtype: torch.dtype, forward: object = None, backward: object = None,
                   evaluate: object = None) -> None:
    """Point the eager operators at these kernels for ``dtype``: ctypes functions with the C
    signatures of ``nm_forward`` / ``nm_backward`` / ``nm_eval`` (the tests inject failing and
    wrong kernels this way); ``None`` means the compiled library's own."""
    lib = library(dtype)
    assert lib is not None
    fns = [f if f is not None else getattr(lib, name)
           for f, name in ((forward, "nm_forward"), (backward, "nm_backward"), (evaluate, "nm_eval"))]
    addr = [ctypes.cast(f, ctypes.c_void_p).value for f in fns]
    torch.ops.normmatters.set_kernels(int(DTYPE_CODES[dtype]), *addr)


def supports(dtype: torch.dtype, layout: int, affine: int) -> bool:
    """What this backend takes: every float dtype it can build, both layouts, per-position affine
    only on NCS (layer and RMS norm rows). Group affine (:attr:`Affine.GROUP`) is the eager
    operators' alone (csrc/lp_norm_op.cpp), which pass the group geometry to the kernels."""
    return dtype in DTYPE_CODES and affine != Affine.GROUP and (affine != Affine.POSITION or layout == Layout.NCS)


def _load(code: int, dtype: torch.dtype) -> ctypes.CDLL:
    lib = build.load("lp_norm_cpu.cpp", str(dtype).split(".")[-1], {"NM_DTYPE": int(code)})
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.nm_forward.argtypes = [i32, i32, p, p, i64, i64, i64, p, p, i32, i64, i64, i32, i32, f64,
                               f64, i32, p, p, p, p, p, p, f64, f64, i32]
    lib.nm_forward.restype = i32
    lib.nm_backward.argtypes = [i32, i32, p, p, p, i64, i64, i64, p, i32, i64, i64, p, p, p, i32,
                                i32, f64, i32, p, p, i32]
    lib.nm_backward.restype = i32
    lib.nm_eval.argtypes = [i32, i32, p, p, i64, i64, i64, p, p, p, p, f64, i32]
    lib.nm_eval.restype = i32
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(x: Tensor) -> int:
    return 1 if x.numel() < SMALL else torch.get_num_threads()


def forward(x: Tensor, layout: int, weight: Tensor | None, bias: Tensor | None, mode: int, k: int,
            constant: float, eps: float, center: bool, affine: int = Affine.CHANNEL,
            running_mean: Tensor | None = None, running_var: Tensor | None = None,
            momentum: float = 0.0, packed: bool = False) -> tuple[Tensor, ...]:
    """Run the fused forward on a dense ``[N, C, S]`` CPU tensor (see ``csrc/lp_norm_cpu.cpp``).

    ``affine`` (:class:`~.enums.Affine`) CHANNEL: weight and bias per channel (size C); POSITION:
    per position s (size S; NCS, N = 1). Returns ``(y, mean, inv, sigma)``; the statistics have
    shape ``[C]`` in the accumulation dtype. ``running_mean`` / ``running_var`` (contiguous, of
    that dtype) are updated in place with ``momentum`` and the Bessel factor n/(n−1).
    ``packed=True`` (the eager path; ``x`` already in ``layout``) returns ``(y, stats)`` instead,
    ``stats`` the ``[3, C]`` rows mean, inv, sigma in one allocation.
    """
    if packed:
        return _run_forward(x, layout, weight, bias, mode, k, constant, eps, center, affine,
                            running_mean, running_var, momentum)
    lib = library(x.dtype)
    assert lib is not None
    n_, c_, s_ = x.shape
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    mean = torch.empty(c_, dtype=stat)
    inv = torch.empty(c_, dtype=stat)
    sigma = torch.empty(c_, dtype=stat)
    n = n_ * s_
    rc = lib.nm_forward(DTYPE_CODES[x.dtype], layout, x.data_ptr(), y.data_ptr(), n_, c_, s_,
                        _ptr(weight), _ptr(bias), affine, 0, 0, mode, k, constant, eps, int(center),
                        mean.data_ptr(), inv.data_ptr(), sigma.data_ptr(), None, _ptr(running_mean),
                        _ptr(running_var), momentum, n / max(n - 1, 1), _threads(x))
    if rc != 0:
        raise RuntimeError(f"normmatters CPU forward kernel failed with code {rc}")
    return y, mean, inv, sigma


def backward(grad: Tensor, x: Tensor, layout: int, weight: Tensor | None, mean: Tensor, inv: Tensor,
             mode: int, k: int, constant: float, center: bool, need_input: bool, need_affine: bool,
             affine: int = Affine.CHANNEL, stats: Tensor | None = None
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward (``normmatters.functional.norm``) of :func:`forward`; ``grad`` has ``x``'s layout.

    ``stats`` (from ``forward(..., packed=True)``) replaces ``mean`` and ``inv``.
    """
    if stats is not None:
        return _run_backward(grad, x, layout, weight, stats, mode, k, constant, center,
                             need_input, need_affine, affine)
    lib = library(x.dtype)
    assert lib is not None
    n_, c_, s_ = x.shape
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if need_input else None
    size = s_ if affine == Affine.POSITION else c_
    dw = torch.empty(size, dtype=mean.dtype) if need_affine else None
    db = torch.empty(size, dtype=mean.dtype) if need_affine else None
    rc = lib.nm_backward(DTYPE_CODES[x.dtype], layout, grad.data_ptr(), x.data_ptr(), _ptr(dx),
                         n_, c_, s_, _ptr(weight), affine, 0, 0, mean.data_ptr(), inv.data_ptr(), None, mode, k,
                         constant, int(center), _ptr(dw), _ptr(db), _threads(x))
    if rc != 0:
        raise RuntimeError(f"normmatters CPU backward kernel failed with code {rc}")
    return dx, dw, db


def evaluate(x: Tensor, layout: int, running_mean: Tensor, running_var: Tensor,
             weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Evaluation batch norm y = a·x + b per channel (a = γ/(√running_var + eps), b = β − running_mean·a)
    on a dense ``[N, C, S]`` CPU tensor; the vectors are contiguous, in the accumulation dtype."""
    lib = library(x.dtype)
    assert lib is not None
    n_, c_, s_ = x.shape
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    rc = lib.nm_eval(DTYPE_CODES[x.dtype], layout, x.data_ptr(), y.data_ptr(), n_, c_, s_,
                     running_mean.data_ptr(), running_var.data_ptr(), _ptr(weight), _ptr(bias), eps,
                     _threads(x))
    if rc != 0:
        raise RuntimeError(f"normmatters CPU evaluation kernel failed with code {rc}")
    return y


def _run_forward(x: Tensor, layout: int, weight: Tensor | None, bias: Tensor | None, mode: int,
                k: int, constant: float, eps: float, center: bool, affine: int,
                running_mean: Tensor | None, running_var: Tensor | None,
                momentum: float) -> tuple[Tensor, Tensor]:
    """``forward(..., packed=True)``: ``(y, stats)`` with ``stats`` the ``[3, C]`` rows mean,
    1/(σ̂ + eps) and σ̂ in one allocation (``x`` already in ``layout``, vectors contiguous)."""
    lib = _libs.get(x.dtype) or library(x.dtype)
    n_, c_, s_ = x.shape
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    stats = torch.empty(3, c_, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    p = stats.data_ptr()
    step = c_ * stats.element_size()
    n = n_ * s_
    rc = lib.nm_forward(_CODES[x.dtype], layout, x.data_ptr(), y.data_ptr(), n_, c_, s_,
                        weight.data_ptr() if weight is not None else None,
                        bias.data_ptr() if bias is not None else None, affine, 0, 0, mode, k, constant,
                        eps, center, p, p + step, p + 2 * step, None,
                        running_mean.data_ptr() if running_mean is not None else None,
                        running_var.data_ptr() if running_var is not None else None, momentum,
                        n / (n - 1) if n > 1 else 1.0, 1 if n_ * c_ * s_ < SMALL else torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"normmatters CPU forward kernel failed with code {rc}")
    return y, stats


def _run_backward(grad: Tensor, x: Tensor, layout: int, weight: Tensor | None, stats: Tensor,
                 mode: int, k: int, constant: float, center: bool, need_input: bool,
                 need_affine: bool, affine: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``backward(..., stats=stats)``."""
    lib = _libs.get(x.dtype) or library(x.dtype)
    n_, c_, s_ = x.shape
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if need_input else None
    size = s_ if affine == Affine.POSITION else c_
    dw = torch.empty(size, dtype=stats.dtype) if need_affine else None
    db = torch.empty(size, dtype=stats.dtype) if need_affine else None
    p = stats.data_ptr()
    rc = lib.nm_backward(_CODES[x.dtype], layout, grad.data_ptr(), x.data_ptr(), _ptr(dx),
                         n_, c_, s_, _ptr(weight), affine, 0, 0, p, p + c_ * stats.element_size(), None, mode, k,
                         constant, center, _ptr(dw), _ptr(db),
                         1 if n_ * c_ * s_ < SMALL else torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"normmatters CPU backward kernel failed with code {rc}")
    return dx, dw, db


# Plain ints for ctypes (an IntEnum converts more slowly).
_CODES = {dt: int(code) for dt, code in DTYPE_CODES.items()}
