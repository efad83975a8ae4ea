"""Range BN (Banner et al. 2018) is a kind of batch norm of its own: it shares the parameter,
buffer and running-statistics code of every batch norm, but it is not an Lp batch norm, so no
converter turns it into one."""

import warnings

import pytest
import torch
from torch import nn

import normmatters
from normmatters.functional import lp_batch_norm
from normmatters.nn import BatchNormBase, LpBatchNorm2d, LpBatchNormBase
from normmatters.precision import NonfiniteRecorder, quantize_model
from normmatters.precision.range_bn import RangeBatchNorm1d, RangeBatchNorm2d, range_batch_norm


def test_range_bn_is_a_batch_norm_but_not_an_lp_batch_norm():
    for m in (RangeBatchNorm2d(4), RangeBatchNorm1d(4, num_chunks=2)):
        assert isinstance(m, BatchNormBase)
        assert not isinstance(m, LpBatchNormBase)
        assert not hasattr(m, "p")
    m = RangeBatchNorm2d(4, 1e-3, None, compute_dtype="fp16")
    assert (m.eps, m.momentum) == (1e-3, None)
    assert "num_chunks=1" in repr(m) and "compute_dtype=fp16" in repr(m)
    with pytest.raises(ValueError, match="num_chunks"):
        RangeBatchNorm2d(4, num_chunks=0)
    with pytest.raises(ValueError, match="constant"):
        RangeBatchNorm2d(4, constant="typo")


def test_range_bn_momentum_none_is_a_cumulative_average_and_eval_uses_the_buffers():
    # torch's batch-norm state semantics, from the shared base
    torch.manual_seed(0)
    m = RangeBatchNorm2d(3, momentum=None)
    xs = [torch.randn(8, 3, 4, 4) * (i + 1) for i in range(3)]
    vars_ = []
    for x in xs:
        rm, rv = torch.zeros(3), torch.ones(3)
        range_batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)  # momentum 1: this batch's values
        vars_.append(rv)
        m(x)
    assert int(m.num_batches_tracked) == 3
    torch.testing.assert_close(m.running_var, torch.stack(vars_).mean(0), rtol=1e-5, atol=1e-6)
    m.eval()
    x = torch.randn(8, 3, 4, 4)
    e = range_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, m.eps)
    torch.testing.assert_close(m(x), e)
    # no squares in evaluation: the same formula as the Lp batch norms' (√running_var + eps)
    ref = lp_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, m.eps, p=1)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_range_bn_in_fp16_with_float32_sums_and_the_recorder():
    x = 400.0 * torch.randn(16, 2, 8, 8)
    m = RangeBatchNorm2d(2, num_chunks=4, compute_dtype="fp16")
    rec = NonfiniteRecorder()
    rec.attach(m)  # Range BN is recorded by default, like the Lp norms
    y = m(x).detach()
    assert torch.isfinite(y).all() and abs(float(y.std()) - 1.0) < 0.1
    t = rec.totals()
    assert t["RangeBatchNorm2d/dispersion"] == {"nonfinite": 0, "underflow": 0, "numel": 2, "calls": 1}
    assert t["RangeBatchNorm2d/output"]["numel"] == x.numel()


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 1), RangeBatchNorm2d(4, num_chunks=2), nn.ReLU(),
                         nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


def _unchanged(before: nn.Module, after: nn.Module, x: torch.Tensor) -> None:
    assert type(after) is RangeBatchNorm2d            # never another kind of norm
    assert after is before
    after.eval()
    y = after(x)
    assert torch.equal(y, range_batch_norm(x, before.running_mean, before.running_var, before.weight,
                                           before.bias, False, 0.1, before.eps))


@pytest.mark.parametrize("converter", ["convert_sync_lp_batchnorm", "convert_norms"])
def test_converters_leave_range_bn_unchanged(converter):
    # convert_sync_lp_batchnorm used to turn Range BN (then an L∞ subclass) into an L∞
    # SyncLpBatchNorm, a silent change of the layer's formula.
    model = _model()
    rbn = model[1]
    x = torch.randn(6, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a converter may say that it leaves the layer
        if converter == "convert_sync_lp_batchnorm":
            model[4] = LpBatchNorm2d(4, p=1)
            out = normmatters.convert_sync_lp_batchnorm(model)
        else:
            out = normmatters.convert_norms(model, p=1)
    _unchanged(rbn, out[1], x)
    assert type(out[4]).__name__ in ("SyncLpBatchNorm", "LpBatchNorm2d")  # the Lp / torch BN converted


def test_quantize_model_still_sees_range_bn_as_a_batch_norm():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), RangeBatchNorm2d(2))
    quantize_model(net)
    assert type(net[1]).__name__ == "QuantizedNorm" and type(net[1].norm) is RangeBatchNorm2d
