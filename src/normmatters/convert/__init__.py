"""Model converters: Lp norms, weight-normalized (BN-free) networks, synchronized batch norm."""

from .norms import convert_norms, to_torch_norms
from .official import from_official_state_dict
from .sync import convert_sync_lp_batchnorm

__all__ = ["convert_norms", "to_torch_norms", "convert_sync_lp_batchnorm", "from_official_state_dict"]

try:  # written alongside; each converter is optional until its module lands
    from .weight_norm import to_weight_normalized  # noqa: F401

    __all__.append("to_weight_normalized")
except ImportError:  # pragma: no cover
    pass
