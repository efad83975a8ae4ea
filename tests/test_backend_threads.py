"""The choice of path is per thread: ``use_backend`` blocks and the self-check never change another
thread's setting, and a first use is checked whatever another thread is doing."""

from __future__ import annotations

import threading

import pytest
import torch

import normmatters.kernels as K
from normmatters.kernels import selfcheck
from normmatters.nn import LpBatchNorm2d

from _shared import fused

pytestmark = pytest.mark.skipif(not K.available("cpu"), reason="no C++ compiler for the kernels")


def _in_thread(fn):
    result, errors = [], []

    def run():
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, result, errors


def test_overlapping_blocks_in_two_threads_restore_their_own_choice():
    # A enters, B enters, A leaves, B leaves: with one process-wide switch B restored "reference".
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with K.use_backend("reference"):
            a_in.set()
            b_in.wait(5)
            seen["a inside"] = K.get_backend()
        a_out.set()
        seen["a after"] = K.get_backend()

    def b():
        a_in.wait(5)
        with K.use_backend("reference"):
            b_in.set()
            a_out.wait(5)
            seen["b inside"] = K.get_backend()
        seen["b after"] = K.get_backend()

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(), tb.start()
    ta.join(10), tb.join(10)
    assert seen == {"a inside": "reference", "b inside": "reference", "a after": "auto",
                    "b after": "auto"}
    assert K.get_backend() == "auto"


def test_a_block_in_one_thread_leaves_another_threads_first_call_fused_and_checked():
    selfcheck.reset()
    inside, done = threading.Event(), threading.Event()

    def user_block():
        with K.use_backend("reference"):
            inside.set()
            done.wait(60)

    t = threading.Thread(target=user_block)
    t.start()
    try:
        inside.wait(5)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        y = LpBatchNorm2d(3, p=1)(x)
        assert K.get_backend() == "auto"
        assert fused(y)  # this thread's first call took the fused path...
        assert selfcheck._verdicts.get((torch.device("cpu"), torch.float32, 0)) is True  # ...checked
    finally:
        done.set()
        t.join(10)


def test_the_self_check_never_changes_the_callers_setting():
    with K.use_backend("reference"):
        assert selfcheck.check(torch.device("cpu"), torch.float32, 0) is None
        assert K.get_backend() == "reference"
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        assert not fused(LpBatchNorm2d(3, p=1)(x))
    assert K.get_backend() == "auto"


def test_set_backend_is_the_default_for_threads_without_a_block():
    try:
        K.set_backend("reference")
        t, result, errors = _in_thread(K.get_backend)
        t.join(10)
        assert result == ["reference"] and not errors
        with K.use_backend("auto"):
            assert K.get_backend() == "auto"
        assert K.get_backend() == "reference"
    finally:
        K.set_backend("auto")


def test_compiled_code_follows_a_later_block():
    """torch.compile guards on the thread's choice: a block entered after compiling recompiles."""
    torch._dynamo.reset()

    def f(x):
        return x + 1 if K.get_backend() == "auto" else x - 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert compiled(torch.zeros(1)).item() == 1
    with K.use_backend("reference"):
        assert compiled(torch.zeros(1)).item() == -1
    assert compiled(torch.zeros(1)).item() == 1
