"""The configuration of one training run: a dataclass, loadable from TOML, overridable from flags.

All hyperparameters live in :class:`TrainConfig`, with defaults that train the embedded scale
(ResNet-20 on MNIST-1D) in a few minutes on two CPU cores. A run saves its resolved config as
``config.toml`` in the run folder, which ``normmatters train --config`` reads back.

Example ``run.toml``::

    model = "resnet56"
    dataset = "cifar10"
    norm = "l1"
    epochs = 160
    lr = 0.1
    lr_schedule = "step"
    lr_milestones = [80, 120]
    [norm_kwargs]
    constant = "calibrated"
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport, a dependency there
    import tomli as tomllib

from .errors import ConfigError

__all__ = ["TrainConfig", "load_config", "config_to_toml", "PRESETS", "preset"]


@dataclass
class TrainConfig:
    """Every hyperparameter of a run. Units are given where they matter.

    Model and data
      ``model``, ``dataset``, ``norm`` (see :func:`~normmatters.experiments.models.create_model`,
      :func:`~normmatters.experiments.data.get_dataset`), ``norm_kwargs`` (to every norm layer),
      ``model_kwargs``, ``dataset_kwargs``, ``data_root``, ``download``, ``augment``.
    Optimization
      ``optimizer`` ``"sgd"`` (``momentum``, ``nesterov``) or ``"adamw"`` (``betas``, ``eps``);
      ``lr`` (per batch of ``batch_size``, not rescaled); ``weight_decay`` (coupled L2 for SGD,
      decoupled for AdamW); ``wd_exclude_norm_bias`` (no decay on norm parameters and biases);
      ``wd_last_layer_only`` (decay only on the classifier: with every other weight scale
      invariant, Hoffer et al. 2018, Sec. 2); ``label_smoothing``; ``grad_clip`` (max global norm, 0 = off).
    Schedule (per optimizer step)
      ``lr_schedule`` ``"cosine"`` | ``"step"`` | ``"constant"``; ``lr_milestones`` (epochs; for
      ``"step"``, default 50 % and 75 % of the run) and ``lr_gamma``; ``warmup_epochs`` (linear
      warm-up from 0, may be fractional); ``min_lr`` (cosine floor).
    Hardware
      ``device`` (``"auto"`` = CUDA if available), ``amp`` (autocast on CUDA only) with
      ``amp_dtype``, ``channels_last``, ``compile`` (:func:`torch.compile`), ``threads`` (0: keep
      torch's default, which honours ``OMP_NUM_THREADS``), ``num_workers``, ``sync_bn``
      (under ``torchrun``, batch norms become :class:`~normmatters.nn.SyncLpBatchNorm`).
    Run
      ``seed`` (model init, data order, augmentation), ``eval_every`` (epochs),
      ``max_train_batches`` (0 = all; for quick checks), ``checkpoint``, ``plots``.
    """

    # model and data
    model: str = "resnet20"
    dataset: str = "mnist1d"
    norm: str = "l2"
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    download: bool = False
    augment: bool = True
    # optimization
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 500
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 5e-4
    wd_exclude_norm_bias: bool = False
    wd_last_layer_only: bool = False
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    # schedule
    lr_schedule: str = "cosine"
    lr_milestones: list[float] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    # hardware
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    compile: bool = False
    threads: int = 0
    num_workers: int = 0
    sync_bn: bool = True  # synchronized batch norms under torchrun
    # run
    seed: int = 0
    eval_every: int = 1
    max_train_batches: int = 0
    checkpoint: bool = True
    plots: bool = True

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build a config from a mapping; unknown keys and wrongly typed values are errors."""
        cfg = cls()
        return cfg.replace(source=source, **d)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file (keys as the fields of this class; tables for the ``*_kwargs``)."""
        return load_config(path)

    def replace(self, *, source: str = "override", **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied, each checked against the field's type.

        :raises ConfigError: an unknown key (with the closest valid names) or a bad value.
        """
        names = self.field_names()
        hints = typing.get_type_hints(type(self))
        new = copy.deepcopy(self)  # the copy shares no list or dict with ``self``
        for key, value in changes.items():
            if key not in names:
                import difflib

                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")
            setattr(new, key, _coerce(key, value, hints[key], source))
        new.validate()
        return new

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check names and ranges that can be checked without building anything.

        :raises ConfigError: naming the key, what was expected and what was received.
        """
        from .data import list_datasets
        from .models import list_models, parse_norm

        if self.model.lower() not in list_models():
            raise ConfigError(f"model: unknown model {self.model!r}; expected one of {', '.join(list_models())}")
        if self.dataset.lower() not in list_datasets():
            raise ConfigError(
                f"dataset: unknown dataset {self.dataset!r}; expected one of {', '.join(list_datasets())}"
            )
        parse_norm(self.norm)
        choices = {
            "optimizer": ("sgd", "adamw"),
            "lr_schedule": ("cosine", "step", "constant"),
            "amp_dtype": ("bfloat16", "float16"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        positive = ("epochs", "batch_size", "eval_batch_size", "eval_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        nonneg = ("lr", "weight_decay", "momentum", "label_smoothing", "grad_clip", "warmup_epochs", "min_lr",
                  "threads", "num_workers", "max_train_batches", "eps")
        for key in nonneg:
            v = getattr(self, key)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{key}: expected a finite number >= 0, got {v}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"label_smoothing: expected a value in [0, 1), got {self.label_smoothing}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas: expected two numbers, got {self.betas}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ConfigError("nesterov: needs optimizer='sgd' and momentum > 0")

    # -- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return config_to_toml(self.to_dict())


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int → float where natural)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: {key}: expected {tp}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a table/dict, got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item,) = args
        return [_coerce(key, v, item, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
    return value


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read ``path`` (TOML) into a :class:`TrainConfig`, then apply ``overrides``.

    A ``[train]`` table, if present, is used instead of the top level (so one file may hold
    other sections).

    :raises ConfigError: unreadable TOML, unknown keys, bad values.
    :raises DataNotFoundError: the file does not exist.
    """
    from .errors import DataNotFoundError

    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"config file {p} not found")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    if isinstance(data.get("train"), dict):
        data = data["train"]
    cfg = TrainConfig.from_dict(data, source=str(p))
    return cfg.replace(**overrides) if overrides else cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        # TOML has no null: a None entry is left out (every option's default).
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise ConfigError(f"config: cannot write {v!r} ({type(v).__name__}) to TOML")


