"""Build, cache, verify and load the compiled CPU kernels (the C++ sources in ``csrc/``).

One ``g++ -O3 -march=native -fopenmp`` build of about two seconds of compiler time per dtype,
cached on disk in ``<cache>/kernels`` (``<cache>`` is :func:`cache_root`) under a hash of the
source, the flags, the compiler and the CPU; later processes load it instantly. The library links
the same ``libgomp`` that torch already loaded, so it shares torch's thread pool.

What is loaded is verified first: each build records the size and SHA-256 of the library in a
sidecar file (``<name>.json``, written atomically next to it), and a cached library whose size
or hash does not match — truncated, emptied, overwritten, or without its record — is rebuilt,
never ``dlopen``-ed (mapping a truncated library kills the process with SIGBUS). Because a
record can be rewritten with the file it describes, the file must also be an ELF library whose
headers' extent fits in it. After loading, the entry points (``nm_forward``, ``nm_backward``) and
the ABI version the source declares (``nm_abi_version``) are checked; a library that fails to
load or fails these checks is rebuilt once, not given up on.

One build per cache: build and install run under an exclusive lock (``<name>.lock``), so of the
processes that start together on an empty cache (the ranks of a node) one compiles and the others
wait, then load its library. The compiler runs at most :func:`build_timeout` seconds
(``$NORMMATTERS_BUILD_TIMEOUT``, default 600): a compiler that hangs is stopped with a message,
never blocks the first forward for ever. A cache that is not writable (a read-only home) builds in
a per-user folder of the system's temporary directory, said once with how to choose a place
(``$NORMMATTERS_CACHE_DIR``).

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
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised (each builder installs atomically)
    fcntl = None  # type: ignore[assignment]

__all__ = ["cache_root", "cache_dir", "kernel_dir", "source", "load", "load_op_library", "verify",
           "STALE_SECONDS", "SYMBOLS", "build_timeout"]

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


def build_timeout() -> float:
    """Seconds one compiler run may take: ``$NORMMATTERS_BUILD_TIMEOUT``, default 600 (the
    operator library takes about half a minute alone, a few minutes on a busy machine)."""
    raw = os.environ.get("NORMMATTERS_BUILD_TIMEOUT", "").strip()
    if not raw:
        return 600.0
    try:
        value = float(raw)
    except ValueError:
        raise RuntimeError(f"NORMMATTERS_BUILD_TIMEOUT={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise RuntimeError(f"NORMMATTERS_BUILD_TIMEOUT={raw!r} must be a positive number of seconds")
    return value


def _elf_problem(path: Path) -> str | None:
    """What makes ``path`` unfit for ``dlopen`` as far as its ELF headers tell: not an ELF file, or
    shorter than the extent its section and program headers describe (mapping a truncated
    library kills the process with SIGBUS, whatever a build record says). ``None`` where the
    headers are consistent, and on systems whose libraries are not ELF."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != b"\x7fELF":
                return "not an ELF shared library"
            is64, little = ident[4] == 2, ident[5] == 1
            e = "<" if little else ">"
            if is64:
                phoff, shoff = struct.unpack_from(e + "QQ", ident, 32)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", ident, 54)
            else:
                phoff, shoff = struct.unpack_from(e + "II", ident, 28)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", ident, 42)
            extent = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            if extent > size:
                return f"truncated: {size} bytes, its headers reach byte {extent}"
            for i in range(phnum):  # every segment's file extent (what dlopen maps)
                f.seek(phoff + i * phentsize)
                entry = f.read(phentsize)
                if len(entry) < phentsize:
                    return f"truncated program header {i}"
                if is64:
                    offset, filesz = struct.unpack_from(e + "Q", entry, 8)[0], struct.unpack_from(e + "Q", entry, 32)[0]
                else:
                    offset, filesz = struct.unpack_from(e + "I", entry, 4)[0], struct.unpack_from(e + "I", entry, 16)[0]
                if offset + filesz > size:
                    return f"truncated: {size} bytes, segment {i} reaches byte {offset + filesz}"
    except OSError as exc:
        return f"unreadable ({exc})"
    return None


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
    # A record can be rewritten along with a damaged file: the file must also hold itself together.
    return _elf_problem(target)


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
        returncode, stderr = _compile(cmd)
        if returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
        digest = _sha256(out)
        record = Path(tmp) / _record_path(target).name
        _write_record(record, {"size": out.stat().st_size, "sha256": digest, "compiler": cxx,
                               "defines": defines, "source": src_path.name})
        # Atomic renames: concurrent builders each install a complete library and record (a
        # reader that sees one builder's library with another's record rebuilds it).
        os.replace(out, target)
        os.replace(record, _record_path(target))
    return digest


