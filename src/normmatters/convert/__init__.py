"""Model converters: Lp norms, weight-normalized (BN-free) networks, synchronized batch norm."""

from .norms import convert_norms, to_torch_norms
from .official import from_official_state_dict
from .sync import convert_sync_lp_batchnorm
from .weight_norm import to_weight_normalized

__all__ = ["convert_norms", "to_torch_norms", "convert_sync_lp_batchnorm", "from_official_state_dict",
           "to_weight_normalized"]
