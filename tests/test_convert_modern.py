"""convert_norms on the patterns of today's model zoos (issue 26): gated RMS norms, norms without
parameters, user hooks, shared modules, weight-standardized convolutions, k against the normalized
size, and the conversion report.

Real architectures come from Hugging Face ``transformers`` built from tiny configs (random init,
nothing downloaded): Mamba2, Zamba2 (gated norms and a transformer block shared by several layers),
FalconH1, Qwen3-Next, OLMo, BiT. Small stand-ins cover what ``transformers`` does not ship (timm's
``StdConv2d``, a mixer whose fused kernel reads its norm's eps, mamba_ssm's ``norm(x, z)``).
Every conversion is checked three ways: p=2 gives the original's outputs, p=1 changes them (the
converted layers are really in use), and the replacement can be called as the original was.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normmatters as nm
from normmatters.convert import ConversionReport, ForeignLpGatedRMSNorm, NormConversionWarning
from normmatters.convert.recognise import is_norm_like
from normmatters.nn import LpGatedRMSNorm, LpLayerNorm, LpRMSNorm

T = pytest.importorskip("transformers")
rec = importlib.import_module("normmatters.convert.recognise")


def _left(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, NormConversionWarning)]


def _convert(model, **kw):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = nm.convert_norms(model, **kw)
    return out, _left(record)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", None) \
        if getattr(out, "logits", None) is not None else out.last_hidden_state


def _ids(n=12):
    return torch.randint(1, 99, (2, n), generator=torch.Generator().manual_seed(0))


_BUILT: dict[str, nn.Module] = {}


def _model(name: str) -> tuple[nn.Module, tuple]:
    """A tiny transformers model (built once per session, handed out as a copy) and its inputs."""
    if name not in _BUILT:
        torch.manual_seed(0)
        if name == "mamba2":
            cfg = T.Mamba2Config(vocab_size=99, hidden_size=32, state_size=8, num_heads=4, head_dim=16, n_groups=2,
                                 num_hidden_layers=2, expand=2, chunk_size=8)
            model = T.Mamba2ForCausalLM(cfg)
        elif name == "zamba2":
            cfg = T.Zamba2Config(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, attention_head_dim=8, mamba_d_state=8, mamba_headdim=8,
                                 mamba_ngroups=2, n_mamba_heads=8, intermediate_size=37,
                                 layer_types=["mamba", "hybrid", "mamba", "hybrid"], use_mem_eff_path=False,
                                 num_mem_blocks=1, chunk_size=8, max_position_embeddings=64, pad_token_id=0)
            cfg.hybrid_layer_ids = [1, 3]  # (this transformers computes them from its default layer list)
            model = T.Zamba2ForCausalLM(cfg)
        elif name == "falcon_h1":
            cfg = T.FalconH1Config(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, intermediate_size=37, mamba_d_ssm=32,
                                   mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8,
                                   mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False,
                                   max_position_embeddings=64)
            model = T.FalconH1ForCausalLM(cfg)
        elif name == "qwen3_next":
            cfg = T.Qwen3NextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                                    linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, shared_expert_intermediate_size=16)
            model = T.Qwen3NextForCausalLM(cfg)
        elif name == "olmo":
            cfg = T.OlmoConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=1)
            model = T.OlmoForCausalLM(cfg)
        elif name == "bit":
            cfg = T.BitConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                              num_groups=4, layer_type="bottleneck", global_padding="SAME")
            model = T.BitModel(cfg)
        else:
            raise KeyError(name)
        if hasattr(model, "config"):
            model.config._attn_implementation = "eager"
        _BUILT[name] = model.eval()
    args = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),) if name == "bit" else (_ids(),)
    return copy.deepcopy(_BUILT[name]), args


def _run(model, args, training=False):
    model.train(training)
    with torch.no_grad():
        return _first(model(*args)).float()


def _same(a, b, tol=2e-5):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def _signature_keeps_calls(old_cls: type, new: nn.Module) -> None:
    """Every call the original's forward accepts (tensor positionally, gate positionally or by
    name, gate left out where it defaults to None) binds to the replacement's forward."""
    old = inspect.signature(old_cls.forward)
    params = list(old.parameters.values())[1:]
    sig = inspect.signature(new.forward)
    sig.bind(object())
    if len(params) >= 2:
        sig.bind(object(), object())
        sig.bind(object(), **{params[1].name: object()})
        if params[1].default is None:
            sig.bind(object())


