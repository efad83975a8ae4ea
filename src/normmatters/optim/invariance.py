"""Finding the scale-invariant weights of a model (claim C1; Hoffer et al. 2018, Sec. 2).

A weight ``w`` whose output reaches a normalization only through operations that are
positively homogeneous in ``w`` (reshapes, permutations, ReLU, pooling, dropout, ...) is
*scale invariant*: for every ``c > 0``

.. math::

    L(c\\,w) = L(w), \\qquad \\nabla L(c\\,w) = \\nabla L(w) / c,

because a normalization divides by a dispersion that is homogeneous of degree one
(``BN(c·x) = BN(x)``, Hoffer et al. 2018, §2). Its norm then only sets the effective step
size ``η/‖w‖²``. The invariance is usually finer than the whole tensor: a convolution followed
by batch norm is invariant to scaling each *output channel* separately, a linear layer followed
by layer norm (over its features) only to scaling the whole matrix, one followed by group norm
to scaling each group of channels.

:func:`scale_invariant_parameters` finds these weights automatically. It traces the model with
:mod:`torch.fx`, propagates the shapes of ``example_input`` through the graph, and for each
parameter follows an abstract state through the graph:

* ``CONST``  — the value does not depend on the parameter (or is invariant to its scale);
* ``HOM(a)`` — positively homogeneous of degree one; scaling output channel ``i`` of the
  parameter scales only slice ``i`` along tensor axis ``a`` (``a=None``: only a scaling of the
  whole parameter is known to scale the value);
* ``AFF(a)`` — ``c·h + b`` with ``h`` in ``HOM(a)`` and an offset ``b`` that is constant along every
  axis but ``a`` (a convolution's bias): removed by a normalization that centres over axes
  that exclude ``a`` (batch norm), not by one that reduces over ``a`` (layer norm);
* ``OTHER``  — anything else.

A normalization maps ``HOM``/``AFF`` to ``CONST``; the parameter is scale invariant when the
model's outputs are ``CONST`` and at least one normalization absorbed it. Modules the analysis
does not understand (e.g. :class:`torch.nn.MultiheadAttention`, traced as a leaf) are treated
conservatively: their parameters are reported as *opaque* and never as invariant.

Models that :mod:`torch.fx` cannot trace (control flow on tensor values) are handled by
``method="probe"``: each parameter is checked numerically in float64 — scaling it (per channel,
then as a whole) must leave the training-mode output unchanged while a random perturbation must
change it. ``method="auto"`` (the default) traces and falls back to the probe with a logged
warning; ``method="fx"`` raises :class:`ScaleInvarianceTraceError` instead.

Invariance is a property of the *training-mode* function (batch statistics); in evaluation mode
a batch norm with running statistics is an affine map and nothing is invariant. The ``eps`` of a
normalization breaks the invariance by a relative ``O(eps/σ²)``, which is ignored here.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False),
    ...                             torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    >>> inv = scale_invariant_parameters(model, torch.randn(4, 3, 8, 8))
    >>> list(inv)
    ['0.weight']
    >>> inv['0.weight'].groups      # one group per output channel
    8
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from normmatters.optim.fx_detect import fx_analysis
from normmatters.optim.probe import probe_analysis
from normmatters.optim.results import InvarianceReport, ScaleInvarianceTraceError, ScaleInvariantParam

# Also importable from here, where they were first defined.
from normmatters.optim.grouping import grouped_norms
from normmatters.optim.param_groups import last_layer_parameters, split_param_groups

__all__ = [
    "ScaleInvariantParam",
    "InvarianceReport",
    "ScaleInvarianceTraceError",
    "analyze_scale_invariance",
    "scale_invariant_parameters",
    "grouped_norms",
    "last_layer_parameters",
    "split_param_groups",
]

logger = logging.getLogger(__name__)


def _as_args(example_input: Any) -> tuple[Any, ...]:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError(
        "scale_invariant_parameters: example_input must be a Tensor or a tuple of positional "
        f"inputs, got {type(example_input).__name__}"
    )


def analyze_scale_invariance(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...],
    *,
    method: str = "auto",
    rtol: float = 1e-7,
) -> InvarianceReport:
    """Find the scale-invariant parameters of ``model`` and report how they were found.

    Args:
        model: the network; it is copied, never modified.
        example_input: a tensor (or a tuple of positional inputs) with a batch of at least two
            samples, used to propagate shapes (``"fx"``) or to evaluate the model (``"probe"``).
        method: ``"fx"`` (trace; raise :class:`ScaleInvarianceTraceError` if tracing fails),
            ``"probe"`` (numerical test of every parameter in float64) or ``"auto"`` (trace, and
            fall back to the probe with a logged warning).
        rtol: relative tolerance of the probe.

    Returns:
        :class:`InvarianceReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"scale_invariant_parameters: model must be an nn.Module, got {type(model).__name__}"
        )
    if method not in ("auto", "fx", "probe"):
        raise ValueError(
            f"scale_invariant_parameters: method must be 'auto', 'fx' or 'probe', got {method!r}"
        )
    args = _as_args(example_input)
    if method == "probe":
        return probe_analysis(model, args, rtol)
    try:
        return fx_analysis(model, args)
    except ScaleInvarianceTraceError as exc:
        if method == "fx":
            raise
        logger.warning("%s; falling back to the numerical probe", exc)
        report = probe_analysis(model, args, rtol)
        report.trace_error = str(exc)
        return report


def scale_invariant_parameters(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...],
    *,
    method: str = "auto",
) -> dict[str, ScaleInvariantParam]:
    """The scale-invariant parameters of ``model``, by name (see the module docstring).

    A parameter ``w`` is reported when ``L(c·w) = L(w)`` for every ``c > 0`` in training mode,
    because every path from ``w`` to the model's output passes a normalization through
    positively homogeneous operations. ``groups`` says how finely: each of ``groups`` blocks of
    output channels may be scaled separately.

    Args:
        model: the network (not modified).
        example_input: a batch the model accepts (tensor or tuple of positional inputs).
        method: ``"auto"`` (default), ``"fx"`` or ``"probe"``; see
            :func:`analyze_scale_invariance`.

    Returns:
        ``{name: ScaleInvariantParam}`` in ``model.named_parameters()`` order.
    """
    return analyze_scale_invariance(model, example_input, method=method).invariant
