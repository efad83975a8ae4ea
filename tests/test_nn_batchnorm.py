"""LpBatchNorm{1,2,3}d: drop-in agreement with torch at p=2, torch's conventions for every p."""

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

from normmatters.nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d

INF = float("inf")
PAIRS = [(nn.BatchNorm1d, LpBatchNorm1d, (8, 5, 7)), (nn.BatchNorm1d, LpBatchNorm1d, (8, 5)),
         (nn.BatchNorm2d, LpBatchNorm2d, (8, 5, 4, 3)), (nn.BatchNorm3d, LpBatchNorm3d, (4, 5, 3, 2, 3))]
KINDS = [(1, None), (2, None), (INF, None), (INF, 10)]
KIND_IDS = ["l1", "l2", "linf", "top10"]


def _run_both(ref, ours, shape, steps=3):
    for step in range(steps):
        x = torch.randn(shape) * (step + 1) + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ref(x1), ours(x2)
        torch.testing.assert_close(y2, y1, rtol=0, atol=0)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    for name in ("weight", "bias"):
        a, b = getattr(ref, name), getattr(ours, name)
        if a is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ref, name), getattr(ours, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}, {"bias": False},
     {"eps": 1e-3, "momentum": 0.01}],
    ids=["default", "cumulative", "no-stats", "no-affine", "no-bias", "eps-momentum"],
)
def test_p2_equals_torch_train_and_eval(torch_cls, cls, shape, kwargs):
    ref, ours = torch_cls(5, **kwargs), cls(5, **kwargs)
    _run_both(ref, ours, shape)
    ref.eval(), ours.eval()
    _run_both(ref, ours, shape, steps=1)


def test_positional_arguments_mean_what_torch_means():
    ours = LpBatchNorm2d(64, 1e-3, 0.01, False, False, p=1)
    ref = nn.BatchNorm2d(64, 1e-3, 0.01, False, False)
    for attr in ("eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr)


def test_signature_mirrors_torch():
    ours = list(inspect.signature(LpBatchNorm2d.__init__).parameters.values())
    ref = list(inspect.signature(nn.BatchNorm2d.__init__).parameters.values())
    assert [p.name for p in ours[: len(ref)]] == [p.name for p in ref]
    assert [p.kind for p in ours[: len(ref)]] == [p.kind for p in ref]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(ref):])
    assert {"p", "k", "constant", "ghost_batch_size"} <= {p.name for p in ours[len(ref):]}


def test_empty_batch_like_torch():
    ref, ours = nn.BatchNorm2d(3), LpBatchNorm2d(3, p=1)
    x = torch.randn(0, 3, 4, 4)
    assert ours(x).shape == ref(x).shape
    assert torch.equal(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked == ref.num_batches_tracked == 1


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_eps_must_be_positive_in_training(p, k):
    with pytest.raises(ValueError, match="eps"):
        LpBatchNorm2d(3, eps=0.0, p=p, k=k)(torch.randn(4, 3, 4, 4))


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_state_dict_moves_both_ways(p, k):
    ref = nn.BatchNorm2d(6)
    ref(torch.randn(8, 6, 5, 5) * 2 + 1)
    ref.weight.data.uniform_()
    ours = LpBatchNorm2d(6, p=p, k=k)
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_state_dict_without_num_batches_tracked_loads_like_torch():
    sd = nn.BatchNorm2d(4).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    m = LpBatchNorm2d(4, p=1)
    m.load_state_dict(sd)
    assert m.num_batches_tracked.item() == 0


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_gaussian_input_unit_variance(p, k):
    m = LpBatchNorm2d(64, p=p, k=k)
    y = m(torch.randn(64, 64, 16, 16) * 5 - 3)
    assert y.std().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_channels_last_and_dtypes(p, k):
    m = LpBatchNorm2d(8, p=p, k=k)
    x = torch.randn(16, 8, 6, 6)
    y = m(x)
    yc = copy.deepcopy(m)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
    y64 = copy.deepcopy(m).double()(x.double())
    torch.testing.assert_close(y64.float(), y, atol=1e-5, rtol=1e-5)
    for dt in (torch.float16, torch.bfloat16):
        yh = copy.deepcopy(m).to(dt)(x.to(dt))
        assert yh.dtype == dt
        torch.testing.assert_close(yh.float(), y, atol=0.06, rtol=0.02)


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_momentum_none_is_cumulative_average(p, k):
    m = LpBatchNorm1d(3, momentum=None, p=p, k=k)
    xs = [torch.randn(32, 3) * s + s for s in (1.0, 2.0, 3.0)]
    for x in xs:
        m(x)
    torch.testing.assert_close(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))


