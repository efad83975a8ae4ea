"""The fused kernels' self-check (normmatters.kernels.selfcheck).

A failing kernel (one that raises) and a wrong kernel (one that returns a perturbed output) are
injected into the CPU backend, and into the Triton backend run by the interpreter: each must give
one warning that names the failure, after which the layers compute exactly what the reference path
computes, warn no more, and train.
"""

from __future__ import annotations

import copy
import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import normmatters.kernels as K
from normmatters.kernels import cpu, selfcheck
from normmatters.kernels.selfcheck import FusedKernelWarning
from normmatters.nn import LpBatchNorm2d, LpLayerNorm

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

needs_kernels = pytest.mark.skipif(not K.available("cpu"), reason="no fused CPU kernels")


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    monkeypatch.delenv("NORMMATTERS_SELFCHECK", raising=False)
    selfcheck.reset()
    yield
    monkeypatch.undo()  # the kernels restored before the verdicts are forgotten
    selfcheck.reset()


def _failing(*args, **kwargs):
    raise RuntimeError("injected kernel failure")


def _wrong(original):
    def forward(x, *args, **kwargs):
        y, *rest = original(x, *args, **kwargs)
        return (y + 0.01 * y.abs().max(), *rest)
    return forward


# The eager CPU path runs either the C++ operators (csrc/lp_norm_op.cpp) or, where they cannot be
# built, the Python wrappers of cpu.py: faults are injected into whichever runs, at the kernel
# (C function pointers) for the operators.
c = ctypes
FWD = c.CFUNCTYPE(c.c_int, c.c_int, c.c_int, c.c_void_p, c.c_void_p, c.c_int64, c.c_int64,
                  c.c_int64, c.c_void_p, c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_int,
                  c.c_int, c.c_double, c.c_double, c.c_int, c.c_void_p, c.c_void_p, c.c_void_p,
                  c.c_void_p, c.c_void_p, c.c_void_p, c.c_double, c.c_double, c.c_int)
BWD = c.CFUNCTYPE(c.c_int, c.c_int, c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64,
                  c.c_int64, c.c_int64, c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_void_p,
                  c.c_void_p, c.c_void_p, c.c_int, c.c_int, c.c_double, c.c_int, c.c_void_p, c.c_void_p,
                  c.c_int)
_CTYPE = {0: c.c_float, 1: c.c_double}


def _buffer(address: int, count: int, code: int) -> torch.Tensor:
    """A tensor over ``count`` values of a float32 / float64 kernel buffer (no copy)."""
    return torch.from_numpy(np.ctypeslib.as_array((_CTYPE[code] * count).from_address(address)))


def _op_active() -> bool:
    return all(cpu.eager_ops(d) for d in DTYPES)


@pytest.fixture
def inject(monkeypatch):
    """``inject(forward=..., backward=..., rows_only=False)`` with ``"failing"`` or ``"wrong"``."""
    callbacks = []

    def install(forward: str | None = None, backward: str | None = None, rows_only: bool = False):
        # The Python wrappers always (torch.compile traces them), the C++ operators' kernels too
        # where they run.
        if forward == "failing":
            monkeypatch.setattr(cpu, "forward", _failing)
        elif forward == "wrong":
            wrong = _wrong(cpu.forward)
            original = cpu.forward
            monkeypatch.setattr(cpu, "forward", (lambda x, *a, **k: (wrong if x.shape[0] == 1 else original)(x, *a, **k))
                                if rows_only else wrong)
        if backward == "wrong":
            original_b = cpu.backward

            def scaled(*args, **kwargs):
                dx, dw, db = original_b(*args, **kwargs)
                return (dx * 1.01 if dx is not None else None), dw, db
            monkeypatch.setattr(cpu, "backward", scaled)
        if not _op_active():
            return
        for dtype in (torch.float32, torch.float64):
            lib = cpu.library(dtype)
            fwd = bwd = None
            if forward is not None:
                def fwd_cb(code, layout, x, y, n, ch, s, *rest, _lib=lib):
                    if forward == "failing":
                        return -77  # the operator raises "... failed with code -77"
                    rc = _lib.nm_forward(code, layout, x, y, n, ch, s, *rest)
                    if not rows_only or n == 1:
                        out = _buffer(y, n * ch * s, code)
                        out += 0.01 * out.abs().max()
                    return rc
                fwd = FWD(fwd_cb)
            if backward is not None:
                def bwd_cb(code, layout, dy, x, dx, n, ch, s, *rest, _lib=lib):
                    rc = _lib.nm_backward(code, layout, dy, x, dx, n, ch, s, *rest)
                    if dx:
                        _buffer(dx, n * ch * s, code).mul_(1.01)
                    return rc
                bwd = BWD(bwd_cb)
            callbacks.extend([fwd, bwd])  # alive as long as the kernels point at them
            cpu.set_op_kernels(dtype, forward=fwd, backward=bwd)

    yield install
    if callbacks:
        for dtype in (torch.float32, torch.float64):
            cpu.set_op_kernels(dtype)


