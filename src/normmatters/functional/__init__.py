"""The math of normmatters, stateless: Lp dispersions, their constants and the normalizations.

Every formula (Hoffer et al. 2018, Sec. 4; docs/math.md) lives here once; modules in :mod:`normmatters.nn` wrap these functions.
"""

from .constants import C_L1, lp_constant, normalize_p, paper_constant, topk_constant
from .norm import (
    batch_norm_statistics,
    lp_batch_norm,
    lp_dispersion,
    lp_group_norm,
    lp_layer_norm,
    lp_rms_norm,
)

__all__ = [
    "C_L1",
    "lp_constant",
    "normalize_p",
    "paper_constant",
    "topk_constant",
    "lp_dispersion",
    "batch_norm_statistics",
    "lp_batch_norm",
    "lp_layer_norm",
    "lp_group_norm",
    "lp_rms_norm",
]
