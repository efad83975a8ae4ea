r"""Arithmetic in an emulated format: rounding after every op, low-precision reductions, a recorder.

The emulation keeps tensors in float32 storage and rounds the result of every operation to the
format (:func:`~normmatters.functional.formats.round_to_format`). For +, −, ×, ÷ and √ of values
that are already in a format of precision p ≤ 11 bits (fp16, bf16, fp8), computing in float32
(24 bits ≥ 2p + 2) and rounding once more gives exactly the correctly rounded result in the
format (double rounding is innocuous; Figueroa 1995), so the emulation equals the format's own
IEEE arithmetic.

Reductions. A normalization's elementwise work (centring, |d| or d², the division, the affine)
runs in the compute format; its sums accumulate in float32 by default, which is what
low-precision hardware does (fp16 tensor cores and torch's own half-precision kernels accumulate
in float32) and what Hoffer et al. (2018, Sec. 5) compare: L2's squares d² overflow fp16 once
|d| > 256, L1's |d| never do. As an option the reductions accumulate in a low format too
(``accumulate=`` that format), in one of five orders:

* ``"pairwise"`` (default): a tree of plain sums; each level adds halves elementwise and rounds,
  so ``⌈log2 n⌉`` vectorised steps. Error O(log n · u): the *most favourable* order of a sum, so a
  failure seen with it is not an artifact of a naive loop. Overflow still happens, because the
  final sum has the same magnitude whatever the order.
* ``"blocked"``: a left-to-right running sum inside blocks of ``block_size`` values (vectorised
  across blocks, as the threads of a reduction kernel do), then pairwise across the blocks.
* ``"sequential"``: one left-to-right running sum (``n`` Python steps: for tests and small n).
  A running sum in a format of precision p swamps: once it is 2^p times a term, the term is lost.
* ``"pairwise_mean"``: a tree of *weighted means* instead of sums. Each step replaces two
  partial means a, b (of c_a and c_b values) by ``round(w_a·a + w_b·b)``, w = c/(c_a + c_b)
  (½ and ½ except at the one odd node of a level), rounded once, as a fused multiply-add unit
  computes it. The exact value lies between a and b, and rounding to nearest is monotonic, so
  every partial lies between the smallest and the largest input: **no step can overflow**, and
  the relative error stays O(log n · u), like the pairwise sum's.
* ``"blocked_mean"``: a running mean ``m_j = round(((j−1)/j)·m_{j−1} + (1/j)·x_j)`` inside
  blocks of ``block_size`` values, then ``"pairwise_mean"`` across the blocks (weighted by their
  sizes). The same bound holds: no partial leaves the range of the inputs.

The two ``*_mean`` orders give a mean directly (:func:`emulated_mean`); a sum of n values needs
n times the range and would overflow again, so :func:`emulated_sum` refuses them.

Gradients. Every rounding is a straight-through estimator: autograd differentiates the emulated
forward graph (each op's derivative evaluated at the rounded values), and the rounding itself
passes the gradient through unchanged, or rounded to the same format when ``round_grad=True``
(a backward pass that also stores its intermediate gradients in the format; the reductions of
the backward — autograd's sums over broadcast axes — then still accumulate in float32).

Non-finite values can be counted per stage with :class:`NonfiniteRecorder`::

    with NonfiniteRecorder() as rec:
        with rec.scope("layer1.bn1"):
            y = emulated_batch_norm(...)
    rec.totals()   # {"layer1.bn1/square": {"nonfinite": ..., "underflow": ..., "numel": ...}, ...}
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .formats import FP32, FloatFormat, IntFormat, get_format, round_to_format

__all__ = [
    "round_ste",
    "emulated_sum",
    "emulated_mean",
    "record",
    "Arithmetic",
    "NonfiniteRecorder",
    "SUMMATIONS",
    "MEAN_SUMMATIONS",
]

#: the reductions that average as they go and so cannot overflow (see the module doc)
MEAN_SUMMATIONS = ("pairwise_mean", "blocked_mean")
#: every reduction order: plain sums, then the averaging ones
SUMMATIONS = ("pairwise", "blocked", "sequential") + MEAN_SUMMATIONS


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fmt: FloatFormat, grad_fmt: FloatFormat | None) -> Tensor:  # type: ignore[override]
        ctx.grad_fmt = grad_fmt
        return round_to_format(x, fmt)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if ctx.grad_fmt is not None:
            g = round_to_format(g, ctx.grad_fmt)
        return g, None, None


def round_ste(x: Tensor, fmt: str | torch.dtype | FloatFormat, grad_fmt: str | torch.dtype | FloatFormat | None = None) -> Tensor:
    """Round ``x`` to ``fmt`` (nearest even, the format's overflow) with a straight-through gradient.

    The gradient passes unchanged, or rounded to ``grad_fmt`` if given.
    """
    f = get_format(fmt)
    if isinstance(f, IntFormat):
        raise ValueError("round_ste: integer formats need a scale; use normmatters.precision.quantize_int")
    gf = None if grad_fmt is None else get_format(grad_fmt)
    if isinstance(gf, IntFormat):
        raise ValueError("round_ste: grad_fmt must be a float format")
    return _RoundSTE.apply(x, f, gf)


# --------------------------------------------------------------------------- recorder

_local = threading.local()


def _active_recorders() -> list[NonfiniteRecorder]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@dataclass
class _Count:
    nonfinite: int = 0
    underflow: int = 0
    numel: int = 0
    calls: int = 0


@dataclass
class NonfiniteRecorder:
    """Counts non-finite values (and underflows to zero) at each stage of the emulated norms.

    Use as a context manager; nested :meth:`scope` names the layer. Stages of a batch norm:
    ``input``, ``centred``, ``square`` (L2) or ``abs``, ``sum``, ``dispersion``, ``output``.
    ``underflow`` counts values that were non-zero before a rounding and zero after it (the
    "lost precision" of the squares). Counting synchronises with the device; use for diagnosis.
    """

    counts: dict[str, _Count] = field(default_factory=lambda: defaultdict(_Count))
    _scopes: list[str] = field(default_factory=list)

    def __enter__(self) -> NonfiniteRecorder:
        _active_recorders().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _active_recorders()
        if self in stack:
            stack.remove(self)

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def add(self, stage: str, value: Tensor, before: Tensor | None = None) -> None:
        key = "/".join([*self._scopes, stage])
        c = self.counts[key]
        with torch.no_grad():
            c.nonfinite += int((~torch.isfinite(value)).sum())
            if before is not None:
                c.underflow += int(((value == 0) & (before != 0)).sum())
        c.numel += value.numel()
        c.calls += 1

    def totals(self) -> dict[str, dict[str, int]]:
        """``{"scope/stage": {"nonfinite", "underflow", "numel", "calls"}}``."""
        return {k: vars(v).copy() for k, v in self.counts.items()}

    def attach(self, model: torch.nn.Module, types: tuple[type, ...] | None = None) -> list:
        """Record inside every submodule of ``model`` of the given ``types``, scoped by its name.

        By default, every submodule with a ``compute_dtype`` attribute: the Lp batch, layer and
        group norms and Range BN, whichever format they are set to. Forward hooks make this
        recorder active for the module's forward only. Returns the hook handles; call
        ``handle.remove()`` on each (or :meth:`detach`) to stop.
        """
        handles = []
        for name, module in model.named_modules():
            if (hasattr(module, "compute_dtype") if types is None else isinstance(module, types)):
                handles.append(module.register_forward_pre_hook(self._pre_hook(name or type(module).__name__)))
                handles.append(module.register_forward_hook(self._post_hook()))
        self._handles = getattr(self, "_handles", []) + handles
        return handles

    def detach(self) -> None:
        """Remove the hooks installed by :meth:`attach`."""
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    def _pre_hook(self, name: str):
        def hook(module, args):
            _active_recorders().append(self)
            self._scopes.append(name)

        return hook

    def _post_hook(self):
        def hook(module, args, output):
            if self._scopes:
                self._scopes.pop()
            stack = _active_recorders()
            if stack and stack[-1] is self:
                stack.pop()

        return hook

    def total_nonfinite(self, stage: str | None = None) -> int:
        """Sum of non-finite counts, over every stage or over stages named ``stage``."""
        return sum(v.nonfinite for k, v in self.counts.items() if stage is None or k.rsplit("/", 1)[-1] == stage)

    def reset(self) -> None:
        self.counts.clear()


def record(stage: str, value: Tensor, before: Tensor | None = None) -> None:
    """Count ``value`` (and its underflows from ``before``) at ``stage`` in every active recorder.

    The emulated normalizations call it at each stage; a normalization built on them (Range BN)
    calls it for its own stages. A no-op when no :class:`NonfiniteRecorder` is active.
    """
    for rec in _active_recorders():
        rec.add(stage, value, before)


_record = record


# --------------------------------------------------------------------------- sums

def _pairwise(x: Tensor, rnd) -> Tensor:
    while x.shape[-1] > 1:
        m = x.shape[-1]
        h = m // 2
        s = rnd(x[..., :h] + x[..., h:2 * h])
        if m % 2:
            s = torch.cat([s, x[..., 2 * h:]], dim=-1)
        x = s
    return x


def _sequential(x: Tensor, rnd) -> Tensor:
    s = x[..., 0]
    for j in range(1, x.shape[-1]):
        s = rnd(s + x[..., j])
    return s.unsqueeze(-1)


def _pairwise_mean(x: Tensor, rnd, counts: list[int] | None = None) -> Tensor:
    """Tree of weighted means over the last axis (keepdim); ``counts[i]``: values behind ``x[..., i]``.

    Adjacent entries are paired, so at every level all nodes stand for the same number of values
    except the last one: the weights are ½, ½ everywhere but at that node.
    """
    counts = [1] * x.shape[-1] if counts is None else list(counts)
    while x.shape[-1] > 1:
        m = x.shape[-1]
        h = m // 2
        a, b = x[..., 0:2 * h:2], x[..., 1:2 * h:2]
        ca, cb = counts[0:2 * h:2], counts[1:2 * h:2]
        if all(u == v for u, v in zip(ca, cb)):
            s = rnd(0.5 * a + 0.5 * b)  # exact in float32 before the one rounding
        else:
            wa = torch.tensor([u / (u + v) for u, v in zip(ca, cb)], dtype=x.dtype, device=x.device)
            s = rnd(wa * a + (1.0 - wa) * b)
        merged = [u + v for u, v in zip(ca, cb)]
        if m % 2:
            s = torch.cat([s, x[..., 2 * h:]], dim=-1)
            merged.append(counts[-1])
        x, counts = s, merged
    return x


def _blocked_mean(x: Tensor, rnd, block_size: int) -> Tensor:
    n = x.shape[-1]
    b = min(block_size, n)
    nb = -(-n // b)
    pad = nb * b - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    blocks = x.reshape(*x.shape[:-1], nb, b)
    sizes = [b] * (nb - 1) + [b - pad]
    m = blocks[..., 0]
    for j in range(2, b + 1):
        # running mean of the first j values of each block; the short last block stops at its size
        w = torch.tensor([1.0 / j if j <= c else 0.0 for c in sizes], dtype=x.dtype, device=x.device)
        m = rnd((1.0 - w) * m + w * blocks[..., j - 1])
    return _pairwise_mean(m, rnd, sizes)


def _check_summation(summation: str, block_size: int, where: str) -> None:
    if summation not in SUMMATIONS:
        raise ValueError(f"{where}: summation must be one of {SUMMATIONS}, got {summation!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size must be a positive integer, got {block_size!r}")


def emulated_sum(
    x: Tensor,
    fmt: str | torch.dtype | FloatFormat | None,
    *,
    summation: str = "pairwise",
    block_size: int = 32,
    grad_fmt: FloatFormat | None = None,
) -> Tensor:
    """Sum over the last axis, rounding every partial sum to ``fmt`` (keepdim).

    ``fmt=None`` or float32/float64 sums with torch (no rounding). See the module doc for the
    ``summation`` orders (``"pairwise"``, ``"blocked"``, ``"sequential"``; the ``*_mean`` orders
    give means, see :func:`emulated_mean`). An empty last axis sums to zero.

    Example::

        >>> float(emulated_sum(torch.ones(1, 4096), "fp16", summation="sequential"))
        2048.0
    """
    _check_summation(summation, block_size, "emulated_sum")
    if summation in MEAN_SUMMATIONS:
        raise ValueError(
            f"emulated_sum: summation={summation!r} averages as it reduces (a sum would overflow "
            f"again); use emulated_mean"
        )
    f = None if fmt is None else get_format(fmt)
    if f is None or f.name == "fp32":
        return x.sum(-1, keepdim=True)
    if x.shape[-1] == 0:
        return x.new_zeros(*x.shape[:-1], 1)

    def rnd(t: Tensor) -> Tensor:
        return _RoundSTE.apply(t, f, grad_fmt)

    if summation == "pairwise":
        return _pairwise(x, rnd)
    if summation == "sequential":
        return _sequential(x, rnd)
    n = x.shape[-1]
    b = min(block_size, n)
    pad = (-n) % b
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))  # adding zeros is exact
    blocks = x.reshape(*x.shape[:-1], -1, b)
    partial = _sequential(blocks, rnd).squeeze(-1)
    return _pairwise(partial, rnd)


def emulated_mean(
    x: Tensor,
    fmt: str | torch.dtype | FloatFormat | None,
    *,
    summation: str = "pairwise",
    block_size: int = 32,
    grad_fmt: FloatFormat | None = None,
) -> Tensor:
    r"""Mean over the last axis accumulated in ``fmt`` (keepdim).

    With a plain ``summation`` (``"pairwise"``, ``"blocked"``, ``"sequential"``) it is
    ``round(emulated_sum(x) / n)``: the sum overflows when n·mean|x| exceeds the format's max.
    With ``"pairwise_mean"`` / ``"blocked_mean"`` every partial result is a mean, between the
    smallest and the largest input, so the reduction cannot overflow (module doc).
    ``fmt=None`` or float32 averages with torch. The last axis must not be empty.

    Example::

        >>> x = torch.full((1, 4096), 400.0)
        >>> float(emulated_mean(x, "fp16")), float(emulated_mean(x, "fp16", summation="pairwise_mean"))
        (inf, 400.0)
    """
    _check_summation(summation, block_size, "emulated_mean")
    n = x.shape[-1]
    if n == 0:
        raise ValueError("emulated_mean: the mean of an empty axis is undefined")
    f = None if fmt is None else get_format(fmt)
    if f is None or f.name == "fp32":
        return x.sum(-1, keepdim=True) / n

    def rnd(t: Tensor) -> Tensor:
        return _RoundSTE.apply(t, f, grad_fmt)

    if summation == "pairwise_mean":
        return _pairwise_mean(x, rnd)
    if summation == "blocked_mean":
        return _blocked_mean(x, rnd, block_size)
    return rnd(emulated_sum(x, f, summation=summation, block_size=block_size, grad_fmt=grad_fmt) / n)


# --------------------------------------------------------------------------- arithmetic

class Arithmetic:
    """Where each kind of operation of a normalization is computed.

    * ``comp``: the result of an elementwise op (one per input value) in ``compute``;
    * ``acc``: the result of a reduction or of a per-statistic op (the division by n, the
      constant, √, eps) in ``accumulate``;
    * ``sum`` / ``mean``: a reduction over the last axis accumulated in ``accumulate``, in the
      order ``summation`` (module doc).

    ``accumulate=None`` is float32: elementwise work in the low format, float32 sums, as
    low-precision hardware does. Pass the low format itself to accumulate in it (plain sums
    overflow; ``summation="pairwise_mean"`` or ``"blocked_mean"`` cannot).

    ``backend="emulate"`` keeps float32 storage and rounds (any device, any format);
    ``backend="native"`` casts to the real torch dtype and lets the hardware compute
    (fp16/bf16 only; torch's reductions then accumulate in float32 internally and round once).

    Example::

        >>> ar = Arithmetic("fp16")                  # fp16 elementwise, float32 sums
        >>> ar16 = Arithmetic("fp16", "fp16", summation="pairwise_mean")
    """

    def __init__(
        self,
        compute: str | torch.dtype | FloatFormat,
        accumulate: str | torch.dtype | FloatFormat | None = None,
        *,
        summation: str = "pairwise",
        block_size: int = 32,
        round_grad: bool = False,
        backend: str = "emulate",
    ) -> None:
        c = get_format(compute)
        a = FP32 if accumulate is None else get_format(accumulate)
        for name, f in (("compute_dtype", c), ("accumulate_dtype", a)):
            if isinstance(f, IntFormat):
                raise ValueError(
                    f"{name}: a normalization cannot be computed in an integer format ({f.name}); "
                    f"use a float format, or quantize its input with normmatters.precision.quant"
                )
        _check_summation(summation, block_size, "Arithmetic")
        if backend not in ("emulate", "native"):
            raise ValueError(f"backend must be 'emulate' or 'native', got {backend!r}")
        if backend == "native":
            for name, f in (("compute_dtype", c), ("accumulate_dtype", a)):
                if f.name not in ("fp32", "fp16", "bf16"):
                    raise ValueError(
                        f"backend='native' computes in real torch dtypes, which have no arithmetic "
                        f"for {f.name} ({name}); use backend='emulate'"
                    )
            if summation in MEAN_SUMMATIONS:
                raise ValueError(
                    f"backend='native' sums with torch; summation={summation!r} needs backend='emulate'"
                )
        self.compute, self.accumulate = c, a
        self.summation, self.block_size = summation, block_size
        self.backend = backend
        self.round_grad = round_grad
        self.storage = torch.float32

    def _round(self, x: Tensor, f: FloatFormat) -> Tensor:
        if self.backend == "native":
            return x.to(f.torch_dtype)
        if f.name == "fp32":
            return x.to(torch.float32)
        # A float64 input is rounded directly (one rounding), then stored exactly in float32.
        return _RoundSTE.apply(x, f, f if self.round_grad else None).to(torch.float32)

    def comp(self, x: Tensor) -> Tensor:
        return self._round(x, self.compute)

    def acc(self, x: Tensor) -> Tensor:
        return self._round(x, self.accumulate)

    def sum(self, x: Tensor) -> Tensor:
        """The sum over the last axis (keepdim), accumulated in ``accumulate``."""
        if self.backend == "native":
            return x.to(self.accumulate.torch_dtype).sum(-1, keepdim=True)
        if self.accumulate.name == "fp32":
            return x.to(torch.float32).sum(-1, keepdim=True)
        if self.summation in MEAN_SUMMATIONS:
            raise ValueError(f"Arithmetic.sum: summation={self.summation!r} gives means; use Arithmetic.mean")
        return emulated_sum(
            x.to(torch.float32), self.accumulate, summation=self.summation,
            block_size=self.block_size, grad_fmt=self.accumulate if self.round_grad else None,
        )

    def mean(self, x: Tensor, stage: str | None = None) -> Tensor:
        """The mean over the last axis (keepdim): ``acc(sum(x) / n)``, or an averaging reduction.

        ``stage`` names the reduction for the :class:`NonfiniteRecorder`: the sum is recorded
        there (the mean itself for the ``*_mean`` orders, which form no sum).
        """
        if self.backend == "emulate" and self.summation in MEAN_SUMMATIONS and self.accumulate.name != "fp32":
            m = emulated_mean(
                x.to(torch.float32), self.accumulate, summation=self.summation,
                block_size=self.block_size, grad_fmt=self.accumulate if self.round_grad else None,
            )
            if stage is not None:
                record(stage, m)
            return m
        s = self.sum(x)
        if stage is not None:
            record(stage, s)
        return self.acc(s / x.shape[-1])

    def constant(self, value: float, like: Tensor, f: FloatFormat | None = None) -> Tensor:
        """A Python constant as the format holds it (e.g. eps, which can round to zero in fp8)."""
        t = torch.tensor(value, dtype=torch.float32, device=like.device)
        return self._round(t, f or self.accumulate)

    def __repr__(self) -> str:
        return (f"Arithmetic(compute={self.compute.name}, accumulate={self.accumulate.name}, "
                f"summation={self.summation!r}, backend={self.backend!r})")