# ------------------------------------------------------------------------------------------
# 1. gated RMS norms
# ------------------------------------------------------------------------------------------


def _mamba2_gated() -> type:
    """Mamba2's gated RMS norm: ``MambaRMSNormGated`` up to transformers 5.24, then
    ``Mamba2RMSNormGated``."""
    from transformers.models.mamba2 import modeling_mamba2

    return getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated


def _gated_norms():
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearRMSNormGated
    MambaRMSNormGated = _mamba2_gated()
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNormGated
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    return {
        "mamba2-groups": lambda: MambaRMSNormGated(32, group_size=16, eps=1e-6),
        "nemotron_h": lambda: NemotronHRMSNormGated(32, group_size=32, eps=1e-5),
        "falcon_h1-after": lambda: FalconH1RMSNormGated(32, eps=1e-6, n_groups=2, norm_before_gate=True),
        "falcon_h1-before": lambda: FalconH1RMSNormGated(32, eps=1e-6, n_groups=2, norm_before_gate=False),
        "qwen3_next": lambda: Qwen3NextRMSNormGated(32, eps=1e-6),
        "kimi-sigmoid": lambda: KimiLinearRMSNormGated(32, eps=1e-6),
    }


@pytest.mark.parametrize("name", ["mamba2-groups", "nemotron_h", "falcon_h1-after", "falcon_h1-before",
                                  "qwen3_next", "kimi-sigmoid"])
def test_gated_norms_of_transformers_convert_with_their_gate(name):
    torch.manual_seed(0)
    norm = _gated_norms()[name]()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, g = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    two, left = _convert(copy.deepcopy(norm), p=2)
    assert not left and type(two) is LpGatedRMSNorm
    _signature_keeps_calls(type(norm), two)
    _same(two(x, g), norm(x, g), tol=1e-6)
    _same(two(x, gate=g), norm(x, g), tol=1e-6)
    if inspect.signature(type(norm).forward).parameters["gate"].default is None and "kimi" not in name:
        _same(two(x), norm(x), tol=1e-6)  # the gate left out (Kimi's forward requires it anyway)
    assert two.variance_epsilon == norm.variance_epsilon  # attributes a parent reads survive
    one, _ = _convert(copy.deepcopy(norm), p=1)
    assert isinstance(one, LpGatedRMSNorm) and one.p == 1
    assert float((one(x, g) - norm(x, g)).abs().max()) > 1e-2
    back = nm.to_torch_norms(two)
    assert type(back) is type(norm)
    _same(back(x, g), norm(x, g), tol=0)


def test_mamba2_p2_is_the_original_and_keeps_the_mixers_call(monkeypatch):
    model, args = _model("mamba2")
    ref_eval, ref_train = _run(model, args), _run(model, args, training=True)
    lp, left = _convert(copy.deepcopy(model), p=2)
    assert not left
    gated = [m for m in lp.modules() if isinstance(m, LpGatedRMSNorm)]
    assert len(gated) == 2 and all(m.group_size == 32 and not m.norm_before_gate for m in gated)
    assert all(isinstance(m, (LpRMSNorm, LpGatedRMSNorm)) for m in lp.modules() if is_norm_like(m))
    _same(_run(lp, args), ref_eval)
    _same(_run(lp, args, training=True), ref_train)
    # the attributes the mixer reads for its fused kernel keep their meaning at p=2
    mixer = lp.backbone.layers[0].mixer
    assert mixer.norm.variance_epsilon == model.backbone.layers[0].mixer.norm.variance_epsilon
    assert lp.state_dict().keys() == model.state_dict().keys()
    # What the mixer's fused training kernel would be handed (it returns None on CPU: the mixer
    # then calls its norm): the replacement's own weight and the original's eps.
    import transformers.models.mamba2.modeling_mamba2 as mamba2

    seen = []
    monkeypatch.setattr(mamba2, "mamba2_split_conv1d_scan_combined",
                        lambda *a, rmsnorm_weight=None, rmsnorm_eps=None, **k: seen.append((rmsnorm_weight, rmsnorm_eps)))
    # Each mixer called on its own, without a cache (a whole model's call may bring one, and a
    # mixer with a cache takes the step-by-step path).
    lp.train()
    with torch.no_grad():
        for layer in lp.backbone.layers:
            layer.mixer(torch.randn(2, 5, layer.mixer.hidden_size))
    assert [(w is layer.mixer.norm.weight, e) for (w, e), layer in zip(seen, lp.backbone.layers)] == \
        [(True, model.backbone.layers[0].mixer.norm.variance_epsilon)] * 2


