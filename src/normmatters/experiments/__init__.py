"""The experiment harness: models, data, the trainer and the ``normmatters`` command.

Python API used by the claims and by people::

    from normmatters.experiments import TrainConfig, train
    summary = train(TrainConfig(model="resnet20", dataset="mnist1d", norm="l1"), "runs/l1")
    summary["final_test_acc"], summary["wall_time"]

* :mod:`.models` — :func:`create_model` (CIFAR/ImageNet ResNets, VGG11, 1-D and 8×8 ResNets,
  Transformer and LSTM language models), every norm through one factory.
* :mod:`.data` — :func:`get_dataset`, :func:`get_dataloaders`: MNIST-1D, digits, text (embedded),
  CIFAR-10/100, ImageNet folders.
* :mod:`.config` — :class:`TrainConfig`, TOML in and out.
* :mod:`.trainer` — :func:`train`, callbacks, exact resume.
* :mod:`.cli` — ``normmatters train | reproduce | bench``.
"""

from .config import TrainConfig, load_config
from .data import DatasetInfo, get_dataloaders, get_dataset, list_datasets
from .errors import CheckpointError, ConfigError, DataNotFoundError, InputError
from .models import create_model, list_models
from .trainer import TrainState, evaluate, train

__all__ = [
    "TrainConfig",
    "load_config",
    "train",
    "TrainState",
    "evaluate",
    "create_model",
    "list_models",
    "get_dataset",
    "get_dataloaders",
    "list_datasets",
    "DatasetInfo",
    "InputError",
    "ConfigError",
    "DataNotFoundError",
    "CheckpointError",
]
