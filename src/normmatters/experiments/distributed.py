"""Multi-process training on ``torch.distributed``: the few helpers a training loop needs.

A run started with ``torchrun --nproc_per_node=N`` has one process per device; torchrun sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. The loop then

1. calls :func:`init_distributed` (gloo on CPU, NCCL on GPU; a no-op in a plain single run),
2. wraps its model with :func:`wrap_ddp` (synchronized Lp batch norms, then DDP),
3. shards its training loader with :func:`shard_loader` (each process takes every N-th example
   of the one-process order, so N processes with batch B see, step by step, exactly the examples
   one process sees with batch N·B),
4. reduces its metrics with :func:`all_reduce_metrics`, writes files only where
   :func:`is_main_process`, and meets the others at :func:`barrier`.

Every helper works unchanged, and communicates nothing, when no process group is initialised,
so one code path serves single- and multi-process runs.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import zlib
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .errors import ConfigError

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "world_info",
    "is_distributed",
    "is_main_process",
    "barrier",
    "main_process_first",
    "broadcast_object",
    "broadcast_buffers",
    "all_reduce_metrics",
    "per_process_batch_size",
    "ShardedSampler",
    "shard_loader",
    "wrap_ddp",
    "unwrap_model",
]

log = logging.getLogger(__name__)

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_OPS = ("mean", "sum", "max", "min")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """This is the process that writes files and prints (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(
                f"init_distributed: WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for several "
                f"processes but the environment variable {name} is not set; start the run with "
                f"torchrun (which sets {', '.join(_ENV)})"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"init_distributed: environment variable {name} must be an integer, got {value!r}") from None


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(
    backend: str | None = None,
    *,
    device: str | torch.device | None = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and a one-process :class:`DistInfo`
    is returned, so a script runs the same with and without torchrun. Otherwise ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` must be set (torchrun sets them); the
    process selects GPU ``LOCAL_RANK`` when CUDA is available, and the backend defaults to NCCL
    on GPU and gloo on CPU. Calling it again returns the current state.

    Args:
        backend: ``"gloo"``, ``"nccl"`` (or any backend torch knows); default by device.
        device: the device of this process; default ``cuda:LOCAL_RANK`` or ``cpu``.
        timeout_s: how long a collective may wait for the others before failing.

    Raises:
        ConfigError: the environment is incomplete or malformed (checked before any process
            waits for another).

    Example::

        >>> info = init_distributed()          # under torchrun --nproc_per_node=2
        >>> info.rank, info.world_size, info.device
        (0, 2, device(type='cpu'))
    """
    if dist.is_available() and dist.is_initialized():
        return world_info()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ConfigError(f"init_distributed: WORLD_SIZE must be >= 1, got {world_size}")
    rank = _env_int("RANK", 0 if world_size == 1 else None)
    local_rank = _env_int("LOCAL_RANK", rank if world_size == 1 else None)
    if not 0 <= rank < world_size:
        raise ConfigError(f"init_distributed: RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if world_size == 1:
        return DistInfo(0, local_rank, 1, None, dev)
    if not dist.is_available():
        raise ConfigError("init_distributed: this torch build has no torch.distributed support")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(
                f"init_distributed: environment variable {name} is not set; start the run with torchrun"
            )
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("joined process group: rank %d of %d (%s, %s)", rank, world_size, backend, dev)
    return DistInfo(rank, local_rank, world_size, backend, dev)


def cleanup_distributed() -> None:
    """Leave the process group (if any); call once at the end of a run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_info() -> DistInfo:
    """The current process's :class:`DistInfo` (one process when no group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = str(dist.get_backend())
    if backend == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, local_rank, world, backend, device)


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a run without a process group: the process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a one-process run)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the others after it, e.g. a dataset download.

    Example::

        >>> with main_process_first():
        ...     data = load_cifar10(root, download=True)   # downloads once, the others read it
    """
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every process receives rank ``src``'s ``obj`` (any picklable value), e.g. the checkpoint
    that rank 0 found to resume from. Without a process group ``obj`` is returned."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (running statistics, counters) of ``module`` into every
    process's copy, e.g. before evaluating layers whose statistics are per process (ghost or
    mean-only batch norms). Nothing happens without a process group of several processes."""
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src)


def all_reduce_metrics(
    metrics: Mapping[str, float | int | torch.Tensor],
    *,
    op: str = "mean",
    weight: float | int | None = None,
) -> dict[str, float]:
    r"""Reduce a dict of scalar metrics over all processes; every process gets the result.

    ``op="mean"`` is the weighted mean :math:`\sum_r w_r m_r / \sum_r w_r` with ``weight`` w_r
    (e.g. the number of examples this process evaluated; default 1, a plain mean), so uneven
    shards give the metric of the whole data set. ``"sum"``, ``"max"`` and ``"min"`` reduce
    elementwise. Values are reduced in float64. Without a process group the metrics are returned
    as floats.

    Raises:
        ValueError: unknown ``op``, a non-scalar value, or processes passing different keys
            (detected on every process, so none is left waiting).

    Example::

        >>> all_reduce_metrics({"loss": 0.5, "acc": 0.9}, weight=len(local_test_set))
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce_metrics: op must be one of {_OPS}, got {op!r}")
    keys = sorted(metrics)
    values = []
    for key in keys:
        v = metrics[key]
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"all_reduce_metrics: metric {key!r} must be a scalar, got shape {list(v.shape)}")
            v = v.item()
        try:
            values.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"all_reduce_metrics: metric {key!r} must be a number, got {type(v).__name__}") from None
    if not is_distributed():
        return dict(zip(keys, values))
    device = _collective_device()
    # Same keys everywhere? Max of (h, −h) over processes is (h, −h) only if every h is equal.
    h = float(zlib.crc32("\0".join(keys).encode()))
    check = torch.tensor([h, -h], dtype=torch.float64, device=device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if check[0].item() != -check[1].item():
        raise ValueError(f"all_reduce_metrics: processes passed different metric keys (this one: {keys})")
    w = 1.0 if weight is None else float(weight)
    if op == "mean":
        packed = torch.tensor([v * w for v in values] + [w], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        total = packed[-1].item()
        out = (packed[:-1] / total).tolist() if total != 0 else [math.nan] * len(keys)
    else:
        packed = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(packed, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op])
        out = packed.tolist()
    return dict(zip(keys, out))


def per_process_batch_size(global_batch_size: int, world_size: int | None = None) -> int:
    """``global_batch_size / world_size``, refusing a global batch the processes cannot share
    evenly (the run would not be the one-process run with that batch)."""
    world = world_info().world_size if world_size is None else world_size
    if world < 1:
        raise ConfigError(f"per_process_batch_size: world_size must be >= 1, got {world}")
    if global_batch_size < 1 or global_batch_size % world:
        raise ConfigError(
            f"per_process_batch_size: a global batch of {global_batch_size} cannot be split evenly over "
            f"{world} processes; choose a multiple of {world}"
        )
    return global_batch_size // world


class ShardedSampler(DistributedSampler):
    """The every-``num_replicas``-th share of another sampler's order, for one process.

    Unlike :class:`~torch.utils.data.DistributedSampler`, which draws its own permutation, this
    shards the order of ``base`` (e.g. the run's seeded, per-epoch shuffling sampler): process r
    takes positions r, r + N, r + 2N, … of it. With batches of B per process, step i of the N
    processes together covers positions [i·N·B, (i+1)·N·B) — the examples of step i of one
    process with batch N·B over ``base``'s order, so an N-process run is the one-process run
    with the N-fold batch. :meth:`set_epoch` is passed on to ``base``.

    With ``pad=True`` (training) the order is padded by repeating its start, as
    DistributedSampler does, so every process takes the same number of steps (required: DDP
    communicates at every step); ``drop_last=True`` drops the tail instead. With ``pad=False``
    (evaluation) every example is seen exactly once and shares differ by at most one example;
    evaluate the unwrapped model then (:func:`unwrap_model`), which communicates nothing.
    """

    def __init__(
        self,
        base: Sampler[int] | Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        *,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        if not isinstance(base, Sized):
            raise TypeError(f"ShardedSampler: base must be a sampler with a length, got {type(base).__name__}")
        info = world_info()
        num_replicas = info.world_size if num_replicas is None else num_replicas
        rank = info.rank if rank is None else rank
        super().__init__(base, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=drop_last)  # type: ignore[arg-type]
        self.base = base
        self.pad = pad
        if not pad and not drop_last:
            self.total_size = len(base)
            self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        indices = list(iter(self.base))  # type: ignore[call-overload]
        if len(indices) < self.total_size:
            extra = self.total_size - len(indices)
            indices += (indices * math.ceil(extra / max(len(indices), 1)))[:extra]
        else:
            indices = indices[:self.total_size]
        return iter(indices[self.rank:self.total_size:self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)


def shard_loader(
    loader: DataLoader,
    *,
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    pad: bool = True,
) -> DataLoader:
    """A copy of ``loader`` that yields this process's share of its examples (see
    :class:`ShardedSampler`), in batches of ``batch_size`` (default: the loader's).

    Dataset, collate function, workers, pinning, generator and ``drop_last`` are kept. In a
    one-process run with the same batch size, ``loader`` itself is returned. Call
    ``set_epoch`` on its sampler (or the data module's ``set_loader_epoch``) before each epoch.

    Example::

        >>> train_loader = shard_loader(train_loader, batch_size=per_process_batch_size(256))
        >>> test_loader = shard_loader(test_loader, pad=False)
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"shard_loader: expected a torch DataLoader, got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ValueError("shard_loader: the loader uses a custom batch_sampler; shard its sampler with ShardedSampler instead")
    info = world_info()
    world = info.world_size if world_size is None else world_size
    rank = info.rank if rank is None else rank
    size = loader.batch_size if batch_size is None else batch_size
    if world == 1 and size == loader.batch_size:
        return loader
    sampler = ShardedSampler(loader.sampler, world, rank, drop_last=loader.drop_last, pad=pad)
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
    return DataLoader(
        loader.dataset, batch_size=size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        **extra,
    )


def wrap_ddp(model: nn.Module, *, sync_batchnorm: bool = True, **ddp_kwargs: Any) -> nn.Module:
    """Prepare ``model`` (already on this process's device) for multi-process training.

    Its batch norms become :class:`~normmatters.nn.SyncLpBatchNorm` of the same p (with
    ``sync_batchnorm``), then it is wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel` (``device_ids`` set on GPU), which
    makes the processes' parameters equal at the start and averages the gradients. Without a
    process group of several processes the model is returned as it is.
    """
    if not is_distributed():
        return model
    from ..convert.sync import convert_sync_lp_batchnorm

    if sync_batchnorm:
        model = convert_sync_lp_batchnorm(model)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    if device.type == "cuda" and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [device.index]
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``DataParallel``) wrapper: what to checkpoint and evaluate."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