def test_mamba2_gated_norms_are_left_at_p1_because_the_mixer_reads_their_eps():
    model, args = _model("mamba2")
    ref = _run(model, args)
    lp, left = _convert(copy.deepcopy(model), p=1)
    assert len(left) == 2  # one warning per gated norm, naming it and the parent that bypasses it
    name = _mamba2_gated().__name__
    assert all(f"({name})" in w and "Mamba2Mixer" in w and "variance_epsilon" in w for w in left)
    assert all(type(layer.mixer.norm) is _mamba2_gated() for layer in lp.backbone.layers)
    assert type(lp.backbone.norm_f) is LpRMSNorm and lp.backbone.norm_f.p == 1
    assert float((_run(lp, args) - ref).abs().max()) > 1e-3
    # a run without the fused kernel (always on CPU) may ask for them to be converted
    forced, left = _convert(copy.deepcopy(model), p=1, fused_parents="convert")
    assert not left and all(type(layer.mixer.norm) is LpGatedRMSNorm for layer in forced.backbone.layers)
    assert float((_run(forced, args) - _run(lp, args)).abs().max()) > 1e-4


def _fused_gated_rms(x, gate, weight, eps):
    """What a parent's fused kernel computes from the norm's weight and eps: always L2."""
    x = x * F.silu(gate)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class FusedMixer(nn.Module):
    """Mamba2-style: with ``use_fused`` it computes its norm itself from ``norm.weight`` and
    ``norm.variance_epsilon`` (the switch a converter cannot turn per instance)."""

    def __init__(self, d=16):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d)
        self.norm = _mamba2_gated()(d, group_size=d, eps=1e-5)
        self.out_norm = nn.LayerNorm(d)
        self.use_fused = False

    def forward(self, h):
        x, gate = self.proj(h).chunk(2, dim=-1)
        if self.use_fused:
            return self.out_norm(_fused_gated_rms(x, gate, self.norm.weight, self.norm.variance_epsilon))
        return self.out_norm(self.norm(x, gate))


def test_a_parent_with_a_fused_path_keeps_the_same_function_at_p2_and_its_norm_at_p1():
    torch.manual_seed(0)
    model = FusedMixer()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 5, 16)
    ref = model(h)
    two, left = _convert(copy.deepcopy(model), p=2)
    assert not left and type(two.norm) is LpGatedRMSNorm
    for fused in (False, True):  # both paths the parent can take compute the original's function
        two.use_fused = fused
        _same(two(h), ref, tol=1e-6)
    one, left = _convert(copy.deepcopy(model), p=1)
    assert len(left) == 1 and f"({_mamba2_gated().__name__})" in left[0] and "FusedMixer.forward reads self.norm.variance_epsilon" in left[0]
    assert type(one.norm) is type(model.norm) and isinstance(one.out_norm, LpLayerNorm)
    one.use_fused = True
    fused = one(h)
    one.use_fused = False
    _same(fused, one(h), tol=1e-6)  # no silent L2 behind an Lp layer: both paths compute one function


