"""8-bit training after Banner et al. 2018: quantized Conv/Linear equal the float
modules when the quantizer represents the values exactly, gradient bifurcation, stochastic
rounding, Range BN and the model converter."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normmatters.precision import round_to_format
from normmatters.precision.quant import (
    QConv1d,
    QConv2d,
    QLinear,
    QuantConfig,
    QuantizedNorm,
    quantize_model,
    quantize_uniform,
)
from normmatters.precision.range_bn import (
    RangeBatchNorm2d,
    expected_range,
    range_batch_norm,
    range_constant,
)

EXACT = QuantConfig(activation="fp8_e4m3", weight="fp8_e4m3", grad=None, weight_grad=None)


def _fp8_values(*shape):
    # multiples of 1/8 in [-2, 2] and small integers: exactly representable in fp8 e4m3
    return torch.randint(-16, 17, shape).float() / 8


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_forward_equals_float_module_when_the_format_is_exact(kind):
    if kind == "linear":
        f, x = nn.Linear(6, 4), _fp8_values(3, 6)
        q = QLinear.from_float(f, EXACT)
    elif kind == "conv1d":
        f, x = nn.Conv1d(2, 3, 3, padding=1), _fp8_values(2, 2, 7)
        q = QConv1d.from_float(f, EXACT)
    else:
        f, x = nn.Conv2d(2, 3, 3, stride=2, padding=1), _fp8_values(2, 2, 6, 6)
        q = QConv2d.from_float(f, EXACT)
    with torch.no_grad():
        f.weight.copy_(_fp8_values(*f.weight.shape))
    q.load_state_dict(f.state_dict())
    assert torch.equal(q(x), f(x))
    # … and not when the values are not representable (the quantizer is really applied)
    assert not torch.equal(q(x + 0.01), f(x + 0.01))


def test_int8_grid_values_pass_unchanged():
    lo, step = -1.0, 2.0 / 255
    j = torch.randint(0, 256, (4, 10)).float()
    j[0, 0], j[0, 1] = 0, 255  # the tensor's min and max are the grid's ends
    x = lo + step * j
    torch.testing.assert_close(quantize_uniform(x, 8), x, rtol=0, atol=1e-6)
    lin = nn.Linear(10, 3)
    q = QLinear.from_float(lin, QuantConfig(weight=None, grad=None))
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=1e-5)


def test_no_quantization_gives_the_float_gradients():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = QConv2d.from_float(conv, QuantConfig(activation=None, weight=None, grad=None, weight_grad=None))
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    g = torch.randn(2, 4, 5, 5)
    a = torch.autograd.grad((conv(x) * g).sum(), (x, conv.weight, conv.bias))
    b = torch.autograd.grad((q(x) * g).sum(), (x, q.weight, q.bias))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_gradient_bifurcation():
    # ∂/∂x uses the 8-bit output gradient, ∂/∂w the float32 one; both through the 8-bit x and w.
    cfg = QuantConfig(grad="int8", weight_grad=None, grad_rounding="nearest")
    conv = QConv2d(2, 3, 3, padding=1, quant=cfg)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    g = torch.randn(2, 3, 6, 6)
    gx, gw = torch.autograd.grad((conv(x) * g).sum(), (x, conv.weight))
    xq, wq = quantize_uniform(x.detach(), 8), quantize_uniform(conv.weight.detach(), 8)
    gq = quantize_uniform(g, 8)
    assert not torch.equal(gq, g)
    torch.testing.assert_close(gx, torch.nn.grad.conv2d_input(x.shape, wq, gq, padding=1))
    torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(xq, conv.weight.shape, g, padding=1))
    lin = QLinear(5, 3, quant=cfg)
    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 3)
    gx, gw = torch.autograd.grad((lin(x) * g).sum(), (x, lin.weight))
    wq, xq, gq = quantize_uniform(lin.weight.detach(), 8), quantize_uniform(x.detach(), 8), quantize_uniform(g, 8)
    torch.testing.assert_close(gx, gq @ wq)
    torch.testing.assert_close(gw, g.t() @ xq)


def test_stochastic_quantization_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([-1.0, 0.3333, 0.71, 1.0])  # range [-1, 1]: step 2/255
    # one tensor of 20000 copies: its range, hence the grid, is that of x
    draws = quantize_uniform(x.repeat(20_000, 1), 8, rounding="stochastic", generator=gen)
    step = 2 / 255
    assert float((draws.mean(0) - x).abs().max()) < 5 * 0.5 * step / math.sqrt(20_000)
    assert torch.allclose(draws[:, 0], torch.tensor(-1.0)) and torch.allclose(draws[:, 3], torch.tensor(1.0))


def test_expected_range_against_known_values_and_monte_carlo():
    assert expected_range(1) == 0.0
    assert abs(expected_range(2) - 2 / math.sqrt(math.pi)) < 1e-9
    assert abs(expected_range(3) - 3 / math.sqrt(math.pi)) < 1e-9  # E[R_3] = 3/√π
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 100, dtype=torch.float64, generator=gen)
    r = z.amax(1) - z.amin(1)
    assert abs(float(r.mean()) - expected_range(100)) < 4 * float(r.std()) / math.sqrt(20_000)
    assert range_constant(100, "paper") == 1 / math.sqrt(2 * math.log(100))


def test_range_batch_norm_unit_scale_running_stats_and_eval():
    x = 3 * torch.randn(64, 4, 8, 8) + 2
    rm, rv = torch.zeros(4), torch.ones(4)
    y = range_batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5, num_chunks=16)
    assert abs(float(y.std()) - 1.0) < 0.05  # the calibrated constant
    # running_var = σ̂²·n/(n−1) with momentum 1; eval then reproduces the batch normalization
    n = 64 * 64
    d = (x - x.mean((0, 2, 3), keepdim=True)).transpose(0, 1).reshape(4, 16, -1)
    sigma = (d.amax(-1) - d.amin(-1)).mean(-1) * range_constant(n // 16)
    torch.testing.assert_close(rv, sigma ** 2 * n / (n - 1), rtol=1e-5, atol=1e-6)
    e = range_batch_norm(x, rm, rv, None, None, False, 0.1, 1e-5)
    torch.testing.assert_close(e, y, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="chunks"):
        range_batch_norm(torch.randn(3, 2, 5), None, None, training=True, num_chunks=4)


def test_range_bn_module_is_a_drop_in_for_batch_norm_state():
    bn = nn.BatchNorm2d(5)
    bn.running_mean.normal_()
    m = RangeBatchNorm2d(5, num_chunks=2)
    m.load_state_dict(bn.state_dict())
    bn2 = nn.BatchNorm2d(5)
    bn2.load_state_dict(m.state_dict())
    assert torch.equal(bn2.running_mean, bn.running_mean)
    x = torch.randn(4, 5, 3, 3, requires_grad=True)
    m(x).sum().backward()
    assert int(m.num_batches_tracked) == 1 and x.grad is not None
    with pytest.raises(ValueError, match="4D"):
        m(torch.randn(4, 5))


def test_quantize_model_converts_and_keeps_parameters_and_mode():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 16, 3))
    net[1].running_mean.normal_()
    net.eval()
    w0, fc0, rm0 = net[0].weight.clone(), net[4].weight.clone(), net[1].running_mean.clone()
    out = quantize_model(net, norm="range", norm_kwargs={"compute_dtype": "fp16"}, skip=("4",))
    assert out is net
    assert isinstance(net[0], QConv2d) and type(net[4]) is nn.Linear
    assert isinstance(net[1], QuantizedNorm) and isinstance(net[1].norm, RangeBatchNorm2d)
    assert torch.equal(net[0].weight, w0) and torch.equal(net[4].weight, fc0)
    assert torch.equal(net[1].norm.running_mean, rm0)
    assert not any(m.training for m in net.modules())
    net.train()
    x = torch.rand(8, 1, 4, 4)
    loss = F.cross_entropy(net(x), torch.randint(0, 3, (8,)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # a second conversion leaves quantized modules alone
    assert isinstance(quantize_model(net)[0], QConv2d)
    with pytest.raises(ValueError, match="norm"):
        quantize_model(nn.Linear(2, 2), norm="l3")
    with pytest.raises(ValueError, match="format"):
        QuantConfig(activation="int")


def test_quantized_norm_quantizes_its_input_and_output_gradient():
    bn = nn.BatchNorm1d(3)
    qn = QuantizedNorm(bn, QuantConfig(activation="fp8_e4m3", grad="fp8_e4m3", grad_rounding="nearest"))
    x = torch.randn(16, 3, requires_grad=True)
    y = qn(x)
    bn2 = nn.BatchNorm1d(3)
    torch.testing.assert_close(y, bn2(round_to_format(x.detach(), "fp8_e4m3")))
    g = torch.randn(16, 3)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    xr = round_to_format(x.detach(), "fp8_e4m3").requires_grad_()
    (ref,) = torch.autograd.grad((nn.BatchNorm1d(3)(xr) * round_to_format(g, "fp8_e4m3")).sum(), xr)
    torch.testing.assert_close(gx, ref)
