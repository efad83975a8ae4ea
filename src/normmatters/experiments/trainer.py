"""The training loop of every experiment, readable top to bottom.

:func:`train` takes a :class:`~normmatters.experiments.config.TrainConfig` and runs: setup (threads,
device, seeds) → data → model → optimizer and schedule → (resume) → epochs of training, each
followed by evaluation, callbacks, an atomic checkpoint and a JSONL log line → plots and summary.
Each step is one function, in this order in the file: ``_setup`` (``_build_data``,
``_build_model``, the optimizer), ``_resume_and_open_run_folder``, ``_epoch_loop``
(``_train_one_epoch``, ``_evaluate_epoch``, ``_save_epoch``) and ``_finish``.

Classification reports loss and accuracy; language models (``task == "lm"``) report loss in nats
per token, perplexity exp(loss) and bits per character loss / ln 2.

Callbacks are objects with any of ``on_train_begin(state)``, ``on_step_end(state)`` and
``on_epoch_end(state)``; ``state`` is the :class:`TrainState`. A callback may add numbers to
``state.metrics`` in ``on_epoch_end`` (they are logged with the epoch) and may set
``state.should_stop = True`` to end the run after the current epoch (its checkpoint is written,
so the run can be resumed).

Multi-process training. Started by ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1), the
same function trains one model with N processes (:mod:`.distributed`): gloo on CPU, NCCL on
GPU ``LOCAL_RANK``. ``batch_size`` stays the global batch: each process takes batch_size / N
examples of the one-process order at each step (the last step of an epoch may be uneven, one
shard possibly empty), batch norms are synchronized (:class:`~normmatters.nn.SyncLpBatchNorm`,
unless the config has ``sync_bn = false``) and the loss of each process is its share of the
global mean, so the gradients, the steps and the weights are those of one process with the
global batch, up to rounding (in float64 to ~1e-14 after epochs; in float32 a value that
rounding moves across a ReLU's or an L1 sign's kink makes the two drift apart, as any other
order of the same sums would). Evaluation runs on every process's share of the
test set without communication and the sums are reduced; only rank 0 writes the run folder;
every process resumes from the same checkpoint. Augmentation is a function of the example and
epoch (:class:`~normmatters.experiments.data.ExampleSeededDataset`), so it is the same too;
what draws from the global generator inside the model (dropout) draws per process.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..convert import convert_sync_lp_batchnorm
from ..optim import split_param_groups
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import DatasetInfo, get_dataloaders, set_loader_epoch
from .distributed import (
    DistInfo,
    all_reduce_metrics,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    main_process_first,
    shard_loader,
    wrap_ddp,
)
from .errors import CheckpointError, ConfigError
from .io import append_jsonl, atomic_write_text, remove_stray_temporaries
from .models import create_model, model_task

__all__ = [
    "TrainState",
    "train",
    "build_optimizer",
    "build_scheduler",
    "RUN_FILES",
    "seed_everything",
    "resolve_device",
    "evaluate",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
#: Every file :func:`train` writes in a run folder (the plots depend on the task).
RUN_FILES = ("config.toml", "environment.json", "dataset.json", METRICS_NAME, CHECKPOINT_NAME, "summary.json",
             "loss.png", "accuracy.png", "bpc.png", "lr.png")


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return dev


def init_process_group_for(config: TrainConfig) -> tuple[DistInfo, torch.device, bool]:
    """Join the process group of a torchrun launch (``WORLD_SIZE`` > 1) for ``config``'s device.

    On GPU each process takes ``cuda:LOCAL_RANK`` (NCCL); on CPU the processes use gloo.
    Without torchrun (or with one process) nothing is initialised.

    :returns: this process's :class:`~normmatters.experiments.distributed.DistInfo`, its device,
        and whether this call created the process group (and so should destroy it).
    """
    device = resolve_device(config.device)
    if os.environ.get("WORLD_SIZE", "1") in ("", "1") and not is_distributed():
        return DistInfo(device=device), device, False
    created = not (dist.is_available() and dist.is_initialized())
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()
        if device.index is not None and device.index != local:
            log.warning("device %s ignored: under torchrun process LOCAL_RANK=%d uses cuda:%d", device, local, local)
        device = torch.device("cuda", local)
    info = init_distributed(device=device)
    return info, device, created and info.is_distributed


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov; coupled weight decay) or AdamW (decoupled).

    The groups are :func:`~normmatters.optim.split_param_groups`'s, the function claim C1's runs
    use too: ``wd_last_layer_only`` decays only the classifier
    (:func:`~normmatters.optim.last_layer_module`; every other weight feeds a normalization, so
    its decay changes only its effective learning rate, Hoffer et al. 2018, Sec. 2), and
    ``wd_exclude_norm_bias`` spares normalization parameters and per-channel parameters.
    """
    groups = split_param_groups(model, weight_decay=config.weight_decay,
                                decay="last_layer" if config.wd_last_layer_only else "all",
                                exclude_norm_bias=config.wd_exclude_norm_bias)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps.

    Linear warm-up over ``warmup_epochs``, then ``"cosine"`` (to ``min_lr``), ``"step"``
    (× ``lr_gamma`` at each milestone epoch) or ``"constant"``.
    """
    total = max(1, config.epochs * steps_per_epoch)
    warm = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    if config.lr_schedule == "cosine":
        t = min(1.0, (step - warm) / max(1, total - warm))
        floor = config.min_lr / config.lr if config.lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if config.lr_schedule == "step":
        milestones = config.lr_milestones or [0.5 * config.epochs, 0.75 * config.epochs]
        epoch = step / steps_per_epoch
        return config.lr_gamma ** sum(epoch >= m for m in milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` of :func:`lr_factor`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# State passed to callbacks
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What callbacks see. ``epoch`` is 1-based during an epoch; ``step`` counts optimizer steps.

    In a multi-process run ``model`` is the module inside DDP (what is checkpointed),
    ``train_loader``/``test_loader`` are this process's shards, ``loss`` and ``batch`` are this
    process's, and ``rank``/``world_size`` say which process this is.
    """

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    info: DatasetInfo
    device: torch.device
    out_dir: Path | None = None
    epoch: int = 0
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    lr_history: list[list[float]] = field(default_factory=list)
    loss: torch.Tensor | None = None
    batch: Any = None
    should_stop: bool = False
    elapsed: float = 0.0
    scaler: Any = None
    train_loader: Any = None
    test_loader: Any = None
    rank: int = 0
    world_size: int = 1

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _call(callbacks: Iterable[Any], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------
def _loss_and_correct(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0, reduction="mean"):
    """Cross-entropy and the number of correct predictions (tokens for a language model)."""
    if logits.dim() == 3:  # (N, T, V) language model
        logits = logits.reshape(-1, logits.shape[-1])
        y = y.reshape(-1)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction=reduction)
    correct = (logits.argmax(-1) == y).sum()
    return loss, correct, y.numel()


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, config.amp_dtype))
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def evaluate(model: nn.Module, loader, device: torch.device, config: TrainConfig | None = None) -> dict[str, float]:
    """Mean loss and accuracy (token accuracy for a language model) of ``model`` over ``loader``."""
    sums = _evaluate_sums(model, loader, device, config)
    return _means(sums)