@pytest.mark.parametrize("name", ["zamba2", "falcon_h1", "qwen3_next"])
def test_hybrid_models_with_gated_norms(name):
    model, args = _model(name)
    ref = _run(model, args)
    n_params = sum(p.numel() for p in model.parameters())
    lp, left = _convert(copy.deepcopy(model), p=2)
    assert not left
    assert any(isinstance(m, LpGatedRMSNorm) for m in lp.modules())
    _same(_run(lp, args), ref)
    assert sum(p.numel() for p in lp.parameters()) == n_params
    one, left = _convert(copy.deepcopy(model), p=1, fused_parents="convert")
    assert not left and float((_run(one, args) - ref).abs().max()) > 1e-3
    gated = [m for m in one.modules() if isinstance(m, LpGatedRMSNorm)]
    assert gated and all(m.p == 1 for m in gated)
    one.load_state_dict(model.state_dict(), strict=True)  # checkpoints load both ways
    model.load_state_dict(one.state_dict(), strict=True)
    one.train()
    loss = _first(one(*args)).float().pow(2).mean()
    loss.backward()
    grads = [q.grad for m in gated for q in m.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


class NormWithResidual(nn.Module):
    """A fused add + RMS norm: ``norm(x, residual)`` returns a tuple; not a gate."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x, residual=None, prenorm=False):
        x = x if residual is None else x + residual
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return (y, x) if prenorm else y


class MambaSsmRMSNormGated(nn.Module):
    """mamba_ssm's ``layernorm_gated.RMSNorm`` (its reference formula): ``norm(x, z=None)``, ``eps``,
    ``group_size``, ``norm_before_gate``, a ``bias`` registered as None."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z)
        g = x.unflatten(-1, (-1, self.group_size or x.shape[-1]))
        y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight
        return y * F.silu(z) if z is not None and self.norm_before_gate else y


@pytest.mark.parametrize("before", [True, False])
def test_a_gate_argument_under_another_name_keeps_its_name(before):
    torch.manual_seed(0)
    norm = MambaSsmRMSNormGated(32, group_size=8, norm_before_gate=before)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, z = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    two, left = _convert(copy.deepcopy(norm), p=2)
    assert not left and type(two) is ForeignLpGatedRMSNorm and two.gate_name == "z" and two.group_size == 8
    _signature_keeps_calls(type(norm), two)
    for call in (lambda m: m(x, z), lambda m: m(x, z=z), lambda m: m(x)):
        _same(call(two), call(norm), tol=1e-6)
    with pytest.raises(TypeError, match="gate"):
        two(x, gate=z)  # the original would refuse it too
    one, _ = _convert(copy.deepcopy(norm), p=1)
    assert float((one(x, z=z) - norm(x, z=z)).abs().max()) > 1e-2
    assert type(nm.to_torch_norms(two)) is MambaSsmRMSNormGated


class NormWithKwargs(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x, **kwargs):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.parametrize("cls, words", [(NormWithResidual, "forward(x, residual=None, prenorm=False)"),
                                        (NormWithKwargs, "**kwargs")])
def test_a_norm_whose_call_the_replacement_cannot_take_is_left_with_its_name(cls, words):
    model = nn.Sequential(nn.Linear(8, 8), cls(8), nn.LayerNorm(8))
    out, left = _convert(model, p=1)
    assert len(left) == 1 and f"'1' ({cls.__name__})" in left[0] and words in left[0], left
    assert type(out[1]) is cls and isinstance(out[2], LpLayerNorm)


def test_other_converters_leave_gated_norms_with_a_warning():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    model = nn.Sequential(nn.LayerNorm(8), Qwen3NextRMSNormGated(8))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        frozen = nm.freeze_norms(copy.deepcopy(model).eval())
    left = _left(record)
    assert len(left) == 1 and "Qwen3NextRMSNormGated" in left[0] and "gate" in left[0]
    assert type(frozen[1]) is Qwen3NextRMSNormGated


# ------------------------------------------------------------------------------------------
# 2. norms without parameters
# ------------------------------------------------------------------------------------------


def test_olmo_layer_norms_without_parameters_are_converted():
    model, args = _model("olmo")
    ref = _run(model, args)
    lp, left = _convert(copy.deepcopy(model), p=2)
    norms = [m for m in lp.modules() if isinstance(m, LpLayerNorm)]
    assert not left and len(norms) == 5
    assert all(m.weight is None and m.bias is None and m.eps == 1e-5 for m in norms)  # eps found by probe
    assert not any(type(m).__name__ == "OlmoLayerNorm" for m in lp.modules())
    _same(_run(lp, args), ref)
    _signature_keeps_calls(type(model.model.norm), norms[0])
    one, _ = _convert(copy.deepcopy(model), p=1)
    assert float((_run(one, args) - ref).abs().max()) > 1e-3
    back = nm.to_torch_norms(lp)
    assert type(back.model.norm).__name__ == "OlmoLayerNorm"
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)
        frozen = nm.freeze_norms(copy.deepcopy(model))  # the other converters know them too
    _same(_run(frozen, args), ref)


