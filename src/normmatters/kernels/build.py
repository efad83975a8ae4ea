"""Build, cache, verify and load the compiled CPU kernels (the C++ sources in ``csrc/``).

One ``g++ -O3 -march=native -fopenmp`` build of about two seconds of compiler time per dtype,
cached on disk in ``<cache>/kernels`` (``<cache>`` is :func:`cache_root`) under a hash of the
source, the flags, the compiler and the CPU; later processes load it instantly. The library links
the same ``libgomp`` that torch already loaded, so it shares torch's thread pool.

What is loaded is verified first: each build records the size and SHA-256 of the library in a
sidecar file (``<name>.json``, written atomically next to it), and a cached library whose size
or hash does not match — truncated, emptied, overwritten, or without its record — is rebuilt,
never ``dlopen``-ed (mapping a truncated library kills the process with SIGBUS). After loading,
the entry points (``nm_forward``, ``nm_backward``) and the ABI version the source declares
(``nm_abi_version``) are checked; a library that fails is rebuilt once.

The compiler: ``$CXX`` if set (an error if it is not found: no silent fall back to another
compiler), else ``g++`` or ``c++`` from ``PATH``. Builds run in a temporary folder of the cache
and are moved into place with an atomic rename, so concurrent builders each install a complete
file and a killed build never leaves a partial library under the final name; the folders that
killed builds leave behind are removed by the next build once they are
:data:`STALE_SECONDS` old.

If no compiler is found or a build fails, :func:`load` raises and the caller (:mod:`.cpu`) uses
the reference path.
"""

from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cache_root", "cache_dir", "kernel_dir", "source", "load", "load_op_library", "verify",
           "STALE_SECONDS", "SYMBOLS"]

logger = logging.getLogger("normmatters.kernels")

_CSRC = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]

#: Entry points every kernel library must export.
SYMBOLS = ("nm_forward", "nm_backward")

#: Temporary build folders older than this (seconds) are left over from a killed build.
STALE_SECONDS = 600

_TMP_PREFIX = "tmp-build-"


def cache_root() -> Path:
    """The root of normmatters' caches (kernels in ``kernels/``, data sets in ``data/``).

    ``$NORMMATTERS_CACHE_DIR``, else ``$NORMMATTERS_CACHE`` (an alias), else
    ``$XDG_CACHE_HOME/normmatters`` or ``~/.cache/normmatters``.
    """
    for name in ("NORMMATTERS_CACHE_DIR", "NORMMATTERS_CACHE"):
        env = os.environ.get(name)
        if env:
            return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normmatters"


def cache_dir() -> Path:
    """Same as :func:`cache_root` (kept for callers of the earlier name)."""
    return cache_root()


def kernel_dir() -> Path:
    """Where compiled kernels are kept: ``cache_root() / "kernels"``."""
    return cache_root() / "kernels"


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


def _compiler() -> list[str] | None:
    """The compiler command: ``$CXX`` (which may carry arguments, e.g. ``ccache g++``) or ``g++`` / ``c++``.

    ``None`` if ``CXX`` is unset and neither is on ``PATH``. Raises ``RuntimeError`` if ``CXX``
    is set but names no executable: an explicit choice is not replaced by another compiler.
    """
    env = os.environ.get("CXX", "").strip()
    if env:
        words = shlex.split(env)
        found = shutil.which(words[0])
        if found is None:
            raise RuntimeError(f"CXX={env!r} is not an executable compiler")
        return [found, *words[1:]]
    found = shutil.which("g++") or shutil.which("c++")
    return [found] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_path(target: Path) -> Path:
    return target.with_suffix(".json")


