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
from normmatters.optim.lr_correction import LRCorrection, reference_group_norms
from normmatters.optim.norm_schedule import NormSchedule, ReferenceNormSchedule, multistep_lambda
from normmatters.optim.tracker import (
    NormTracker,
    ReferenceNorms,
    angle_between,
    effective_lr_rule,
    plot_norm_log,
    read_norm_log,
)

__all__ = [
    "InvarianceReport",
    "LRCorrection",
    "NormSchedule",
    "NormTracker",
    "ReferenceNormSchedule",
    "ReferenceNorms",
    "angle_between",
    "effective_lr_rule",
    "multistep_lambda",
    "plot_norm_log",
    "read_norm_log",
    "reference_group_norms",
    "ScaleInvarianceTraceError",
    "ScaleInvariantParam",
    "analyze_scale_invariance",
    "grouped_norms",
    "last_layer_parameters",
    "scale_invariant_parameters",
    "split_param_groups",
]
