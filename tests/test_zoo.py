"""The converters on real model code: Hugging Face transformers models from tiny configs (random
init, nothing downloaded) and torch's own Transformer.

For every model: p=2 conversion computes what the original computes, in training (dropout 0,
running statistics included) and in evaluation (``inference_mode``, where torch's Transformer takes
its fused fast path); L1 / L∞ / Top(10) versions train a few steps with finite gradients; state
dicts load strictly both ways and ``to_torch_norms`` gives back the original classes. ``torch.compile``
agrees with eager on three representative models (an RMS-norm decoder, a channels-first CNN and
torch's Transformer: compiling is slow); the CNNs fold and export to ONNX.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import normmatters as nm
from normmatters.convert import ForeignLpNorm, NormConversionWarning
from normmatters.convert.recognise import is_norm_like
from normmatters.deploy import export_onnx, fold_norms
from normmatters.deploy.fold import flatten_outputs
from normmatters.nn import LpBatchNorm2d, LpGroupNorm, LpLayerNorm, LpRMSNorm

T = pytest.importorskip("transformers")

OURS = (LpBatchNorm2d, LpGroupNorm, LpLayerNorm, LpRMSNorm, ForeignLpNorm)


class TorchTransformer(nn.Module):
    """torch's encoder-decoder Transformer, its output a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Transformer(32, 4, 2, 2, 64, 0.0, batch_first=True)

    def forward(self, src, tgt):
        return self.net(src, tgt)