def config_to_toml(d: dict[str, Any]) -> str:
    """Write a flat mapping (values: bool, int, float, str, lists, dicts) as TOML.

    ``None`` values are omitted (TOML has no null; the field's default is ``None``).
    """
    lines = []
    for k, v in d.items():
        if v is None:
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


#: Named starting points (``normmatters train --preset NAME``): the embedded scale, sized for a
#: 2-core CPU, and the paper's scale, with the paper's schedules.
PRESETS: dict[str, dict[str, Any]] = {
    # ResNet-20 (1-D) on MNIST-1D: the defaults of TrainConfig.
    "mnist1d": {},
    # ResNet-8 on scikit-learn's 8×8 digits: seconds on a CPU.
    "digits": {"model": "resnet_digits", "dataset": "digits", "epochs": 15, "batch_size": 64},
    # Character-level Transformer LM on CPython's pydoc text, Lp layer norm.
    "text_transformer": {
        "model": "transformer_lm", "dataset": "text", "norm": "l2", "epochs": 4, "batch_size": 32,
        "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.1, "wd_exclude_norm_bias": True,
        "warmup_epochs": 0.25, "grad_clip": 1.0, "eval_batch_size": 64,
        "dataset_kwargs": {"block_size": 128},
    },
    # 2-layer LSTM LM with bounded weight normalization on the same text.
    "text_lstm": {
        "model": "lstm_lm", "dataset": "text", "norm": "bwn", "epochs": 4, "batch_size": 32, "optimizer": "adamw",
        "lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0, "eval_batch_size": 64,
        "dataset_kwargs": {"block_size": 64},
    },
    # He et al. (2016) CIFAR schedule, as in the paper's ResNet-56 runs (C2, C3, C5).
    "cifar10_resnet56": {
        "model": "resnet56", "dataset": "cifar10", "epochs": 164, "batch_size": 128, "lr": 0.1,
        "weight_decay": 1e-4, "lr_schedule": "step", "lr_milestones": [81, 122], "num_workers": 4,
    },
    # VGG11 on CIFAR-10 (C1).
    "cifar10_vgg11": {
        "model": "vgg11", "dataset": "cifar10", "epochs": 160, "batch_size": 128, "lr": 0.1,
        "weight_decay": 5e-4, "lr_schedule": "step", "lr_milestones": [80, 120], "num_workers": 4,
    },
    # ImageNet ResNet-50, 90 epochs, LR ÷10 at 30/60/80 (C2, C4, C5).
    "imagenet_resnet50": {
        "model": "resnet50", "dataset": "imagenet", "epochs": 90, "batch_size": 256, "lr": 0.1,
        "weight_decay": 1e-4, "lr_schedule": "step", "lr_milestones": [30, 60, 80], "num_workers": 8,
        "eval_batch_size": 256, "channels_last": True,
    },
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` (see :data:`PRESETS`), with ``overrides``.

    :raises ConfigError: an unknown preset.
    """
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**PRESETS[name], **overrides}, source=f"preset {name}")
