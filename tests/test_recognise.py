"""The conversion rule: a module is converted into one that computes the same function at p=2 (its
Lp version otherwise), or left as it is with one warning naming it. Norms are recognised by what
they compute, torch's Transformer fast path never bypasses a converted norm, and a registry
covers classes the probe cannot."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import normmatters as nm
from normmatters.convert import (
    ForeignLpNorm,
    NormConversionWarning,
    convert_sync_lp_batchnorm,
    recognise,
    register_norm,
    to_weight_normalized,
    unregister_norm,
)
from normmatters.deploy import export_onnx, fold_norms, freeze_norms
from normmatters.nn import LpBatchNorm2d, LpLayerNorm, LpRMSNorm, SyncLpBatchNorm

T = pytest.importorskip("transformers")
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.mistral.modeling_mistral import MistralRMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402


def _left_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, NormConversionWarning)]


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


# ------------------------------------------------------------------------------------------
# 1. torch's Transformer fast path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_encoder_layer_runs_converted_norms_in_every_mode(p):
    torch.manual_seed(0)
    layer = nm.convert_norms(nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True), p=p).eval()
    x = torch.randn(4, 10, 32)
    plain = layer(x)  # grad mode: torch's Python path, which calls the norms
    with torch.no_grad():
        a = layer(x)
    with torch.inference_mode():
        b = layer(x)
    torch.testing.assert_close(a, plain.detach(), rtol=1e-5, atol=1e-5)  # was 0.52 apart at p=1
    torch.testing.assert_close(b, plain.detach(), rtol=1e-5, atol=1e-5)


def test_encoder_with_padding_mask_takes_no_nested_fast_path_after_conversion():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True), 2)
    enc = nm.convert_norms(enc, p=1).eval()
    x = torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 5:] = True
    plain = enc(x, src_key_padding_mask=pad).detach()
    with torch.inference_mode():
        fast = enc(x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(fast[keep], plain[keep], rtol=1e-5, atol=1e-5)


def test_fast_path_is_turned_off_on_converted_layers_only_and_back_on_by_to_torch():
    torch.manual_seed(0)
    a = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True)
    b = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True, activation="gelu")
    model = nn.Sequential(a, b)
    model[1] = nm.convert_norms(model[1], p=1)
    assert model[0].activation_relu_or_gelu == 1  # untouched
    assert not model[1].activation_relu_or_gelu
    assert torch.backends.mha.get_fastpath_enabled()  # no global switch
    model[1] = nm.to_torch_norms(nm.convert_norms(model[1], p=2))
    assert model[1].activation_relu_or_gelu == 2 and type(model[1].norm1) is nn.LayerNorm


def test_export_of_a_converted_encoder_layer_passes_its_check(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    layer = nm.convert_norms(nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True), p=1).eval()
    res = export_onnx(layer, torch.randn(2, 6, 32), tmp_path / "enc.onnx", fold=False)
    assert res.max_abs_diff_onnx < 1e-4


# ------------------------------------------------------------------------------------------
# 2. subclasses are recognised by what they compute
# ------------------------------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: a batch norm whose forward adds the activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class PlainSubclass(nn.BatchNorm2d):
    pass


def _net_with(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("p", [1, 2])
def test_channels_first_layer_norm_stays_channels_first(p):
    # width == channels: the old converter normalized the last axis without any error
    ln = _randomize(ConvNextLayerNorm(8, eps=1e-6, data_format="channels_first"))
    x = torch.randn(2, 8, 5, 8)
    out = nm.convert_norms(copy.deepcopy(ln), p=p)
    assert isinstance(out, ForeignLpNorm) and out.axis == "channels_first"
    ref = LpLayerNorm(8, 1e-6, p=p)
    ref.load_state_dict(ln.state_dict())
    expect = ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out(x), expect, rtol=1e-5, atol=1e-5)
    if p == 2:
        torch.testing.assert_close(out(x), ln(x), rtol=1e-5, atol=1e-5)
    assert out.state_dict().keys() == ln.state_dict().keys()


def test_channels_last_subclass_becomes_lp_layer_norm_and_comes_back():
    ln = _randomize(ConvNextLayerNorm(8, eps=1e-6))
    out = nm.convert_norms(copy.deepcopy(ln), p=2)
    assert type(out) is LpLayerNorm
    back = nm.to_torch_norms(out)
    assert type(back) is ConvNextLayerNorm and back.data_format == "channels_last"
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(back(x), ln(x), rtol=0, atol=0)


def test_norm_with_activation_is_left_with_one_warning_by_every_converter():
    model = _net_with(BatchNormAct2d(8)).eval()
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    for name, convert in [
        ("convert_norms", lambda m: nm.convert_norms(m, p=1)),
        ("freeze_norms", freeze_norms),
        ("convert_sync_lp_batchnorm", convert_sync_lp_batchnorm),
        ("to_weight_normalized", to_weight_normalized),
        ("fold_norms", lambda m: fold_norms(m, x)),
    ]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = convert(copy.deepcopy(model))
        left = _left_warnings(record)
        assert len(left) == 1, (name, left)
        assert left[0].startswith(f"{name}: left '1' (BatchNormAct2d)"), left[0]
        assert type(out.get_submodule("1")) is BatchNormAct2d, name
        if name == "fold_norms":
            torch.testing.assert_close(out(x), y, rtol=1e-5, atol=1e-5)


def test_plain_subclass_is_converted_and_restored():
    model = _net_with(PlainSubclass(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)
        out = nm.convert_norms(copy.deepcopy(model), p=2)
    assert type(out[1]) is LpBatchNorm2d
    back = nm.to_torch_norms(out)
    assert type(back[1]) is PlainSubclass
    frozen = freeze_norms(copy.deepcopy(model))
    assert type(frozen[1]).__name__ == "FrozenNorm"


def test_range_batch_norm_keeps_its_kind_in_the_sync_converter():
    precision = pytest.importorskip("normmatters.precision")
    rbn = precision.RangeBatchNorm2d(4)
    with pytest.warns(NormConversionWarning, match=r"left '0' \(RangeBatchNorm2d\)"):
        out = convert_sync_lp_batchnorm(nn.Sequential(rbn))
    assert out[0] is rbn  # was an L∞ SyncLpBatchNorm: another function
    with pytest.warns(NormConversionWarning, match="RangeBatchNorm2d"):
        nm.convert_norms(nn.Sequential(rbn, nn.BatchNorm2d(4)), p=1)


# ------------------------------------------------------------------------------------------
# 3. other libraries' norms
# ------------------------------------------------------------------------------------------

FOREIGN = {
    "llama": lambda: LlamaRMSNorm(16, eps=1e-6),
    "mistral": lambda: MistralRMSNorm(16, eps=1e-5),
    "t5": lambda: T5LayerNorm(16),
    "gemma": lambda: GemmaRMSNorm(16, eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_rms_norms_are_converted_keep_keys_and_load_back(name):
    orig = _randomize(FOREIGN[name]())
    x = torch.randn(3, 5, 16) * 2 + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)
        lp2 = nm.convert_norms(nn.Sequential(copy.deepcopy(orig)), p=2)[0]
    assert isinstance(lp2, (LpRMSNorm, ForeignLpNorm))
    torch.testing.assert_close(lp2(x), orig(x), rtol=1e-5, atol=1e-5)
    assert lp2.state_dict().keys() == orig.state_dict().keys()
    torch.testing.assert_close(lp2.state_dict()["weight"], orig.weight.detach())  # Gemma: w, not 1 + w
    lp1 = nm.convert_norms(copy.deepcopy(orig), p=1)
    scale = (orig.weight.detach() + (1.0 if name == "gemma" else 0.0))
    expect = x / (math.sqrt(math.pi / 2) * x.abs().mean(-1, keepdim=True) + orig_eps(orig)) * scale
    torch.testing.assert_close(lp1(x), expect, rtol=1e-5, atol=1e-5)
    fresh = FOREIGN[name]()
    fresh.load_state_dict(lp1.state_dict(), strict=True)
    back = nm.to_torch_norms(nm.convert_norms(lp1, p=2))
    assert type(back) is type(orig)
    torch.testing.assert_close(back(x), orig(x), rtol=0, atol=0)


def orig_eps(m):
    return getattr(m, "variance_epsilon", None) or m.eps


def test_llama_is_no_longer_said_to_have_no_norm():
    cfg = T.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    model = nm.convert_norms(T.LlamaForCausalLM(cfg), p=1)
    assert sum(isinstance(m, LpRMSNorm) and m.p == 1 for m in model.modules()) == 3


class ScaleNorm(nn.Module):
    """y = g · x / ‖x‖₂ (Nguyen & Salazar 2019): norm-like, but none of the formulas we build."""

    def __init__(self, eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(()))
        self.eps = eps

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


def test_unrecognised_norm_is_left_with_a_warning_and_can_be_registered():
    model = nn.Sequential(nn.Linear(4, 4), ScaleNorm(), nn.LayerNorm(4))
    with pytest.warns(NormConversionWarning, match=r"convert_norms: left '1' \(ScaleNorm\)"):
        out = nm.convert_norms(copy.deepcopy(model), p=1)
    assert type(out[1]) is ScaleNorm and type(out[2]) is LpLayerNorm
    assert isinstance(recognise(ScaleNorm()), str)

    class LpScaleNorm(ScaleNorm):
        pass

    calls = []

    def to_lp(m, p, k, constant):
        calls.append((p, k, constant))
        new = LpScaleNorm(m.eps)
        new.load_state_dict(m.state_dict())
        return new

    register_norm(ScaleNorm, to_lp=to_lp)
    register_norm(LpScaleNorm, to_lp=lambda m, p, k, constant: m, to_torch=lambda m: ScaleNorm(m.eps))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", NormConversionWarning)
            out = nm.convert_norms(copy.deepcopy(model), p=1)
            assert type(out[1]) is LpScaleNorm and calls == [(1.0, None, "calibrated")]
            back = nm.to_torch_norms(convert_norms_p2(out))
        assert type(back[1]) is ScaleNorm
    finally:
        unregister_norm(ScaleNorm)
        unregister_norm(LpScaleNorm)
    with pytest.raises(TypeError):
        register_norm(object)


def convert_norms_p2(model):
    return nm.convert_norms(model, p=2, kinds=("layer",))


def test_modules_that_are_not_norms_never_warn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(),
                          nn.LazyLinear(3), nn.Embedding(3, 4), nn.MultiheadAttention(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)
        nm.convert_norms(model, p=1)


def test_probe_leaves_the_module_and_the_random_state_alone():
    bn = PlainSubclass(4)
    before = copy.deepcopy(bn.state_dict())
    state = torch.random.get_rng_state()
    spec = recognise(bn)
    assert spec.kind == "batch" and not spec.exact
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k])


def test_sync_converter_converts_a_faithful_subclass_and_keeps_tensors():
    bn = PlainSubclass(4)
    out = convert_sync_lp_batchnorm(nn.Sequential(bn))
    assert type(out[0]) is SyncLpBatchNorm and out[0].p == 2 and out[0].weight is bn.weight


# ------------------------------------------------------------------------------------------
# 4. export: any output structure, every tensor compared, no file left behind
# ------------------------------------------------------------------------------------------


@dataclass
class Out:
    logits: torch.Tensor
    extra: tuple


class Structured(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.kind == "dataclass":
            return Out(y.mean((2, 3)), (y.sum(), None))
        if self.kind == "dict":
            return {"a": y, "b": [y.amax((2, 3)), 3]}
        return T.modeling_outputs.ImageClassifierOutputWithNoAttention(logits=y.mean((2, 3)), hidden_states=(y,))


@pytest.mark.parametrize("kind", ["dataclass", "dict", "model_output"])
def test_export_accepts_any_output_structure(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nm.convert_norms(Structured(kind), p=1)
    with torch.no_grad():
        model(torch.randn(8, 1, 6, 6))
    res = export_onnx(model.eval(), torch.randn(2, 1, 6, 6), tmp_path / "m.onnx")
    assert res.path.exists() and res.max_abs_diff_onnx < 1e-4


class Drifting(nn.Module):
    """Its second output is random: onnxruntime's cannot match PyTorch's."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return {"same": self.lin(x), "drifts": self.lin(x) + torch.rand_like(x)}