class TorchEncoder(nn.Module):
    """torch's TransformerEncoder with a padding mask: in evaluation it takes the nested-tensor path."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32))

    def forward(self, src, pad):
        # padded positions are zeros on the nested path and values on the plain one: compare the rest
        return self.net(src, src_key_padding_mask=pad).masked_fill(pad[..., None], 0.0)


def _ids(g, n=12):
    return torch.randint(1, 99, (2, n), generator=g)


def _model(name: str):
    """(class, config) or a module factory, and example inputs."""
    g = torch.Generator().manual_seed(0)
    if name == "bert":
        cfg = T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           max_position_embeddings=64, num_labels=3)
        return (T.BertForSequenceClassification, cfg), (_ids(g),)
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
        return (T.GPT2LMHeadModel, cfg), (_ids(g),)
    if name == "vit":
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, num_labels=3)
        return (T.ViTForImageClassification, cfg), (torch.randn(2, 3, 16, 16, generator=g),)
    if name == "llama":
        cfg = T.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return (T.LlamaForCausalLM, cfg), (_ids(g),)
    if name == "mistral":
        cfg = T.MistralConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              sliding_window=8)
        return (T.MistralForCausalLM, cfg), (_ids(g),)
    if name == "t5":
        cfg = T.T5Config(vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0,
                         decoder_start_token_id=0, pad_token_id=0)
        ids = _ids(g)
        return (T.T5ForConditionalGeneration, cfg), (ids, None, ids[:, :7])
    if name == "convnext":
        cfg = T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=2,
                               image_size=16, num_labels=3, drop_path_rate=0.0)
        return (T.ConvNextForImageClassification, cfg), (torch.randn(2, 3, 16, 16, generator=g),)
    if name == "resnet":
        cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic", num_labels=3)
        return (T.ResNetForImageClassification, cfg), (torch.randn(4, 3, 32, 32, generator=g) + 0.5,)
    if name == "wav2vec2":
        cfg = T.Wav2Vec2Config(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=20, conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 3),
                               feat_extract_norm="group", num_conv_pos_embeddings=16,
                               num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0,
                               activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                               mask_time_prob=0.0, mask_feature_prob=0.0)
        return (T.Wav2Vec2Model, cfg), (torch.randn(2, 800, generator=g),)
    if name == "olmo":  # layer norms without parameters
        cfg = T.OlmoConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                           eos_token_id=1)
        return (T.OlmoForCausalLM, cfg), (_ids(g),)
    if name == "torch_transformer":
        return TorchTransformer, (torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 32, generator=g))
    if name == "torch_encoder":
        pad = torch.zeros(2, 10, dtype=torch.bool)
        pad[0, 7:] = True
        return TorchEncoder, (torch.randn(2, 10, 32, generator=g), pad)
    raise KeyError(name)


MODELS = ["bert", "gpt2", "vit", "llama", "mistral", "t5", "convnext", "resnet", "wav2vec2", "olmo",
          "torch_transformer", "torch_encoder"]


def build(name: str) -> tuple[nn.Module, tuple, type | None]:
    spec, args = _model(name)
    torch.manual_seed(0)
    if isinstance(spec, tuple):
        cls, cfg = spec
        model = cls(cfg)
        model.config._attn_implementation = "eager"
        return model, args, cls
    return spec(), args, None


def _outputs(model, args):
    return [t for t in flatten_outputs(model(*args)) if t.is_floating_point()]


def _assert_same(a, b, tol=2e-5):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        bound = tol * max(1.0, float(y.detach().abs().max()))
        assert float((x - y).detach().abs().max()) <= bound


def _convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)  # nothing in these models is left
        return nm.convert_norms(model, **kw)


def _norm_modules(model):
    return [m for m in model.modules() if is_norm_like(m)]


@pytest.mark.parametrize("name", MODELS)
def test_p2_conversion_is_the_original_in_train_and_eval(name):
    model, args, _ = build(name)
    lp = _convert(copy.deepcopy(model), p=2)
    norms = _norm_modules(lp)
    assert norms and all(isinstance(m, OURS) for m in norms), [type(m).__name__ for m in norms]
    model.train(), lp.train()
    torch.manual_seed(1)
    a = _outputs(model, args)
    torch.manual_seed(1)
    b = _outputs(lp, args)
    _assert_same(b, a)
    sa, sb = model.state_dict(), lp.state_dict()  # running statistics updated alike
    assert sa.keys() == sb.keys()
    for key in sa:
        if sa[key].is_floating_point():
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6, msg=key)
    model.eval(), lp.eval()
    with torch.inference_mode():
        _assert_same(_outputs(lp, args), _outputs(model, args))
    with torch.no_grad():
        ref = _outputs(model, args)
    _assert_same(_outputs(lp, args), [r.detach() for r in ref])


@pytest.mark.parametrize("kind", ["l1", "linf", "top10"])
@pytest.mark.parametrize("name", MODELS)
def test_lp_versions_train_with_finite_gradients(name, kind):
    model, args, _ = build(name)
    p, k = {"l1": (1, None), "linf": (math.inf, None), "top10": (math.inf, 10)}[kind]
    lp = _convert(model, p=p, k=k).train()
    norms = [m for m in lp.modules() if isinstance(m, OURS)]
    assert norms and all(m.p == p and m.k == k for m in norms)
    opt = torch.optim.AdamW(lp.parameters(), lr=1e-4)
    losses = []
    for _ in range(3):
        loss = sum(t.float().pow(2).mean() for t in _outputs(lp, args))
        opt.zero_grad()
        loss.backward()
        grads = [q.grad for q in lp.parameters() if q.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
        own = [q for m in norms for q in m.parameters()]  # (OLMo's norms have none)
        assert not own or any(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in own)
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", MODELS)
def test_state_dicts_load_strictly_both_ways_and_classes_come_back(name):
    model, args, _ = build(name)
    original_classes = [type(m) for m in model.modules()]
    lp = _convert(copy.deepcopy(model), p=1)
    fresh, _, _ = build(name)
    fresh.load_state_dict(lp.state_dict(), strict=True)  # a converted checkpoint in the original class
    lp.load_state_dict(model.state_dict(), strict=True)  # an original checkpoint in the converted model
    back = nm.to_torch_norms(_convert(copy.deepcopy(model), p=2))
    assert [type(m) for m in back.modules()] == original_classes
    back.eval(), model.eval()
    with torch.no_grad():
        _assert_same(_outputs(back, args), _outputs(model, args), tol=0)


@pytest.mark.parametrize("name", MODELS)
def test_freezing_keeps_the_function_and_the_keys(name):
    model, args, _ = build(name)
    model.eval()
    classes = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)
        frozen = nm.freeze_norms(copy.deepcopy(model))
    assert frozen.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        _assert_same(_outputs(frozen, args), _outputs(model, args))
    back = nm.unfreeze_norms(frozen)
    assert [type(m) for m in back.modules()] == classes


@pytest.mark.parametrize("name", ["llama", "convnext", "torch_transformer"])
def test_compile_agrees_with_eager(name):
    torch._dynamo.reset()
    model, args, _ = build(name)
    lp = _convert(model, p=1).eval()
    with torch.no_grad():
        eager = _outputs(lp, args)
        compiled = _outputs(torch.compile(lp), args)  # inductor: ~25 s a model on 2 cores
    _assert_same(compiled, eager, tol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_cnns_fold_and_export(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model, args, _ = build(name)
    lp = _convert(model, p=1).eval()
    if name == "resnet":
        folded, report = fold_norms(lp, args, return_report=True)
        assert len(report.folded) == sum(isinstance(m, LpBatchNorm2d) for m in lp.modules())
        assert not any(isinstance(m, LpBatchNorm2d) for m in folded.modules())
    else:  # layer norms only: nothing to fold, each one reported
        with pytest.raises(ValueError, match="nothing to fold"):
            fold_norms(lp, args)
    res = export_onnx(lp, args, tmp_path / f"{name}.onnx")
    assert res.path.exists() and res.max_abs_diff_onnx is not None and res.max_abs_diff_onnx < 1e-4