def test_track_running_stats_false_uses_batch_stats_in_eval():
    m = LpBatchNorm2d(3, track_running_stats=False, p=1).eval()
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(m(x), m.train()(x))
    assert m.running_mean is None and m.num_batches_tracked is None


def test_not_converted_by_torch_sync_batchnorm():
    # Not a _BatchNorm subclass, so torch's converter cannot silently turn L1 into L2.
    model = nn.Sequential(LpBatchNorm2d(4, p=1))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], LpBatchNorm2d) and converted[0].p == 1


@pytest.mark.parametrize("p,k", KINDS, ids=KIND_IDS)
def test_deepcopy_pickle_and_repr(p, k):
    m = LpBatchNorm2d(4, p=p, k=k, constant="paper" if k else "calibrated")
    m(torch.randn(8, 4, 3, 3))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone.p == m.p and clone.k == m.k and clone.constant == m.constant
        assert torch.equal(clone.running_var, m.running_var)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert torch.equal(sd["running_mean"], m.running_mean)
    assert "p=" in repr(m)


@pytest.mark.parametrize(
    "make,x,exc,match",
    [
        (lambda: LpBatchNorm2d(4, p=1), torch.randn(2, 3, 4, 4), ValueError, "expected input with 4 channels"),
        (lambda: LpBatchNorm2d(4, p=1), torch.randn(2, 4, 4), ValueError, "expected 4D input"),
        (lambda: LpBatchNorm1d(4, p=1), torch.randn(2, 4, 4, 4), ValueError, "expected 2D or 3D"),
        (lambda: LpBatchNorm3d(4, p=1), torch.randn(2, 4, 4, 4), ValueError, "expected 5D"),
        (lambda: LpBatchNorm2d(4, p=1), torch.randn(1, 4, 1, 1), ValueError, "more than 1 value per channel"),
        (lambda: LpBatchNorm1d(4, p="inf", k=10), torch.randn(5, 4), ValueError, "k=10 > n=5"),
        (lambda: LpBatchNorm2d(4, p=1), torch.ones(2, 4, 3, 3, dtype=torch.int32), TypeError, "floating-point"),
    ],
)
def test_bad_input(make, x, exc, match):
    with pytest.raises(exc, match=match) as info:
        make()(x)
    assert "LpBatchNorm" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"p": 3}, "p must be 1, 2 or inf"), ({"p": 1, "k": 3}, "needs p=inf"), ({"p": "inf", "k": 0}, "positive"),
     ({"constant": "magic"}, "constant must be"), ({"ghost_batch_size": 1}, "ghost_batch_size")],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LpBatchNorm2d(4, **kwargs)


def test_ghost_batch_module():
    m = LpBatchNorm2d(3, p=1, ghost_batch_size=4)
    x = torch.randn(8, 3, 5, 5)
    y = m(x)
    ref = torch.cat([LpBatchNorm2d(3, p=1)(c) for c in x.split(4)])
    torch.testing.assert_close(y, ref)


def test_compile_fullgraph_agrees_with_eager():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), LpBatchNorm2d(8, p=1), nn.ReLU(),
                          LpBatchNorm2d(8, p="inf", k=5), nn.Flatten(), nn.Linear(8 * 36, 2))
    x = torch.randn(4, 3, 8, 8)
    ref_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    y, y_ref = compiled(x), ref_model(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, ref_model[0].weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model[1].running_var, ref_model[1].running_var)
