"""The kernel cache (normmatters.kernels.build): verified loads, rebuilds, CXX, temporaries, env names.

A damaged cached library must be rebuilt, never mapped: before the build record existed, a
library truncated to 4 KiB killed every process that used a fused layer with SIGBUS (exit 135).
Each damaged cache is therefore used in a fresh Python process, where a crash shows as its exit
status.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from normmatters.experiments.data import cache_dir as data_cache_dir
from normmatters.kernels import build

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="no C++ compiler")

# A fused layer, forward and backward; prints whether the fused CPU kernels were available.
USE_LAYER = textwrap.dedent(
    """
    import torch
    import normmatters.kernels as K
    from normmatters.nn import LpBatchNorm2d
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = LpBatchNorm2d(3, p=1)(x)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    print("fused", K.available("cpu"))
    """
)


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NORMMATTERS_CACHE_DIR", "NORMMATTERS_CACHE", "NORMMATTERS_KERNELS", "CXX")}
    # The C++ eager operators (half a minute to build against torch's headers) are not what
    # these tests exercise: the kernel libraries are.
    env.update(NORMMATTERS_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", NORMMATTERS_CPU_OP="0")
    env.update(extra)
    return env


def _run(cache: Path, script: str = USE_LAYER, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], env=_env(cache, **extra),
                          capture_output=True, text=True, timeout=300)


def _library(cache: Path) -> Path:
    (lib,) = (cache / "kernels").glob("lp_norm_cpu_float32_*.so")
    return lib


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A cache holding a good float32 library and its build record, built by a fresh process."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    cache = tmp_path_factory.mktemp("pristine")
    proc = _run(cache)
    assert proc.returncode == 0 and "fused True" in proc.stdout, proc.stderr
    return cache


def _copy(pristine: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    return cache


def _truncate_4k(lib: Path) -> None:
    with open(lib, "r+b") as f:
        f.truncate(4096)


def _zero(lib: Path) -> None:
    lib.write_bytes(b"")


def _flip_bytes(lib: Path) -> None:
    data = bytearray(lib.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # same size, different content
    lib.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate_4k, _zero, _flip_bytes],
                         ids=["truncated-4KiB", "zero-bytes", "wrong-hash"])
def test_damaged_library_is_rebuilt_not_loaded(pristine, tmp_path, damage):
    cache = _copy(pristine, tmp_path)
    lib = _library(cache)
    good = lib.read_bytes()
    damage(lib)
    assert build.verify(lib) is not None
    proc = _run(cache)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])  # SIGBUS was -7 / 135
    assert "fused True" in proc.stdout
    assert "fails verification" in proc.stderr and "rebuilding" in proc.stderr
    assert build.verify(lib) is None
    assert lib.stat().st_size == len(good)
    record = json.loads(lib.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(lib.read_bytes()).hexdigest()
    if damage is _truncate_4k:  # the next process loads the rebuilt library as it is
        again = _run(cache)
        assert again.returncode == 0 and "fused True" in again.stdout
        assert "rebuilding" not in again.stderr and "compiling" not in again.stderr


def test_verify_names_what_is_wrong(pristine, tmp_path):
    cache = _copy(pristine, tmp_path)
    lib = _library(cache)
    record = lib.with_suffix(".json")
    assert build.verify(lib) is None
    text = record.read_text()
    record.write_text(text[:10])
    assert "unreadable build record" in build.verify(lib)
    record.unlink()
    assert build.verify(lib) == "no build record"  # e.g. a cache of an earlier version: rebuilt
    record.write_text(text)
    _truncate_4k(lib)
    assert build.verify(lib).startswith("size 4096 bytes")
    lib.unlink()
    assert "cannot stat" in build.verify(lib)


@needs_compiler
def test_library_without_the_entry_points_is_rebuilt(pristine, tmp_path):
    # A valid shared library whose record matches it, but without nm_forward / nm_backward.
    cache = _copy(pristine, tmp_path)
    lib = _library(cache)
    src = tmp_path / "other.cpp"
    src.write_text('extern "C" int something_else() { return 1; }\n')
    cxx = shutil.which("g++") or shutil.which("c++")
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    lib.with_suffix(".json").write_text(json.dumps(
        {"size": lib.stat().st_size, "sha256": hashlib.sha256(lib.read_bytes()).hexdigest()}))
    assert build.verify(lib) is None  # the record cannot tell: the symbol check after loading does
    proc = _run(cache)
    assert proc.returncode == 0 and "fused True" in proc.stdout, proc.stderr[-3000:]
    assert "missing symbols nm_forward, nm_backward" in proc.stderr
    assert build.verify(lib) is None and lib.stat().st_size > 10_000


def test_missing_cxx_is_an_error_not_a_fallback(tmp_path):
    cache = tmp_path / "cache"
    script = USE_LAYER + textwrap.dedent(
        """
        from normmatters.kernels import cpu
        assert cpu.library(torch.float32) is None  # asked again: no second warning
        """
    )
    proc = _run(cache, script, CXX="/nonexistent/c++")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused False" in proc.stdout  # the layer ran on the reference path
    lines = [line for line in proc.stderr.splitlines() if "CXX" in line]
    assert len(lines) == 1 and "/nonexistent/c++" in lines[0], proc.stderr
    assert not list(cache.glob("kernels/*.so"))


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_failed_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    failing = tmp_path / "bad-cxx"
    failing.write_text("#!/bin/sh\necho 'error: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("NORMMATTERS_CACHE_DIR", str(cache))
    monkeypatch.setenv("CXX", str(failing))
    with pytest.raises(RuntimeError, match="error: no"):
        build.load("lp_norm_cpu.cpp", "float32", {"NM_DTYPE": 0})
    # Only the build lock stays (removing it would race with a process about to take it).
    assert [p for p in (cache / "kernels").iterdir() if p.suffix != ".lock"] == []


@needs_compiler
def test_killed_build_leaves_no_library_then_cxx_is_honoured_and_stale_folders_go(tmp_path):
    cache = tmp_path / "cache"
    kernels = cache / "kernels"
    real = shutil.which("g++") or shutil.which("c++")
    started = tmp_path / "started"
    slow = tmp_path / "slow-cxx"
    slow.write_text(f'#!/bin/sh\ntouch "{started}"\nsleep 60\nexec "{real}" "$@"\n')
    slow.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-c", USE_LAYER], env=_env(cache, CXX=str(slow)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert started.exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its compiler, mid-build
        proc.wait()
    assert not list(kernels.glob("*.so")) and not list(kernels.glob("*.json"))
    (killed,) = [d for d in kernels.iterdir() if d.is_dir()]
    assert killed.name.startswith("tmp")
    # Left-overs of killed builds, this one's and one of an earlier version (tempfile's prefix).
    older = kernels / "tmpx7q2_old"
    (older / "sub").mkdir(parents=True)
    (older / "sub" / "half.so").write_bytes(b"\x7fELF")
    for d in (killed, older):
        _age(d, build.STALE_SECONDS + 60)
    running = kernels / "tmp-build-running"  # a build in progress right now: left alone
    running.mkdir()
    # The next build, by an explicit CXX (a wrapper that logs its calls), removes them.
    log = tmp_path / "cxx.log"
    wrapper = tmp_path / "my-cxx"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    after = _run(cache, CXX=str(wrapper))
    assert after.returncode == 0 and "fused True" in after.stdout, after.stderr[-3000:]
    assert "lp_norm_cpu.cpp" in log.read_text()  # built by $CXX, not by c++ from PATH
    assert not killed.exists() and not older.exists() and running.exists()
    assert build.verify(_library(cache)) is None


@needs_compiler
def test_three_processes_building_at_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", USE_LAYER], env=_env(cache), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    assert all("fused True" in o for o, _ in outs)
    assert build.verify(_library(cache)) is None
    assert [d for d in (cache / "kernels").iterdir() if d.is_dir()] == []


# ---- one name for the cache root


@pytest.mark.parametrize("env, expected", [
    ({"NORMMATTERS_CACHE_DIR": "/a"}, "/a"),
    ({"NORMMATTERS_CACHE": "/b"}, "/b"),
    ({"NORMMATTERS_CACHE_DIR": "/a", "NORMMATTERS_CACHE": "/b"}, "/a"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/normmatters"),
])
def test_one_cache_root_for_kernels_and_data(monkeypatch, env, expected):
    for name in ("NORMMATTERS_CACHE_DIR", "NORMMATTERS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = Path(expected)
    assert build.cache_root() == root
    assert build.kernel_dir() == root / "kernels"
    assert data_cache_dir(None, "data") == root / "data"
    assert data_cache_dir("/explicit", "data") == Path("/explicit/data")


def test_default_cache_root_is_in_the_home_folder(monkeypatch):
    for name in ("NORMMATTERS_CACHE_DIR", "NORMMATTERS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert build.cache_root() == Path.home() / ".cache" / "normmatters"
    assert data_cache_dir(None, "data") == Path.home() / ".cache" / "normmatters" / "data"



# ---- one build per cache, a bounded compiler, repairs whatever the record says, read-only caches


def _logging_cxx(tmp_path: Path, log: Path) -> Path:
    real = shutil.which("g++") or shutil.which("c++")
    wrapper = tmp_path / "counting-cxx"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@needs_compiler
def test_four_processes_starting_together_build_once(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "cxx.log"
    env = _env(cache, CXX=str(_logging_cxx(tmp_path, log)))
    procs = [subprocess.Popen([sys.executable, "-c", USE_LAYER], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-2000:] for _, e in outs]
    assert all("fused True" in o for o, _ in outs)
    builds = [line for line in log.read_text().splitlines() if "lp_norm_cpu.cpp" in line]
    assert len(builds) == 1, builds  # the others waited for the lock, then loaded it
    assert sum("compiling the fused CPU" in e for _, e in outs) == 1
    assert build.verify(_library(cache)) is None


@needs_compiler
def test_a_hanging_compiler_is_stopped_with_a_message(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    hang = tmp_path / "hanging-cxx"
    child = tmp_path / "child.pid"  # a compiler's own child (cc1plus) must be stopped too
    hang.write_text(f'#!/bin/sh\nsleep 120 &\necho $! > "{child}"\nwait\n')
    hang.chmod(0o755)
    monkeypatch.setenv("NORMMATTERS_CACHE_DIR", str(cache))
    monkeypatch.setenv("CXX", str(hang))
    monkeypatch.setenv("NORMMATTERS_BUILD_TIMEOUT", "1")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not finish within 1 s.*NORMMATTERS_BUILD_TIMEOUT"):
        build.load("lp_norm_cpu.cpp", "float32", {"NM_DTYPE": 0})
    assert time.monotonic() - t0 < 30
    assert not list((cache / "kernels").glob("*.so"))
    pid = int(child.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL is delivered asynchronously
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "zombie" in status.read_text(), "the compiler's child survived"
    monkeypatch.setenv("NORMMATTERS_BUILD_TIMEOUT", "soon")
    with pytest.raises(RuntimeError, match="NORMMATTERS_BUILD_TIMEOUT='soon'"):
        build.build_timeout()


def _record(lib: Path) -> None:
    """A build record that matches whatever ``lib`` now holds (the damage a record cannot see)."""
    lib.with_suffix(".json").write_text(json.dumps(
        {"size": lib.stat().st_size, "sha256": hashlib.sha256(lib.read_bytes()).hexdigest()}))


def _not_elf(lib: Path) -> None:
    lib.write_bytes(b"#!/bin/sh\n" + bytes(20000))


def _truncated_half(lib: Path) -> None:
    with open(lib, "r+b") as f:
        f.truncate(lib.stat().st_size // 2)


def _object_file(lib: Path) -> None:
    # A real ELF file whose headers are consistent, but a relocatable object: dlopen refuses it.
    src = lib.parent / "obj.cpp"
    src.write_text('extern "C" int nm_forward() { return 0; }\n')
    cxx = shutil.which("g++") or shutil.which("c++")
    subprocess.run([cxx, "-c", "-fPIC", str(src), "-o", str(lib)], check=True)
    src.unlink()


@needs_compiler
@pytest.mark.parametrize("damage", [_not_elf, _truncated_half, _object_file],
                         ids=["not-elf", "truncated", "unloadable-elf"])
def test_damage_with_a_matching_record_is_repaired(pristine, tmp_path, damage):
    cache = _copy(pristine, tmp_path)
    lib = _library(cache)
    damage(lib)
    _record(lib)
    if damage is not _object_file:
        assert build.verify(lib) is not None  # the headers tell, whatever the record says
    proc = _run(cache)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])  # SIGBUS was -7 / 135
    assert "fused True" in proc.stdout and "rebuilding" in proc.stderr, proc.stderr[-3000:]
    assert build.verify(lib) is None and lib.stat().st_size > 10_000
    again = _run(cache)  # repaired for good, not a fallback of one process
    assert again.returncode == 0 and "fused True" in again.stdout
    assert "rebuilding" not in again.stderr and "compiling" not in again.stderr


@needs_compiler
def test_read_only_cache_builds_in_a_temporary_folder(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")  # mkdir fails, even for root
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _run(blocked, TMPDIR=str(tmp))
    assert proc.returncode == 0 and "fused True" in proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "normmatters" in line]
    said = [i for i, line in enumerate(lines) if "not writable" in line]
    assert len(said) == 1 and "NORMMATTERS_CACHE_DIR" in lines[said[0]], lines
    # Nothing claims the unwritable folder as the cache before that.
    assert not any(str(blocked) in line and "compiling" in line for line in lines), lines
    assert list(tmp.glob("normmatters-*/kernels/lp_norm_cpu_float32_*.so"))