def verify(target: Path) -> str | None:
    """Check a cached library against its build record; ``None`` if intact, else what is wrong."""
    try:
        record = json.loads(_record_path(target).read_text(encoding="utf-8"))
        size, digest = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return "no build record"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable build record ({exc})"
    try:
        actual = target.stat().st_size
    except OSError as exc:
        return f"cannot stat ({exc})"
    if actual != size:
        return f"size {actual} bytes, built with {size}"
    try:
        if _sha256(target) != digest:
            return "SHA-256 differs from the build record"
    except OSError as exc:
        return f"unreadable ({exc})"
    return None


def _clean_stale(folder: Path) -> None:
    # Temporary build folders of killed builds (``tmp*``; older versions used tempfile's default
    # prefix). A folder younger than STALE_SECONDS may belong to a build running right now.
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            if (entry.name.startswith("tmp") and entry.is_dir() and not entry.is_symlink()
                    and now - entry.stat().st_mtime > STALE_SECONDS):
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _write_record(path: Path, record: dict) -> None:
    # Written in the build folder, then renamed: readers see the old record or the whole new one.
    path.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


def _build(target: Path, cxx: list[str], src_path: Path, defines: dict[str, int],
           flags: Sequence[str] = _FLAGS, libs: Sequence[str] = ()) -> str:
    """Compile into a temporary folder, record size and hash, rename into place; the hash."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target.parent)
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [*cxx, *flags, *(f"-D{k}={v}" for k, v in defines.items()), str(src_path), "-o",
               str(out), *libs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        digest = _sha256(out)
        record = Path(tmp) / _record_path(target).name
        _write_record(record, {"size": out.stat().st_size, "sha256": digest, "compiler": cxx,
                               "defines": defines, "source": src_path.name})
        # Atomic renames: concurrent builders each install a complete library and record (a
        # reader that sees one builder's library with another's record rebuilds it).
        os.replace(out, target)
        os.replace(record, _record_path(target))
    return digest


def _abi_version(text: str) -> int | None:
    m = re.search(r"\bnm_abi_version\s*\(\s*(?:void\s*)?\)\s*\{\s*return\s+(\d+)\s*;", text)
    return int(m.group(1)) if m else None


def _check_library(lib: ctypes.CDLL, symbols: Sequence[str], abi: int | None,
                   defines: dict[str, int]) -> str | None:
    missing = [s for s in symbols if not hasattr(lib, s)]
    if missing:
        return f"missing symbols {', '.join(missing)}"
    if abi is not None:
        if not hasattr(lib, "nm_abi_version"):
            return "missing symbol nm_abi_version"
        fn = lib.nm_abi_version
        fn.restype, fn.argtypes = ctypes.c_int, []
        if fn() != abi:
            return f"ABI version {fn()}, expected {abi}"
    if "NM_DTYPE" in defines and hasattr(lib, "nm_dtype"):
        fn = lib.nm_dtype
        fn.restype, fn.argtypes = ctypes.c_int, []
        if fn() != defines["NM_DTYPE"]:
            return f"built for dtype code {fn()}, expected {defines['NM_DTYPE']}"
    return None


def _unload(lib: ctypes.CDLL) -> None:
    # So that loading the rebuilt file maps it afresh instead of returning the cached handle.
    try:
        _ctypes.dlclose(lib._handle)
    except Exception:  # noqa: BLE001 - best effort: if it stays loaded, the reload fails the check again
        pass


def _ensure_built(target: Path, cxx: list[str] | None, src_path: Path, defines: dict[str, int],
                  problem: str | None, what: str, announce: str, flags: Sequence[str] = _FLAGS,
                  libs: Sequence[str] = ()) -> None:
    """Build ``target`` if it is missing or ``problem`` (from :func:`verify`) says it is damaged,
    announcing a first build with ``announce``; raises unless the result verifies."""
    if target.exists() and problem is None:
        return
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    if problem is not None:
        logger.warning("normmatters: the cached %s %s fails verification (%s); rebuilding it.",
                       what, target, problem)
    else:
        logger.warning("%s", announce)
    t0 = time.perf_counter()
    digest = _build(target, cxx, src_path, defines, flags, libs)
    logger.info("normmatters: %s compiled in %.1f s", what, time.perf_counter() - t0)
    problem = verify(target)
    if problem is not None and _sha256(target) != digest:
        time.sleep(0.2)  # another builder's library and record are being installed right now
        problem = verify(target)
    if problem is not None:
        raise RuntimeError(f"the freshly built {target} fails verification ({problem})")


def load(name: str, tag: str, defines: dict[str, int],
         symbols: Sequence[str] = SYMBOLS) -> ctypes.CDLL:
    """Compile ``csrc/<name>`` with ``defines`` (once per machine, cached), verify and ``dlopen`` it.

    ``tag`` names the cached file (e.g. the dtype); ``symbols`` must be exported. Raises on any
    failure (no compiler, a failed build, a library that fails its checks after a rebuild).
    """
    src_path = _CSRC / name
    text = src_path.read_text(encoding="utf-8")
    cxx = _compiler()
    key = hashlib.sha256("\0".join([text, " ".join(_FLAGS), repr(sorted(defines.items())),
                                    " ".join(cxx or []), _cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    target = kernel_dir() / f"{Path(name).stem}_{tag}_{key}.so"
    abi = _abi_version(text)
    problem = verify(target) if target.exists() else None
    for attempt in range(2):
        _ensure_built(target, cxx, src_path, defines, problem, "kernel library",
                      f"normmatters: compiling the fused CPU normalization kernels ({tag}) once (a "
                      f"few seconds); cached in {target.parent}. Set NORMMATTERS_KERNELS=reference "
                      f"to skip.")
        lib = ctypes.CDLL(str(target))
        problem = _check_library(lib, symbols, abi, defines)
        if problem is None:
            return lib
        _unload(lib)
        if attempt == 0:
            logger.warning("normmatters: the cached kernel library %s is unusable (%s); "
                           "rebuilding it.", target, problem)
    raise RuntimeError(f"the kernel library {target} is unusable after a rebuild ({problem})")


def _torch_flags() -> tuple[list[str], list[str], str]:
    """Compiler and linker flags for a library built against the installed torch, and a tag."""
    import torch  # the library is built for this torch: its headers, its ABI, its libraries

    # What torch.utils.cpp_extension.include_paths() / library_paths() give on the CPU, without
    # importing it (it needs setuptools, which newer Pythons' venvs lack).
    root = Path(torch.__file__).resolve().parent
    include = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    lib_dirs = [str(root / "lib")]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    flags = ["-O2", "-fPIC", "-shared", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *include]
    libs = [*(f"-L{d}" for d in lib_dirs), "-lc10", "-ltorch_cpu", "-ltorch",
            *(f"-Wl,-rpath,{d}" for d in lib_dirs)]
    return flags, libs, f"torch{torch.__version__}"


def load_op_library(name: str) -> Path:
    """Compile ``csrc/<name>`` against the installed torch (once per machine and torch version,
    cached and verified like :func:`load`) and load it with ``torch.ops.load_library``, which
    registers its operators. Returns the library's path; raises on any failure.

    The first build takes about half a minute (torch's headers), announced at WARNING level.
    """
    import torch

    src_path = _CSRC / name
    text = src_path.read_text(encoding="utf-8")
    cxx = _compiler()
    flags, libs, tag = _torch_flags()
    key = hashlib.sha256("\0".join([text, " ".join(flags), " ".join(libs), tag,
                                    " ".join(cxx or []), platform.machine()]).encode()).hexdigest()[:16]
    target = kernel_dir() / f"{Path(name).stem}_{key}.so"
    _ensure_built(target, cxx, src_path, {}, verify(target) if target.exists() else None,
                  "operator library",
                  f"normmatters: compiling the eager CPU operators against {tag} once (about half "
                  f"a minute); cached in {target.parent}. Set NORMMATTERS_KERNELS=reference to "
                  f"skip.", flags, libs)
    torch.ops.load_library(str(target))
    return target
