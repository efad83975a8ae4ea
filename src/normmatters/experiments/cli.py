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

The run folder. ``--out`` must be absent or empty, unless ``--resume`` continues the run it holds
(its ``checkpoint.pt`` must be there) or ``--force`` starts that run over. ``--force`` removes
only the files a run writes (``config.toml``, ``checkpoint.pt``, ``metrics.jsonl``, the plots, …);
a folder that also holds anything else is refused, so no file of the user's is ever deleted or
overwritten.

Bad input (unknown model, dataset, norm or config key, a missing data folder, a damaged
checkpoint, a run folder that is taken or cannot be written) ends with one line on stderr and exit
status 2, before anything is written. ``reproduce`` and ``bench`` are dispatched to
:mod:`normmatters.experiments.reproduce` and :mod:`normmatters.kernels.bench`. ``train`` and
``reproduce`` need the ``experiments`` extra (``pip install 'normmatters[experiments]'``);
``bench`` does not.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import tomllib  # the standard library's, or the tomli backport on Python 3.10
from .errors import ConfigError, InputError

__all__ = ["main", "train_main", "build_train_parser"]

PROG = "normmatters"

_SUBCOMMANDS = {
    "train": "train one configuration (model × dataset × norm) with logs, checkpoints and plots",
    "reproduce": "run the paper's claims C1–C5 and write a report",
    "bench": "time the normalization layers against PyTorch's",
}
_DISPATCH = {"reproduce": "normmatters.experiments.reproduce", "bench": "normmatters.experiments.bench_steps"}
# The import names of the ``experiments`` extra (pyproject.toml), needed by these commands.
_EXTRA_MODULES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "mnist1d": "mnist1d", "tqdm": "tqdm"}
_NEEDS_EXTRA = ("train", "reproduce")


def _error(cmd: str, msg: str) -> int:
    print(f"{PROG}{' ' + cmd if cmd else ''}: error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# Installation and run folders: checked before anything is written.
# ---------------------------------------------------------------------------------------------
def missing_extra() -> list[str]:
    """The distributions of the ``experiments`` extra that are not installed."""
    return [dist for mod, dist in _EXTRA_MODULES.items() if importlib.util.find_spec(mod) is None]


def _extra_error(cmd: str) -> int | None:
    missing = missing_extra()
    if not missing:
        return None
    return _error(cmd, f"{PROG} {cmd} needs the experiments extra ({', '.join(missing)} missing): "
                       f"pip install 'normmatters[experiments]'")


def writable_folder_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be (or become) a folder this process writes in, or ``None``.

    Nothing is left changed: the test creates and removes a temporary entry in ``path`` (or in
    its nearest existing parent, for a folder still to be created).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be created: {parent} is not a folder"
    try:
        if parent == path:
            fd, tmp = tempfile.mkstemp(dir=path, prefix=".normmatters-write-test.")
            os.close(fd)
            os.unlink(tmp)
        else:
            os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".normmatters-write-test."))
    except OSError as exc:
        what = f"{path} is not writable" if parent == path else f"{path} cannot be created in {parent}"
        return f"{what} ({exc.strerror or exc})"
    return None


