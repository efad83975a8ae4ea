"""Weight decay, learning rate and weight norms (claim C1; Hoffer et al. 2018, Sec. 2).

* :func:`scale_invariant_parameters` — which weights are followed by a normalization
  (:mod:`.invariance`: the front; :mod:`.fx_detect`: the torch.fx abstract interpreter;
  :mod:`.probe`: the numerical fallback; :mod:`.grouping`: norms by channel blocks);
* :func:`split_param_groups` — the optimizer groups and weight decay of every training
  (:mod:`.param_groups`);
* :class:`NormTracker` — ‖w‖, the effective learning rate and the angular update per layer
  and channel, logged to JSONL and plotted;
* :class:`LRCorrection` — train without weight decay and mimic it by a per-channel LR;
* :class:`NormSchedule` / :class:`ReferenceNormSchedule` — norm scheduling instead of LR
  scheduling;
* :func:`rotational_equilibrium` — the angular update and norm weight decay settles each
  scale-invariant neuron at (:mod:`.equilibrium`);
* :class:`RotationalOptimizer` — holds each scale-invariant neuron at that rotation from the
  first step, with its norm fixed (:mod:`.rotational`).
"""

from normmatters.optim.grouping import grouped_norms
from normmatters.optim.invariance import analyze_scale_invariance, scale_invariant_parameters
from normmatters.optim.param_groups import last_layer_module, last_layer_parameters, split_param_groups
from normmatters.optim.results import InvarianceReport, ScaleInvarianceTraceError, ScaleInvariantParam
from normmatters.optim.lr_correction import LRCorrection, reference_group_norms
from normmatters.optim.equilibrium import GroupEquilibrium, lion_correlation_sum, rotational_equilibrium
from normmatters.optim.rotational import RotationalOptimizer
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
    "GroupEquilibrium",
    "lion_correlation_sum",
    "rotational_equilibrium",
    "InvarianceReport",
    "LRCorrection",
    "NormSchedule",
    "NormTracker",
    "ReferenceNormSchedule",
    "RotationalOptimizer",
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
    "last_layer_module",
    "last_layer_parameters",
    "scale_invariant_parameters",
    "split_param_groups",
]
