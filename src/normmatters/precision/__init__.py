"""Low precision (claim C4; Hoffer et al. 2018, Sec. 5): format emulation, normalization computed
in fp16 / bf16 / fp8, a precision map of the Lp dispersions, and 8-bit training after Banner et
al. (2018).

* :mod:`normmatters.functional.formats` — fp16, bf16, fp8 e4m3 / e5m2 and int8: rounding to
  nearest or stochastically, with each format's real overflow and underflow.
* :mod:`normmatters.functional.emulate` — arithmetic that rounds after every op, reductions in
  float32 (the default) or in the format (plain sums, which overflow, or averaging reductions,
  which cannot), and a recorder of non-finite values.
* :mod:`normmatters.functional.emulated` — :func:`emulated_batch_norm` / :func:`emulated_layer_norm`,
  the functional Lp norms with their arithmetic in a format
  (``LpBatchNorm2d(..., compute_dtype=torch.float16)`` uses them: fp16 elementwise work, float32
  sums).
* :mod:`.precision_map` — the input scales and sizes at which each p keeps its dispersion within
  1% of float64, per format.
* :mod:`.quant`, :mod:`.range_bn` — quantized Conv/Linear (8-bit forward, 8-bit stochastically
  rounded activation gradients), Range BN (its own kind of batch norm), and :func:`quantize_model`.

The emulation lives in :mod:`normmatters.functional` (the layers of :mod:`normmatters.nn` use it);
this package re-exports it.
"""

from ..functional.emulate import MEAN_SUMMATIONS, SUMMATIONS, Arithmetic, NonfiniteRecorder, emulated_mean, emulated_sum, round_ste
from ..functional.formats import (
    FORMATS,
    FloatFormat,
    IntFormat,
    get_format,
    quantize_int,
    round_to_format,
    stochastic_round,
)
from ..functional.emulated import (
    batch_norm_in_format,
    emulated_batch_norm,
    emulated_dispersion,
    emulated_layer_norm,
    emulated_statistics,
)
from .precision_map import PrecisionMap, precision_map
from .quant import (
    QConv1d,
    QConv2d,
    QLinear,
    QuantConfig,
    QuantizedNorm,
    quantize_grad,
    quantize_model,
    quantize_ste,
    quantize_uniform,
)
from .range_bn import RangeBatchNorm1d, RangeBatchNorm2d, expected_range, range_batch_norm, range_constant

__all__ = [
    "FORMATS",
    "FloatFormat",
    "IntFormat",
    "get_format",
    "round_to_format",
    "stochastic_round",
    "quantize_int",
    "Arithmetic",
    "NonfiniteRecorder",
    "emulated_sum",
    "emulated_mean",
    "SUMMATIONS",
    "MEAN_SUMMATIONS",
    "round_ste",
    "emulated_batch_norm",
    "emulated_layer_norm",
    "emulated_dispersion",
    "emulated_statistics",
    "batch_norm_in_format",
    "PrecisionMap",
    "precision_map",
    "QuantConfig",
    "QLinear",
    "QConv1d",
    "QConv2d",
    "QuantizedNorm",
    "quantize_model",
    "quantize_uniform",
    "quantize_ste",
    "quantize_grad",
    "RangeBatchNorm1d",
    "RangeBatchNorm2d",
    "range_batch_norm",
    "range_constant",
    "expected_range",
]
