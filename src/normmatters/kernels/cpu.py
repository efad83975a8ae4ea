"""Fused CPU Lp normalization: build, cache and call the C++ kernels of :mod:`._cpu_source`.

Why a small C++ library called through ``ctypes`` rather than ``torch.compile`` or a torch C++
extension: measured on the project's 2-core machine, the ``torch.compile`` (inductor C++) version of
the same fused function needs a fresh compile per shape and tens of seconds before its first call,
and a ``torch.utils.cpp_extension`` build spends most of a minute parsing torch's headers. The
kernels here need no torch headers: one ``g++ -O3 -march=native -fopenmp`` build of about two
seconds of compiler time per dtype,
cached on disk (``$NORMMATTERS_CACHE_DIR`` or ``~/.cache/normmatters``) under a hash of the
source, the flags and the CPU, and later processes load it instantly. The library links the same
``libgomp`` that torch already loaded, so it shares torch's thread pool; the thread count is
``torch.get_num_threads()``.

If no compiler is found or a build fails, :func:`library` returns ``None`` (logged once) and
the caller uses the reference path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from ._cpu_source import SOURCE

__all__ = ["library", "cache_dir", "forward", "backward", "DTYPE_CODES"]

logger = logging.getLogger("normmatters.kernels")

#: dtype → code understood by the C++ entry points.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
_lock = threading.Lock()
_libs: dict[torch.dtype, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$NORMMATTERS_CACHE_DIR`` or ``$XDG_CACHE_HOME/normmatters``."""
    env = os.environ.get("NORMMATTERS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normmatters"


def _cpu_signature() -> str:
    # -march=native code is only valid on the CPU it was built for: key the cache on its flags.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _build(target: Path, cxx: str, code: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "lp_norm.cpp"
        src.write_text(SOURCE, encoding="utf-8")
        out = Path(tmp) / target.name
        cmd = [cxx, *_FLAGS, f"-DNM_DTYPE={code}", str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders each install a complete file


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


def _load(code: int, dtype: torch.dtype) -> ctypes.CDLL:
    cxx = _compiler()
    key = hashlib.sha256("\0".join([SOURCE, " ".join(_FLAGS), str(code), cxx or "",
                                    _cpu_signature(), platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lp_norm_cpu_{str(dtype).split('.')[-1]}_{key}.so"
    if not target.exists():
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX)")
        logger.warning("normmatters: compiling the fused CPU normalization kernels for %s once "
                       "(a few seconds); cached in %s. Set NORMMATTERS_KERNELS=reference to skip.",
                       dtype, target.parent)
        t0 = time.perf_counter()
        _build(target, cxx, code)
        logger.info("normmatters: kernels compiled in %.1f s", time.perf_counter() - t0)
    lib = ctypes.CDLL(str(target))
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.nm_forward.argtypes = [i32, i32, p, p, i64, i64, i64, p, p, i32, i32, i32, f64, f64, i32, p, p, p, i32]
    lib.nm_forward.restype = i32
    lib.nm_backward.argtypes = [i32, i32, p, p, p, i64, i64, i64, p, i32, p, p, i32, i32, f64, i32, p, p, i32]
    lib.nm_backward.restype = i32
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(x: Tensor, layout: int, weight: Tensor | None, bias: Tensor | None, mode: int, k: int,
            constant: float, eps: float, center: bool, affine: int = 1
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the fused forward on a dense ``[N, C, S]`` CPU tensor (see :mod:`._cpu_source`).

    ``affine`` 1: weight and bias per channel (size C); 2: per position s (size S; NCS, N = 1).
    Returns ``(y, mean, inv, sigma)``; the statistics have shape ``[C]`` in the accumulation dtype.
    """
    lib = library(x.dtype)
    assert lib is not None
    n_, c_, s_ = x.shape
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    mean = torch.empty(c_, dtype=stat)
    inv = torch.empty(c_, dtype=stat)
    sigma = torch.empty(c_, dtype=stat)
    rc = lib.nm_forward(DTYPE_CODES[x.dtype], layout, x.data_ptr(), y.data_ptr(), n_, c_, s_,
                        _ptr(weight), _ptr(bias), affine, mode, k, constant, eps, int(center),
                        mean.data_ptr(), inv.data_ptr(), sigma.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"normmatters CPU forward kernel failed with code {rc}")
    return y, mean, inv, sigma


def backward(grad: Tensor, x: Tensor, layout: int, weight: Tensor | None, mean: Tensor, inv: Tensor,
             mode: int, k: int, constant: float, center: bool, need_input: bool, need_affine: bool,
             affine: int = 1) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward (SPEC §2) of :func:`forward`; ``grad`` has ``x``'s layout."""
    lib = library(x.dtype)
    assert lib is not None
    n_, c_, s_ = x.shape
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if need_input else None
    size = c_ if affine == 1 else s_
    dw = torch.empty(size, dtype=mean.dtype) if need_affine else None
    db = torch.empty(size, dtype=mean.dtype) if need_affine else None
    rc = lib.nm_backward(DTYPE_CODES[x.dtype], layout, grad.data_ptr(), x.data_ptr(), _ptr(dx),
                         n_, c_, s_, _ptr(weight), affine, mean.data_ptr(), inv.data_ptr(), mode, k,
                         constant, int(center), _ptr(dw), _ptr(db), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"normmatters CPU backward kernel failed with code {rc}")
    return dx, dw, db
