"""Build, cache and load the compiled CPU kernels (the C++ sources in ``csrc/``).

One ``g++ -O3 -march=native -fopenmp`` build of about two seconds of compiler time per dtype,
cached on disk (``$NORMMATTERS_CACHE_DIR`` or ``~/.cache/normmatters``) under a hash of the
source, the flags, the compiler and the CPU; later processes load it instantly. The library links
the same ``libgomp`` that torch already loaded, so it shares torch's thread pool.

If no compiler is found or a build fails, :func:`load` raises and the caller (:mod:`.cpu`) uses
the reference path.
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
import time
from pathlib import Path

__all__ = ["cache_dir", "source", "load"]

logger = logging.getLogger("normmatters.kernels")

_CSRC = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$NORMMATTERS_CACHE_DIR`` or ``$XDG_CACHE_HOME/normmatters``."""
    env = os.environ.get("NORMMATTERS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normmatters"


def source(name: str) -> str:
    """The text of ``csrc/<name>``."""
    return (_CSRC / name).read_text(encoding="utf-8")


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


def _build(target: Path, cxx: str, src_path: Path, defines: dict[str, int]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cxx, *_FLAGS, *(f"-D{k}={v}" for k, v in defines.items()), str(src_path), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders each install a complete file


def load(name: str, tag: str, defines: dict[str, int]) -> ctypes.CDLL:
    """Compile ``csrc/<name>`` with ``defines`` (once per machine, cached) and ``dlopen`` it.

    ``tag`` names the cached file (e.g. the dtype). Raises on any failure.
    """
    src_path = _CSRC / name
    text = src_path.read_text(encoding="utf-8")
    cxx = _compiler()
    key = hashlib.sha256("\0".join([text, " ".join(_FLAGS), repr(sorted(defines.items())), cxx or "",
                                    _cpu_signature(), platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{Path(name).stem}_{tag}_{key}.so"
    if not target.exists():
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX)")
        logger.warning("normmatters: compiling the fused CPU normalization kernels (%s) once "
                       "(a few seconds); cached in %s. Set NORMMATTERS_KERNELS=reference to skip.",
                       tag, target.parent)
        t0 = time.perf_counter()
        _build(target, cxx, src_path, defines)
        logger.info("normmatters: kernels compiled in %.1f s", time.perf_counter() - t0)
    return ctypes.CDLL(str(target))
