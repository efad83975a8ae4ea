r"""8-bit training after Banner, Hubara, Hoffer & Soudry (2018) (claim C4; Hoffer et al. 2018, Sec. 5).

"Scalable methods for 8-bit training of neural networks" quantizes the *bottleneck* operations —
the convolutions and matrix products — and keeps everything else in higher precision:

* forward: the input activations and the weights of every Conv/Linear are quantized to 8 bits
  (uniform grid over the tensor's [min, max], round to nearest); the products accumulate in
  float32 (the int32 accumulators of integer hardware) and the bias stays in float32;
* backward, *gradient bifurcation*: the gradient of the layer's output is quantized to 8 bits
  **with stochastic rounding** (unbiased) to compute the gradient of the input — the gradient
  that flows down the network through every layer — while the weight gradient is computed from
  a higher-precision copy of the same output gradient (float32 by default, or e.g. ``"int16"``);
* quantizers are straight-through estimators: ∂Q(x)/∂x = 1;
* Range BN (:mod:`normmatters.precision.range_bn`) replaces batch norm's variance by a range.

Formats are names: ``"int<b>"`` (a uniform grid of 2^b levels over [min, max] of the tensor,
per tensor), a float format of :mod:`normmatters.functional.formats` (``"fp16"``, ``"bf16"``,
``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp32"``: rounding to the format, no scaling) or ``None`` (no
quantization).

Example::

    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> net = quantize_model(net, QuantConfig(), norm="range")
    >>> type(net[0]).__name__, type(net[1].norm).__name__
    ('QConv2d', 'RangeBatchNorm2d')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.formats import FloatFormat, IntFormat, get_format, round_to_format
from ..nn import LpBatchNorm1d, LpBatchNorm2d
from ..nn.batchnorm import BatchNormBase
from .range_bn import RangeBatchNorm1d, RangeBatchNorm2d

__all__ = [
    "QuantConfig",
    "quantize_uniform",
    "quantize_tensor",
    "quantize_ste",
    "quantize_grad",
    "QLinear",
    "QConv1d",
    "QConv2d",
    "QuantizedNorm",
    "quantize_model",
]


@dataclass(frozen=True)
class QuantConfig:
    """Where each tensor of a quantized layer is quantized (format names as in the module doc).

    Attributes:
        activation: the layer's input in the forward pass (``"int8"``).
        weight: the weight in the forward pass (``"int8"``).
        grad: the output gradient used for the input gradient, the back-propagated bottleneck
            (``"int8"``, stochastic rounding).
        weight_grad: the output gradient used for the weight gradient (``None`` = float32).
        grad_rounding: ``"stochastic"`` (default, unbiased) or ``"nearest"`` for the gradients.
    """

    activation: str | None = "int8"
    weight: str | None = "int8"
    grad: str | None = "int8"
    weight_grad: str | None = None
    grad_rounding: str = "stochastic"

    def __post_init__(self) -> None:
        for name in ("activation", "weight", "grad", "weight_grad"):
            value = getattr(self, name)
            if value is not None:
                get_format(value)  # raises a ValueError naming the format
        if self.grad_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"QuantConfig: grad_rounding must be 'nearest' or 'stochastic', got {self.grad_rounding!r}")

    def __repr__(self) -> str:
        return "QuantConfig(" + ", ".join(f"{k}={v!r}" for k, v in asdict(self).items()) + ")"


def quantize_uniform(
    x: Tensor,
    bits: int = 8,
    *,
    lo: Tensor | float | None = None,
    hi: Tensor | float | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Round ``x`` to the uniform grid of 2^bits levels on [lo, hi] (default: x's min and max).

    .. math::
        s = \frac{hi - lo}{2^b - 1},\quad
        Q(x) = lo + s\cdot\mathrm{clamp}\big(\mathrm{round}((x - lo)/s),\ 0,\ 2^b - 1\big)

    Values outside [lo, hi] saturate. Stochastic rounding is ``floor((x − lo)/s + u)``,
    u ~ U[0, 1): unbiased inside the range. A constant tensor (hi = lo) is returned unchanged.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize_uniform: expected a floating-point tensor, got {type(x).__name__}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24:
        raise ValueError(f"quantize_uniform: bits must be an integer in [1, 24], got {bits!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"quantize_uniform: rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if x.numel() == 0:
        return x.clone()
    with torch.no_grad():
        lo_t = x.min() if lo is None else torch.as_tensor(lo, dtype=x.dtype, device=x.device)
        hi_t = x.max() if hi is None else torch.as_tensor(hi, dtype=x.dtype, device=x.device)
        levels = 2 ** bits - 1
        scale = (hi_t - lo_t) / levels
        ok = scale > 0
        safe = torch.where(ok, scale, torch.ones_like(scale))
        q = (x - lo_t) / safe
        if rounding == "stochastic":
            q = torch.floor(q + torch.rand(q.shape, dtype=q.dtype, device=q.device, generator=generator))
        else:
            q = torch.round(q)
        out = lo_t + q.clamp(0, levels) * safe
        return torch.where(ok, out, x)


def quantize_tensor(x: Tensor, fmt: str | None, *, rounding: str = "nearest") -> Tensor:
    """Quantize ``x`` to ``fmt`` (``"int<b>"``, a float format name, or ``None``); no gradient."""
    if fmt is None:
        return x
    f = get_format(fmt)
    if isinstance(f, IntFormat):
        return quantize_uniform(x, f.bits, rounding=rounding)
    assert isinstance(f, FloatFormat)
    with torch.no_grad():
        y = round_to_format(x.float(), f, rounding=rounding, overflow="saturate")
    return y.to(x.dtype)


class _QuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fmt: str | None) -> Tensor:  # type: ignore[override]
        return quantize_tensor(x, fmt)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g, None


class _GradQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fmt: str | None, rounding: str) -> Tensor:  # type: ignore[override]
        ctx.fmt, ctx.rounding = fmt, rounding
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return quantize_tensor(g, ctx.fmt, rounding=ctx.rounding), None, None


def quantize_ste(x: Tensor, fmt: str | None) -> Tensor:
    """``Q(x)`` in the forward pass, the identity in the backward pass (straight-through)."""
    return x if fmt is None else _QuantSTE.apply(x, fmt)


def quantize_grad(x: Tensor, fmt: str | None, rounding: str = "stochastic") -> Tensor:
    """The identity in the forward pass; quantizes the gradient flowing back through it."""
    return x if fmt is None else _GradQuant.apply(x, fmt, rounding)


class _BifurcatedOp(torch.autograd.Function):
    """y = op(xq, wq) + b whose backward uses a quantized gradient for ∂/∂x and another for ∂/∂w."""

    @staticmethod
    def forward(ctx, xq: Tensor, wq: Tensor, bias: Tensor | None, layer: Any, cfg: QuantConfig) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xq, wq)
        ctx.layer, ctx.cfg, ctx.has_bias = layer, cfg, bias is not None
        return layer._op(xq, wq, bias)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        cfg: QuantConfig = ctx.cfg
        g_in = quantize_tensor(g, cfg.grad, rounding=cfg.grad_rounding)
        g_w = quantize_tensor(g, cfg.weight_grad, rounding=cfg.grad_rounding)
        gx = ctx.layer._grad_input(g_in, xq, wq) if ctx.needs_input_grad[0] else None
        gw = ctx.layer._grad_weight(g_w, xq, wq) if ctx.needs_input_grad[1] else None
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(dim=[i for i in range(g.dim()) if i != ctx.layer._channel_dim(g)])
        return gx, gw, gb, None, None


class _QuantMixin:
    """forward = bifurcated op on the quantized input and weight (see the module doc)."""

    quant: QuantConfig

    def forward(self, input: Tensor) -> Tensor:
        xq = quantize_ste(input, self.quant.activation)
        wq = quantize_ste(self.weight, self.quant.weight)  # type: ignore[attr-defined]
        return _BifurcatedOp.apply(xq, wq, self.bias, self, self.quant)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", quant={self.quant!r}"  # type: ignore[misc]


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with 8-bit forward and bifurcated 8-bit / float32 gradients (Banner et al.).

    Same arguments, parameters and state dict as ``nn.Linear``, plus keyword-only ``quant``.

    Example::

        >>> layer = QLinear(16, 4)
        >>> y = layer(torch.randn(8, 16))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, quant: QuantConfig | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.quant = quant or QuantConfig()

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def _grad_input(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return g @ w

    def _grad_weight(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def _channel_dim(self, g: Tensor) -> int:
        return g.dim() - 1

    @classmethod
    def from_float(cls, module: nn.Linear, quant: QuantConfig | None = None) -> QLinear:
        """A QLinear sharing nothing with ``module`` but holding a copy of its parameters."""
        q = cls(module.in_features, module.out_features, module.bias is not None,
                device=module.weight.device, dtype=module.weight.dtype, quant=quant)
        q.load_state_dict(module.state_dict())
        q.train(module.training)
        return q


class _QConvNd(_QuantMixin):
    def _conv_args(self) -> tuple[list[int], list[int], list[int]]:
        padding = self.padding  # type: ignore[attr-defined]
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * len(self.kernel_size)  # type: ignore[attr-defined]
            else:  # "same" with stride 1: torch pads (total // 2) on the left
                totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]  # type: ignore[attr-defined]
                if any(t % 2 for t in totals):
                    raise ValueError(f"{type(self).__name__}: padding='same' with an even kernel is not supported")
                padding = tuple(t // 2 for t in totals)
        return list(self.stride), list(padding), list(self.dilation)  # type: ignore[attr-defined]

    def _pad(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":  # type: ignore[attr-defined]
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)  # type: ignore[attr-defined]
        return x

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(self._pad(input))

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        stride, padding, dilation = self._conv_args()
        if self.padding_mode != "zeros":  # type: ignore[attr-defined]
            padding = [0] * len(padding)
        return torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False,
                                          [0] * len(stride), self.groups)  # type: ignore[attr-defined]

    def _backward(self, g: Tensor, x: Tensor, w: Tensor, mask: list[bool]) -> tuple:
        stride, padding, dilation = self._conv_args()
        if self.padding_mode != "zeros":  # type: ignore[attr-defined]
            padding = [0] * len(padding)
        return torch.ops.aten.convolution_backward(
            g, x, w, None, stride, padding, dilation, False, [0] * len(stride),
            self.groups, mask)  # type: ignore[attr-defined]

    def _grad_input(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return self._backward(g, x, w, [True, False, False])[0]

    def _grad_weight(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return self._backward(g, x, w, [False, True, False])[1]

    def _channel_dim(self, g: Tensor) -> int:
        return 1

    @classmethod
    def from_float(cls, module: nn.Module, quant: QuantConfig | None = None):
        """A quantized copy of a ``nn.Conv1d`` / ``nn.Conv2d`` (same parameters and buffers)."""
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,  # type: ignore[call-arg]
                module.padding, module.dilation, module.groups, module.bias is not None,
                module.padding_mode, device=module.weight.device, dtype=module.weight.dtype, quant=quant)
        q.load_state_dict(module.state_dict())
        q.train(module.training)
        return q


class QConv1d(_QConvNd, nn.Conv1d):
    """``nn.Conv1d`` quantized as in the module doc; same arguments plus keyword-only ``quant``."""

    def __init__(self, *args: Any, quant: QuantConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quant = quant or QuantConfig()


class QConv2d(_QConvNd, nn.Conv2d):
    """``nn.Conv2d`` quantized as in the module doc; same arguments plus keyword-only ``quant``.

    Example::

        >>> conv = QConv2d(3, 8, 3, padding=1)
        >>> y = conv(torch.randn(2, 3, 8, 8))
    """

    def __init__(self, *args: Any, quant: QuantConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quant = quant or QuantConfig()


class QuantizedNorm(nn.Module):
    """A normalization layer whose input is quantized (forward, STE) and whose output gradient is
    quantized with stochastic rounding (backward), as Banner et al.'s Range BN does.

    The wrapped layer is ``self.norm`` (its state dict keys gain the prefix ``norm.``).
    """

    def __init__(self, norm: nn.Module, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.quant = quant or QuantConfig()

    def forward(self, input: Tensor) -> Tensor:
        y = self.norm(quantize_ste(input, self.quant.activation))
        return quantize_grad(y, self.quant.grad, self.quant.grad_rounding)

    def extra_repr(self) -> str:
        return f"quant={self.quant!r}"


def _is_batch_norm(m: nn.Module) -> bool:
    # torch's batch norms, and ours: the Lp batch norms and Range BN (BatchNormBase)
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNormBase))


def _convert_norm(m: nn.Module, norm: str, norm_kwargs: dict[str, Any]) -> nn.Module:
    two_d = isinstance(m, (nn.BatchNorm2d,)) or type(m).__name__.endswith("2d")
    args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    factory = {"device": m.running_mean.device if m.running_mean is not None else None}
    bias = getattr(m, "bias", None) is not None
    if norm == "range":
        cls = RangeBatchNorm2d if two_d else RangeBatchNorm1d
        new = cls(*args, **factory, bias=bias, **norm_kwargs)
    else:
        cls = LpBatchNorm2d if two_d else LpBatchNorm1d
        p = {"l1": 1, "l2": 2, "linf": "inf"}[norm]
        new = cls(*args, **factory, bias=bias, p=p, **norm_kwargs)
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


def quantize_model(
    model: nn.Module,
    quant: QuantConfig | None = None,
    *,
    norm: str = "keep",
    norm_kwargs: dict[str, Any] | None = None,
    quantize_norms: bool = True,
    skip: tuple[str, ...] = (),
) -> nn.Module:
    """Convert a model for 8-bit training in place, and return it.

    * every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` becomes :class:`QLinear` /
      :class:`QConv1d` / :class:`QConv2d` with the same parameters (those named in ``skip``,
      e.g. ``("fc",)``, stay in float);
    * every batch norm (torch's or an Lp one) becomes ``norm``: ``"keep"``, ``"range"``
      (:class:`~normmatters.precision.range_bn.RangeBatchNorm2d`), ``"l1"``, ``"l2"`` or
      ``"linf"`` (an :class:`~normmatters.nn.LpBatchNorm2d`), built with ``norm_kwargs`` (e.g.
      ``{"compute_dtype": torch.float16}``) and the old layer's parameters and buffers;
    * with ``quantize_norms`` each batch norm is wrapped in :class:`QuantizedNorm`.

    The training flag of every layer is kept.
    """
    quant = quant or QuantConfig()
    if norm not in ("keep", "range", "l1", "l2", "linf"):
        raise ValueError(f"quantize_model: norm must be 'keep', 'range', 'l1', 'l2' or 'linf', got {norm!r}")
    kwargs = dict(norm_kwargs or {})

    def convert(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}"
            if full in skip:
                continue
            new: nn.Module | None = None
            if isinstance(child, (QLinear, _QConvNd, QuantizedNorm)):
                continue
            if type(child) is nn.Linear:
                new = QLinear.from_float(child, quant)
            elif type(child) is nn.Conv2d:
                new = QConv2d.from_float(child, quant)
            elif type(child) is nn.Conv1d:
                new = QConv1d.from_float(child, quant)
            elif _is_batch_norm(child):
                new = child if norm == "keep" else _convert_norm(child, norm, kwargs)
                if quantize_norms:
                    new = QuantizedNorm(new, quant).train(child.training)
            if new is not None:
                setattr(module, name, new)
            else:
                convert(child, full + ".")

    convert(model, "")
    return model
