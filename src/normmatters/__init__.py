"""normmatters: efficient and accurate normalization schemes, after Hoffer et al., "Norm matters"
(NeurIPS 2018).

* :mod:`normmatters.functional` — the math: Lp dispersions, their constants, the normalizations.
* :mod:`normmatters.nn` — drop-in layers: ``LpBatchNorm{1,2,3}d``, ``LpLayerNorm``,
  ``LpGroupNorm``, ``LpRMSNorm``, ``MeanOnlyBatchNorm{1,2,3}d`` and a norm factory.
* :mod:`normmatters.convert` — ``convert_norms`` and friends.
* :mod:`normmatters.deploy` — ``fold_norms``, ``freeze_norms``, ONNX export.
"""

from . import functional, nn
from .convert import (
    NormConversionWarning,
    convert_norms,
    convert_sync_lp_batchnorm,
    from_official_state_dict,
    register_norm,
    to_torch_norms,
    to_weight_normalized,
)
from .deploy import fold_norms, freeze_norms, unfreeze_norms
from .optim import LRCorrection, NormSchedule, NormTracker, ReferenceNormSchedule, scale_invariant_parameters
from .parametrizations import bounded_weight_norm, lp_weight_norm, remove_weight_norm, weight_norm
from .functional import C_L1, lp_constant, paper_constant, topk_constant
from .nn import (
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpGatedRMSNorm,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    create_norm_layer,
    get_norm_layer,
)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "nn",
    "convert_norms",
    "to_torch_norms",
    "convert_sync_lp_batchnorm",
    "register_norm",
    "NormConversionWarning",
    "from_official_state_dict",
    "fold_norms",
    "freeze_norms",
    "unfreeze_norms",
    "weight_norm",
    "lp_weight_norm",
    "bounded_weight_norm",
    "remove_weight_norm",
    "to_weight_normalized",
    "scale_invariant_parameters",
    "NormTracker",
    "LRCorrection",
    "NormSchedule",
    "ReferenceNormSchedule",
    "C_L1",
    "lp_constant",
    "paper_constant",
    "topk_constant",
    "LpBatchNorm1d",
    "LpBatchNorm2d",
    "LpBatchNorm3d",
    "LpLayerNorm",
    "LpGroupNorm",
    "LpRMSNorm",
    "LpGatedRMSNorm",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "MeanOnlyBatchNorm3d",
    "get_norm_layer",
    "create_norm_layer",
]