class ShapelessNorm(nn.Module):
    """No parameters and no normalized_shape: its size cannot be told without running it."""

    def __init__(self):
        super().__init__()
        self.eps = 1e-5

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)


def test_parameter_free_norms_that_cannot_be_converted_are_named_in_the_error():
    with pytest.raises(ValueError, match=r"left: 1 \(ShapelessNorm\)"):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            nm.convert_norms(nn.Sequential(nn.Linear(4, 4), ShapelessNorm()), p=1)
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", NormConversionWarning)
        nm.convert_norms(nn.Sequential(*[ShapelessNorm() for _ in range(7)]), p=1, report=True)
    assert "and 2 more" in str(info.value) and len(info.value.report.left) == 7
    _, left = _convert(nn.Sequential(ShapelessNorm(), nn.LayerNorm(4)), p=1)
    assert len(left) == 1 and "(ShapelessNorm)" in left[0] and "normalized_shape" in left[0]


# ------------------------------------------------------------------------------------------
# 3. hooks
# ------------------------------------------------------------------------------------------


def test_hooks_move_to_the_replacement_and_recognition_never_runs_them():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    calls: list[str] = []
    model = nn.Sequential(nn.Linear(8, 8), LlamaRMSNorm(8, eps=1e-6), nn.Linear(8, 2))
    norm = model[1]
    handles = [
        norm.register_forward_pre_hook(lambda m, a: calls.append("pre")),
        norm.register_forward_pre_hook(lambda m, a, kw: (calls.append("pre-kw"), ((a[0] * 2,), kw))[1],
                                       with_kwargs=True),
        norm.register_forward_hook(lambda m, a, out: calls.append("fwd")),
        norm.register_forward_hook(lambda m, a, kw, out: calls.append("fwd-kw"), with_kwargs=True),
        norm.register_forward_hook(lambda m, a, out: calls.append("always"), always_call=True),
        norm.register_state_dict_post_hook(lambda m, sd, prefix, meta: calls.append("state")),
        norm.register_load_state_dict_post_hook(lambda m, keys: calls.append("load")),
        norm.register_full_backward_hook(lambda m, gi, go: calls.append("bwd")),
    ]
    x = torch.randn(3, 8)
    y = model(x)
    calls.clear()
    out, left = _convert(model, p=2)  # the probe and everything else must not call them
    assert not left and calls == []
    assert type(out[1]) is LpRMSNorm and out[1] is not norm
    _same(out(x), y, tol=1e-6)  # the pre-hook that doubles the input still applies
    assert calls == ["pre", "pre-kw", "fwd", "fwd-kw", "always"]
    calls.clear()
    sd = out.state_dict()
    out.load_state_dict(sd)
    assert calls == ["state", "load"]
    calls.clear()
    out(x.requires_grad_()).sum().backward()
    assert "bwd" in calls
    for h in handles:  # the user's handles remove them from the replacement
        h.remove()
    calls.clear()
    out(x), out.state_dict()
    assert calls == []