def _is_run_folder(out: Path) -> bool:
    """Whether ``out`` was written by ``normmatters train``: its ``environment.json`` (the first
    file a run writes after its ``config.toml``) names the package. A user's own ``config.toml``
    or ``metrics.jsonl`` does not make a folder a run."""
    try:
        env = json.loads((out / "environment.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(env, dict) and "normmatters" in env and "torch" in env


def _run_folder_entries(out: Path) -> tuple[list[str], list[str]]:
    """The entries of ``out`` an earlier run wrote (regular files of a run folder) and the others."""
    from .io import stray_temporaries
    from .trainer import RUN_FILES

    entries = sorted(out.iterdir())
    if not _is_run_folder(out):
        return [], [p.name for p in entries]
    own_names = set(RUN_FILES) | {p.name for p in stray_temporaries(out, RUN_FILES)}
    own, foreign = [], []
    for p in entries:
        (own if p.name in own_names and p.is_file() and not p.is_symlink() else foreign).append(p.name)
    return own, foreign


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")


def check_train_out(out: str | os.PathLike, *, resume: bool, force: bool) -> list[str]:
    """Check that ``normmatters train`` may use ``out`` as its run folder; nothing is changed.

    :returns: the earlier run's files that ``--force`` is to remove (empty otherwise).
    :raises ConfigError: in one line, what is wrong and what to pass instead.
    """
    out = Path(out)
    if resume and force:
        raise ConfigError("--resume continues the run in --out and --force starts it over; pass one")
    if resume:
        if not out.exists():
            raise ConfigError(f"--resume: {out} does not exist (a mistyped run folder?)")
        if not out.is_dir():
            raise ConfigError(f"--resume: {out} is not a folder")
        from .trainer import CHECKPOINT_NAME

        ckpt = out / CHECKPOINT_NAME
        if ckpt.exists() and not ckpt.is_file():
            raise ConfigError(f"--resume: {ckpt} is not a file")
        if not ckpt.is_file():
            hint = ("pass --force instead to start the run over" if _is_run_folder(out)
                    else "leave out --resume to start a run")
            raise ConfigError(f"--resume: no {CHECKPOINT_NAME} in {out}, so nothing to resume; {hint}")
    problem = writable_folder_problem(out)
    if problem:
        raise ConfigError(f"--out: {problem}")
    if resume or not out.is_dir():
        return []
    try:
        own, foreign = _run_folder_entries(out)
    except OSError as exc:
        raise ConfigError(f"--out: cannot read {out} ({exc.strerror or exc})") from None
    if foreign:
        if own:
            raise ConfigError(f"--out: {out} holds an earlier run and files that are not a run's ({_shown(foreign)}); "
                              "--force removes only a run's own files, so choose a new or empty folder")
        raise ConfigError(f"--out: {out} is not empty ({_shown(foreign)}); choose a new or empty folder")
    if own and not force:
        raise ConfigError(f"--out: {out} holds an earlier run ({_shown(own)}); pass --resume to continue it "
                          "or --force to start it over")
    return own


def _remove_run_files(out: Path, names: list[str]) -> None:
    for name in names:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


def _inside(exc: OSError, folder: str | os.PathLike) -> bool:
    """Whether the file an OSError is about lies in ``folder``."""
    root = os.path.abspath(folder)
    for name in (exc.filename, exc.filename2):
        if isinstance(name, (str, os.PathLike)):
            path = os.path.abspath(name)
            if path == root or path.startswith(root + os.sep):
                return True
    return False


def _out_argument(argv: Sequence[str]) -> str | None:
    """The value of ``--out`` in ``argv`` (``--out X`` or ``--out=X``; the last one wins)."""
    value = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--out" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--out="):
            value = a[len("--out="):]
    return value


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
    p.add_argument("--force", action="store_true",
                   help="start the run in --out over: remove its files (never a file a run does not write)")
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
    skip = {"config", "preset", "out", "resume", "force", "sets", "progress", "verbose"}
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
    from .trainer import init_process_group_for, train

    args = build_train_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    rc = _extra_error("train")
    if rc is not None:
        return rc
    created_group = False
    is_main = True
    out: str | None = args.out
    try:
        if args.resume and not args.out:
            raise ConfigError("--resume needs --out RUN_FOLDER (the folder holding checkpoint.pt)")
        if args.force and not args.out:
            raise ConfigError("--force needs --out RUN_FOLDER (the run to start over)")
        if args.out:
            # Every process checks before joining the others: no process has written yet.
            check_train_out(args.out, resume=args.resume, force=args.force)
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
        problem = None
        if is_main:
            try:  # again on rank 0, for a default folder too, then --force clears the earlier run
                remove = check_train_out(out, resume=args.resume, force=args.force)
                _remove_run_files(Path(out), remove)  # --force: the earlier run's files only
            except (ConfigError, OSError) as exc:
                problem = str(exc) if isinstance(exc, ConfigError) else f"--out: cannot clear {out} ({exc})"
        problem = broadcast_object(problem)
        if problem:
            raise ConfigError(problem)
        summary = train(config, out, progress=args.progress, resume=args.resume)
    except InputError as exc:
        return _error("train", str(exc))
    except OSError as exc:  # the folder became unwritable (or full) while the run went on
        if out is None or not _inside(exc, out):
            raise
        return _error("train", f"cannot write the run folder {out} ({exc.strerror or exc})")
    except KeyboardInterrupt:
        print(f"{PROG} train: interrupted; continue with: {PROG} train --out {out or '<run folder>'} --resume",
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
    if cmd in _NEEDS_EXTRA:
        rc = _extra_error(cmd)
        if rc is not None:
            return rc
    out = _out_argument(argv) if cmd == "reproduce" else None
    if out is not None:
        # A report folder that cannot be written fails now, in one line, not after the first claim.
        problem = writable_folder_problem(out)
        if problem:
            return _error(cmd, f"--out: {problem}")
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
    except OSError as exc:  # the report folder became unwritable (or full) on the way
        if out is None or not _inside(exc, out):
            raise
        return _error(cmd, f"cannot write the report folder {out} ({exc.strerror or exc})")
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
