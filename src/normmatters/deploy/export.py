"""Export helpers: a folded model to an ONNX file, checked in onnxruntime.

Our layers go through :func:`torch.export.export` (training and evaluation) and
``torch.onnx.export(..., dynamo=True)``: while exporting, the fused CPU/Triton kernels of
:mod:`normmatters.kernels` (custom ops ``normmatters::...``, which ONNX cannot express) step aside
for plain ATen ops. :func:`export_onnx` adds what a deployment wants around it: fold the norms
(:func:`~normmatters.deploy.fold_norms`), make the batch axis dynamic, write the file atomically,
and compare onnxruntime's output with PyTorch's.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels import use_backend
from .fold import FoldReport, _as_args, _max_abs, _max_diff, check_eval_mode, flatten_outputs, fold_norms

__all__ = ["export_onnx", "OnnxExport", "warm_constants", "flatten_outputs"]


@dataclass
class OnnxExport:
    """The result of :func:`export_onnx`.

    :ivar path: the ONNX file written.
    :ivar file_bytes: its size.
    :ivar fold_report: what folding did (``None`` if ``fold=False`` or nothing could be folded).
    :ivar max_abs_diff_folded: max |model − folded model| on the example inputs.
    :ivar max_abs_diff_onnx: max |model − onnxruntime| on the example inputs (``None`` unverified).
    """

    path: Path
    file_bytes: int
    fold_report: FoldReport | None
    max_abs_diff_folded: float | None
    max_abs_diff_onnx: float | None


def warm_constants(model: nn.Module, example_inputs: Any) -> None:
    """Run a copy of ``model`` once so the Lp constants its layers need are computed and cached.

    :func:`normmatters.functional.lp_constant` for L∞ / Top(k) evaluates an integral with torch
    ops on first use; inside ``torch.export`` those ops would be traced as fake tensors. Computing
    them before exporting keeps them plain Python floats. The model (and its running statistics)
    is not touched.
    """
    args = _as_args(example_inputs)
    with torch.no_grad():
        copy.deepcopy(model)(*args)


class _FlatOutputs(nn.Module):
    """``model`` with its output flattened to a tuple of tensors (what ONNX can name)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.model(*args)))


def _save_tmp(onnx_program: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx_program.save(tmp, external_data=False)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    fold: bool = True,
    dynamic_batch: bool = True,
    verify: bool = True,
    tol: float = 1e-4,
    opset_version: int | None = None,
) -> OnnxExport:
    """Fold ``model``'s norms and export it to ONNX with ``torch.onnx.export(..., dynamo=True)``.

    The model may return any structure of tensors (a tensor, tuples, lists, dicts, dataclasses,
    transformers' ``ModelOutput``): the ONNX graph has one output per tensor, in the order of
    :func:`flatten_outputs`, and every one of them is compared.

    Args:
        model: a module in evaluation mode.
        example_inputs: a tensor or a tuple of positional tensors.
        path: the ``.onnx`` file; written to a temporary file, checked there and only then moved
            into place: when the export or the check fails, no file is left behind (an earlier
            file at ``path`` is kept as it was).
        fold: fold batch norms and bake weight norms first (:func:`fold_norms`); a model with
            nothing to fold is exported as it is.
        dynamic_batch: make dimension 0 of every input dynamic.
        verify: run the file in onnxruntime on ``example_inputs`` and compare with ``model``;
            a difference above ``tol · max(1, max|output|)`` is an error.
        opset_version: passed to ``torch.onnx.export``.

    Returns:
        An :class:`OnnxExport` with the path, file size, fold report and differences.

    Example::

        >>> res = export_onnx(model.eval(), torch.randn(8, 1, 8, 8), "model.onnx")
        >>> res.max_abs_diff_onnx < 1e-4
        True
    """
    where = "export_onnx"
    check_eval_mode(model, where)
    args = _as_args(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(f"{where}: example_inputs must be a tensor or a tuple of tensors")
    path = Path(path)
    report = None
    diff_folded = None
    target = model
    if fold:
        try:
            target, report = fold_norms(model, args, tol=tol, return_report=True)
            diff_folded = report.max_abs_diff
        except ValueError as exc:
            if not str(exc).startswith("fold_norms: nothing to fold"):
                raise
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if a.dim() > 0 else None for a in args)
    # The fused kernels are custom ops that ONNX cannot express: export the reference path,
    # plain ATen ops computing the same function.
    with use_backend("reference"):
        warm_constants(target, args)
        # The wrapper takes ``*args``: one (variadic) parameter, so the shapes nest once more.
        program = torch.onnx.export(_FlatOutputs(target).eval(), args, dynamo=True,
                                    dynamic_shapes=None if dynamic_shapes is None else (dynamic_shapes,), opset_version=opset_version,
                                    verbose=False)
    tmp = _save_tmp(program, path)
    try:
        diff_onnx = None
        if verify:
            import numpy as np
            import onnxruntime as ort

            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
            outs = [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]
            with torch.no_grad():
                refs = [r.detach().cpu() for r in flatten_outputs(model(*args))]
            if len(outs) != len(refs):
                raise ValueError(f"{where}: the ONNX graph has {len(outs)} outputs, the model returns "
                                 f"{len(refs)} tensors")
            for i, (r, o) in enumerate(zip(refs, outs)):
                if tuple(r.shape) != tuple(o.shape):
                    raise ValueError(f"{where}: output {i} has shape {tuple(o.shape)} in onnxruntime, "
                                     f"{tuple(r.shape)} in PyTorch")
            diff_onnx = _max_diff(tuple(refs), tuple(outs))
            bound = tol * max(1.0, _max_abs(refs))
            if not diff_onnx <= bound:
                raise ValueError(f"{where}: onnxruntime's output differs from PyTorch's by {diff_onnx:.3g} "
                                 f"(> {bound:.3g}); no file written")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return OnnxExport(path, path.stat().st_size, report, diff_folded, diff_onnx)