class PrivateScaleRMS(nn.Module):
    """Its formula depends on a private attribute: instances that differ in it are not alike."""

    def __init__(self, d, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6
        self._scale = scale

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight * self._scale


def test_recognition_is_remembered_only_for_modules_alike_in_every_attribute():
    model = nn.Sequential(PrivateScaleRMS(8, 1.0), PrivateScaleRMS(8, 1.0), PrivateScaleRMS(8, 3.0))
    out, left = _convert(model, p=1)
    assert isinstance(out[0], LpRMSNorm) and isinstance(out[1], LpRMSNorm)
    assert len(left) == 1 and "'2' (PrivateScaleRMS)" in left[0]


def test_a_hook_holding_the_model_is_not_copied():
    seen = []
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].register_forward_hook(lambda m, a, o: seen.append(model))
    out, _ = _convert(model, p=1)
    out(torch.randn(2, 4))
    assert seen == [model] and seen[0] is out


def test_to_torch_norms_moves_hooks_back():
    calls = []
    model = nn.Sequential(nn.LayerNorm(4))
    model[0].register_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    back = nm.to_torch_norms(nm.convert_norms(model, p=2))
    assert calls == [] and not hasattr(back[0], "p")  # nothing of the Lp layer left on it
    back(torch.randn(2, 4))
    assert calls == ["LayerNorm"]


# ------------------------------------------------------------------------------------------
# 4. shared modules
# ------------------------------------------------------------------------------------------