def test_failed_check_leaves_no_file_and_names_the_difference(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "d.onnx"
    with pytest.raises(ValueError, match="onnxruntime's output differs"):
        export_onnx(Drifting().eval(), torch.randn(2, 4), path, fold=False)
    assert list(tmp_path.iterdir()) == []


class MyLpLayerNorm(LpLayerNorm):
    """A user's subclass: not known to compute what LpLayerNorm computes."""


def test_to_torch_leaves_layers_without_a_torch_counterpart_with_a_warning():
    from normmatters.nn import MeanOnlyBatchNorm2d

    model = nn.Sequential(LpBatchNorm2d(4, p=2), MeanOnlyBatchNorm2d(4), MyLpLayerNorm(4, p=2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = nm.to_torch_norms(model)
    left = _left_warnings(record)
    assert type(out[0]) is nn.BatchNorm2d and type(out[1]) is MeanOnlyBatchNorm2d and type(out[2]) is MyLpLayerNorm
    assert len(left) == 2 and "'1' (MeanOnlyBatchNorm2d)" in left[0] and "'2' (MyLpLayerNorm)" in left[1]
    with pytest.raises(ValueError, match="low-precision emulation"):
        nm.to_torch_norms(nn.Sequential(LpBatchNorm2d(4, p=2, compute_dtype=torch.float16)))
