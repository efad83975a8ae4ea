"""Normalization modules: Lp batch / layer / group / RMS norms, mean-only batch norm, a factory."""

from .batchnorm import BatchNormBase, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, LpBatchNormBase
from .gated import LpGatedRMSNorm
from .factory import create_norm_layer, get_norm_layer, norm_layer_names
from .layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm
from .meanbn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d
from .sync import SyncLpBatchNorm

__all__ = [
    "BatchNormBase",
    "LpBatchNormBase",
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
    "SyncLpBatchNorm",
    "get_norm_layer",
    "create_norm_layer",
    "norm_layer_names",
]