def _means(sums: dict[str, float]) -> dict[str, float]:
    if sums["count"] == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": sums["loss_sum"] / sums["count"], "acc": sums["correct"] / sums["count"]}


@torch.no_grad()
def _evaluate_sums(model: nn.Module, loader, device: torch.device, config: TrainConfig | None = None) -> dict[str, float]:
    """Summed loss, number correct and number of predictions over ``loader`` (summable over shards)."""
    config = config or TrainConfig()
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        for x, y in loader:
            x, y = _to_device(x, device, config.channels_last), y.to(device, non_blocking=True)
            with _autocast(config, device):
                logits = model(x)
            loss, correct, n = _loss_and_correct(logits, y, reduction="sum")
            total_loss += loss.double()
            total_correct += correct
            count += n
    finally:
        model.train(was_training)
    return {"loss_sum": total_loss.item(), "correct": float(total_correct.item()), "count": float(count)}


def _epoch_metrics(prefix: str, loss: float, acc: float, task: str) -> dict[str, float]:
    out = {f"{prefix}_loss": loss, f"{prefix}_acc": acc}
    if task == "lm":
        out[f"{prefix}_ppl"] = math.exp(loss) if loss < 700 else float("inf")
        out[f"{prefix}_bpc"] = loss / math.log(2)
    return out


