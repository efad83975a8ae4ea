"""Export: our layers through torch.export (train and eval) and ONNX (dynamo) run in onnxruntime
with the same outputs; export_onnx folds, exports and verifies."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.export import Dim

from normmatters.deploy import export_onnx, warm_constants
from normmatters.kernels import use_backend
from normmatters.nn import (
    LpBatchNorm2d,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
    MeanOnlyBatchNorm2d,
)
from normmatters.parametrizations import bounded_weight_norm

INF = math.inf


def _net() -> nn.Sequential:
    """Every layer kind of ours, in one small network."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), LpBatchNorm2d(8, p=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), LpBatchNorm2d(8, p=INF, k=3),
        nn.Conv2d(8, 8, 1), LpBatchNorm2d(8, p=INF), MeanOnlyBatchNorm2d(8, scale=True),
        LpGroupNorm(2, 8, p=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        LpLayerNorm(8, p=1), LpRMSNorm(8, p=INF, k=3), LpLayerNorm(8, p=INF), nn.Linear(8, 4),
    )


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.train()
        for i in range(3):
            model(x * (1 + 0.5 * i) + 0.1 * i)
    return model.eval()


X = torch.randn(6, 3, 6, 6)


def test_torch_export_eval_dynamic_batch() -> None:
    model = _trained(_net(), X)
    warm_constants(model, X)
    ep = torch.export.export(model, (X,), dynamic_shapes=({0: Dim("batch", min=2)},))
    x2 = torch.randn(9, 3, 6, 6)
    torch.testing.assert_close(ep.module()(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_torch_export_train_mode_matches_and_updates_statistics() -> None:
    model = _trained(_net(), X).train()
    warm_constants(model, X)
    eager = copy.deepcopy(model)
    ep = torch.export.export(copy.deepcopy(model), (X,))
    gm = ep.module()
    x = torch.randn(6, 3, 6, 6) * 2
    torch.testing.assert_close(gm(x), eager(x), rtol=1e-5, atol=1e-5)
    # the exported program updates the running statistics as the eager layers do
    for name in ("1.running_mean", "1.running_var", "4.running_var", "6.running_var", "7.running_mean"):
        torch.testing.assert_close(gm.get_buffer(name), eager.get_buffer(name), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eager.get_buffer("1.running_var"), model.get_buffer("1.running_var"))


def test_torch_export_with_a_cold_constant_cache() -> None:
    from normmatters.functional import constants

    constants._expected_topk_mean.cache_clear()
    model = nn.Sequential(nn.Linear(4, 37), LpLayerNorm(37, p=INF)).eval()
    x = torch.randn(3, 4)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x))


def _run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_onnx_dynamo_export_of_our_layers_runs_in_onnxruntime(tmp_path) -> None:
    model = _trained(_net(), X)
    with use_backend("reference"):  # plain ATen ops rather than the fused custom ops
        warm_constants(model, X)
        program = torch.onnx.export(model, (X,), dynamo=True, dynamic_shapes=({0: Dim("batch")},),
                                    verbose=False)
    path = tmp_path / "layers.onnx"
    program.save(str(path))
    onnx.checker.check_model(onnx.load(str(path)))
    x2 = torch.randn(11, 3, 6, 6) * 1.5
    got = _run_onnx(path, x2)
    with torch.no_grad():
        expect = model(x2).numpy()
    assert np.abs(got - expect).max() <= 1e-5 * max(1.0, np.abs(expect).max())


def _bwn_l1_net() -> nn.Sequential:
    torch.manual_seed(0)
    conv = bounded_weight_norm(nn.Conv2d(1, 8, 3, padding=1, bias=False), gain="bounded")
    return nn.Sequential(conv, MeanOnlyBatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), LpBatchNorm2d(8, p=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_export_onnx_folds_verifies_and_writes_atomically(tmp_path) -> None:
    x = torch.randn(8, 1, 8, 8)
    model = _trained(_bwn_l1_net(), x)
    path = tmp_path / "sub" / "model.onnx"
    res = export_onnx(model, x, path)
    assert res.path == path and path.exists() and res.file_bytes == path.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temporary left
    assert [n for _, n in res.fold_report.folded] == ["1", "4"]
    assert res.fold_report.baked == ["0.weight"]
    assert res.max_abs_diff_onnx is not None and res.max_abs_diff_onnx < 1e-5
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and "Sqrt" not in ops and "ReduceL2" not in ops  # norms and WN are gone
    x2 = torch.randn(3, 1, 8, 8)  # the batch axis is dynamic
    with torch.no_grad():
        expect = model(x2).numpy()
    assert np.abs(_run_onnx(path, x2) - expect).max() < 1e-5


def test_export_onnx_refuses_train_mode_and_bad_inputs(tmp_path) -> None:
    model = _bwn_l1_net().train()
    with pytest.raises(ValueError, match="evaluation mode"):
        export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="tensor"):
        export_onnx(model.eval(), [1, 2], tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())
