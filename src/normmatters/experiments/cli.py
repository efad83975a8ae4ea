"""The ``normmatters`` command: ``train``, ``reproduce`` and ``bench``.

``normmatters train`` runs one :class:`~normmatters.experiments.config.TrainConfig`, read from
``--config FILE.toml`` and/or flags (flags win)::

    normmatters train --model resnet20 --dataset mnist1d --norm l1
    normmatters train --config runs/x/config.toml --epochs 60 --out runs/y
    normmatters train --out runs/y --resume                # continue a run, exactly
    normmatters train --set norm_kwargs.constant='"paper"' --norm linf
    torchrun --nproc_per_node=4 -m normmatters train --preset cifar10_resnet56   # 4 GPUs, DDP

Under ``torchrun`` every process runs the command; they train one model together (see
:mod:`normmatters.experiments.trainer`), rank 0 writes the run folder and prints the summary.

Bad input (unknown model, dataset, norm or config key, a missing data folder, a damaged
checkpoint) ends with one line on stderr and exit status 2. ``reproduce`` and ``bench`` are
dispatched to :mod:`normmatters.experiments.reproduce` and :mod:`normmatters.kernels.bench`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError

__all__ = ["main", "train_main", "build_train_parser"]

PROG = "normmatters"

_SUBCOMMANDS = {
    "train": "train one configuration (model × dataset × norm) with logs, checkpoints and plots",
    "reproduce": "run the paper's claims C1–C5 and write a report",
    "bench": "time the normalization layers against PyTorch's",
}
_DISPATCH = {"reproduce": "normmatters.experiments.reproduce", "bench": "normmatters.kernels.bench"}


def _error(cmd: str, msg: str) -> int:
    print(f"{PROG}{' ' + cmd if cmd else ''}: error: {msg}", file=sys.stderr)
    return 2


def _bool_flag(parser: argparse.ArgumentParser, name: str, dest: str, help: str) -> None:
    parser.add_argument(f"--{name}", dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help=help)


def build_train_parser() -> argparse.ArgumentParser:
    """The parser of ``normmatters train``; every config flag defaults to "not given"."""
    from .data import list_datasets
    from .models import list_models, list_norms

    p = argparse.ArgumentParser(
        prog=f"{PROG} train", description=_SUBCOMMANDS["train"] + ".",
        epilog="Any TrainConfig key can be set with --set KEY=VALUE (VALUE in TOML syntax; "
               "KEY.SUB for the *_kwargs tables). Flags override --config.",
    )
    S = argparse.SUPPRESS
    p.add_argument("--config", metavar="FILE.toml", help="read the run's configuration from a TOML file")
    from .config import PRESETS

    p.add_argument("--preset", metavar="NAME", help=f"start from a named configuration: {', '.join(PRESETS)}")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<model>-<dataset>-<norm>-s<seed>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (its config.toml unless --config is given)")
    p.add_argument("--model", default=S, help=f"one of: {', '.join(list_models())}")
    p.add_argument("--dataset", default=S, help=f"one of: {', '.join(list_datasets())}")
    p.add_argument("--norm", default=S, help=f"one of: {', '.join(list_norms())}")
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=S)
    p.add_argument("--lr", type=float, default=S, help="learning rate (per batch)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=S)
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--optimizer", default=S, help="sgd or adamw")
    p.add_argument("--momentum", type=float, default=S)
    _bool_flag(p, "nesterov", "nesterov", "Nesterov momentum (SGD)")
    p.add_argument("--lr-schedule", dest="lr_schedule", default=S, help="cosine, step or constant")
    p.add_argument("--lr-milestones", dest="lr_milestones", type=float, nargs="+", default=S, metavar="EPOCH")
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=S)
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=S)
    _bool_flag(p, "wd-exclude-norm-bias", "wd_exclude_norm_bias", "no weight decay on norm parameters and biases")
    _bool_flag(p, "wd-last-layer-only", "wd_last_layer_only", "weight decay only on the classifier")
    p.add_argument("--data-root", dest="data_root", default=S, metavar="DIR")
    _bool_flag(p, "download", "download", "download CIFAR if missing (checksum verified)")
    _bool_flag(p, "augment", "augment", "training-set augmentation")
    p.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N")
    _bool_flag(p, "amp", "amp", "mixed precision on CUDA")
    _bool_flag(p, "channels-last", "channels_last", "channels-last memory format")
    _bool_flag(p, "compile", "compile", "torch.compile the model")
    p.add_argument("--threads", type=int, default=S, help="torch CPU threads (0: OMP_NUM_THREADS / default)")
    p.add_argument("--num-workers", dest="num_workers", type=int, default=S)
    from .config import TrainConfig

    if "sync_bn" in TrainConfig.field_names():
        _bool_flag(p, "sync-bn", "sync_bn", "synchronized batch norms under torchrun (default: on)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, VALUE in TOML syntax (e.g. --set lr_gamma=0.2)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    return p


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is taken as a string: --set norm=l1
    return key, value


def _apply_overrides(config, args: argparse.Namespace):
    """``config`` with the flags and ``--set`` items applied (``KEY.SUB`` merges into a table)."""
    skip = {"config", "preset", "out", "resume", "sets", "progress", "verbose"}
    over = {k: v for k, v in vars(args).items() if k not in skip}
    for item in args.sets:
        key, value = _parse_set(item)
        if "." in key:
            table, sub = key.split(".", 1)
            if table not in config.field_names() or not table.endswith("_kwargs"):
                raise ConfigError(f"--set: {table!r} is not a *_kwargs table of the config")
            over.setdefault(table, dict(getattr(config, table)))[sub] = value
        else:
            over[key] = value
    return config.replace(source="command line", **over) if over else config


def _summary_line(s: dict[str, Any]) -> str:
    head = f"{s['model']} on {s['dataset']} with norm {s['norm']}: "
    if s["task"] == "lm":
        res = f"test {s.get('final_test_bpc', float('nan')):.4f} bits/char (ppl {s.get('final_test_ppl', float('nan')):.3f})"
    else:
        acc, best = s.get("final_test_acc"), s.get("best_test_acc")
        res = f"test accuracy {100 * acc:.2f}% (best {100 * best:.2f}% at epoch {s.get('best_epoch')})" if acc is not None else "not evaluated"
    loss = s.get("final_test_loss")
    return (f"{head}{res}, test loss {loss:.4f}, {s['epochs']} epochs in {s['wall_time']:.1f} s "
            f"({s['time_per_epoch']:.2f} s/epoch, {s['threads']} threads, {s['device']})"
            + (f", run folder {s['out_dir']}" if s.get("out_dir") else ""))


def train_main(argv: Sequence[str] | None = None) -> int:
    """``normmatters train``: returns the exit status."""
    from .config import TrainConfig, load_config, preset
    from .distributed import broadcast_object, cleanup_distributed, is_main_process
    from .trainer import CHECKPOINT_NAME, init_process_group_for, train

    args = build_train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    created_group = False
    try:
        if args.resume and not args.out:
            raise ConfigError("--resume needs --out RUN_FOLDER (the folder holding checkpoint.pt)")
        if args.config and args.preset:
            raise ConfigError("--config and --preset are exclusive; pass one")
        if args.config:
            config = load_config(args.config)
        elif args.preset:
            config = preset(args.preset)
        elif args.resume and (Path(args.out) / "config.toml").is_file():
            config = load_config(Path(args.out) / "config.toml")
        else:
            config = TrainConfig()
        config = _apply_overrides(config, args)
        config.validate()
        # Under torchrun the processes join here, so that they share one run folder name and
        # only rank 0 prints; a plain run initialises nothing.
        _, _, created_group = init_process_group_for(config)
        is_main = is_main_process()
        out = args.out or str(Path("runs") / f"{config.model}-{config.dataset}-{config.norm}-s{config.seed}-"
                                                f"{time.strftime('%Y%m%d-%H%M%S')}")
        out = broadcast_object(out)
        if is_main and args.resume and not (Path(out) / CHECKPOINT_NAME).is_file():
            logging.getLogger(__name__).warning("no checkpoint in %s: starting from scratch", out)
        summary = train(config, out, progress=args.progress, resume=args.resume)
    except InputError as exc:
        return _error("train", str(exc))
    except KeyboardInterrupt:
        print(f"{PROG} train: interrupted; continue with: {PROG} train --out {args.out or '<run folder>'} --resume",
              file=sys.stderr)
        return 130
    finally:
        if created_group:
            cleanup_distributed()
    if is_main:
        print(_summary_line(summary))
    return 0


def _dispatch(cmd: str, argv: list[str]) -> int:
    module = _DISPATCH[cmd]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return _error(cmd, f"not available in this installation ({module} is missing)")
        raise
    entry = getattr(mod, "main", None)
    if entry is None:
        return _error(cmd, f"{module} has no main(argv)")
    try:
        rc = entry(argv)
    except InputError as exc:
        return _error(cmd, str(exc))
    return int(rc or 0)


def _top_help() -> str:
    lines = [f"usage: {PROG} <command> [options]", "", "commands:"]
    lines += [f"  {k:<10} {v}" for k, v in _SUBCOMMANDS.items()]
    lines += ["", f"'{PROG} <command> --help' lists a command's options; '{PROG} --version' prints the version."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normmatters`` console script and of ``python -m normmatters``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        import normmatters

        print(f"{PROG} {getattr(normmatters, '__version__', 'unknown')}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd in _DISPATCH:
        return _dispatch(cmd, rest)
    return _error("", f"unknown command {cmd!r}; expected one of {', '.join(_SUBCOMMANDS)} (see {PROG} --help)")
