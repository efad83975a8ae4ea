"""Model converters: Lp norms, weight-normalized (BN-free) networks, synchronized batch norm.

Every converter replaces a module by one that computes the same function at p=2 (its Lp version
otherwise) or leaves it with one :class:`NormConversionWarning`; norms of other classes are
recognised by what they compute (:mod:`normmatters.convert.recognise`), or registered with
:func:`register_norm`.
"""

from .layers import ForeignLpGatedRMSNorm, ForeignLpNorm
from .norms import convert_norms, to_torch_norms
from .official import from_official_state_dict
from .report import ConversionReport, ConversionRow
from .recognise import NormConversionWarning, NormSpec, recognise, register_norm, unregister_norm
from .sync import convert_sync_lp_batchnorm
from .weight_norm import to_weight_normalized

__all__ = ["convert_norms", "to_torch_norms", "convert_sync_lp_batchnorm", "from_official_state_dict",
           "to_weight_normalized", "register_norm", "unregister_norm", "recognise", "NormSpec",
           "NormConversionWarning", "ForeignLpNorm", "ForeignLpGatedRMSNorm", "ConversionReport", "ConversionRow"]
