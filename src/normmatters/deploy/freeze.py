r"""Freeze normalization layers, in the manner of timm's ``freeze_batch_norm_2d``.

A frozen norm (:class:`FrozenNorm`) holds its affine parameters as buffers (nothing to train) and
computes, in training and in evaluation alike, what the original layer computes in evaluation:

* batch norms of any p (torch's, :class:`~normmatters.nn.LpBatchNorm2d`): the running statistics,
  :math:`y = \gamma (x-\mu)/\sqrt{\sigma^2_{run}+\epsilon} + \beta` at p=2 and
  :math:`\gamma (x-\mu)/(\sqrt{\sigma^2_{run}}+\epsilon) + \beta` otherwise (docs/math.md),
  through the same functions the layers use; the running statistics are never updated;
* mean-only batch norms: :math:`y = (x - \mu_{run})\gamma + \beta`;
* layer, group and RMS norms (torch's, ours, and other classes that compute one of them, such as
  transformers' ``LlamaRMSNorm`` or a channels-first ``ConvNextLayerNorm``: recognised by what they
  compute, :mod:`normmatters.convert.recognise`): per-sample statistics, as always (they have no
  running statistics); only their parameters stop training.

Any other norm-like module (e.g. a batch norm subclass whose ``forward`` adds an activation) is
left as it is with one :class:`~normmatters.convert.NormConversionWarning`.

State-dict keys are those of the original layer (``weight``, ``bias`` — or the original's own
names —, ``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts move between a frozen and an unfrozen
model both ways. :func:`unfreeze_norms` rebuilds the original layer classes with the current values.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.layers import foreign_norm, meta_template, update_transformer_fast_paths
from ..convert.norms import replace_modules
from ..convert.recognise import MEAN_ONLY, NormSpec, recognise, warn_left
from ..functional import lp_batch_norm, lp_group_norm

__all__ = ["FrozenNorm", "freeze_norms", "unfreeze_norms"]

_KINDS = ("batch", "layer", "group", "rms")
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _spec(m: nn.Module) -> NormSpec | str | None:
    """What ``m`` computes (``"mean"`` for a mean-only batch norm), as in :func:`recognise`."""
    if isinstance(m, MEAN_ONLY):
        return NormSpec("mean", (m.num_features,), None,
                        weight="weight" if getattr(m, "weight", None) is not None else None,
                        bias="bias" if getattr(m, "bias", None) is not None else None)
    return recognise(m)


class FrozenNorm(nn.Module):
    """A normalization layer with frozen parameters and statistics (see the module docstring).

    Built from a layer by :func:`freeze_norms`; ``FrozenNorm(layer)`` also works. The original
    layer's configuration is kept (on the ``meta`` device, no memory) so that
    :meth:`unfreeze` returns a layer of the original class.

    Example::

        >>> f = FrozenNorm(LpBatchNorm2d(16, p=1).eval())
        >>> list(f.parameters())
        []
    """

    def __init__(self, module: nn.Module, spec: NormSpec | None = None) -> None:
        super().__init__()
        if spec is None:
            found = _spec(module)
            if not isinstance(found, NormSpec):
                why = f": {found}" if isinstance(found, str) else ""
                raise TypeError(f"FrozenNorm: expected a batch/layer/group/RMS norm, got "
                                f"{type(module).__name__}{why}")
            spec = found
        kind = spec.kind
        if kind in ("batch", "mean") and getattr(module, "running_mean", None) is None:
            raise ValueError(
                f"FrozenNorm: {type(module).__name__} has no running statistics "
                "(track_running_stats=False); a frozen batch norm needs them"
            )
        if getattr(module, "compute_dtype", None) is not None:
            raise ValueError(
                f"FrozenNorm: {type(module).__name__} emulates low precision "
                f"(compute_dtype={module.compute_dtype}); freezing it would change its arithmetic"
            )
        if kind == "batch" and spec.options.get("ghost_batch_size") is not None:
            pass  # evaluation of a ghost batch norm uses the running statistics like any other
        self.kind = kind
        self.original_class = type(module).__name__
        self.p, self.k, self.constant = float(spec.p), spec.k, spec.constant
        self.eps = spec.eps
        self.axis, self.offset = spec.axis, spec.offset
        self.weight_name, self.bias_name = spec.weight, spec.bias
        self.num_features = spec.shape[0] if kind in ("batch", "mean", "group") else None
        self.normalized_shape = tuple(spec.shape) if kind in ("layer", "rms") else ()
        self.num_groups = spec.num_groups
        self.requires_grad = {n: p.requires_grad for n, p in module.named_parameters(recurse=False)}
        names = [n for n in (spec.weight, spec.bias) if n is not None]
        if kind in ("batch", "mean"):
            names += [n for n in _STATS if n in module._buffers]
        for name in names:
            t = getattr(module, name, None)
            self.register_buffer(name, None if t is None else t.detach().clone())
        # Kept outside the module tree (no state, no device moves): the original's class and
        # configuration, with its tensors on the meta device.
        self.__dict__["_template"] = meta_template(module)
        self.train(module.training)

    def forward(self, input: Tensor) -> Tensor:
        w = self._buffers.get(self.weight_name) if self.weight_name else None
        b = self._buffers.get(self.bias_name) if self.bias_name else None
        lp = {"p": self.p, "k": self.k, "constant": self.constant}
        if self.kind == "batch":
            rm, rv = self._buffers["running_mean"], self._buffers["running_var"]
            if self.p == 2.0:
                return F.batch_norm(input, rm, rv, w, b, False, 0.0, self.eps)
            return lp_batch_norm(input, rm, rv, w, b, False, 0.0, self.eps, **lp)
        if self.kind == "mean":
            view = [1, -1] + [1] * (input.dim() - 2)
            y = input - self._buffers["running_mean"].reshape(view).to(input.dtype)
            if w is not None:
                y = y * w.reshape(view).to(y.dtype)
            if b is not None:
                y = y + b.reshape(view).to(y.dtype)
            return y
        if self.kind == "group":
            return lp_group_norm(input, self.num_groups, w, b, self.eps, **lp)
        return foreign_norm(input, self.kind, self.axis, self.normalized_shape, w, b, self.eps,
                            self.offset, **lp)

    def unfreeze(self) -> nn.Module:
        """A layer of the original class holding this layer's current values and training flag."""
        ref = next((t for t in self._buffers.values() if t is not None and t.is_floating_point()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        new = copy.deepcopy(self.__dict__["_template"]).to_empty(device=device)
        if ref is not None:
            new = new.to(dtype=ref.dtype)
        with torch.no_grad():
            for name in self._buffers:
                src = self._buffers.get(name)
                dst = getattr(new, name, None)
                if src is not None and isinstance(dst, Tensor):
                    dst.copy_(src)
        for name, p in new.named_parameters(recurse=False):
            p.requires_grad_(self.requires_grad.get(name, True))
        return new.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A state dict saved before num_batches_tracked existed (torch's version 1) still loads.
        key = prefix + "num_batches_tracked"
        if "num_batches_tracked" in self._buffers and key not in state_dict:
            state_dict[key] = self._buffers["num_batches_tracked"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = f"{self.original_class}, kind={self.kind!r}"
        if self.num_features is not None:
            s += f", {self.num_features}"
        if self.normalized_shape:
            s += f", normalized_shape={self.normalized_shape}"
        if self.kind != "mean":
            s += f", eps={self.eps}, p={self.p:g}" + (f", k={self.k}" if self.k is not None else "")
        return s


def freeze_norms(model: nn.Module, kinds: tuple[str, ...] | list[str] = _KINDS) -> nn.Module:
    """Replace every normalization layer of ``model`` by a :class:`FrozenNorm`, in place.

    Like timm's ``freeze_batch_norm_2d`` for every norm of torch and normmatters: the frozen
    layers have no trainable parameters and use their running statistics in training and
    evaluation (module docstring). Returns ``model`` (or the frozen layer if ``model`` is a norm).

    Args:
        model: any module.
        kinds: which families to freeze, a subset of ``("batch", "layer", "group", "rms")``
            (``"batch"`` includes mean-only batch norms).

    Raises:
        ValueError: unknown ``kinds``, or nothing to freeze (the message says why: no norm, or
            only norms that cannot be frozen, e.g. batch norms without running statistics).

    Example::

        >>> model = freeze_norms(model)           # fine-tune everything but the norms
        >>> model = unfreeze_norms(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_norms: expected an nn.Module, got {type(model).__name__}")
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        raise ValueError(f"freeze_norms: unknown kinds {sorted(unknown)}; choose from {_KINDS}")
    wanted = set(kinds) | ({"mean"} if "batch" in kinds else set())
    frozen, refused = 0, []

    def fn(m: nn.Module, name: str) -> nn.Module | None:
        nonlocal frozen
        if isinstance(m, FrozenNorm):
            return m
        spec = _spec(m)
        if spec is None:
            return None
        if isinstance(spec, str):
            warn_left("freeze_norms", name, m, spec)
            refused.append(f"{name or '<root>'}: {spec}")
            return m
        if spec.kind not in wanted:
            return m
        try:
            new = FrozenNorm(m, spec)
        except ValueError as exc:
            refused.append(f"{name or '<root>'}: {exc}")
            warn_left("freeze_norms", name, m, str(exc))
            return m
        frozen += 1
        return new

    # Hooks move and shared norms stay shared; a frozen layer (and the layer it gives back) keeps
    # its own attributes.
    out = replace_modules(model, fn, attributes=False)
    update_transformer_fast_paths(out)
    if frozen == 0:
        why = "; ".join(refused) if refused else f"it has no unfrozen {'/'.join(kinds)} norm layer"
        raise ValueError(f"freeze_norms: nothing to freeze in {type(model).__name__} ({why})")
    return out


def unfreeze_norms(model: nn.Module) -> nn.Module:
    """Replace every :class:`FrozenNorm` in ``model`` by its original layer class, in place.

    Parameters become trainable again (with the ``requires_grad`` they had when frozen), and
    current values, buffers and the training flag carry over.

    Raises:
        ValueError: ``model`` has no frozen norm.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze_norms: expected an nn.Module, got {type(model).__name__}")
    count = 0

    def fn(m: nn.Module, name: str) -> nn.Module | None:
        nonlocal count
        if isinstance(m, FrozenNorm):
            count += 1
            return m.unfreeze()
        return None

    # Hooks move and shared norms stay shared; a frozen layer (and the layer it gives back) keeps
    # its own attributes.
    out = replace_modules(model, fn, attributes=False)
    update_transformer_fast_paths(out)
    if count == 0:
        raise ValueError(f"unfreeze_norms: nothing to unfreeze: {type(model).__name__} has no FrozenNorm")
    return out

