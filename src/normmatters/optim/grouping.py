"""Norms of a weight by blocks of output channels, the unit in which a weight is scale invariant.

A convolution followed by batch norm is invariant to scaling each output channel separately, one
followed by group norm to scaling each group of channels, one followed by layer norm only to
scaling the whole tensor (Hoffer et al. 2018, Sec. 2). These helpers are shared by the
detection, the tracker, the learning-rate correction and the norm schedules.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_norms", "expand_groups"]


def _channels_first(t: Tensor, channel_dim: int) -> Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


def grouped_norms(t: Tensor, channel_dim: int = 0, groups: int | None = None) -> Tensor:
    """Euclidean norms of ``groups`` contiguous blocks of channels along ``channel_dim``.

    ``groups=None`` means one group per channel (per-channel norms ‖w_i‖₂).
    """
    rows = _channels_first(t, channel_dim)
    n = rows.shape[0]
    g = n if groups is None else groups
    if g <= 0 or n % g:
        raise ValueError(f"grouped_norms: {n} channels cannot be split into groups={g}")
    return torch.linalg.vector_norm(rows.reshape(g, -1), dim=1)


def expand_groups(per_group: Tensor, like: Tensor, channel_dim: int, groups: int) -> Tensor:
    """A per-group tensor ``(groups,)`` repeated over each group's channels and shaped to broadcast
    against ``like`` along ``channel_dim``."""
    if like.dim() == 0:
        return per_group.reshape(())
    n = like.shape[channel_dim]
    per_channel = per_group.repeat_interleave(n // groups)
    shape = [1] * like.dim()
    shape[channel_dim] = n
    return per_channel.reshape(shape)
