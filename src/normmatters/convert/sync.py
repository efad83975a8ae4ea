"""Turn the batch norms of a model into synchronized Lp batch norms, for multi-process training.

The counterpart of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` for normmatters'
layers. Torch's converter turns every ``_BatchNorm`` into an L2 ``SyncBatchNorm``; ours keeps the
kind of each layer (p, k, constant), which is why normmatters' batch norms do not subclass
``_BatchNorm`` (STYLE, convention 2).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.batchnorm import _LpNormBase
from ..nn.sync import SyncLpBatchNorm
from .norms import _factory

__all__ = ["convert_sync_lp_batchnorm"]

log = logging.getLogger(__name__)


def _sync_from(module: nn.Module, process_group: Any, name: str) -> nn.Module | None:
    if isinstance(module, SyncLpBatchNorm):
        return None
    if isinstance(module, _LpNormBase):
        if module.ghost_batch_size is not None:
            # Ghost batch norm normalizes each virtual batch of a process on its own by design;
            # it has nothing to synchronize.
            log.info("convert_sync_lp_batchnorm: %r keeps ghost batches and is left unsynchronized",
                     name or type(module).__name__)
            return None
        if module.compute_dtype is not None or module.accumulate_dtype is not None:
            raise ValueError(
                f"convert_sync_lp_batchnorm: module {name or '<root>'!r} emulates low precision "
                f"(compute_dtype={module.compute_dtype}, accumulate_dtype={module.accumulate_dtype}), "
                f"which SyncLpBatchNorm does not; convert it with convert_norms first or leave it out"
            )
        opts = {"p": module.p, "k": module.k, "constant": module.constant}
    elif isinstance(module, _BatchNorm):
        opts = {"p": 2}  # torch's batch norms (nn.SyncBatchNorm included) are L2
    else:
        return None
    new = SyncLpBatchNorm(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
        process_group, bias=module.bias is not None or not module.affine, **_factory(module), **opts,
    )
    # Share (not copy) parameters and buffers, as torch's converter does, so an optimizer or an
    # EMA built before the conversion still holds the model's tensors.
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_sync_lp_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replace every batch norm of ``module`` by a :class:`~normmatters.nn.SyncLpBatchNorm` of
    the same kind.

    ``LpBatchNorm{1,2,3}d`` keep their ``p``, ``k`` and ``constant``; torch's
    ``nn.BatchNorm{1,2,3}d`` and ``nn.SyncBatchNorm`` become L2 (``p=2``) layers. ``eps``,
    ``momentum``, ``affine``, ``bias``, ``track_running_stats`` and the ``training`` flag carry
    over, and the parameters and buffers are the same tensors (shared, not copied), so the state
    dict keeps its keys and loads into the unconverted model and back. Ghost-batch layers are
    left as they are (their statistics are per virtual batch of one process by design), and so
    are layer, group and RMS norms (per sample: nothing to synchronize) and mean-only batch norms.

    Call it before wrapping the model in :class:`~torch.nn.parallel.DistributedDataParallel`.

    Args:
        module: any module; if it is itself a batch norm, the new layer is returned.
        process_group: the group to synchronize over (default: the whole world).

    Returns:
        ``module`` with its batch norms replaced (a new module if ``module`` was one).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: a layer emulates low precision (``compute_dtype``), which has no synchronized
            counterpart.

    Example::

        >>> model = convert_sync_lp_batchnorm(convert_norms(resnet, p=1))
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_lp_batchnorm: expected an nn.Module, got {type(module).__name__}")
    return _convert(module, process_group, "")


def _convert(module: nn.Module, process_group: Any, name: str) -> nn.Module:
    out = _sync_from(module, process_group, name)
    if out is None:
        out = module
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        new_child = _convert(child, process_group, full)
        if new_child is not child:
            out.add_module(child_name, new_child)
    return out
