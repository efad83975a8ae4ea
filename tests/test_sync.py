"""SyncLpBatchNorm and convert_sync_lp_batchnorm.

The central property (issue 9): with the batch split over 2 processes (gloo, CPU), the
outputs, input and parameter gradients and running statistics of the synchronized layer equal
those of one LpBatchNorm on the concatenated batch, for every p, also with uneven and empty
shards; and a few DDP training steps on 2 processes equal one process on the doubled batch.
One spawn runs every case (interpreter start-up dominates); the parent computes the references.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _multiprocess import start_method
from normmatters.convert.sync import convert_sync_lp_batchnorm
from normmatters.nn.batchnorm import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from normmatters.nn.meanbn import MeanOnlyBatchNorm2d
from normmatters.nn.sync import SyncLpBatchNorm

INF = math.inf
WORLD = 2


def _start_method() -> str:
    return start_method(["normmatters.nn.sync", "normmatters.convert.sync",
                         "normmatters.experiments.distributed"])


# name -> (p, k, constant)
KINDS = {
    "l2": (2, None, "calibrated"),
    "l1": (1, None, "calibrated"),
    "linf": (INF, None, "calibrated"),
    "linf_paper": (INF, None, "paper"),
    "top3": (INF, 3, "calibrated"),
}
# name -> per-process batch sizes
SPLITS = {"even": (4, 4), "uneven": (5, 2), "empty": (6, 0)}
# name -> trailing shape after (N, C)
SHAPES = {"2d": (3, 2), "1d": (), "2d_cl": (2, 3)}  # 2d_cl: channels-last memory
C = 3
CASES = [(kind, split, shape) for kind in KINDS for split in SPLITS for shape in SHAPES]
DDP_KINDS = ["l2", "l1", "linf", "top3"]
LAYER_BY_DIM = {2: LpBatchNorm1d, 3: LpBatchNorm1d, 4: LpBatchNorm2d, 5: LpBatchNorm3d}


def _case_data(case: tuple[str, str, str], step: int) -> dict[str, torch.Tensor]:
    """The global batch of one case and step: input, loss weights, affine parameters (float64)."""
    kind, split, shape = case
    g = torch.Generator().manual_seed(10 * CASES.index(case) + step)
    n = sum(SPLITS[split])
    x = torch.randn(n, C, *SHAPES[shape], generator=g, dtype=torch.float64) * 2.0 + 0.5
    r = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return {"x": x, "r": r, "w": w, "b": b}


def _layout(x: torch.Tensor, case: tuple[str, str, str]) -> torch.Tensor:
    if case[2] == "2d_cl":
        return x.contiguous(memory_format=torch.channels_last)
    return x.clone()


def _shard(t: torch.Tensor, split: str, rank: int) -> torch.Tensor:
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _run_case(case, layer, rank, steps=2):
    """Two training steps and one evaluation; what one process saw."""
    kind, split, _ = case
    out = {}
    for step in range(steps):
        data = _case_data(case, step)
        with torch.no_grad():
            layer.weight.copy_(data["w"])
            layer.bias.copy_(data["b"])
        layer.weight.grad = None
        layer.bias.grad = None
        x = _layout(_shard(data["x"], split, rank), case).requires_grad_(True)
        y = layer(x)
        (y * _shard(data["r"], split, rank)).sum().backward()
        out[f"y{step}"] = y.detach()
        out[f"gx{step}"] = x.grad.detach()
        out[f"gw{step}"] = layer.weight.grad.detach().clone()
        out[f"gb{step}"] = layer.bias.grad.detach().clone()
    out["running_mean"] = layer.running_mean.clone()
    out["running_var"] = layer.running_var.clone()
    out["num_batches_tracked"] = layer.num_batches_tracked.clone()
    layer.eval()
    out["eval"] = layer(_shard(_case_data(case, steps)["x"], split, rank)).detach()
    layer.train()
    return out


def _make_layer(kind: str, momentum: float | None, cls=SyncLpBatchNorm):
    p, k, constant = KINDS[kind]
    return cls(C, 1e-5, momentum, dtype=torch.float64, p=p, k=k, constant=constant)


def _ddp_data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def _ddp_model(kind: str) -> nn.Module:
    torch.manual_seed(5)
    p, k, constant = KINDS[kind]
    return nn.Sequential(nn.Linear(6, 8), LpBatchNorm1d(8, p=p, k=k, constant=constant), nn.ReLU(),
                         nn.Linear(8, 3))


def _train(model: nn.Module, shard: slice, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    for step in range(steps):
        x, y = _ddp_data(step)
        loss = nn.functional.cross_entropy(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()


TIE_KINDS = {"linf": (INF, None), "top3": (INF, 3), "l1": (1, None)}


def _tie_data() -> tuple[torch.Tensor, torch.Tensor]:
    # Mean 0 exactly; |x| = 3 at positions 0, 1 (rank 0) and 4, 5 (rank 1): L∞ takes position 0,
    # Top(3) positions 0, 1 and 4 — a choice that crosses the processes.
    x = torch.tensor([3.0, -3.0, 1.0, -1.0, 3.0, -3.0, 0.5, -0.5], dtype=torch.float64).view(8, 1)
    r = torch.tensor([0.3, -1.2, 0.7, 2.0, -0.4, 1.1, 0.9, -0.6], dtype=torch.float64).view(8, 1)
    return x, r


def _worker(rank: int, init_method: str, outdir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            momentum = None if case[1] == "uneven" else 0.3
            results[case] = _run_case(case, _make_layer(case[0], momentum), rank)
        # float32 input: statistics in float32, same answers to float32 tolerance.
        layer32 = SyncLpBatchNorm(C, p=1)
        x32 = _shard(_case_data(CASES[0], 0)["x"].float(), "uneven", rank)
        results["float32"] = layer32(x32).detach()
        # bfloat16 input: statistics in float32 (as LpBatchNorm), output rounded to bfloat16.
        x16 = _shard(_case_data(CASES[0], 0)["x"].bfloat16(), "uneven", rank)
        results["bfloat16"] = SyncLpBatchNorm(C, p=INF, k=2)(x16).detach()
        # A group of one process (each its own): nothing to synchronize, the local statistics.
        own = [dist.new_group([r]) for r in range(WORLD)][rank]
        results["own_group"] = SyncLpBatchNorm(C, p=1, process_group=own)(x32).detach()
        # Top(k) with k above the global count must fail on every process, not hang one.
        try:
            SyncLpBatchNorm(C, p=INF, k=50)(torch.randn(4, C, 2))
            results["k_too_large"] = "no error"
        except ValueError as e:
            results["k_too_large"] = str(e)
        # Tied maxima, within a process and across the two: the one tie rule (lowest index first).
        for kind, (p, k) in TIE_KINDS.items():
            x = _tie_data()[0][4 * rank:4 * rank + 4].clone().requires_grad_(True)
            layer = SyncLpBatchNorm(1, dtype=torch.float64, p=p, k=k)
            (layer(x) * _tie_data()[1][4 * rank:4 * rank + 4]).sum().backward()
            results[("ties", kind)] = x.grad.detach()
        # DDP: a few SGD steps with the batch split over the processes.
        for kind in DDP_KINDS:
            model = nn.parallel.DistributedDataParallel(convert_sync_lp_batchnorm(_ddp_model(kind)))
            _train(model, slice(8 * rank, 8 * rank + 8))
            results[("ddp", kind)] = {k: v.clone() for k, v in model.module.state_dict().items()}
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sync")
    init = f"file://{tmp / 'rendezvous'}"
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children
    try:
        mp.start_processes(_worker, args=(init, str(tmp)), nprocs=WORLD, join=True,
                           start_method=_start_method())
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_two_processes_equal_one_on_concatenated_batch(spawned, case):
    kind, split, shape = case
    momentum = None if split == "uneven" else 0.3
    ref_cls = LAYER_BY_DIM[2 + len(SHAPES[shape])]
    # The reference: one process, the whole (unsplit) batch.
    layer = _make_layer(kind, momentum, ref_cls)
    ref = {}
    for step in range(2):
        data = _case_data(case, step)
        with torch.no_grad():
            layer.weight.copy_(data["w"])
            layer.bias.copy_(data["b"])
        layer.weight.grad = layer.bias.grad = None
        x = _layout(data["x"], case).requires_grad_(True)
        y = layer(x)
        (y * data["r"]).sum().backward()
        ref[f"y{step}"], ref[f"gx{step}"] = y.detach(), x.grad
        ref[f"gw{step}"], ref[f"gb{step}"] = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.eval()
    ref["eval"] = layer(_case_data(case, 2)["x"]).detach()

    got = [spawned[r][case] for r in range(WORLD)]
    for step in range(2):
        _close(torch.cat([g[f"y{step}"] for g in got]), ref[f"y{step}"])
        _close(torch.cat([g[f"gx{step}"] for g in got]), ref[f"gx{step}"])
        # Each process holds the gradient of its own shard's terms; their sum is the total.
        _close(sum(g[f"gw{step}"] for g in got), ref[f"gw{step}"])
        _close(sum(g[f"gb{step}"] for g in got), ref[f"gb{step}"])
    for g in got:
        _close(g["running_mean"], layer.running_mean)
        _close(g["running_var"], layer.running_var)
        assert int(g["num_batches_tracked"]) == int(layer.num_batches_tracked) == 2
    _close(torch.cat([g["eval"] for g in got]), ref["eval"])


def test_float32_input_matches_concatenated_batch(spawned):
    x = _case_data(CASES[0], 0)["x"].float()
    ref = LpBatchNorm2d(C, p=1)(x[:sum(SPLITS["uneven"])]).detach()
    torch.testing.assert_close(torch.cat([spawned[r]["float32"] for r in range(WORLD)]), ref,
                               rtol=1e-5, atol=1e-5)


def test_process_group_of_one_uses_local_statistics(spawned):
    x = _case_data(CASES[0], 0)["x"].float()
    for r in range(WORLD):
        ref = LpBatchNorm2d(C, p=1)(_shard(x, "uneven", r)).detach()
        torch.testing.assert_close(spawned[r]["own_group"], ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_input_matches_concatenated_batch(spawned):
    x = _case_data(CASES[0], 0)["x"].bfloat16()[:sum(SPLITS["uneven"])]
    ref = LpBatchNorm2d(C, p=INF, k=2)(x).detach()
    got = torch.cat([spawned[r]["bfloat16"] for r in range(WORLD)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_top_k_above_global_count_fails_on_every_process(spawned):
    for r in range(WORLD):
        msg = spawned[r]["k_too_large"]
        assert "k=50" in msg and "n=16" in msg, msg


@pytest.mark.parametrize("kind", DDP_KINDS)
def test_ddp_training_equals_one_process_with_doubled_batch(spawned, kind):
    model = _ddp_model(kind)
    _train(model, slice(0, 16))
    ref = model.state_dict()
    for r in range(WORLD):
        got = spawned[r][("ddp", kind)]
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------- without a process group


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_is_lp_batch_norm(kind, momentum):
    p, k, constant = KINDS[kind]
    sync = SyncLpBatchNorm(4, 1e-4, momentum, p=p, k=k, constant=constant)
    plain = LpBatchNorm2d(4, 1e-4, momentum, p=p, k=k, constant=constant)
    with torch.no_grad():
        for m in (sync, plain):
            m.weight.copy_(torch.linspace(0.5, 2.0, 4))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    for _ in range(2):
        x = torch.randn(6, 4, 3, 3)
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yp = sync(xs), plain(xp)
        assert torch.equal(ys, yp)
        ys.pow(2).sum().backward()
        yp.pow(2).sum().backward()
        assert torch.equal(xs.grad, xp.grad)
    assert torch.equal(sync.weight.grad, plain.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sync, name), getattr(plain, name))
    sync.eval(), plain.eval()
    x = torch.randn(3, 4, 2, 2)
    assert torch.equal(sync(x), plain(x))


def test_world_of_one_process_is_lp_batch_norm(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        sync = SyncLpBatchNorm(3, p=INF, k=2)
        plain = LpBatchNorm1d(3, p=INF, k=2)
        x = torch.randn(5, 3, 4)
        assert torch.equal(sync(x), plain(x))
        assert torch.equal(sync.running_var, plain.running_var)
    finally:
        dist.destroy_process_group()


def test_track_running_stats_false_and_no_affine():
    sync = SyncLpBatchNorm(3, affine=False, track_running_stats=False, p=1)
    plain = LpBatchNorm2d(3, affine=False, track_running_stats=False, p=1)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(sync(x), plain(x))
    sync.eval(), plain.eval()
    assert torch.equal(sync(x), plain(x))  # batch statistics in evaluation too
    assert sync.running_mean is None and sync.weight is None


def test_constructor_mirrors_torch_sync_batch_norm():
    import inspect

    ours = list(inspect.signature(SyncLpBatchNorm.__init__).parameters.values())
    theirs = list(inspect.signature(nn.SyncBatchNorm.__init__).parameters.values())
    assert [(q.name, q.kind, q.default) for q in ours[:len(theirs)]] == \
        [(q.name, q.kind, q.default) for q in theirs]
    assert all(q.kind is inspect.Parameter.KEYWORD_ONLY for q in ours[len(theirs):])
    m = SyncLpBatchNorm(8, 1e-3, 0.01, True, False, None, p=1)
    assert (m.eps, m.momentum, m.track_running_stats, m.process_group, m.p) == (1e-3, 0.01, False, None, 1.0)
    # Not a torch _BatchNorm: torch's converter must not turn it into an L2 layer.
    assert not isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert nn.SyncBatchNorm.convert_sync_batchnorm(m) is m


def test_state_dict_keys_match_torch_batch_norm():
    assert SyncLpBatchNorm(5, p=1).state_dict().keys() == nn.BatchNorm2d(5).state_dict().keys()
    assert SyncLpBatchNorm(5, bias=False).state_dict().keys() == \
        nn.BatchNorm2d(5, bias=False).state_dict().keys()


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.randn(4), ValueError),  # fewer than 2 dimensions
        (torch.randn(4, 5, 2), ValueError),  # wrong channel count
        (torch.ones(4, 3, dtype=torch.long), TypeError),
    ],
)
def test_bad_input_is_refused(bad, error):
    with pytest.raises(error, match="SyncLpBatchNorm"):
        SyncLpBatchNorm(3)(bad)


@pytest.mark.parametrize("kwargs", [{"p": 3}, {"p": 1, "k": 2}, {"p": INF, "k": 0}, {"constant": "x"}])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError, match="SyncLpBatchNorm"):
        SyncLpBatchNorm(3, **kwargs)


def test_repr_names_the_kind():
    r = repr(SyncLpBatchNorm(4, p=INF, k=10, constant="paper"))
    assert "p=inf, k=10" in r and "'paper'" in r


# ---------------------------------------------------------------- convert_sync_lp_batchnorm


def _mixed_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.2),
        nn.Sequential(LpBatchNorm2d(4, p=1, bias=False), LpBatchNorm2d(4, p=INF, k=5, constant="paper")),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 6),
        LpBatchNorm1d(6, 1e-3, None, p=INF, affine=False),
        nn.LayerNorm(6),
    )


def test_convert_keeps_kind_shares_tensors_and_state_dict():
    model = _mixed_model()
    with torch.no_grad():  # make the state non-default so that a lost copy would show
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 8, 8)
    y_before = model(x)

    converted = convert_sync_lp_batchnorm(model)
    assert converted is model
    kinds = [(type(m).__name__, getattr(m, "p", None), getattr(m, "k", None), getattr(m, "constant", None))
             for m in converted.modules() if isinstance(m, SyncLpBatchNorm)]
    assert kinds == [
        ("SyncLpBatchNorm", 2.0, None, "calibrated"),
        ("SyncLpBatchNorm", 1.0, None, "calibrated"),
        ("SyncLpBatchNorm", INF, 5, "paper"),
        ("SyncLpBatchNorm", INF, None, "calibrated"),
    ]
    assert isinstance(converted[6], nn.LayerNorm)
    assert converted[1].momentum == 0.2 and converted[5].momentum is None and converted[5].eps == 1e-3
    assert converted[2][0].bias is None and converted[5].weight is None
    assert not any(m.training for m in converted.modules())
    # The same Parameter objects: an optimizer made before the conversion still trains the model.
    for name, p in converted.named_parameters():
        assert p is params[name]
    after = converted.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    # In evaluation nothing is communicated and the function is unchanged.
    assert torch.equal(converted(x), y_before)
    # And state dicts move both ways.
    _mixed_model().load_state_dict(after)
    convert_sync_lp_batchnorm(_mixed_model()).load_state_dict(before)


def test_convert_root_batch_norm_and_torch_sync_batch_norm():
    bn = nn.BatchNorm3d(5, affine=False, track_running_stats=False)
    new = convert_sync_lp_batchnorm(bn)
    assert isinstance(new, SyncLpBatchNorm) and new.p == 2.0 and not new.affine
    assert new.running_mean is None
    tsync = nn.SyncBatchNorm(5, dtype=torch.float64)
    new = convert_sync_lp_batchnorm(tsync)
    assert isinstance(new, SyncLpBatchNorm) and new.weight.dtype == torch.float64
    assert convert_sync_lp_batchnorm(new) is new  # already synchronized


def test_convert_leaves_ghost_and_mean_only_layers():
    ghost = LpBatchNorm2d(4, p=1, ghost_batch_size=8)
    mean_only = MeanOnlyBatchNorm2d(4)
    model = nn.Sequential(ghost, mean_only)
    out = convert_sync_lp_batchnorm(model)
    assert out[0] is ghost and out[1] is mean_only


def test_convert_refuses_precision_emulation_and_non_modules():
    layer = LpBatchNorm2d(4, p=1, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="compute_dtype"):
        convert_sync_lp_batchnorm(nn.Sequential(layer))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync_lp_batchnorm("model")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(TIE_KINDS))
def test_ties_follow_one_rule_on_every_path(spawned, kind):
    # Two processes, one process on the fused kernels, and the reference all send the gradient of
    # tied maxima to the same positions.
    import normmatters.kernels as K

    p, k = TIE_KINDS[kind]
    x, r = _tie_data()
    grads = {}
    for backend in ("auto", "reference"):
        xx = x.clone().requires_grad_(True)
        with K.use_backend(backend):
            (LpBatchNorm1d(1, dtype=torch.float64, p=p, k=k)(xx) * r).sum().backward()
        grads[backend] = xx.grad
    synced = torch.cat([spawned[rank][("ties", kind)] for rank in range(WORLD)])
    _close(grads["auto"], grads["reference"])
    _close(synced, grads["reference"])
    if kind != "l1":
        # The rule itself: the closed form with the gradient of σ̂ at exactly these positions.
        from normmatters.functional.norm import closed_form_grad, closed_form_sums
        from normmatters.functional import lp_constant

        kk = 1 if k is None else k
        d = x.view(8, 1)
        pattern = torch.zeros(8, 1, dtype=torch.float64)
        for i in ([0] if kk == 1 else [0, 1, 4]):
            pattern[i, 0] = torch.sign(d[i, 0])
        c = lp_constant(p, k, 8)
        inv = 1.0 / (c * 3.0 + 1e-5)
        inv_t = torch.full((1, 1), inv, dtype=torch.float64)
        sums = closed_form_sums(r, d, pattern, (0,))
        expected = closed_form_grad(r, d, inv_t, pattern, sums, 8, p, k, c, (0,))
        _close(grads["reference"], expected)
