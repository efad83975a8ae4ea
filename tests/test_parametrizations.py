"""Tests for normmatters.parametrizations: WN, Lp WN and bounded WN (SPEC §3)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normmatters.parametrizations import (
    bounded_weight_norm,
    is_weight_normalized,
    lp_weight_norm,
    output_channel_dim,
    remove_weight_norm,
    weight_norm,
)

INF = float("inf")
PS = [1, 2, INF]


def _apply(kind: str, module: nn.Module, name: str = "weight", p=2):
    if kind == "wn":
        return weight_norm(module, name, p=p)
    if kind == "lpwn":
        return lp_weight_norm(module, name, p=p)
    if kind == "bwn":
        return bounded_weight_norm(module, name, p=p)
    if kind == "bwn_bounded":
        return bounded_weight_norm(module, name, p=p, gain="bounded")
    raise AssertionError(kind)


KINDS = ["wn", "lpwn", "bwn", "bwn_bounded"]


def _channels(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(channels, rest) view of w with `dim` the channel axis, computed independently of the library."""
    return w.movedim(dim, 0).reshape(w.shape[dim], -1)


def _norms(w: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    return torch.linalg.vector_norm(_channels(w, dim), ord=p, dim=1)


def _modules():
    """(factory, name, channel axis, input factory) for every supported layer kind."""
    return {
        "linear": (lambda: nn.Linear(6, 5), "weight", 0, lambda: torch.randn(4, 6)),
        "conv1d": (lambda: nn.Conv1d(3, 5, 3), "weight", 0, lambda: torch.randn(2, 3, 9)),
        "conv2d": (lambda: nn.Conv2d(3, 5, 3), "weight", 0, lambda: torch.randn(2, 3, 7, 7)),
        "conv3d": (lambda: nn.Conv3d(2, 4, 2), "weight", 0, lambda: torch.randn(2, 2, 4, 4, 4)),
        "convT2d": (lambda: nn.ConvTranspose2d(3, 5, 3), "weight", 1, lambda: torch.randn(2, 3, 5, 5)),
        "embedding": (lambda: nn.Embedding(10, 4), "weight", 0, lambda: torch.randint(0, 10, (3, 5))),
        "lstm_ih": (lambda: nn.LSTM(3, 4), "weight_ih_l0", 0, lambda: torch.randn(5, 2, 3)),
        "gru_hh": (lambda: nn.GRU(3, 4), "weight_hh_l0", 0, lambda: torch.randn(5, 2, 3)),
    }


MODS = list(_modules())


def _out(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = module(x)
    return y[0] if isinstance(y, tuple) else y


def _v(module: nn.Module, name: str = "weight") -> nn.Parameter:
    orig = module.parametrizations[name]
    return orig.original if hasattr(orig, "original") else orig.original1


# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("mod", MODS)
def test_bwn_fixed_rho_is_power_mean_and_every_channel_has_norm_rho(mod, p):
    torch.manual_seed(0)
    make, name, dim, _ = _modules()[mod]
    m = make()
    w0 = getattr(m, name).detach().clone()
    bounded_weight_norm(m, name, p=p)
    n_out = w0.shape[dim]
    # rho = ‖V0‖_p (whole tensor) / N^{1/p}
    expected = torch.linalg.vector_norm(w0.flatten(), ord=p) / (1.0 if math.isinf(p) else n_out ** (1 / p))
    rho = m.parametrizations[name][0].rho
    torch.testing.assert_close(rho, expected)
    assert not rho.requires_grad and "rho" in dict(m.parametrizations[name][0].named_buffers())
    torch.testing.assert_close(_norms(getattr(m, name), dim, p), rho.expand(n_out))
    # the direction of each channel is kept
    cos = torch.nn.functional.cosine_similarity(_channels(getattr(m, name), dim), _channels(w0, dim), dim=1)
    torch.testing.assert_close(cos, torch.ones(n_out))


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("mod", MODS)
def test_wn_and_bounded_gain_keep_the_weight_at_application(mod, p):
    torch.manual_seed(0)
    make, name, dim, _ = _modules()[mod]
    for kind in ("lpwn", "bwn_bounded"):
        m = make()
        w0 = getattr(m, name).detach().clone()
        _apply(kind, m, name, p)
        torch.testing.assert_close(getattr(m, name), w0)


@pytest.mark.parametrize("p", PS)
def test_lp_wn_formula_against_direct_computation(p):
    torch.manual_seed(1)
    m = lp_weight_norm(nn.Conv2d(3, 6, 3), p=p)
    g = m.parametrizations.weight.original0
    v = m.parametrizations.weight.original1
    assert g.shape == (6, 1, 1, 1)
    with torch.no_grad():
        g.uniform_(0.5, 2.0)
        v.normal_()
    expected = g.flatten()[:, None] * _channels(v, 0) / _norms(v, 0, p)[:, None]
    torch.testing.assert_close(_channels(m.weight, 0), expected)


@pytest.mark.parametrize("p", PS)
def test_bounded_gain_formula_against_direct_computation(p):
    torch.manual_seed(2)
    m = bounded_weight_norm(nn.Linear(7, 5), p=p, gain="bounded")
    g = m.parametrizations.weight.original0
    v = m.parametrizations.weight.original1
    g0 = torch.linalg.vector_norm(v.detach(), ord=p, dim=1)
    torch.testing.assert_close(m.parametrizations.weight[0].gain_norm, g0.norm())
    with torch.no_grad():
        g.uniform_(0.1, 3.0)
        v.normal_()
    gf = g.flatten()
    expected = (g0.norm() / gf.norm() * gf)[:, None] * v / torch.linalg.vector_norm(v, ord=p, dim=1, keepdim=True)
    torch.testing.assert_close(m.weight, expected)
    # the norm of the per-channel gain vector is held at ‖g0‖₂ whatever g is
    torch.testing.assert_close(torch.linalg.vector_norm(m.weight, ord=p, dim=1).norm(), g0.norm())


def test_grouped_transposed_conv_is_normalised_per_true_output_channel():
    torch.manual_seed(3)
    groups, cin, cout = 2, 4, 6
    m = bounded_weight_norm(nn.ConvTranspose2d(cin, cout, 3, groups=groups))
    # weight (cin, cout/groups, k, k): output channel (gr, j) is weight[gr*cin/g:(gr+1)*cin/g, j]
    w = m.weight.detach()
    rho = m.parametrizations.weight[0].rho
    per = cin // groups
    for gr in range(groups):
        for j in range(cout // groups):
            torch.testing.assert_close(w[gr * per:(gr + 1) * per, j].norm(), rho)


def test_output_channel_dim():
    assert output_channel_dim(nn.Conv2d(2, 3, 1)) == 0
    assert output_channel_dim(nn.ConvTranspose1d(2, 3, 1)) == 1
    assert output_channel_dim(nn.ConvTranspose1d(2, 3, 1), "bias") == 0
    assert output_channel_dim(nn.Embedding(3, 2)) == 0


def test_embedding_padding_row_stays_zero():
    m = bounded_weight_norm(nn.Embedding(10, 4, padding_idx=0))
    assert torch.equal(m.weight[0], torch.zeros(4))
    assert torch.isfinite(m.weight).all()


# ------------------------------------------------------------------ invariants


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mod", MODS)
def test_output_invariant_to_scaling_v(mod, kind, p):
    torch.manual_seed(4)
    make, name, _, inp = _modules()[mod]
    m = _apply(kind, make(), name, p)
    x = inp()
    y0 = _out(m, x)
    v = _v(m, name)
    with torch.no_grad():
        v.mul_(7.3)  # a global scale
        # and an independent positive scale per output channel
        per = torch.rand(v.shape[output_channel_dim(m, name)]) + 0.5
        shape = [1] * v.dim()
        shape[output_channel_dim(m, name)] = -1
        v.mul_(per.view(shape))
    torch.testing.assert_close(_out(m, x), y0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mod", ["linear", "conv2d", "convT2d", "lstm_ih"])
def test_gradient_of_v_is_orthogonal_to_v_per_channel(mod, kind, p):
    # scale invariance f(c·v_i) = f(v_i) gives <∇_{v_i} f, v_i> = 0 (Euler), for every p
    torch.manual_seed(5)
    make, name, dim, inp = _modules()[mod]
    m = _apply(kind, make().double(), name, p)
    x = inp().double()
    (_out(m, x) ** 2).sum().backward()
    v = _v(m, name)
    dots = (_channels(v.grad, dim) * _channels(v.detach(), dim)).sum(1)
    scale = _channels(v.grad, dim).norm(dim=1) * _channels(v.detach(), dim).norm(dim=1)
    assert (dots.abs() <= 1e-10 * scale.clamp_min(1e-30) + 1e-14).all(), dots


@pytest.mark.parametrize("p", PS)
def test_bwn_channel_norms_stay_rho_after_many_optimizer_steps(p):
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    bounded_weight_norm(m[0], p=p)
    bounded_weight_norm(m[3], p=p)
    rho0 = m[0].parametrizations.weight[0].rho.clone()
    rho3 = m[3].parametrizations.weight[0].rho.clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    x, t = torch.randn(16, 3, 7, 7), torch.randint(0, 4, (16,))
    v_before = _v(m[0]).detach().clone()
    for _ in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), t).backward()
        opt.step()
    assert not torch.allclose(_v(m[0]), v_before)  # it did train
    torch.testing.assert_close(m[0].parametrizations.weight[0].rho, rho0)
    torch.testing.assert_close(_norms(m[0].weight, 0, p), rho0.expand(8))
    torch.testing.assert_close(_norms(m[3].weight, 0, p), rho3.expand(4))


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, p):
    torch.manual_seed(7)
    m = _apply(kind, nn.Linear(4, 3).double(), "weight", p)
    plist = m.parametrizations.weight
    originals = [plist.original] if hasattr(plist, "original") else [plist.original0, plist.original1]
    par = plist[0]
    # for p = inf, max|v| is not differentiable at ties; random float64 data has none
    inputs = tuple(o.detach().clone().requires_grad_(True) for o in originals)
    assert torch.autograd.gradcheck(lambda *a: par(*a), inputs)


# ------------------------------------------------------------------ removal and round trips


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mod", MODS)
def test_remove_bakes_current_weight(mod, kind, p):
    torch.manual_seed(8)
    make, name, _, inp = _modules()[mod]
    m = _apply(kind, make(), name, p)
    with torch.no_grad():
        _v(m, name).add_(0.1 * torch.randn_like(_v(m, name)))
    w = getattr(m, name).detach().clone()
    x = inp()
    y = _out(m, x).detach()
    remove_weight_norm(m, name)
    assert not parametrize.is_parametrized(m)
    assert isinstance(getattr(m, name), nn.Parameter) and getattr(m, name).requires_grad
    torch.testing.assert_close(getattr(m, name).detach(), w)
    torch.testing.assert_close(_out(m, x), y)
    assert type(m).__name__ == make().__class__.__name__


@pytest.mark.parametrize("p", PS)
def test_apply_then_remove_round_trips_for_learned_gain(p):
    torch.manual_seed(9)
    for kind in ("wn", "lpwn", "bwn_bounded"):
        m = nn.Conv2d(3, 5, 3)
        w0 = m.weight.detach().clone()
        remove_weight_norm(_apply(kind, m, p=p))
        torch.testing.assert_close(m.weight.detach(), w0)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_and_torch_save(kind):
    torch.manual_seed(10)
    a = _apply(kind, nn.Conv2d(3, 4, 3), p=2)
    with torch.no_grad():
        _v(a).normal_()
    b = _apply(kind, nn.Conv2d(3, 4, 3), p=2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(b.weight, a.weight)
    for key in a.state_dict():
        torch.testing.assert_close(b.state_dict()[key], a.state_dict()[key])


def test_state_dict_names_are_documented():
    wn = weight_norm(nn.Linear(3, 2))
    assert set(wn.state_dict()) == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    bwn = bounded_weight_norm(nn.Linear(3, 2))
    assert set(bwn.state_dict()) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.rho"}
    bb = bounded_weight_norm(nn.Linear(3, 2), gain="bounded")
    assert set(bb.state_dict()) == {
        "bias", "parametrizations.weight.original0", "parametrizations.weight.original1",
        "parametrizations.weight.0.gain_norm",
    }


def test_weight_norm_loads_old_hook_style_state_dict():
    torch.manual_seed(11)
    src = nn.Linear(5, 3)
    sd = {"weight_g": src.weight.norm(dim=1, keepdim=True).detach() * 2, "weight_v": src.weight.detach(), "bias": src.bias.detach()}
    m = weight_norm(nn.Linear(5, 3))
    m.load_state_dict(sd)
    torch.testing.assert_close(m.weight, 2 * src.weight.detach())


def test_rho_is_restored_from_state_dict_not_recomputed():
    torch.manual_seed(12)
    a = bounded_weight_norm(nn.Linear(5, 3))
    b = bounded_weight_norm(nn.Linear(5, 3))
    assert not torch.equal(a.parametrizations.weight[0].rho, b.parametrizations.weight[0].rho)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.parametrizations.weight[0].rho, b.parametrizations.weight[0].rho)


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_is_independent(kind):
    torch.manual_seed(13)
    a = _apply(kind, nn.Conv2d(2, 3, 3))
    b = copy.deepcopy(a)
    torch.testing.assert_close(b.weight, a.weight)
    with torch.no_grad():
        _v(b).normal_()
    assert not torch.allclose(b.weight, a.weight)
    assert is_weight_normalized(b)


# ------------------------------------------------------------------ framework integration


class _CountingHook:
    def __init__(self, par: nn.Module) -> None:
        self.calls = 0
        par.register_forward_hook(self)

    def __call__(self, *args) -> None:
        self.calls += 1


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_iteration_does_not_recompute(kind):
    m = _apply(kind, nn.Linear(4, 3))
    counter = _CountingHook(m.parametrizations.weight[0])
    params = list(m.parameters())
    names = [n for n, _ in m.named_parameters()]
    _ = m.state_dict()
    assert counter.calls == 0
    assert all(isinstance(p, nn.Parameter) for p in params)
    assert "weight" not in names  # only the originals are trained
    m(torch.randn(2, 4))
    assert counter.calls == 1


@pytest.mark.parametrize("kind", KINDS)
def test_parametrize_cached_computes_once(kind):
    m = _apply(kind, nn.Linear(4, 3))
    counter = _CountingHook(m.parametrizations.weight[0])
    x = torch.randn(2, 4)
    with parametrize.cached():
        y1, y2 = m(x), m(x)
    assert counter.calls == 1
    torch.testing.assert_close(y1, y2)


@pytest.mark.parametrize("kind", ["wn", "bwn", "bwn_bounded"])
def test_torch_compile_matches_eager(kind):
    torch.manual_seed(14)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    _apply(kind, m[0])
    _apply(kind, m[3])
    x = torch.randn(3, 3, 6, 6)
    y_eager = m(x)
    y_eager.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_lstm_forward_sees_updated_weights():
    # nn.LSTM caches flat weights; the parametrized weight must be recomputed each forward
    torch.manual_seed(15)
    m = bounded_weight_norm(nn.LSTM(3, 4), "weight_ih_l0")
    x = torch.randn(5, 2, 3)
    y0 = m(x)[0].detach()
    with torch.no_grad():
        _v(m, "weight_ih_l0").normal_()
    assert not torch.allclose(m(x)[0], y0)
    ref = nn.LSTM(3, 4)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "parametrizations" not in k}, strict=False)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(m.weight_ih_l0)
    torch.testing.assert_close(m(x)[0], ref(x)[0])


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("func", [weight_norm, lp_weight_norm, bounded_weight_norm])
def test_missing_parameter_is_a_clear_error(func):
    with pytest.raises(ValueError, match="no tensor named 'kernel'"):
        func(nn.Linear(3, 2), "kernel")
    with pytest.raises(ValueError, match="ReLU has no tensor named 'weight'"):
        func(nn.ReLU())