# ---------------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------------
def _environment(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    import normmatters

    return {
        "normmatters": getattr(normmatters, "__version__", "unknown"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "world_size": dist.get_world_size() if is_distributed() else 1,
        "backend": str(dist.get_backend()) if is_distributed() else None,
        "seed": config.seed,
        "argv": sys.argv,
    }


def _check_run_folder_names(out: Path) -> None:
    """Fail now, not after an epoch, when ``out`` or one of the names the run will write is taken
    by something that is not a file (a folder named ``checkpoint.pt``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run folder {out} exists and is not a folder")
    for name in RUN_FILES:
        path = out / name
        if path.exists() and not path.is_file():
            raise ConfigError(f"run folder {out}: {name} is a folder (or another non-file); the run cannot write it")


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    callbacks: Iterable[Any] = (),
    model: nn.Module | None = None,
    optimizer_factory: Callable[[nn.Module, TrainConfig], tuple[torch.optim.Optimizer, Any]] | None = None,
    model_transform: Callable[[nn.Module], nn.Module] | None = None,
    progress: bool = True,
    resume: bool | str | os.PathLike = False,
) -> dict[str, Any]:
    """Train one configuration and return its summary.

    :param config: the run's :class:`TrainConfig`.
    :param out_dir: run folder (``config.toml``, ``environment.json``, ``metrics.jsonl``,
        ``checkpoint.pt`` every epoch, ``loss.png``/``accuracy.png``/``lr.png``, ``summary.json``);
        ``None`` writes nothing. In a multi-process run only rank 0 writes it.
    :param callbacks: objects with optional ``on_train_begin``/``on_step_end``/``on_epoch_end(state)``.
    :param model: a model to train instead of ``create_model(config.model, ...)``.
    :param optimizer_factory: ``(model, config) -> (optimizer, scheduler)``; a ``None`` scheduler
        means the config's schedule over that optimizer. The scheduler is stepped after every
        optimizer step.
    :param model_transform: applied to the model after it is built (e.g. a norm conversion),
        before the optimizer is created.
    :param progress: show tqdm progress bars (on rank 0 only).
    :param resume: ``True`` continues from ``out_dir/checkpoint.pt`` if it exists (else starts
        fresh); a path continues from that checkpoint. A resumed CPU run ends with the same
        weights as an uninterrupted one. Every process of a multi-process run reads the same
        file (a folder all of them can read).
    :returns: summary: ``final_test_acc``, ``best_test_acc``, ``final_test_loss``,
        ``final_train_loss``, ``wall_time`` (s), ``out_dir``, ``world_size``, … (``final_test_bpc``/
        ``_ppl`` for language models); the same on every process.
    :raises ConfigError, DataNotFoundError, CheckpointError: bad input (the CLI exits 2 on these).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined here if the caller has
    not joined it, and kept for later runs of the same processes (joining again after leaving
    races with the processes still leaving); it is left when the process exits. See the module's
    docstring for what is synchronized.
    """
    config.validate()
    dinfo, device, created_group = init_process_group_for(config)
    if created_group:
        atexit.register(cleanup_distributed)
    return _train(config, out_dir, dinfo, device, callbacks=callbacks, model=model,
                  optimizer_factory=optimizer_factory, model_transform=model_transform,
                  progress=progress, resume=resume)


def _global_batch_sizes(num_examples: int, batch_size: int, steps: int) -> list[int]:
    """Examples in each step of an epoch of the one-process loader (``drop_last=False``)."""
    return [min(batch_size, num_examples - i * batch_size) for i in range(steps)]


def _batches(loader, steps: int) -> Iterable[Any]:
    """The first ``steps`` batches of ``loader``; when a process's shard ends early (the last
    global batch has fewer examples than there are processes), empty batches of the same
    structure, so that every process takes part in every step's collectives."""
    last = None
    n = 0
    for batch in itertools.islice(loader, steps):
        last, n = batch, n + 1
        yield batch
    while n < steps and last is not None:
        n += 1
        yield tuple(t[:0] for t in last)


@dataclass
class _Run:
    """What the epoch loop needs besides the :class:`TrainState` callbacks see."""

    state: TrainState
    task: str
    steps_per_epoch: int
    global_sizes: list[int]  # examples in each step of the one-process order
    wrapped: nn.Module  # DDP around the model in a multi-process run, else the model
    forward: Callable[..., Any]  # wrapped, compiled if asked for
    eval_forward: Callable[..., Any]  # the model without DDP (evaluation needs no communication)
    n_params: int
    out: Path | None
    main: bool
    progress: bool
    t_setup: float
    start_epoch: int = 1


def _train(
    config: TrainConfig,
    out_dir: str | os.PathLike | None,
    dinfo: DistInfo,
    device: torch.device,
    *,
    callbacks: Iterable[Any],
    model: nn.Module | None,
    optimizer_factory: Callable[[nn.Module, TrainConfig], tuple[torch.optim.Optimizer, Any]] | None,
    model_transform: Callable[[nn.Module], nn.Module] | None,
    progress: bool,
    resume: bool | str | os.PathLike,
) -> dict[str, Any]:
    run = _setup(config, out_dir, dinfo, device, model=model, optimizer_factory=optimizer_factory,
                 model_transform=model_transform, progress=progress)
    _resume_and_open_run_folder(run, resume)
    _call(callbacks, "on_train_begin", run.state)
    wall = _epoch_loop(run, callbacks)
    return _finish(run, wall)


# -- setup ------------------------------------------------------------------------------------
def _setup(config: TrainConfig, out_dir: str | os.PathLike | None, dinfo: DistInfo, device: torch.device, *,
           model: nn.Module | None, optimizer_factory, model_transform, progress: bool) -> _Run:
    """Threads and seeds, then data, model, optimizer and schedule, in this order (the order the
    random generators are drawn from, so a run is reproducible)."""
    t_setup = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _check_run_folder_names(out)  # before any work: a folder in a file's place fails now
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    world, main = dinfo.world_size, dinfo.is_main
    seed_everything(config.seed)  # the same seed everywhere: same initial model, same streams

    train_loader, eval_loader, info, steps_per_epoch, global_sizes = _build_data(config, device, world)
    model = _build_model(config, info, device, world, model, model_transform)
    n_params = sum(p.numel() for p in model.parameters())

    if optimizer_factory is not None:
        optimizer, scheduler = optimizer_factory(model, config)
        if scheduler is None:
            scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    else:
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    use_scaler = config.amp and device.type == "cuda" and config.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    # DDP averages the gradients over the processes; the model inside it is what is evaluated,
    # checkpointed and shown to callbacks.
    wrapped = wrap_ddp(model, sync_batchnorm=False) if world > 1 else model
    forward = torch.compile(wrapped) if config.compile else wrapped
    eval_forward = forward if world == 1 else (torch.compile(model) if config.compile else model)

    state = TrainState(config=config, model=model, optimizer=optimizer, scheduler=scheduler, info=info,
                       device=device, scaler=scaler, train_loader=train_loader, test_loader=eval_loader,
                       rank=dinfo.rank, world_size=world)
    return _Run(state=state, task=info.task, steps_per_epoch=steps_per_epoch, global_sizes=global_sizes,
                wrapped=wrapped, forward=forward, eval_forward=eval_forward, n_params=n_params, out=out,
                main=main, progress=progress and main, t_setup=t_setup)


def _build_data(config: TrainConfig, device: torch.device, world: int):
    """The loaders (this process's shards in a multi-process run), the dataset's description, the
    steps per epoch and the size of each step's global batch."""
    if world > 1 and config.batch_size % world:
        raise ConfigError(
            f"batch_size: {config.batch_size} is the global batch and must be a multiple of the "
            f"{world} processes (each takes batch_size / {world} examples per step)"
        )
    with main_process_first():  # a download or a cache is written once, by rank 0
        train_loader, test_loader, info = get_dataloaders(
            config.dataset, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
            root=config.data_root, download=config.download, seed=config.seed, num_workers=config.num_workers,
            pin_memory=device.type == "cuda", augment=config.augment, **config.dataset_kwargs,
        )
    # Steps are counted on the one-process loader: every process takes every step.
    steps_per_epoch = len(train_loader)
    if config.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, config.max_train_batches)
    global_sizes = _global_batch_sizes(len(train_loader.dataset), config.batch_size, steps_per_epoch)
    eval_loader = test_loader
    if world > 1:
        if len(train_loader.dataset) < world:
            raise ConfigError(f"dataset {config.dataset!r}: {len(train_loader.dataset)} training examples "
                              f"cannot be shared by {world} processes")
        # Process r takes positions r, r + N, … of the one-process order: step i of the N
        # processes together is step i of one process with the global batch. No padding, so no
        # example is seen twice; shards of the last step may differ in size.
        train_loader = shard_loader(train_loader, batch_size=config.batch_size // world, pad=False)
        eval_loader = shard_loader(test_loader, pad=False)
    return train_loader, eval_loader, info, steps_per_epoch, global_sizes


def _build_model(config: TrainConfig, info: DatasetInfo, device: torch.device, world: int,
                 model: nn.Module | None, model_transform: Callable[[nn.Module], nn.Module] | None) -> nn.Module:
    """``config.model`` for this dataset (or the given model), transformed, on ``device``, with
    synchronized batch norms in a multi-process run."""
    task = info.task
    if model is None:
        if model_task(config.model) != task:
            raise ConfigError(
                f"model {config.model!r} is a {model_task(config.model)} model but dataset "
                f"{config.dataset!r} is a {task} dataset"
            )
        kw = dict(config.model_kwargs)
        if task == "lm":
            kw.setdefault("vocab_size", info.vocab_size)
            if config.model == "transformer_lm":
                kw.setdefault("block_size", info.input_shape[0])
        else:
            kw.setdefault("input_dims", info.input_dims)
            kw.setdefault("in_channels", info.in_channels)
        try:
            model = create_model(config.model, norm=config.norm, num_classes=info.num_classes,
                                 norm_kwargs=config.norm_kwargs or None, **kw)
        except TypeError as exc:  # a model option that does not exist
            raise ConfigError(f"model {config.model!r}: bad option in model_kwargs/norm_kwargs ({exc})") from exc
    if model_transform is not None:
        model = model_transform(model)
    model = model.to(device)
    if config.channels_last and info.input_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and getattr(config, "sync_bn", True):
        # Statistics over the global batch, as one process computes them (same state-dict keys).
        model = convert_sync_lp_batchnorm(model)
    return model


# -- run folder and resume --------------------------------------------------------------------
def _resume_and_open_run_folder(run: _Run, resume: bool | str | os.PathLike) -> None:
    """Restore the checkpoint (``resume``), then write the run folder's description files."""
    state, out, config = run.state, run.out, run.state.config
    if resume:
        if resume is True:
            if out is None:
                raise ConfigError("resume=True needs out_dir (the run folder holding checkpoint.pt)")
            ckpt_path = out / CHECKPOINT_NAME
        else:
            ckpt_path = Path(resume)
        # Rank 0 decides, so that every process resumes or none does.
        if broadcast_object(resume is not True or ckpt_path.is_file()):
            run.start_epoch = _restore(state, load_checkpoint(ckpt_path), ckpt_path) + 1
        else:
            log.warning("no checkpoint in %s; starting a fresh run", out)
    if out is not None and run.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stray_temporaries(out, RUN_FILES)  # left by a process killed while writing
        atomic_write_text(out / "config.toml", config.to_toml())
        atomic_write_text(out / "environment.json", json.dumps(_environment(config, state.device), indent=2) + "\n")
        atomic_write_text(out / "dataset.json", json.dumps(state.info.to_dict(), indent=2, default=str) + "\n")
        # The log is rewritten from the checkpoint's history, so it never holds an epoch the
        # checkpoint does not (a crash between the two writes would otherwise leave one).
        _write_metrics(out / METRICS_NAME, state.history)
    barrier()
    log.info("%s on %s with norm %s: %d parameters, %d steps/epoch, device %s, %d threads, %d process(es)",
             config.model, config.dataset, config.norm, run.n_params, run.steps_per_epoch, state.device,
             torch.get_num_threads(), state.world_size)


# -- epochs -----------------------------------------------------------------------------------
def _progress_bar(iterable: Iterable[Any], **kw: Any):
    """A tqdm bar (tqdm is part of the ``experiments`` extra, imported when a run starts)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kw)


def _epoch_loop(run: _Run, callbacks: Iterable[Any]) -> float:
    """Train, evaluate, call back, checkpoint and log each epoch; return the wall time (s)."""
    state, config = run.state, run.state.config
    t0 = time.perf_counter() - state.elapsed
    epochs_bar = _progress_bar(range(run.start_epoch, config.epochs + 1), desc=f"{config.model}/{config.norm}",
                               initial=run.start_epoch - 1, total=config.epochs, disable=not run.progress,
                               unit="epoch")
    for epoch in epochs_bar:
        state.epoch = epoch
        state.metrics = {}
        t_epoch = time.perf_counter()
        metrics = _train_one_epoch(run, epoch, callbacks)
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            metrics.update(_evaluate_epoch(run))
        metrics["epoch_time"] = time.perf_counter() - t_epoch
        metrics["elapsed"] = time.perf_counter() - t0
        state.metrics = metrics
        _call(callbacks, "on_epoch_end", state)  # callbacks may add to state.metrics
        if state.world_size > 1:  # a stop asked for by any process stops them all
            state.should_stop = bool(all_reduce_metrics({"stop": float(state.should_stop)}, op="max")["stop"])
        state.history.append(dict(state.metrics))
        state.elapsed = time.perf_counter() - t0
        _save_epoch(run)
        if run.progress:
            epochs_bar.set_postfix(_postfix(state.history[-1], run.task), refresh=True)
        if run.main:
            log.info("epoch %d: %s", epoch, _postfix(state.history[-1], run.task))
        if state.should_stop:
            break
    epochs_bar.close()
    return time.perf_counter() - t0


def _train_one_epoch(run: _Run, epoch: int, callbacks: Iterable[Any]) -> dict[str, Any]:
    """One pass over the training shard; returns the epoch's training metrics (global)."""
    state, config, device = run.state, run.state.config, run.state.device
    world = state.world_size
    optimizer, scheduler, scaler, model = state.optimizer, state.scheduler, state.scaler, state.model
    set_loader_epoch(state.train_loader, epoch)
    run.wrapped.train()
    lr_every = max(1, run.steps_per_epoch // 25)
    sum_loss = torch.zeros((), dtype=torch.float64, device=device)
    sum_correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    bar = _progress_bar(_batches(state.train_loader, run.steps_per_epoch), total=run.steps_per_epoch,
                        desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not run.progress)
    for i, (x, y) in enumerate(bar):
        x, y = _to_device(x, device, config.channels_last), y.to(device, non_blocking=True)
        with _autocast(config, device):
            logits = run.forward(x)
        if world == 1:
            loss, correct, n = _loss_and_correct(logits, y, config.label_smoothing)
            step_loss = loss.detach()
            local_loss_sum = step_loss.double() * n
        else:
            # This process's share of the global batch's mean loss, times N because DDP
            # averages the N gradients: the step is the one-process step on the global batch.
            loss_sum, correct, n = _loss_and_correct(logits, y, config.label_smoothing, reduction="sum")
            per_example = n // len(y) if len(y) else 1  # tokens per sequence for a language model
            loss = loss_sum * (world / (run.global_sizes[i] * per_example))
            local_loss_sum = loss_sum.detach().double()
            step_loss = (local_loss_sum / max(n, 1)).float()  # this process's mean
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        state.step += 1
        state.loss, state.batch = step_loss, (x, y)
        sum_loss += local_loss_sum
        sum_correct += correct
        count += n
        if state.step % lr_every == 0:
            state.lr_history.append([state.step, state.lr])
        _call(callbacks, "on_step_end", state)
        if run.progress and (i % 10 == 0):
            bar.set_postfix(loss=f"{state.loss.item():.3f}", refresh=False)
    bar.close()
    totals = all_reduce_metrics({"loss_sum": sum_loss, "correct": sum_correct, "count": count}, op="sum")
    train_loss = totals["loss_sum"] / max(totals["count"], 1)
    if not math.isfinite(train_loss):
        log.warning("epoch %d: training loss is %s", epoch, train_loss)
    metrics: dict[str, Any] = {"epoch": epoch, "step": state.step, "lr": state.lr}
    metrics.update(_epoch_metrics("train", train_loss, totals["correct"] / max(totals["count"], 1), run.task))
    return metrics


def _evaluate_epoch(run: _Run) -> dict[str, float]:
    """Test metrics over the whole test set (each process's share, summed)."""
    state = run.state
    if state.world_size > 1:
        # Layers left unsynchronized (ghost or mean-only batch norms) evaluate with rank
        # 0's running statistics, the ones the checkpoint holds.
        broadcast_buffers(state.model)
    sums = all_reduce_metrics(_evaluate_sums(run.eval_forward, state.test_loader, state.device, state.config),
                              op="sum")
    ev = _means(sums)
    return _epoch_metrics("test", ev["loss"], ev["acc"], run.task)


def _save_epoch(run: _Run) -> None:
    """The epoch's checkpoint, then its log line (rank 0); the others wait for both."""
    state, out = run.state, run.out
    if out is not None and run.main:
        if state.config.checkpoint:
            save_checkpoint(out / CHECKPOINT_NAME, _checkpoint_payload(state))
        append_jsonl(out / METRICS_NAME, state.history[-1])
    barrier()  # the others go on once the checkpoint of this epoch is on disk


# -- summary ----------------------------------------------------------------------------------
def _finish(run: _Run, wall: float) -> dict[str, Any]:
    """The summary (returned on every process), written with the plots by rank 0."""
    state, out = run.state, run.out
    summary = _summary(state, run.task, wall, run.n_params, time.perf_counter() - run.t_setup, out)
    if out is not None and run.main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if state.config.plots and state.history:
            from .plots import plot_run

            try:
                plot_run(state.history, state.lr_history, out, task=run.task)
            except Exception as exc:  # a plotting backend problem must not lose a finished run
                log.warning("could not write plots: %s", exc)
    barrier()
    return summary


def _postfix(m: dict[str, Any], task: str) -> dict[str, str]:
    keys = ("train_loss", "test_loss", "test_bpc") if task == "lm" else ("train_loss", "test_loss", "test_acc")
    return {k: f"{m[k]:.4f}" for k in keys if m.get(k) is not None}


def _checkpoint_payload(state: TrainState) -> dict[str, Any]:
    return {
        "epoch": state.epoch,
        "step": state.step,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if hasattr(state.scheduler, "state_dict") else None,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rng_state(),
        # Every process draws the same stream on its own GPU; rank 0's is the one to restore.
        "rng_device": torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
        "world_size": state.world_size,
        "config": state.config.to_dict(),
        "history": state.history,
        "lr_history": state.lr_history,
        "elapsed": state.elapsed,
    }


def _restore(state: TrainState, ckpt: dict[str, Any], path: Path) -> int:
    """Load ``ckpt`` into ``state``; return the last finished epoch."""
    saved = ckpt.get("config", {})
    for key in ("model", "dataset", "norm"):
        if saved.get(key) != getattr(state.config, key):
            raise CheckpointError(
                f"checkpoint {path} is for {key}={saved.get(key)!r}, but this run has {key}={getattr(state.config, key)!r}"
            )
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None and hasattr(state.scheduler, "load_state_dict"):
            state.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") is not None and state.scaler is not None:
            state.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if ckpt.get("rng_device") is not None and state.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng_device"], state.device)
    except (KeyError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} does not match this run's model or optimizer ({msg})") from exc
    state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step"])
    state.history = list(ckpt.get("history", []))
    state.lr_history = [list(r) for r in ckpt.get("lr_history", [])]
    state.elapsed = float(ckpt.get("elapsed", 0.0))
    log.info("resumed from %s at epoch %d (step %d)", path, state.epoch, state.step)
    return state.epoch


def _summary(state: TrainState, task: str, wall: float, n_params: int, total: float, out: Path | None) -> dict[str, Any]:
    c = state.config
    hist = state.history
    last = hist[-1] if hist else {}
    evaluated = [h for h in hist if h.get("test_loss") is not None]
    s: dict[str, Any] = {
        "model": c.model, "dataset": c.dataset, "norm": c.norm, "task": task, "seed": c.seed,
        "epochs": state.epoch, "epochs_planned": c.epochs, "steps": state.step,
        "stopped_early": state.epoch < c.epochs,
        "final_train_loss": last.get("train_loss"), "final_train_acc": last.get("train_acc"),
        "final_test_loss": last.get("test_loss"), "final_test_acc": last.get("test_acc"),
        "wall_time": wall, "time_per_epoch": wall / max(1, len(hist)), "setup_and_train_time": total,
        "params": n_params, "device": str(state.device), "threads": torch.get_num_threads(),
        "world_size": state.world_size,
        "out_dir": str(out) if out is not None else None,
    }
    if evaluated:
        if task == "lm":
            best = min(evaluated, key=lambda h: h["test_loss"])
            s.update(final_test_ppl=last.get("test_ppl"), final_test_bpc=last.get("test_bpc"),
                     best_test_bpc=best["test_bpc"], best_test_ppl=best["test_ppl"], best_epoch=best["epoch"])
        else:
            best = max(evaluated, key=lambda h: h["test_acc"])
            s.update(best_test_acc=best["test_acc"], best_epoch=best["epoch"])
        s.setdefault("best_test_acc", max(h["test_acc"] for h in evaluated))
    return s
