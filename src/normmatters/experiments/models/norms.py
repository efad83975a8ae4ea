"""The one place where the experiment models turn a norm name into layers.

Every model in :mod:`normmatters.experiments.models` takes ``norm=`` and builds its normalization
and its normalized weights through :class:`NormFactory`; nothing else in the models imports
:mod:`normmatters.nn` or :mod:`normmatters.parametrizations`.

Norm names (Hoffer et al. 2018, Sec. 4 and 6; the formulas in ``docs/math.md``):

=================  ==========================================================================
``"l2"`` / ``"bn"``  :class:`normmatters.nn.LpBatchNorm2d` with ``p=2`` (torch's batch norm)
``"l1"``             L1 batch norm, σ̂ = C_L1 · mean|d|, C_L1 = √(π/2)
``"linf"``           L∞ batch norm, σ̂ = C_∞(n) · max|d|
``"top{k}"``         Top(k) batch norm, e.g. ``"top10"``: σ̂ = C_k(n) · mean of the k largest |d|
``"wn"``             weight norm (Salimans & Kingma 2016) on each normalized weight, then a
                     mean-only batch norm without scale (the gain g is in the parametrization)
``"bwn"``            bounded weight norm (ρ fixed at initialization), then a mean-only batch norm
                     *with* a learned per-channel scale and bias (Sec. 6)
``"bwn_bounded"``    the official code's BWN variant (``gain="bounded"``), mean-only BN, no scale
``"wn_l1"`` …        Lp weight norm: suffix ``_l1`` / ``_linf`` on ``wn`` / ``bwn``
``"none"``           no normalization (:class:`torch.nn.Identity`); convolutions get a bias
=================  ==========================================================================

For layer norm (the Transformer) the Lp names select :class:`normmatters.nn.LpLayerNorm` with the
same ``p`` and ``k``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import ConfigError

__all__ = ["NormFactory", "NORM_NAMES", "list_norms", "parse_norm"]

#: Names listed by ``normmatters train --help``; ``top{k}`` accepts any positive k.
NORM_NAMES = ("l2", "l1", "linf", "top10", "wn", "bwn", "bwn_bounded", "none")

_WN_RE = re.compile(r"^(b?wn)(?:_(l1|l2|linf))?(_bounded)?$")
_TOPK_RE = re.compile(r"^top(\d+)$")


def list_norms() -> list[str]:
    """Return the norm names (``top{k}`` stands for any k)."""
    return list(NORM_NAMES) + ["top{k}", "bn", "wn_l1", "wn_linf", "bwn_l1", "bwn_linf"]


@dataclass(frozen=True)
class NormSpec:
    """A parsed norm name.

    :ivar name: the name as given (lower case).
    :ivar kind: ``"lp"`` (an Lp batch/layer norm), ``"wn"``, ``"bwn"`` or ``"none"``.
    :ivar p: the norm's p (1, 2 or ``inf``): the dispersion's for ``"lp"``, the weight norm's for
        ``"wn"``/``"bwn"``.
    :ivar k: ``k`` of Top(k), else ``None``.
    :ivar gain: for ``"bwn"``: ``"fixed"`` (the paper's formula, Sec. 6) or ``"bounded"`` (official code).
    """

    name: str
    kind: str
    p: float = 2.0
    k: int | None = None
    gain: str = "fixed"


def parse_norm(norm: str) -> NormSpec:
    """Parse a norm name (see the module docstring) into a :class:`NormSpec`.

    :raises ConfigError: for an unknown name.
    """
    if not isinstance(norm, str):
        raise ConfigError(f"norm: expected a name such as 'l2', 'l1', 'linf', 'top10', 'bwn', got {norm!r}")
    name = norm.strip().lower()
    if name in ("l2", "bn"):
        return NormSpec(name, "lp", 2.0)
    if name == "l1":
        return NormSpec(name, "lp", 1.0)
    if name == "linf":
        return NormSpec(name, "lp", float("inf"))
    m = _TOPK_RE.match(name)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise ConfigError(f"norm: Top(k) needs k >= 1, got {norm!r}")
        return NormSpec(name, "lp", float("inf"), k)
    if name in ("none", "identity"):
        return NormSpec(name, "none")
    m = _WN_RE.match(name)
    if m:
        kind, pname, bounded = m.groups()
        p = {"l1": 1.0, "l2": 2.0, "linf": float("inf"), None: 2.0}[pname]
        if bounded and kind != "bwn":
            raise ConfigError(f"norm: '_bounded' applies to 'bwn' only, got {norm!r}")
        return NormSpec(name, kind, p, None, "bounded" if bounded else "fixed")
    raise ConfigError(
        f"norm: unknown norm {norm!r}; expected one of {', '.join(list_norms())}"
    )


def _nn():
    """Import :mod:`normmatters.nn` lazily, with a clear error if it is not available."""
    try:
        from normmatters import nn as nmnn
    except ImportError as exc:  # pragma: no cover - only while the package is incomplete
        raise ImportError(f"normmatters.nn is required for Lp norms but could not be imported: {exc}") from exc
    return nmnn


def _parametrizations():
    """Import :mod:`normmatters.parametrizations` lazily, with a clear error if absent."""
    try:
        from normmatters import parametrizations
    except ImportError as exc:  # pragma: no cover - only while the package is incomplete
        raise ImportError(
            "norm 'wn'/'bwn' needs normmatters.parametrizations (weight_norm, bounded_weight_norm), "
            f"which could not be imported: {exc}"
        ) from exc
    return parametrizations


@dataclass
class NormFactory:
    """Builds the normalization layers and normalized weights of one model.

    :param norm: a norm name (see the module docstring) or a parsed :class:`NormSpec`.
    :param norm_kwargs: keyword arguments passed to every norm layer this factory builds (for
        example ``constant="paper"``, ``ghost_batch_size=32`` or a precision option).

    Example::

        f = NormFactory("l1")
        conv = f.conv(2, 16, 32, 3, padding=1)   # Conv2d, bias only when norm is "none"
        bn = f.batch_norm(32, dims=2)            # LpBatchNorm2d(32, p=1)
    """

    norm: str | NormSpec = "l2"
    norm_kwargs: dict[str, Any] | None = None
    spec: NormSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = self.norm if isinstance(self.norm, NormSpec) else parse_norm(self.norm)
        self.norm_kwargs = dict(self.norm_kwargs or {})

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def normalized(self) -> bool:
        """Whether the layers this factory builds normalize at all (``False`` for ``"none"``)."""
        return self.spec.kind != "none"

    @property
    def weight_normalized(self) -> bool:
        """Whether weights are reparametrized (``"wn"``/``"bwn"``)."""
        return self.spec.kind in ("wn", "bwn")

    # -- batch norm ---------------------------------------------------------------------------
    def batch_norm(self, num_features: int, dims: int = 2) -> nn.Module:
        """The normalization after a convolution (or linear layer, ``dims=0``/``1``).

        :param num_features: channels.
        :param dims: spatial dimensions of the input: 0 or 1 → ``*1d``, 2 → ``*2d``, 3 → ``*3d``.
        """
        s = self.spec
        if s.kind == "none":
            return nn.Identity()
        dims = max(int(dims), 1)
        if dims not in (1, 2, 3):
            raise ConfigError(f"NormFactory.batch_norm: dims must be 0, 1, 2 or 3, got {dims}")
        nmnn = _nn()
        kwargs = dict(self.norm_kwargs)
        if s.kind == "lp":
            cls = getattr(nmnn, f"LpBatchNorm{dims}d")
            return cls(num_features, **kwargs, p=s.p, k=s.k)
        # WN keeps its learned gain in the parametrization; BWN (gain="fixed") moves the gain into
        # the mean-only BN; the official BWN ("bounded") keeps g and has a bias only.
        scale = s.kind == "bwn" and s.gain == "fixed"
        cls = getattr(nmnn, f"MeanOnlyBatchNorm{dims}d")
        return cls(num_features, **kwargs, scale=scale)

    # -- layer norm ---------------------------------------------------------------------------
    def layer_norm(self, normalized_shape: int | tuple[int, ...]) -> nn.Module:
        """The normalization of a Transformer block: Lp layer norm with this norm's p and k.

        For ``"wn"``/``"bwn"`` the Transformer's weights are normalized instead, and the layer
        norm becomes a learned per-feature affine map (gain and bias); for ``"none"`` it
        is the identity.
        """
        s = self.spec
        if s.kind == "none":
            return nn.Identity()
        if s.kind in ("wn", "bwn"):
            return Affine(normalized_shape, scale=(s.kind == "bwn" and s.gain == "fixed"))
        nmnn = _nn()
        return nmnn.LpLayerNorm(normalized_shape, **self.norm_kwargs, p=s.p, k=s.k)

    # -- weights ------------------------------------------------------------------------------
    def weight(self, module: nn.Module, name: str = "weight") -> nn.Module:
        """Reparametrize ``module.<name>`` for ``"wn"``/``"bwn"``; return ``module`` unchanged else.

        Only weights whose output goes into a normalization (or whose scale is otherwise free) are
        passed here; classifier heads are left plain.
        """
        s = self.spec
        if s.kind == "wn":
            _parametrizations().weight_norm(module, name=name, p=s.p)
        elif s.kind == "bwn":
            _parametrizations().bounded_weight_norm(module, name=name, p=s.p, gain=s.gain)
        return module

    def conv(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool | None = None,
    ) -> nn.Module:
        """A ``Conv{dims}d`` that feeds a norm layer.

        :param bias: default: a bias only without normalization (a batch norm's mean subtraction
            cancels a bias, and its β replaces it).
        """
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(max(int(dims), 1))
        if cls is None:
            raise ConfigError(f"NormFactory.conv: dims must be 1, 2 or 3, got {dims}")
        if bias is None:
            bias = not self.normalized
        conv = cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias)
        # He initialization (fan-out, as torchvision's ResNets) before any reparametrization, so
        # that WN/BWN start from the same directions and norms as the batch-normalized network.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return self.weight(conv)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """An :class:`~torch.nn.Linear` whose weight is normalized for ``"wn"``/``"bwn"``."""
        return self.weight(nn.Linear(in_features, out_features, bias=bias))


class Affine(nn.Module):
    """A learned per-feature gain and bias over the last dimensions: y = γ·x + β.

    The companion of a weight-normalized layer where a layer norm would otherwise hold γ and β.
    """

    def __init__(self, normalized_shape: int | tuple[int, ...], scale: bool = True) -> None:
        super().__init__()
        import torch

        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape = shape
        self.weight = nn.Parameter(torch.ones(shape)) if scale else None
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        if self.weight is not None:
            x = x * self.weight
        return x + self.bias

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, scale={self.weight is not None}"
