"""Models of the experiments, each taking its normalization as an argument.

:func:`create_model` builds any of them by name; the norm goes through the one factory in
:mod:`.norms`::

    from normmatters.experiments.models import create_model
    net = create_model("resnet20", norm="l1", num_classes=10, in_channels=1, input_dims=1)  # MNIST-1D
    net = create_model("resnet56", norm="bwn")                                              # CIFAR-10
    lm = create_model("transformer_lm", norm="l1", vocab_size=256)

=====================================  ================================================  ===========
name                                   network                                           task
=====================================  ================================================  ===========
resnet20/32/44/56/110                  CIFAR ResNet (6n+2), 1-D when ``input_dims=1``    classify
vgg11                                  VGG "A" for CIFAR                                 classify
resnet18, resnet50                     ImageNet ResNets                                  classify
resnet1d                               ResNet-20 with Conv1d, for MNIST-1D               classify
resnet_digits                          ResNet-8 for 8×8 digits                           classify
transformer_lm                         decoder-only Transformer with Lp layer norm       lm
lstm_lm                                2-layer LSTM, weights (B)WN or plain              lm
=====================================  ================================================  ===========
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch.nn as nn

from ...optim import last_layer_module
from ..errors import ConfigError
from .lstm import LSTMLM, lstm_lm
from .norms import NormFactory, list_norms, parse_norm
from .resnet_cifar import CifarResNet, cifar_resnet, resnet1d, resnet_digits
from .resnet_imagenet import ImageNetResNet, resnet18, resnet50
from .transformer import TransformerLM, transformer_lm
from .vgg import VGG, vgg11

__all__ = [
    "create_model",
    "list_models",
    "model_task",
    "last_layer",
    "NormFactory",
    "parse_norm",
    "list_norms",
    "CifarResNet",
    "ImageNetResNet",
    "VGG",
    "TransformerLM",
    "LSTMLM",
]

# name -> (builder, task, default in_channels, default input_dims)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str, int | None, int | None]] = {
    **{f"resnet{d}": (partial(cifar_resnet, d), "classification", 3, 2) for d in (20, 32, 44, 56, 110)},
    "vgg11": (vgg11, "classification", 3, 2),
    "resnet18": (resnet18, "classification", 3, 2),
    "resnet50": (resnet50, "classification", 3, 2),
    "resnet1d": (resnet1d, "classification", 1, 1),
    "resnet_digits": (resnet_digits, "classification", 1, 2),
    "transformer_lm": (transformer_lm, "lm", None, None),
    "lstm_lm": (lstm_lm, "lm", None, None),
}


def list_models() -> list[str]:
    """Names :func:`create_model` accepts."""
    return list(_REGISTRY)


def _lookup(name: str):
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ConfigError(f"model: unknown model {name!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def model_task(name: str) -> str:
    """``"classification"`` or ``"lm"`` (a language model: (N, T) tokens → (N, T, V) logits)."""
    return _lookup(name)[1]


def create_model(
    name: str,
    *,
    norm: str = "l2",
    num_classes: int = 10,
    in_channels: int | None = None,
    norm_kwargs: dict[str, Any] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build the model ``name`` with the normalization ``norm``.

    :param name: one of :func:`list_models`.
    :param norm: a norm name (``"l2"``, ``"l1"``, ``"linf"``, ``"top10"``, ``"wn"``, ``"bwn"``,
        ``"none"``, …, see :mod:`normmatters.experiments.models.norms`).
    :param num_classes: classifier outputs (the vocabulary size for a language model, unless
        ``vocab_size=`` is given).
    :param in_channels: input channels; default 3 for the CIFAR/ImageNet models, 1 for
        ``resnet1d``/``resnet_digits``.
    :param norm_kwargs: passed to every norm layer (e.g. ``{"constant": "paper"}``).
    :param kw: model options, notably ``input_dims`` (1 → Conv1d networks for sequences such as
        MNIST-1D, 2 → images), ``vocab_size``/``block_size``/``d_model``/… for the LMs,
        ``depth``/``widths`` for the small ResNets.
    :raises ConfigError: (a :class:`ValueError`) for an unknown model or norm.
    """
    builder, task, default_channels, default_dims = _lookup(name)
    parse_norm(norm)  # an unknown norm fails here, with the list of valid names
    if task == "lm":
        kw.pop("input_dims", None)
        return builder(norm=norm, num_classes=num_classes, norm_kwargs=norm_kwargs, **kw)
    if kw.get("input_dims") is None:
        kw["input_dims"] = default_dims
    return builder(
        norm=norm,
        num_classes=num_classes,
        in_channels=default_channels if in_channels is None else in_channels,
        norm_kwargs=norm_kwargs,
        **kw,
    )


def last_layer(model: nn.Module) -> nn.Module:
    """The model's last (classifier) layer, :func:`normmatters.optim.last_layer_module`: the one
    every weight-decay grouping keeps decayed in a WD-off run."""
    head = last_layer_module(model)
    if head is None:
        raise ValueError(f"last_layer: {type(model).__name__} has no get_classifier(), no nn.Linear and no convolution")
    return head
