"""MeanOnlyBatchNorm{1,2,3}d: subtract the batch mean (running mean in eval), add a bias."""

import pytest
import torch

from normmatters.nn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d


def test_train_subtracts_batch_mean_and_adds_bias():
    m = MeanOnlyBatchNorm2d(3)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(8, 3, 4, 4) * 2 + 5
    y = m(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.tensor([1.0, 2.0, 3.0]))
    # The scale is untouched: only a shift.
    torch.testing.assert_close(y.std((0, 2, 3)), x.std((0, 2, 3)))
    torch.testing.assert_close(m.running_mean, 0.1 * x.mean((0, 2, 3)))


def test_eval_uses_running_mean_and_scale_option():
    m = MeanOnlyBatchNorm1d(4, momentum=None, scale=True)
    xs = [torch.randn(16, 4) + s for s in (1.0, 3.0)]
    for x in xs:
        m(x)
    torch.testing.assert_close(m.running_mean, (xs[0].mean(0) + xs[1].mean(0)) / 2)
    with torch.no_grad():
        m.weight.fill_(2.0)
    m.eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(m(x), 2.0 * (x - m.running_mean) + m.bias)


def test_state_dict_keys_and_errors():
    m = MeanOnlyBatchNorm3d(2)
    assert set(m.state_dict()) == {"bias", "running_mean", "num_batches_tracked"}
    assert set(MeanOnlyBatchNorm2d(2, scale=True).state_dict()) >= {"weight", "bias"}
    with pytest.raises(ValueError, match="expected 5D"):
        m(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="2 channels"):
        m(torch.randn(2, 3, 2, 2, 2))


def test_gradient_is_centred():
    m = MeanOnlyBatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m.double()(t), (x,))