class Tied(nn.Module):
    """One norm used at two places, and one block used twice."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.a = nn.Sequential(nn.Linear(8, 8), self.norm)
        self.b = nn.Sequential(nn.Linear(8, 8), self.norm)
        block = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8))
        self.blocks = nn.ModuleList([block, block])

    def forward(self, x):
        x = self.b(self.a(x))
        for blk in self.blocks:
            x = blk(x)
        return x


def test_shared_modules_are_replaced_once_and_stay_shared():
    torch.manual_seed(0)
    model = Tied()
    x = torch.randn(3, 8)
    n_params = sum(p.numel() for p in model.parameters())
    y = model(x)
    out, report = nm.convert_norms(copy.deepcopy(model), p=2, report=True)
    assert out.a[1] is out.b[1] is out.norm and isinstance(out.norm, LpLayerNorm)
    assert out.blocks[0] is out.blocks[1] and isinstance(out.blocks[0][1], LpRMSNorm)
    assert sum(p.numel() for p in out.parameters()) == n_params
    _same(out(x), y, tol=1e-6)
    rows = {r.cls: r for r in report.rows}
    assert rows["LayerNorm"].paths == ["norm", "a.1", "b.1"] and rows["RMSNorm"].paths == ["blocks.0.1", "blocks.1.1"]
    one = nm.convert_norms(copy.deepcopy(model), p=1)
    assert one.a[1] is one.b[1] and float((one(x) - y).abs().max()) > 1e-3
    back = nm.to_torch_norms(out)
    assert type(back.norm) is nn.LayerNorm and back.a[1] is back.b[1] is back.norm
    assert back.blocks[0] is back.blocks[1]


def _ties(model):
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(names for names in groups.values() if len(names) > 1)


@pytest.mark.parametrize("p", [2, 1])
def test_zamba2_shared_transformer_keeps_its_tied_norm_weights(p):
    # Zamba2's hybrid layers hold one transformer block each whose parameters are the same tensors
    # (the norms' weights included): the converted norms keep those very tensors.
    model, args = _model("zamba2")
    ties = _ties(model)
    assert any("shared_transformer.input_layernorm.weight" in names[0] for names in ties)
    out, left = _convert(copy.deepcopy(model), p=p, fused_parents="convert")
    assert not left and _ties(out) == ties
    assert sum(q.numel() for q in out.parameters()) == sum(q.numel() for q in model.parameters())
    layers = [layer.shared_transformer for layer in out.model.layers if hasattr(layer, "shared_transformer")]
    assert isinstance(layers[0].input_layernorm, LpRMSNorm)
    assert layers[0].input_layernorm.weight is layers[1].input_layernorm.weight
    if p == 2:
        back = nm.to_torch_norms(out)
        assert _ties(back) == ties and [type(m) for m in back.modules()] == [type(m) for m in model.modules()]


def test_the_sync_converter_keeps_shared_batch_norms_shared_and_their_hooks():
    calls = []
    bn = nn.BatchNorm1d(4)
    bn.register_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 4), bn), "b": nn.Sequential(bn)})
    out = nm.convert_sync_lp_batchnorm(model)
    assert out["a"][1] is out["b"][0] and type(out["b"][0]) is nm.nn.SyncLpBatchNorm
    assert calls == []
    out["b"].eval()(torch.randn(3, 4))
    assert calls == ["SyncLpBatchNorm"]


def test_an_optimizer_built_before_conversion_still_trains_the_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = nm.convert_norms(model, p=1)
    out(torch.randn(8, 4)).pow(2).sum().backward()
    before = out[1].weight.detach().clone()
    opt.step()
    assert not torch.equal(out[1].weight, before)


# ------------------------------------------------------------------------------------------
# 5. weight-standardized convolutions and the cost of recognition
# ------------------------------------------------------------------------------------------


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardized per output channel at every call (an eps)."""

    def __init__(self, *args, eps=1e-6, **kw):
        super().__init__(*args, **kw)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv(nn.Module):
    """A standardized convolution that is not an nn.Conv2d subclass: a rank-4 weight and an eps."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3))
        self.gain = nn.Parameter(torch.ones(c, 1, 1, 1))
        self.eps = 1e-6

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + self.eps)
        return F.conv2d(x, w * self.gain, padding=1)


def test_standardized_convolutions_are_not_probed(monkeypatch):
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d

    probed = []
    real = rec._disagreement
    monkeypatch.setattr(rec, "_disagreement", lambda m, *a, **k: (probed.append(type(m).__name__), real(m, *a, **k))[1])
    rec._PROBED.clear()
    convs = [WeightStandardizedConv2d(4, 4, 3), StdConv2d(4, 4, 3, padding=1), ScaledStdConv(4)]
    assert not any(is_norm_like(c) for c in convs)
    model = nn.Sequential(*convs, nn.GroupNorm(2, 4))
    out, left = _convert(model, p=1)
    assert not left and probed == []
    model, args = _model("bit")
    ref = _run(model, args)
    rec._PROBED.clear()
    probed.clear()
    out, left = _convert(copy.deepcopy(model), p=2)
    assert set(probed) == {"BitGroupNormActivation"}  # never a convolution
    n_norms = sum(type(m).__name__ == "BitGroupNormActivation" for m in model.modules())
    assert len(probed) <= n_norms // 2  # each distinct configuration probed once
    # the norms followed by their ReLU stay, named; those without an activation are converted
    assert left and all("(BitGroupNormActivation)" in w and "followed by its 'activation' (ReLU)" in w for w in left)
    _same(_run(out, args), ref)
    one, _ = _convert(copy.deepcopy(model), p=1)
    assert float((_run(one, args) - ref).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------
# 6. k against the normalized size; the closest formula in a warning
# ------------------------------------------------------------------------------------------


def test_k_larger_than_a_normalized_size_is_an_error_naming_the_layers_and_nothing_changes():
    model, args = _model("qwen3_next")  # head norms of size 8, gated norms of 8, hidden norms of 32
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as info:
        nm.convert_norms(model, p="inf", k=10, fused_parents="convert")
    msg = str(info.value)
    assert "k=10" in msg and "'model.layers.3.self_attn.q_norm' (Qwen3NextRMSNorm" in msg and "8 values" in msg
    assert "'model.layers.0.linear_attn.norm' (Qwen3NextRMSNormGated" in msg
    assert "input_layernorm" not in msg  # 32 values: fine
    assert [type(m) for m in model.modules()] == before  # decided before anything was replaced
    gated = nn.Sequential(LpGatedRMSNorm(32, group_size=8))
    with pytest.raises(ValueError, match=r"'0' \(LpGatedRMSNorm.*groups of 8.*: 8 values"):
        nm.convert_norms(gated, p="inf", k=9)
    out = nm.convert_norms(nn.Sequential(nn.LayerNorm(32)), p="inf", k=10)
    assert out[0].k == 10


class AlmostRMS(nn.Module):
    """An RMS norm with an extra shift: closest to an RMS norm, not to the first formula tried."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + 0.01


