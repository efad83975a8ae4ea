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
from .fold import FoldReport, _as_args, _max_abs, _max_diff, check_eval_mode, fold_norms

__all__ = ["export_onnx", "OnnxExport", "warm_constants"]


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


def _atomic_save(onnx_program: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx_program.save(tmp, external_data=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

    Args:
        model: a module in evaluation mode.
        example_inputs: a tensor or a tuple of positional tensors.
        path: the ``.onnx`` file; written to a temporary file and moved into place.
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
        program = torch.onnx.export(target, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    opset_version=opset_version, verbose=False)
    _atomic_save(program, path)
    diff_onnx = None
    if verify:
        import numpy as np
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
        outs = session.run(None, feeds)
        with torch.no_grad():
            ref = model(*args)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        diff_onnx = _max_diff(tuple(r.detach().cpu() for r in refs), tuple(torch.from_numpy(np.asarray(o)) for o in outs))
        bound = tol * max(1.0, _max_abs(refs))
        if not diff_onnx <= bound:
            raise ValueError(f"{where}: onnxruntime's output differs from PyTorch's by {diff_onnx:.3g} (> {bound:.3g})")
    return OnnxExport(path, path.stat().st_size, report, diff_folded, diff_onnx)