def _compile(cmd: list[str]) -> tuple[int, str]:
    """Run the compiler with :func:`build_timeout`; on timeout kill it and the processes it
    started (cc1plus, the assembler, the linker) and raise an error that says how to allow longer
    or skip the build."""
    timeout = build_timeout()
    # In this process's group: whoever stops this process's group (a job manager, torchrun, a
    # test) stops the compiler with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.communicate()
        raise RuntimeError(
            f"the C++ compiler ({cmd[0]}) did not finish within {timeout:g} s and was stopped; "
            f"set NORMMATTERS_BUILD_TIMEOUT to a number of seconds to allow longer, or "
            f"NORMMATTERS_KERNELS=reference to skip the fused kernels") from None
    return proc.returncode, stderr


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (the compiler driver's cc1plus, as, ld), children first
    reversed: from Linux's ``/proc/<pid>/task/*/children``; empty where that is unavailable."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", encoding="ascii") as f:
                    kids = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            stack.extend(kids)
    return found[::-1]


def _writable(folder: Path) -> str | None:
    """``None`` if builds can be installed in ``folder`` (created if needed), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=_TMP_PREFIX):
            pass
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_fallback_said: set[str] = set()


def _build_folder(folder: Path) -> Path:
    """Where a build for the cache folder ``folder`` goes: ``folder`` if writable, else a
    per-user folder under the system's temporary directory (said once per process)."""
    why = _writable(folder)
    if why is None:
        return folder
    uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    alt = Path(tempfile.gettempdir()) / f"normmatters-{uid}" / folder.name
    why_alt = _writable(alt)
    if why_alt is not None:
        raise RuntimeError(f"the kernel cache {folder} is not writable ({why}), nor is {alt} "
                           f"({why_alt}); set NORMMATTERS_CACHE_DIR to a writable folder")
    if str(folder) not in _fallback_said:
        _fallback_said.add(str(folder))
        logger.warning("normmatters: the kernel cache %s is not writable (%s); using %s instead, "
                       "which the system may clear. Set NORMMATTERS_CACHE_DIR to a writable "
                       "folder to keep the build.", folder, why, alt)
    return alt


class _BuildLock:
    """An exclusive lock on ``<target>.lock`` for building and installing ``target``: of the
    processes that start together on an empty cache (torchrun ranks on one node), one compiles
    and the others wait, then load its library. The operating system releases the lock of a killed
    process. Waiting is bounded by the compiler's timeout plus a margin."""

    def __init__(self, target: Path):
        self.path = target.with_suffix(".lock")
        self.file = None

    def __enter__(self) -> _BuildLock:
        if fcntl is None:
            return self
        self.file = open(self.path, "a+")  # noqa: SIM115 - closed in __exit__
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return self
        except BlockingIOError:
            pass
        logger.warning("normmatters: another process is building %s; waiting for it.",
                       self.path.with_suffix(".so").name)
        deadline = time.monotonic() + build_timeout() + 60.0
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.file.close()
                    self.file = None
                    raise RuntimeError(
                        f"waited more than {build_timeout() + 60.0:g} s for another process's "
                        f"build (lock {self.path}); remove the lock file if no build is running")
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            finally:
                self.file.close()
                self.file = None


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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _ensure_built(target: Path, cxx: list[str] | None, src_path: Path, defines: dict[str, int],
                  problem: str | None, what: str, announce: str, flags: Sequence[str] = _FLAGS,
                  libs: Sequence[str] = ()) -> Path:
    """The path of a verified ``target``: as it is if present and ``problem`` is ``None``, else
    built. ``problem`` is what is wrong with the file now at ``target`` (from :func:`verify`, or
    a failed load). One build per cache: under a lock, and a process that waited for another's
    build takes the library that one installed. A read-only cache builds in a temporary folder
    (:func:`_build_folder`). ``announce`` (with ``{folder}`` for the folder) says a first build is
    starting; raises unless the result verifies."""
    if target.exists() and problem is None:
        return target
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    bad = _identity(target) if problem is not None else None
    folder = _build_folder(target.parent)
    if folder != target.parent:
        target = folder / target.name
        bad = None
    with _BuildLock(target):
        current = verify(target) if target.exists() else "missing"
        if current is None and (bad is None or _identity(target) != bad):
            return target  # intact, or installed by another process while this one waited
        if current == "missing":
            logger.warning("%s", announce.format(folder=target.parent))
        elif current is not None:
            logger.warning("normmatters: the cached %s %s fails verification (%s); rebuilding it.",
                           what, target, current)
        else:
            logger.warning("normmatters: the cached %s %s is unusable (%s); rebuilding it.",
                           what, target, problem)
        t0 = time.perf_counter()
        digest = _build(target, cxx, src_path, defines, flags, libs)
        logger.info("normmatters: %s compiled in %.1f s", what, time.perf_counter() - t0)
    problem = verify(target)
    if problem is not None and _sha256(target) != digest:
        time.sleep(0.2)  # another builder's library and record are being installed right now
        problem = verify(target)
    if problem is not None:
        raise RuntimeError(f"the freshly built {target} fails verification ({problem})")
    return target


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
    announce = (f"normmatters: compiling the fused CPU normalization kernels ({tag}) once (a few "
                f"seconds); cached in {{folder}}. Set NORMMATTERS_KERNELS=reference to skip.")
    for attempt in range(2):
        target = _ensure_built(target, cxx, src_path, defines, problem, "kernel library", announce)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:  # e.g. an ELF file of another machine that its record matches
            problem = f"cannot be loaded ({exc})"
            continue
        problem = _check_library(lib, symbols, abi, defines)
        if problem is None:
            return lib
        _unload(lib)
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
    problem = verify(target) if target.exists() else None
    announce = (f"normmatters: compiling the eager CPU operators against {tag} once (about half a "
                f"minute); cached in {{folder}}. Set NORMMATTERS_KERNELS=reference to skip.")
    for _ in range(2):
        target = _ensure_built(target, cxx, src_path, {}, problem, "operator library", announce,
                               flags, libs)
        try:
            torch.ops.load_library(str(target))
            return target
        except OSError as exc:  # a library that fails to load is rebuilt once, not given up on
            problem = f"cannot be loaded ({exc})"
    raise RuntimeError(f"the operator library {target} cannot be loaded after a rebuild ({problem})")
