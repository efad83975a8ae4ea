"""Helpers several test files share (imported as a plain module, like ``_multiprocess``)."""

from __future__ import annotations

import torch

#: Names of the autograd nodes of the fused paths: the custom op, its eager twin, the C++ node.
FUSED_NODES = ("normmatters_lp_norm_fwd", "lp_norm_fwd", "_EagerLpNorm", "LpNormFn")


def fused(y: torch.Tensor) -> bool:
    """Whether the autograd graph of ``y`` contains a fused normalization node."""
    seen, stack = set(), [y.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if any(s in f.name() for s in FUSED_NODES):
            return True
        stack.extend(n for n, _ in f.next_functions)
    return False


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, Algorithm 2) with decoupled weight decay, as lion-pytorch and timm
    write it; torch has none."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-g["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