def _failure_text(text: str) -> bool:
    return "injected kernel failure" in text or "failed with code -77" in text


def _ours(records) -> list[warnings.WarningMessage]:
    return [r for r in records if issubclass(r.category, FusedKernelWarning)]


def _train(layer: torch.nn.Module, x: torch.Tensor, steps: int = 3) -> list[float]:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(x.shape[1], layer.num_features, 3, padding=1)
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    opt = torch.optim.SGD([*conv.parameters(), *layer.parameters()], lr=0.1)
    target = torch.randn(x.shape[0], layer.num_features, x.shape[2], x.shape[3])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (layer(conv(x).contiguous(memory_format=fmt)) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@needs_kernels
@pytest.mark.parametrize("layout", [0, 1])
def test_healthy_kernels_agree_with_the_reference(layout):
    for dtype in DTYPES:
        assert selfcheck.check(CPU, dtype, layout) is None, (dtype, layout)


@needs_kernels
def test_verdict_is_computed_once_and_cached(monkeypatch):
    calls = []
    real = selfcheck.check

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(selfcheck, "check", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.trusted(CPU, torch.float32, 0)
        assert selfcheck.trusted(CPU, torch.float32, 0)
        LpBatchNorm2d(3, p=1)(torch.randn(2, 3, 4, 4))
    assert calls == [(CPU, torch.float32, 0)]


@needs_kernels
@pytest.mark.parametrize("path", ["operators", "python"])
@pytest.mark.parametrize("kind", ["failing", "wrong"])
@pytest.mark.parametrize("layout", [0, 1])
def test_bad_cpu_kernel_gives_one_warning_then_the_reference_path(monkeypatch, inject, kind,
                                                                     layout, path):
    if path == "python":  # the path that runs where the C++ operators cannot be built
        monkeypatch.setattr(cpu, "_registered", {d: False for d in DTYPES})
    elif not _op_active():
        pytest.skip("the C++ eager operators are unavailable")
    inject(forward=kind)
    layer = LpBatchNorm2d(4, p=1)
    twin = copy.deepcopy(layer)
    x = torch.randn(6, 4, 5, 5)
    if layout == 1:
        x = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        y = layer(x)
    (w,) = _ours(records)
    text = str(w.message)
    layout_name = "channels-last" if layout == 1 else "contiguous"
    assert "cpu" in text and "torch.float32" in text and layout_name in text
    assert "batch norm L1" in text
    assert (_failure_text(text) if kind == "failing"
            else "max relative error" in text and "in the output" in text)
    assert w.filename == __file__  # points at the call, not into the library
    assert not selfcheck.trusted(CPU, torch.float32, layout)
    with K.use_backend("reference"):
        expected = twin(x)
    assert torch.equal(y, expected)
    assert torch.equal(layer.running_mean, twin.running_mean)
    assert torch.equal(layer.running_var, twin.running_var)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedKernelWarning)  # no second warning
        losses = _train(layer, x)
        with K.use_backend("reference"):
            expected_losses = _train(twin, x)
    assert losses == expected_losses and losses[-1] < losses[0]


@needs_kernels
def test_wrong_backward_is_caught(inject):
    inject(backward="wrong")
    with pytest.warns(FusedKernelWarning, match="in the input gradient"):
        assert not selfcheck.trusted(CPU, torch.float64, 0)


@needs_kernels
def test_layer_norm_is_checked_on_the_contiguous_layout(inject):
    inject(forward="wrong", rows_only=True)  # only layer/group/RMS norm (rows as N = 1) are wrong
    layer = LpLayerNorm(16, p=1)
    x = torch.randn(4, 16)
    with pytest.warns(FusedKernelWarning, match="layer norm L1"):
        y = layer(x)
    with K.use_backend("reference"):
        assert torch.equal(y, layer(x))


def test_distrust_warns_once_and_sticks():
    key = (torch.device("cpu"), torch.float16, 1)
    with pytest.warns(FusedKernelWarning, match="launch failed"):
        selfcheck.distrust(*key, "launch failed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selfcheck.distrust(*key, "launch failed again")
        assert not selfcheck.trusted(*key)


def test_switch_off_trusts_without_checking(monkeypatch):
    monkeypatch.setenv("NORMMATTERS_SELFCHECK", "0")
    selfcheck.reset()
    monkeypatch.setattr(selfcheck, "check", _failing)
    assert selfcheck.trusted(CPU, torch.float32, 0)


def test_exception_in_the_check_itself_means_untrusted(monkeypatch):
    monkeypatch.setattr(selfcheck, "check", _failing)
    with pytest.warns(FusedKernelWarning, match="RuntimeError: injected kernel failure"):
        assert not selfcheck.trusted(CPU, torch.float32, 0)


def test_threads_wait_for_one_check(monkeypatch):
    calls = []

    def slow(*args):
        calls.append(args)
        time.sleep(0.2)
        return None

    monkeypatch.setattr(selfcheck, "check", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(selfcheck.trusted(CPU, torch.float32, 1)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4 and len(calls) == 1


def test_check_leaves_the_global_rng_and_backend_alone():
    state = torch.get_rng_state()
    selfcheck.check(CPU, torch.float32, 0)
    assert torch.equal(torch.get_rng_state(), state)
    assert K.get_backend() == "auto"


@needs_kernels
def test_compiled_layer_runs_the_check_eagerly(inject):
    # The first call is made while torch.compile traces: the check runs outside the trace, and a
    # wrong kernel is replaced by the reference path in the compiled graph too.
    inject(forward="wrong")
    layer = LpBatchNorm2d(3, p=1)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 3, 5, 5)
    with pytest.warns(FusedKernelWarning, match="max relative error"):
        y = compiled(x)
    with K.use_backend("reference"):
        assert torch.allclose(y, twin(x), atol=1e-6)
    torch._dynamo.reset()


TRITON_SCRIPT = textwrap.dedent(
    r"""
    import copy, warnings
    import torch
    import triton
    import triton.language as tl
    import normmatters.kernels as K
    from normmatters.kernels import autograd, selfcheck, triton_kernels as tk
    from normmatters.kernels.selfcheck import FusedKernelWarning
    from normmatters.nn import LpBatchNorm2d

    # The Triton kernels, run by the interpreter, become the CPU backend.
    autograd.register_backend("cpu", tk)
    cpu = torch.device("cpu")
    for layout in (0, 1):
        assert selfcheck.check(cpu, torch.float32, layout) is None, layout

    @triton.jit
    def broken_apply(x_ptr, y_ptr, mean_ptr, a_ptr, b_ptr, total, C, S, LAYOUT: tl.constexpr,
                     BLOCK: tl.constexpr):
        tl.store(y_ptr + tl.arange(0, BLOCK), not_defined_anywhere)

    def perturbed(original):
        def forward(x, *args, **kwargs):
            y, *rest = original(x, *args, **kwargs)
            return (y + 0.01 * y.abs().max(), *rest)
        return forward

    good_apply, good_forward = tk._apply_kernel, tk.forward
    for inject in ("failing", "wrong"):
        selfcheck.reset()
        tk._apply_kernel, tk.forward = good_apply, good_forward
        if inject == "failing":
            tk._apply_kernel = broken_apply
        else:
            tk.forward = perturbed(good_forward)
        layer = LpBatchNorm2d(4, p=1)
        twin = copy.deepcopy(layer)
        x = torch.randn(6, 4, 5, 5)
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            y = layer(x)
        ours = [r for r in records if issubclass(r.category, FusedKernelWarning)]
        assert len(ours) == 1, [str(r.message) for r in records]
        text = str(ours[0].message)
        assert "batch norm L1" in text, text
        assert ("not_defined_anywhere" in text) if inject == "failing" else ("max relative error" in text), text
        with K.use_backend("reference"):
            assert torch.equal(y, twin(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FusedKernelWarning)
            opt = torch.optim.SGD(layer.parameters(), lr=0.1)
            for _ in range(2):
                opt.zero_grad()
                layer(x).square().mean().backward()
                opt.step()
        print("ok", inject)
    """
)


@needs_kernels
def test_bad_triton_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("NORMMATTERS_SELFCHECK", None)
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "ok failing" in proc.stdout and "ok wrong" in proc.stdout