def test_the_warning_names_the_closest_formula():
    _, left = _convert(nn.Sequential(AlmostRMS(16), nn.LayerNorm(16)), p=1)
    assert len(left) == 1 and "closest" in left[0] and "differs from a RMS norm by 0.01" in left[0], left


# ------------------------------------------------------------------------------------------
# the conversion report
# ------------------------------------------------------------------------------------------


def test_report_lists_each_norm_what_it_became_or_why_it_was_left():
    model, args = _model("mamba2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormConversionWarning)
        out, report = nm.convert_norms(model, p=1, report=True)
    assert isinstance(report, ConversionReport)
    assert [r.outcome for r in report.rows].count("converted") == 3 and len(report.left) == 2
    text = str(report)
    for path in ("backbone.layers.0.norm", "backbone.layers.0.mixer.norm", "backbone.norm_f"):
        assert path in text
    assert f"{_mamba2_gated().__name__}  left" in text and "LpRMSNorm((32,), eps=1e-05" in text
    assert "3 converted, 2 left" in text and report.skipped > 0 and report.seconds >= 0
    _, kept = nm.convert_norms(nn.Sequential(nn.LayerNorm(4), nn.BatchNorm1d(4)), p=1, kinds=("layer",),
                               report=True)
    assert [r.outcome for r in kept.rows] == ["converted", "kept"]


# ------------------------------------------------------------------------------------------
# LpGatedRMSNorm itself
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_gated_norm_without_a_gate_is_a_grouped_rms_norm(p):
    torch.manual_seed(0)
    norm = LpGatedRMSNorm(12, 1e-5, group_size=4, p=p)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 12)
    ref = LpRMSNorm(4, 1e-5, elementwise_affine=False, p=p)(x.unflatten(-1, (3, 4))).flatten(-2) * norm.weight
    _same(norm(x), ref, tol=1e-6)
    g = torch.randn(3, 12)
    after = LpGatedRMSNorm(12, 1e-5, group_size=4, p=p, norm_before_gate=True)
    after.load_state_dict(norm.state_dict())
    _same(after(x, g), ref * F.silu(g), tol=1e-6)
    before = LpGatedRMSNorm(12, 1e-5, group_size=4, p=p, norm_before_gate=False, activation="sigmoid")
    before.load_state_dict(norm.state_dict())
    _same(before(x, g), norm(x * torch.sigmoid(g)), tol=1e-6)


def test_gated_norm_half_precision_is_computed_in_float32_and_its_errors_name_it():
    norm = LpGatedRMSNorm(8, p=1)
    x, g = torch.randn(2, 8), torch.randn(2, 8)
    y = norm(x.bfloat16(), g.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x.bfloat16().float(), g.bfloat16().float()), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="LpGatedRMSNorm: group_size=3 must divide normalized_shape=8"):
        LpGatedRMSNorm(8, group_size=3)
    with pytest.raises(ValueError, match="LpGatedRMSNorm: k=5 is larger than the 4 values"):
        LpGatedRMSNorm(8, group_size=4, p="inf", k=5)
    with pytest.raises(ValueError, match="activation"):
        LpGatedRMSNorm(8, activation="gelu")
    with pytest.raises(ValueError, match=r"last dimension is 8, got input of shape \[2, 6\]"):
        norm(torch.randn(2, 6))
    assert "group_size" not in repr(norm) and "p=1" in repr(norm)


def test_a_32_layer_llama_costs_one_probe_per_kind_of_norm(monkeypatch):
    probed = []
    real = rec._disagreement
    monkeypatch.setattr(rec, "_disagreement", lambda m, *a, **k: (probed.append(type(m).__name__), real(m, *a, **k))[1])
    rec._PROBED.clear()
    cfg = T.LlamaConfig(vocab_size=99, hidden_size=16, intermediate_size=16, num_hidden_layers=32,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg)
    out, report = nm.convert_norms(model, p=1, report=True)
    assert len(report.converted) == 65 and report.skipped > 300
    # the candidates of one configuration (layer norm, with and without an offset, then RMS norm),
    # once for all 65 norms
    assert set(probed) == {"LlamaRMSNorm"} and len(probed) <= 4
