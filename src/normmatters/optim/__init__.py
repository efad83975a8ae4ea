"""Weight decay, learning rate and weight norms (claim C1, SPEC §4).

* :func:`scale_invariant_parameters` — which weights are followed by a normalization;
* :class:`NormTracker` — ‖w‖, the effective learning rate and the angular update per layer
  and channel, logged to JSONL and plotted;
* :class:`LRCorrection` — train without weight decay and mimic it by a per-channel LR;
* :class:`NormSchedule` / :class:`ReferenceNormSchedule` — norm scheduling instead of LR
  scheduling.
"""

from normmatters.optim.invariance import (
    InvarianceReport,
    ScaleInvarianceTraceError,
    ScaleInvariantParam,
    analyze_scale_invariance,
    grouped_norms,
    last_layer_parameters,
    scale_invariant_parameters,
    split_param_groups,
)

__all__ = [
    "InvarianceReport",
    "ScaleInvarianceTraceError",
    "ScaleInvariantParam",
    "analyze_scale_invariance",
    "grouped_norms",
    "last_layer_parameters",
    "scale_invariant_parameters",
    "split_param_groups",
]