@pytest.mark.parametrize("bad", [3, 0, -1, 1.5, "fro", "l3"])
def test_unsupported_p_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="p must be 1, 2"):
        lp_weight_norm(nn.Linear(3, 2), p=bad)
    with pytest.raises(ValueError, match="p must be 1, 2"):
        bounded_weight_norm(nn.Linear(3, 2), p=bad)
    with pytest.raises(ValueError, match="p must be 1, 2"):
        weight_norm(nn.Linear(3, 2), p=bad)


def test_p_strings_are_accepted():
    m = lp_weight_norm(nn.Linear(3, 2), p="inf")
    assert m.parametrizations.weight[0].p == INF


@pytest.mark.parametrize("first", KINDS)
@pytest.mark.parametrize("second", KINDS)
def test_applying_twice_is_a_clear_error(first, second):
    m = _apply(first, nn.Linear(3, 2))
    with pytest.raises(ValueError, match="already weight-normalized"):
        _apply(second, m)


def test_torch_weight_norm_then_ours_is_refused():
    m = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="already weight-normalized"):
        bounded_weight_norm(m)


def test_other_bad_input():
    with pytest.raises(ValueError, match="gain must be 'fixed' or 'bounded'"):
        bounded_weight_norm(nn.Linear(3, 2), gain="learned")
    with pytest.raises(ValueError, match="at least one more axis"):
        weight_norm(nn.Linear(3, 2), "bias")
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        weight_norm(nn.Linear(3, 2), dim=2)
    with pytest.raises(ValueError, match="is not weight-normalized"):
        remove_weight_norm(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        weight_norm(torch.zeros(3, 2))


def test_remove_on_a_deepcopy_leaves_the_original_working():
    import copy as _copy

    from normmatters.parametrizations import remove_weight_norm as _remove
    from normmatters.parametrizations import weight_norm as _wn

    m = _wn(nn.Linear(4, 3))
    clone = _copy.deepcopy(m)
    _remove(clone)
    x = torch.randn(2, 4)
    assert torch.isfinite(m(x)).all()
    assert parametrize.is_parametrized(m, "weight")
    torch.testing.assert_close(clone(x), m(x))
