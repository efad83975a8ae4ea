"""Deployment: fold norms into convolutions, freeze norms, export to ONNX.

* :func:`fold_norms` — an inference copy with every conv/linear → batch norm (any p, torch's too)
  merged into one layer and weight normalizations baked in (found with :mod:`torch.fx`).
* :func:`freeze_norms` / :func:`unfreeze_norms` — norms with frozen parameters and statistics.
* :func:`export_onnx` — fold, export with ``torch.onnx.export(..., dynamo=True)``, check in
  onnxruntime.

Checkpoints of the paper's official code load through
:func:`normmatters.convert.from_official_state_dict`.
"""

from .export import OnnxExport, export_onnx, warm_constants
from .fold import FoldReport, bake_weight_norms, fold_norms, norm_eval_affine
from .freeze import FrozenNorm, freeze_norms, unfreeze_norms

__all__ = [
    "fold_norms",
    "FoldReport",
    "bake_weight_norms",
    "norm_eval_affine",
    "freeze_norms",
    "unfreeze_norms",
    "FrozenNorm",
    "export_onnx",
    "OnnxExport",
    "warm_constants",
]
