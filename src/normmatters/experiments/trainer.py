"""The training loop of every experiment, readable top to bottom.

:func:`train` takes a :class:`~normmatters.experiments.config.TrainConfig` and runs: setup (threads,
device, seeds) → data → model → optimizer and schedule → (resume) → epochs of training, each
followed by evaluation, callbacks, an atomic checkpoint and a JSONL log line → plots and summary.

Classification reports loss and accuracy; language models (``task == "lm"``) report loss in nats
per token, perplexity exp(loss) and bits per character loss / ln 2.

Callbacks are objects with any of ``on_train_begin(state)``, ``on_step_end(state)`` and
``on_epoch_end(state)``; ``state`` is the :class:`TrainState`. A callback may add numbers to
``state.metrics`` in ``on_epoch_end`` (they are logged with the epoch) and may set
``state.should_stop = True`` to end the run after the current epoch (its checkpoint is written,
so the run can be resumed).
"""

from __future__ import annotations

import contextlib
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
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import DatasetInfo, get_dataloaders, set_loader_epoch
from .errors import CheckpointError, ConfigError
from .io import append_jsonl, atomic_write_text
from .models import create_model, last_layer, model_task

__all__ = [
    "TrainState",
    "train",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "seed_everything",
    "resolve_device",
    "evaluate",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


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


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------
def _norm_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that belong to normalization layers (ours, torch's, or an affine gain).

    A layer counts as a normalization if it is one of torch's or its class name contains "Norm"
    (``LpBatchNorm2d``, ``MeanOnlyBatchNorm1d``, ``LpLayerNorm``, …), so that norms from any
    package are recognized without importing them here.
    """
    from .models.norms import Affine

    torch_norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, Affine)
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, torch_norms) or "Norm" in type(m).__name__:
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, weight_decay: float, *, exclude_norm_bias: bool = False,
                 last_layer_only: bool = False) -> list[dict[str, Any]]:
    """Split the parameters into a ``"decay"`` and a ``"no_decay"`` optimizer group.

    :param exclude_norm_bias: no weight decay on normalization parameters (γ, β) and on any
        per-channel parameter (biases, gains such as weight norm's g).
    :param last_layer_only: weight decay only on the classifier
        (:func:`~normmatters.experiments.models.last_layer`): every other weight feeds a
        normalization, so its decay changes only its effective learning rate (SPEC §4, C1).
    :returns: non-empty groups, each with a ``"name"`` key.
    """
    norm_ids = _norm_parameter_ids(model) if exclude_norm_bias else set()
    head_ids = {id(p) for p in last_layer(model).parameters()} if last_layer_only else None
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A gain or bias has one number per channel: 1-D, or (C, 1, 1, …) like weight norm's g.
        per_channel = p.ndim < 2 or p.numel() == p.shape[0]
        excluded = exclude_norm_bias and (id(p) in norm_ids or per_channel)
        if head_ids is not None and id(p) not in head_ids:
            excluded = True
        (no_decay if excluded else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov; coupled weight decay) or AdamW (decoupled), with :func:`param_groups`."""
    groups = param_groups(model, config.weight_decay, exclude_norm_bias=config.wd_exclude_norm_bias,
                          last_layer_only=config.wd_last_layer_only)
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
    """What callbacks see. ``epoch`` is 1-based during an epoch; ``step`` counts optimizer steps."""

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


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, config: TrainConfig | None = None) -> dict[str, float]:
    """Mean loss and accuracy (token accuracy for a language model) of ``model`` over ``loader``."""
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
    if count == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": total_loss.item() / count, "acc": total_correct.item() / count}


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
        "seed": config.seed,
        "argv": sys.argv,
    }


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
        ``None`` writes nothing.
    :param callbacks: objects with optional ``on_train_begin``/``on_step_end``/``on_epoch_end(state)``.
    :param model: a model to train instead of ``create_model(config.model, ...)``.
    :param optimizer_factory: ``(model, config) -> (optimizer, scheduler)``; a ``None`` scheduler
        means the config's schedule over that optimizer. The scheduler is stepped after every
        optimizer step.
    :param model_transform: applied to the model after it is built (e.g. a norm conversion),
        before the optimizer is created.
    :param progress: show tqdm progress bars.
    :param resume: ``True`` continues from ``out_dir/checkpoint.pt`` if it exists (else starts
        fresh); a path continues from that checkpoint. A resumed CPU run ends with the same
        weights as an uninterrupted one.
    :returns: summary: ``final_test_acc``, ``best_test_acc``, ``final_test_loss``,
        ``final_train_loss``, ``wall_time`` (s), ``out_dir``, … (``final_test_bpc``/``_ppl`` for
        language models).
    :raises ConfigError, DataNotFoundError, CheckpointError: bad input (the CLI exits 2 on these).
    """
    config.validate()
    t_setup = time.perf_counter()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    seed_everything(config.seed)

    # -- data ---------------------------------------------------------------------------------
    train_loader, test_loader, info = get_dataloaders(
        config.dataset, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        root=config.data_root, download=config.download, seed=config.seed, num_workers=config.num_workers,
        pin_memory=device.type == "cuda", augment=config.augment, **config.dataset_kwargs,
    )
    task = info.task

    # -- model --------------------------------------------------------------------------------
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
    n_params = sum(p.numel() for p in model.parameters())

    # -- optimizer and schedule ---------------------------------------------------------------
    steps_per_epoch = len(train_loader)
    if config.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, config.max_train_batches)
    if optimizer_factory is not None:
        optimizer, scheduler = optimizer_factory(model, config)
        if scheduler is None:
            scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    else:
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    use_scaler = config.amp and device.type == "cuda" and config.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    forward = torch.compile(model) if config.compile else model

    state = TrainState(config=config, model=model, optimizer=optimizer, scheduler=scheduler, info=info,
                       device=device, scaler=scaler, train_loader=train_loader, test_loader=test_loader)

    # -- run folder and resume ----------------------------------------------------------------
    out = Path(out_dir) if out_dir is not None else None
    start_epoch = 1
    if resume:
        if resume is True:
            if out is None:
                raise ConfigError("resume=True needs out_dir (the run folder holding checkpoint.pt)")
            ckpt_path = out / CHECKPOINT_NAME
        else:
            ckpt_path = Path(resume)
        if resume is not True or ckpt_path.is_file():
            start_epoch = _restore(state, load_checkpoint(ckpt_path), ckpt_path) + 1
        else:
            log.warning("no checkpoint in %s; starting a fresh run", out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", config.to_toml())
        atomic_write_text(out / "environment.json", json.dumps(_environment(config, device), indent=2) + "\n")
        atomic_write_text(out / "dataset.json", json.dumps(info.to_dict(), indent=2, default=str) + "\n")
        # The log is rewritten from the checkpoint's history, so it never holds an epoch the
        # checkpoint does not (a crash between the two writes would otherwise leave one).
        _write_metrics(out / METRICS_NAME, state.history)

    log.info("%s on %s with norm %s: %d parameters, %d steps/epoch, device %s, %d threads",
             config.model, config.dataset, config.norm, n_params, steps_per_epoch, device, torch.get_num_threads())
    _call(callbacks, "on_train_begin", state)

    # -- epochs -------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    t0 = time.perf_counter() - state.elapsed
    epochs_bar = tqdm(range(start_epoch, config.epochs + 1), desc=f"{config.model}/{config.norm}",
                      initial=start_epoch - 1, total=config.epochs, disable=not progress, unit="epoch",
                      dynamic_ncols=True)
    lr_every = max(1, steps_per_epoch // 25)
    for epoch in epochs_bar:
        state.epoch = epoch
        state.metrics = {}
        set_loader_epoch(train_loader, epoch)
        model.train()
        t_epoch = time.perf_counter()
        sum_loss = torch.zeros((), dtype=torch.float64, device=device)
        sum_correct = torch.zeros((), dtype=torch.int64, device=device)
        count = 0
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            if config.max_train_batches and i >= config.max_train_batches:
                break
            x, y = _to_device(x, device, config.channels_last), y.to(device, non_blocking=True)
            with _autocast(config, device):
                logits = forward(x)
            loss, correct, n = _loss_and_correct(logits, y, config.label_smoothing)
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
            state.loss, state.batch = loss.detach(), (x, y)
            sum_loss += loss.detach().double() * n
            sum_correct += correct
            count += n
            if state.step % lr_every == 0:
                state.lr_history.append([state.step, state.lr])
            _call(callbacks, "on_step_end", state)
            if progress and (i % 10 == 0):
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        train_loss = sum_loss.item() / max(count, 1)
        if not math.isfinite(train_loss):
            log.warning("epoch %d: training loss is %s", epoch, train_loss)
        metrics: dict[str, Any] = {"epoch": epoch, "step": state.step, "lr": state.lr}
        metrics.update(_epoch_metrics("train", train_loss, sum_correct.item() / max(count, 1), task))
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            ev = evaluate(forward, test_loader, device, config)
            metrics.update(_epoch_metrics("test", ev["loss"], ev["acc"], task))
        metrics["epoch_time"] = time.perf_counter() - t_epoch
        metrics["elapsed"] = time.perf_counter() - t0
        state.metrics = metrics
        _call(callbacks, "on_epoch_end", state)  # callbacks may add to state.metrics
        state.history.append(dict(state.metrics))
        state.elapsed = time.perf_counter() - t0
        if out is not None:
            if config.checkpoint:
                save_checkpoint(out / CHECKPOINT_NAME, _checkpoint_payload(state))
            append_jsonl(out / METRICS_NAME, state.history[-1])
        if progress:
            epochs_bar.set_postfix(_postfix(state.history[-1], task), refresh=True)
        log.info("epoch %d: %s", epoch, _postfix(state.history[-1], task))
        if state.should_stop:
            break
    epochs_bar.close()
    wall = time.perf_counter() - t0

    # -- summary ------------------------------------------------------------------------------
    summary = _summary(state, task, wall, n_params, time.perf_counter() - t_setup, out)
    if out is not None:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if config.plots and state.history:
            from .plots import plot_run

            try:
                plot_run(state.history, state.lr_history, out, task=task)
            except Exception as exc:  # a plotting backend problem must not lose a finished run
                log.warning("could not write plots: %s", exc)
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
