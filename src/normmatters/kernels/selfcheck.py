r"""The fused kernels prove themselves before they are trusted.

On the first fused call for a (device, dtype, layout) — layout 0 is a contiguous ``[N, C, S]``
tensor (NCHW), 1 is channels-last (NHWC) — :func:`trusted` runs the fused and the reference path
of :mod:`normmatters.functional` on a small input of that device, dtype and layout and compares
them: batch norm (and, for layout 0, batch norm on a permuted input — dense, but neither
contiguous nor channels-last — and layer, group and RMS norm) with p = 1, L∞ and Top(3); the
output, the updated running statistics and the gradients of the input, weight and bias. Any
difference beyond the tolerance of the dtype, and any exception (a failed Triton compile, a
launch error, a kernel that reports an error code), makes the fused path untrusted for the rest
of the process: the dispatcher then takes the reference path, and one :class:`FusedKernelWarning`
(plus a log line) says what failed.

The answer is a constant of the process: after the first call :func:`trusted` is one dictionary
lookup, and ``torch.compile`` evaluates it once while tracing (the check itself runs eagerly, in a
helper thread, outside the tracer). ``NORMMATTERS_SELFCHECK=0`` skips the check (every key is
trusted).

The test input is chosen so that the k + 1 largest |x − mean| of every channel differ clearly:
the L∞ / Top(k) gradient is then the same in both paths (see :mod:`.autograd` on ties).

Example::

    >>> import torch
    >>> from normmatters.kernels import selfcheck
    >>> selfcheck.trusted(torch.device("cpu"), torch.float32, 0)
    True
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .. import functional as nmf
from .. import kernels

__all__ = ["FusedKernelWarning", "trusted", "distrust", "reset", "check", "TOLERANCES"]

logger = logging.getLogger("normmatters.kernels")

NCS, NSC = 0, 1
_LAYOUT_NAMES = {NCS: "NCHW (contiguous)", NSC: "NHWC (channels-last)"}

#: Largest accepted difference, relative to max(1, max |reference|), per dtype.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class FusedKernelWarning(RuntimeWarning):
    """The fused kernels failed their self-check or a call; the reference path is used instead."""


_Key = tuple  # (torch.device, torch.dtype, int)

_verdicts: dict[_Key, bool] = {}
#: Changes whenever a verdict is withdrawn or forgotten (callers may cache "trusted" under it).
generation = 0
_check_lock = threading.RLock()   # one check at a time; other threads wait for its verdict
_state_lock = threading.Lock()    # the verdicts and the one warning per key
_local = threading.local()        # .checking: the key this thread checks (its fused calls pass)


def _read_env() -> bool:
    return os.environ.get("NORMMATTERS_SELFCHECK", "1").strip().lower() not in ("0", "off", "false", "no")


_enabled = _read_env()


def trusted(device: torch.device, dtype: torch.dtype, layout: int) -> bool:
    """Whether the fused kernels may run for ``device``, ``dtype`` and ``layout`` (0 NCS, 1 NSC).

    The first call per key runs the self-check (a few milliseconds once the kernels are built);
    later calls are a dictionary lookup.
    """
    verdict = _verdicts.get((device, dtype, layout))
    if verdict is not None:
        return verdict
    return _first_use(device, dtype, layout)


# A constant of the process for torch.compile, marked the way torch.compiler.assume_constant_result
# marks a function (without importing torch._dynamo): dynamo calls it once while tracing.
trusted._dynamo_marked_constant = True  # type: ignore[attr-defined]


def distrust(device: torch.device, dtype: torch.dtype, layout: int, reason: str) -> None:
    """Mark the fused kernels untrusted for this key (a fused call raised): warn once, use the reference.

    Called by the check's own fused calls, the reason becomes part of the check's verdict.
    """
    key = (device, dtype, layout)
    if getattr(_local, "checking", None) == key:
        _local.failures.append(reason)
        return
    _set_false(key, reason)


def reset() -> None:
    """Forget every verdict and re-read ``NORMMATTERS_SELFCHECK`` (for tests)."""
    global _enabled
    with _state_lock:
        _verdicts.clear()
        _bump()
        _enabled = _read_env()


def _bump() -> None:
    global generation
    generation += 1


def _describe(key: _Key) -> str:
    device, dtype, layout = key
    return f"{device}, {dtype}, layout {_LAYOUT_NAMES.get(layout, layout)}"


def _set_false(key: _Key, reason: str) -> None:
    with _state_lock:
        if _verdicts.get(key) is False:
            return
        _verdicts[key] = False
        _bump()
    message = (f"normmatters: the fused normalization kernels failed on {_describe(key)}: {reason}. "
               f"Using the reference path for the rest of the process.")
    logger.warning("%s", message)
    warnings.warn(message, FusedKernelWarning, stacklevel=_caller_level())


_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 os.path.dirname(os.path.abspath(torch.__file__)))


def _caller_level() -> int:
    # The warning points at the first frame outside normmatters and torch: the user's call.
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def _first_use(device: torch.device, dtype: torch.dtype, layout: int) -> bool:
    if getattr(_local, "checking", None) is not None:
        return True  # the check's own fused calls
    if not _enabled:
        _verdicts[(device, dtype, layout)] = True
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return True  # the dispatcher takes the reference path while exporting; decide later
    key = (device, dtype, layout)
    with _check_lock:
        verdict = _verdicts.get(key)
        if verdict is not None:
            return verdict
        failure = _run_outside_tracing(device, dtype, layout)
        if failure is not None:
            _set_false(key, failure)
        else:
            with _state_lock:
                _verdicts.setdefault(key, True)  # distrust() during the check keeps its False
        return _verdicts[key]


def _run_outside_tracing(device: torch.device, dtype: torch.dtype, layout: int) -> str | None:
    # A fresh thread has none of the caller's thread-local state: no dynamo frame hook or fake
    # tensor mode (when called while torch.compile traces), no autocast, grad mode on.
    result: list[str | None] = ["the self-check did not finish"]

    def work() -> None:
        try:
            result[0] = check(device, dtype, layout)
        except BaseException as exc:  # noqa: BLE001 - any failure of the check means "untrusted"
            result[0] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=work, name="normmatters-selfcheck", daemon=True)
    thread.start()
    thread.join()
    return result[0]


# ---------------------------------------------------------------------------------------------
# The comparison


_PK = ((1, None), (math.inf, None), (math.inf, 3))


def _pk_name(p: float, k: int | None) -> str:
    return "L1" if p == 1 else ("L∞" if k is None else f"Top({k})")


def _separated(x: Tensor, dims: tuple[int, ...], k: int, center: bool) -> bool:
    # The k + 1 largest |x − mean| along dims must differ by more than rounding.
    x = x.double()
    d = (x - x.mean(dims, keepdim=True)).abs() if center else x.abs()
    d = d.movedim([i for i in range(x.dim()) if i not in dims], list(range(x.dim() - len(dims))))
    d = d.reshape(-1, math.prod(x.shape[i] for i in dims))
    top = d.topk(k + 1, dim=1).values
    return bool(((top[:, :-1] - top[:, 1:]) > 0.05 * top[:, :1]).all())


def _sample(shape: tuple[int, ...], dims: tuple[int, ...], center: bool, dtype: torch.dtype,
            gen: torch.Generator) -> Tensor:
    # Per group of reduced values: a body in [-0.5, 0.5] and four outliers of distinct size at
    # random places, scaled and (when centring) shifted: the k + 1 ≤ 4 largest |x − mean| differ.
    keep = [i for i in range(len(shape)) if i not in dims]
    groups = math.prod(shape[i] for i in keep)
    n = math.prod(shape[i] for i in dims)
    outliers = torch.tensor([4.0, -3.4, -2.8, 2.2], dtype=torch.float64, device="cpu")
    for _ in range(100):
        v = torch.rand(groups, n, generator=gen, dtype=torch.float64, device="cpu") - 0.5
        where = torch.rand(groups, n, generator=gen, device="cpu").argsort(dim=1)[:, :4]
        sign = torch.where(torch.rand(groups, 1, generator=gen, device="cpu") < 0.5, -1.0, 1.0).double()
        v.scatter_(1, where, outliers.expand(groups, 4) * sign)
        v = v * (torch.rand(groups, 1, generator=gen, dtype=torch.float64, device="cpu") + 0.5)
        if center:
            v = v + torch.randn(groups, 1, generator=gen, dtype=torch.float64, device="cpu")
        x = v.reshape([shape[i] for i in keep] + [shape[i] for i in dims])
        x = x.permute(*[(keep + list(dims)).index(i) for i in range(len(shape))]).contiguous().to(dtype)
        if _separated(x, dims, 4, center):
            return x
    raise RuntimeError("could not draw a tie-free test input")  # pragma: no cover


def _error(got: Tensor | None, want: Tensor | None) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    if got.shape != want.shape:
        return math.inf
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return float((got - want).abs().max()) / scale if got.numel() else 0.0


class _Case:
    """One kind of normalization: its input shape, reduced axes, parameter shape and call."""

    def __init__(self, name: str, shape: tuple[int, ...], dims: tuple[int, ...], center: bool,
                 param: tuple[int, ...], bias: bool, call: Callable[..., Tensor],
                 running: bool = False, grad: bool = True, permuted: bool = False):
        self.name, self.shape, self.dims, self.center = name, shape, dims, center
        self.param, self.bias, self.call, self.running, self.grad = param, bias, call, running, grad
        # A dense input that is neither contiguous nor channels-last (the last two axes swapped
        # in memory): the fused path must copy or read it in place, never misplace its values.
        self.permuted = permuted

    def layout(self, t: Tensor, memory_format: torch.memory_format) -> Tensor:
        if self.permuted:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t


def _cases(layout: int) -> list[_Case]:
    bn = [_Case("batch norm", (3, 4, 5, 6), (0, 2, 3), True, (4,), True,
                lambda x, w, b, rm, rv, p, k: nmf.lp_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, p=p, k=k),
                running=True),
          # Evaluation without gradients: the running statistics as one per-channel affine.
          _Case("batch norm (evaluation)", (3, 4, 5, 6), (0, 2, 3), True, (4,), True,
                lambda x, w, b, rm, rv, p, k: nmf.lp_batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, p=p, k=k),
                running=True, grad=False)]
    if layout != NCS:
        return bn
    permuted = [_Case(c.name + ", permuted input", c.shape, c.dims, c.center, c.param, c.bias,
                      c.call, running=c.running, grad=c.grad, permuted=True) for c in bn]
    return bn + permuted + [
        _Case("layer norm", (4, 3, 16), (2,), True, (16,), True,
              lambda x, w, b, rm, rv, p, k: nmf.lp_layer_norm(x, (16,), w, b, 1e-5, p=p, k=k)),
        _Case("group norm", (3, 4, 5, 6), (2, 3), True, (4,), True,
              lambda x, w, b, rm, rv, p, k: nmf.lp_group_norm(x, 2, w, b, 1e-5, p=p, k=k)),
        _Case("RMS norm", (4, 3, 16), (2,), False, (16,), False,
              lambda x, w, b, rm, rv, p, k: nmf.lp_rms_norm(x, (16,), w, 1e-5, p=p, k=k)),
    ]


def _run(case: _Case, x0: Tensor, w0: Tensor, b0: Tensor | None, g: Tensor, p: float,
         k: int | None, device: torch.device) -> dict[str, Tensor | None]:
    c = case.param[0]
    gen = torch.Generator("cpu").manual_seed(c)
    rm = rv = None
    if case.running:  # the same starting statistics for both paths
        rm = torch.randn(c, generator=gen, dtype=torch.float64, device="cpu").to(device, w0.dtype)
        rv = (torch.rand(c, generator=gen, dtype=torch.float64, device="cpu") + 0.5).to(device, w0.dtype)
    if not case.grad:
        with torch.no_grad():
            y = case.call(x0, w0, b0, rm, rv, p, k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"output": y}
    x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    w = w0.detach().clone().requires_grad_(True)
    b = b0.detach().clone().requires_grad_(True) if b0 is not None else None
    y = case.call(x, w, b, rm, rv, p, k)
    y.backward(g)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a launch failure surfaces here, inside the check
    return {"output": y, "running_mean": rm, "running_var": rv,
            "input gradient": x.grad, "weight gradient": w.grad,
            "bias gradient": b.grad if b is not None else None}


def check(device: torch.device, dtype: torch.dtype, layout: int) -> str | None:
    """Compare the fused and the reference path once; ``None`` if they agree, else what failed.

    An exception of the fused path (or a fused call that the dispatcher reports as failed) is a
    failure too. :func:`trusted` calls this and caches the answer; called directly (to test a
    device) it caches nothing.
    """
    device = torch.device(device)
    previous = getattr(_local, "checking", None), getattr(_local, "failures", None)
    # The dispatcher's trusted() passes this thread's fused calls; the fused calls that raise
    # (the dispatcher catches them and calls distrust) are collected in .failures.
    _local.checking, _local.failures = (device, dtype, layout), []
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):  # Triton launches on the current device
                return _compare(device, dtype, layout)
        return _compare(device, dtype, layout)
    finally:
        _local.checking, _local.failures = previous


def _compare(device: torch.device, dtype: torch.dtype, layout: int) -> str | None:
    tol = TOLERANCES.get(dtype, 1e-4)
    gen = torch.Generator("cpu").manual_seed(1803_01814)  # its own stream: the user's RNG is untouched
    memory_format = torch.channels_last if layout == NSC else torch.contiguous_format
    for case in _cases(layout):
        for p, k in _PK:
            x = case.layout(_sample(case.shape, case.dims, case.center, dtype, gen).to(device),
                            memory_format)
            g = torch.randn(case.shape, generator=gen, dtype=torch.float64, device="cpu").to(device, dtype)
            g = case.layout(g, memory_format)
            w = (torch.rand(case.param, generator=gen, dtype=torch.float64, device="cpu") + 0.5).to(device, dtype)
            b = torch.randn(case.param, generator=gen, dtype=torch.float64, device="cpu").to(device, dtype) if case.bias else None
            with kernels.use_backend("reference"):
                want = _run(case, x, w, b, g, p, k, device)
            where = f"{case.name} {_pk_name(p, k)}"
            try:
                with kernels.use_backend("auto"):
                    got = _run(case, x, w, b, g, p, k, device)
            except Exception as exc:  # noqa: BLE001 - e.g. a backward, compile or launch error
                return f"{where}: {type(exc).__name__}: {exc}"
            if _local.failures:
                return f"{where}: {_local.failures[0]}"
            for what, ref in want.items():
                err = _error(got[what], ref)
                if not err <= tol:  # also catches NaN
                    return f"{where}: max relative error {err:.3g} in the {what} (tolerance {tol:g})"
    return None
