"""Turn the batch norms of a model into synchronized Lp batch norms, for multi-process training.

The counterpart of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` for normmatters'
layers. Torch's converter turns every ``_BatchNorm`` into an L2 ``SyncBatchNorm``; ours keeps the
kind of each layer (p, k, constant), which is why normmatters' batch norms do not subclass
``_BatchNorm`` (so torch's converter cannot touch them).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..nn import SyncLpBatchNorm
from .layers import original_of, remember_original
from .norms import factory_of, replace_modules
from .recognise import MEAN_ONLY, build, recognise, warn_left

__all__ = ["convert_sync_lp_batchnorm"]

_WHERE = "convert_sync_lp_batchnorm"


def _sync_from(module: nn.Module, process_group: Any, name: str) -> nn.Module | None:
    if type(module) is SyncLpBatchNorm:
        return module
    if isinstance(module, MEAN_ONLY):
        warn_left(_WHERE, name, module, "normmatters has no synchronized mean-only batch norm; its mean "
                                        "stays per process")
        return module
    spec = recognise(module)
    if spec is None:
        return None
    if isinstance(spec, str):
        warn_left(_WHERE, name, module, spec)
        return module
    if spec.kind != "batch":
        return module  # per-sample statistics: nothing to synchronize
    if spec.options.get("ghost_batch_size") is not None:
        # Ghost batch norm normalizes each virtual batch of a process on its own by design.
        warn_left(_WHERE, name, module, "ghost batch norm normalizes each virtual batch of one process "
                                        "on its own; there is nothing to synchronize")
        return module
    if spec.options.get("compute_dtype") is not None or spec.options.get("accumulate_dtype") is not None:
        raise ValueError(
            f"{_WHERE}: module {name or '<root>'!r} emulates low precision "
            f"(compute_dtype={module.compute_dtype}, accumulate_dtype={module.accumulate_dtype}), "
            f"which SyncLpBatchNorm does not; convert it with convert_norms first or leave it out"
        )
    new = build(spec, sync=True, process_group=process_group, **factory_of(module))
    # Share (not copy) parameters and buffers, as torch's converter does, so an optimizer or an
    # EMA built before the conversion still holds the model's tensors.
    if spec.weight is not None:
        new.weight = module.weight
    if spec.bias is not None:
        new.bias = module.bias
    if spec.track_running_stats:
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    if original_of(module) is not None or not spec.exact:
        remember_original(new, module)
    return new


def convert_sync_lp_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replace every batch norm of ``module`` by a :class:`~normmatters.nn.SyncLpBatchNorm` of
    the same kind.

    ``LpBatchNorm{1,2,3}d`` keep their ``p``, ``k`` and ``constant``; torch's
    ``nn.BatchNorm{1,2,3}d`` and ``nn.SyncBatchNorm`` become L2 (``p=2``) layers, and so does a
    subclass or another library's batch norm that computes what torch's does on a probe input
    (:mod:`normmatters.convert.recognise`). Anything else that looks like a batch norm (Range
    BN, a batch norm whose ``forward`` adds an activation, ...) is left as it is with one
    :class:`~normmatters.convert.NormConversionWarning`: the kind of a layer never changes. ``eps``,
    ``momentum``, ``affine``, ``bias``, ``track_running_stats`` and the ``training`` flag carry
    over, and the parameters and buffers are the same tensors (shared, not copied), so the state
    dict keeps its keys and loads into the unconverted model and back. A layer reachable at several
    places is replaced once (the replacement is shared), and its hooks move to the replacement.
    Ghost-batch layers are
    left as they are (their statistics are per virtual batch of one process by design; with a
    warning), and so are layer, group and RMS norms (per sample: nothing to synchronize) and
    mean-only batch norms (with a warning: their mean stays per process).

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
    return replace_modules(module, lambda m, name: _sync_from(m, process_group, name))
