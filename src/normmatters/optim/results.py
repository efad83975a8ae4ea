"""What the detection of scale-invariant weights returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from normmatters.optim.grouping import expand_groups, grouped_norms

__all__ = ["ScaleInvarianceTraceError", "ScaleInvariantParam", "InvarianceReport"]


class ScaleInvarianceTraceError(RuntimeError):
    """Raised when :mod:`torch.fx` cannot trace a model (``method="fx"``)."""


@dataclass(frozen=True)
class ScaleInvariantParam:
    """A scale-invariant parameter and the granularity of its invariance.

    Args:
        name: qualified parameter name, as in ``model.named_parameters()``.
        param: the parameter itself.
        channel_dim: the parameter's output-channel dimension (0 for convolutions and linear
            layers, 1 for transposed convolutions and embeddings).
        groups: number of blocks along ``channel_dim`` that are *separately* scale invariant:
            the number of output channels after batch norm, the number of groups after group
            norm, 1 when only the whole tensor is invariant (layer norm).
        norms: names of the normalizations (modules or functions) that absorb its scale.
    """

    name: str
    param: Tensor = field(repr=False, compare=False)
    channel_dim: int
    groups: int
    norms: tuple[str, ...] = ()

    def group_norms(self, tensor: Tensor | None = None) -> Tensor:
        """‖w_g‖₂ for each of the ``groups`` blocks of ``tensor`` (default: the parameter)."""
        t = self.param if tensor is None else tensor
        return grouped_norms(t.detach(), self.channel_dim, self.groups)

    def expand(self, per_group: Tensor) -> Tensor:
        """Broadcastable view of a per-group tensor ``(groups,)`` against the parameter."""
        return expand_groups(per_group, self.param, self.channel_dim, self.groups)


@dataclass
class InvarianceReport:
    """Result of :func:`analyze_scale_invariance`.

    Attributes:
        invariant: scale-invariant parameters by name, in ``named_parameters()`` order.
        opaque: parameters inside modules the analysis cannot see into (never invariant).
        method: ``"fx"`` or ``"probe"`` — what produced the answer.
        trace_error: the tracing error when the probe was used as a fallback.
    """

    invariant: dict[str, ScaleInvariantParam]
    opaque: list[str]
    method: str
    trace_error: str | None = None
