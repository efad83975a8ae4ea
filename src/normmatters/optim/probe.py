"""Numerical detection of scale-invariant weights, for models :mod:`torch.fx` cannot trace.

Each parameter is tested in float64 at a generic point (not at the initialization): scaling it by
random positive factors per block of output channels (finest partition first), then as a whole,
must leave the training-mode output unchanged, while a random perturbation must change it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from normmatters.optim.grouping import expand_groups
from normmatters.optim.results import InvarianceReport, ScaleInvariantParam

__all__ = ["probe_analysis"]


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def probe_analysis(model: nn.Module, args: tuple[Any, ...], rtol: float) -> InvarianceReport:
    """The scale-invariant parameters of ``model`` found numerically (relative tolerance ``rtol``)."""
    work = copy.deepcopy(model).train().double()
    for m in work.modules():  # remove the eps that breaks exact invariance
        if isinstance(getattr(m, "eps", None), float) and m.eps > 0:
            m.eps = 1e-30
    dargs = tuple(a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    gen = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in work.state_dict().items()}
    # Test at a generic point, not at the initialization: a zero bias (batch norm's beta)
    # would make its layer's gain look scale invariant.
    for name, _ in work.named_parameters():
        t = state[name]
        spread = float(t.abs().mean()) if bool(t.abs().max() > 0) else 0.1
        state[name] = t + 0.3 * spread * torch.randn(t.shape, generator=gen, dtype=t.dtype)

    def forward() -> list[Tensor]:
        work.load_state_dict(state)  # batch-norm running statistics must not drift
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return [o.detach().clone() for o in _flat_outputs(work(*dargs))]

    def close(a: list[Tensor], b: list[Tensor]) -> bool:
        return all(
            torch.allclose(x, y, rtol=rtol, atol=rtol * max(float(x.abs().max()), 1e-30))
            for x, y in zip(a, b)
        )

    with torch.no_grad():
        ref = forward()
        invariant: dict[str, ScaleInvariantParam] = {}
        orig = dict(model.named_parameters())
        for name in dict(work.named_parameters()):
            keep = state[name].clone()
            noise = torch.randn(keep.shape, generator=gen, dtype=keep.dtype)
            state[name] = keep + 0.5 * noise * keep.abs().mean()
            relevant = not close(forward(), ref)
            found: int | None = None
            if relevant and keep.dim() >= 1 and keep.shape[0] > 1:
                # The finest partition of the output channels (dim 0) into equal blocks that
                # may be scaled separately: channels, then groups (group norm, heads).
                n = keep.shape[0]
                for g in [d for d in range(n, 1, -1) if n % d == 0]:
                    f = torch.rand(g, generator=gen, dtype=keep.dtype) * 1.5 + 0.5
                    state[name] = keep * expand_groups(f, keep, 0, g)
                    if close(forward(), ref):
                        found = g
                        break
            if relevant:
                if found is None:
                    state[name] = keep * 2.5
                    if close(forward(), ref):
                        found = 1
            state[name] = keep
            if found is not None:
                invariant[name] = ScaleInvariantParam(
                    name=name, param=orig[name], channel_dim=0, groups=found, norms=()
                )
    return InvarianceReport(invariant=invariant, opaque=[], method="probe")
