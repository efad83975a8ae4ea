"""normmatters.experiments.distributed: process-group setup, metric reduction, sharded loaders.

Without a process group every helper must be a no-op (one code path for one and many
processes); with 2 gloo processes started from torchrun-style environment variables the
reductions must equal the arithmetic on the gathered values, and the sharded loaders must cover,
step by step, the batches of one process with the doubled batch.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _multiprocess import start_method
from normmatters.experiments.data.base import EpochSampler
from normmatters.experiments.distributed import (
    DistInfo,
    ShardedSampler,
    all_reduce_metrics,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    is_main_process,
    main_process_first,
    per_process_batch_size,
    shard_loader,
    unwrap_model,
    world_info,
    wrap_ddp,
)
from normmatters.experiments.errors import ConfigError
from normmatters.nn.batchnorm import LpBatchNorm1d
from normmatters.nn.sync import SyncLpBatchNorm

WORLD = 2


def _start_method() -> str:
    return start_method(["normmatters.nn.sync", "normmatters.convert.sync",
                         "normmatters.experiments.distributed"])


TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------- one process, no group


def test_without_torchrun_nothing_is_initialised(no_torchrun_env):
    info = init_distributed(device="cpu")
    assert info == DistInfo(0, 0, 1, None, torch.device("cpu"))
    assert info.is_main and not info.is_distributed
    assert not dist.is_initialized() and not is_distributed() and is_main_process()
    assert world_info() == DistInfo()


def test_world_size_one_initialises_nothing(no_torchrun_env):
    no_torchrun_env.setenv("WORLD_SIZE", "1")
    no_torchrun_env.setenv("RANK", "0")
    no_torchrun_env.setenv("LOCAL_RANK", "0")
    assert init_distributed(device="cpu").world_size == 1
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "env, match",
    [
        ({"WORLD_SIZE": "2"}, "RANK"),  # torchrun sets RANK; its absence is a misconfiguration
        ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "outside"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "MASTER_ADDR"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ],
)
def test_incomplete_environment_fails_before_waiting(no_torchrun_env, env, match):
    for name, value in env.items():
        no_torchrun_env.setenv(name, value)
    with pytest.raises(ConfigError, match=match):
        init_distributed(device="cpu")
    assert not dist.is_initialized()


def test_helpers_are_no_ops_without_group():
    metrics = {"loss": torch.tensor(0.25), "acc": 3}
    assert all_reduce_metrics(metrics) == {"acc": 3.0, "loss": 0.25}
    assert all_reduce_metrics(metrics, op="max", weight=10) == {"acc": 3.0, "loss": 0.25}
    assert broadcast_object({"a": 1}) == {"a": 1}
    barrier()
    with main_process_first():
        pass
    model = nn.Linear(2, 2)
    assert wrap_ddp(model) is model and unwrap_model(model) is model
    cleanup_distributed()


@pytest.mark.parametrize("bad, match", [({"x": torch.ones(2)}, "scalar"), ({"x": "high"}, "number")])
def test_metric_values_must_be_scalars(bad, match):
    with pytest.raises(ValueError, match=match):
        all_reduce_metrics(bad)


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="op"):
        all_reduce_metrics({"x": 1.0}, op="median")


def test_per_process_batch_size():
    assert per_process_batch_size(256, 4) == 64
    assert per_process_batch_size(32) == 32  # one process
    for global_batch, world in ((10, 4), (0, 1), (8, 0)):
        with pytest.raises(ConfigError):
            per_process_batch_size(global_batch, world)


# ---------------------------------------------------------------- sharded loaders


def _loader(n: int, batch: int, drop_last: bool = False, seed: int = 3) -> DataLoader:
    data = TensorDataset(torch.arange(n), torch.arange(n) % 3)
    return DataLoader(data, batch_size=batch, sampler=EpochSampler(n, seed), drop_last=drop_last)


def _epoch(loader: DataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [x.tolist() for x, _ in loader]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_step_by_step_cover_the_one_process_batches(world, drop_last):
    n, batch = 48, 4
    single = _loader(n, world * batch, drop_last)
    shards = [shard_loader(_loader(n, world * batch, drop_last), batch_size=batch, rank=r, world_size=world)
              for r in range(world)]
    for epoch in (0, 1):
        ref = _epoch(single, epoch)
        got = [_epoch(s, epoch) for s in shards]
        assert all(len(g) == len(ref) for g in got)
        for step, ref_batch in enumerate(ref):
            union = sorted(sum((g[step] for g in got), []))
            assert union == sorted(ref_batch), (epoch, step)
    assert _epoch(single, 0) != _epoch(single, 1)  # set_epoch reaches the base sampler


def test_padding_gives_every_process_the_same_number_of_steps():
    n, world = 10, 3
    base = EpochSampler(n, seed=1)
    shards = [list(ShardedSampler(base, world, r)) for r in range(world)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(set(sum(shards, []))) == list(range(n))  # every example, two repeated
    unpadded = [list(ShardedSampler(base, world, r, pad=False)) for r in range(world)]
    assert [len(s) for s in unpadded] == [len(ShardedSampler(base, world, r, pad=False)) for r in range(world)]
    assert sorted(sum(unpadded, [])) == list(range(n))  # evaluation: each example exactly once
    dropped = [list(ShardedSampler(base, world, r, drop_last=True)) for r in range(world)]
    assert [len(s) for s in dropped] == [3, 3, 3] and len(set(sum(dropped, []))) == 9


def test_shard_loader_keeps_single_process_loader_and_checks_input():
    loader = _loader(12, 4)
    assert shard_loader(loader, rank=0, world_size=1) is loader
    with pytest.raises(TypeError, match="DataLoader"):
        shard_loader([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(EpochSampler(8), 2, 5)


# ---------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    out: dict = {}
    info = init_distributed(device="cpu", timeout_s=60)
    try:
        out["info"] = info
        out["again"] = init_distributed(device="cpu")
        out["world_info"] = world_info()
        out["main"] = is_main_process()
        # rank r has loss r+1 on 10·(r+1) examples and accuracy 0.5·r
        local = {"loss": float(rank + 1), "acc": torch.tensor(0.5 * rank, dtype=torch.float64)}
        out["mean"] = all_reduce_metrics(local)
        out["weighted"] = all_reduce_metrics(local, weight=10 * (rank + 1))
        out["sum"] = all_reduce_metrics(local, op="sum")
        out["max"] = all_reduce_metrics(local, op="max")
        out["min"] = all_reduce_metrics(local, op="min")
        try:
            all_reduce_metrics({"loss": 1.0} if rank == 0 else {"lost": 1.0})
            out["mismatch"] = "no error"
        except ValueError as e:
            out["mismatch"] = str(e)
        out["broadcast"] = broadcast_object({"resume_from": f"ckpt-from-rank-{rank}"})
        marker = Path(outdir) / "written-by-main"
        with main_process_first():
            if is_main_process():
                marker.write_text("x")
            out["saw_marker"] = marker.exists()
        barrier()
        model = nn.Sequential(nn.Linear(3, 4), LpBatchNorm1d(4, p=1))
        wrapped = wrap_ddp(model)
        out["ddp"] = type(wrapped).__name__
        out["sync_p"] = [(type(m).__name__, m.p) for m in unwrap_model(wrapped).modules()
                         if isinstance(m, SyncLpBatchNorm)]
        out["sharded_len"] = len(shard_loader(_loader(20, 8), batch_size=4))
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    finally:
        cleanup_distributed()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True,
                       start_method=_start_method())
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_init_from_torchrun_environment(two_processes):
    for rank, out in enumerate(two_processes):
        assert out["info"] == DistInfo(rank, rank, WORLD, "gloo", torch.device("cpu"))
        assert out["again"] == out["info"] == out["world_info"]
        assert out["main"] is (rank == 0)


def test_metric_reductions_equal_arithmetic_on_all_values(two_processes):
    losses, accs, weights = [1.0, 2.0], [0.0, 0.5], [10, 20]
    expect = {
        "mean": {"loss": sum(losses) / 2, "acc": sum(accs) / 2},
        "weighted": {"loss": sum(w * v for w, v in zip(weights, losses)) / sum(weights),
                     "acc": sum(w * v for w, v in zip(weights, accs)) / sum(weights)},
        "sum": {"loss": sum(losses), "acc": sum(accs)},
        "max": {"loss": max(losses), "acc": max(accs)},
        "min": {"loss": min(losses), "acc": min(accs)},
    }
    for out in two_processes:
        for op, values in expect.items():
            assert out[op].keys() == values.keys()
            for key, value in values.items():
                assert math.isclose(out[op][key], value, rel_tol=1e-12), (op, key)


def test_mismatched_metric_keys_fail_on_every_process(two_processes):
    for out in two_processes:
        assert "different metric keys" in out["mismatch"]


def test_broadcast_barrier_and_main_first(two_processes):
    for out in two_processes:
        assert out["broadcast"] == {"resume_from": "ckpt-from-rank-0"}
        assert out["saw_marker"]  # rank 1 entered the block only after rank 0 had written


def test_wrap_ddp_synchronizes_lp_batch_norms(two_processes):
    for out in two_processes:
        assert out["ddp"] == "DistributedDataParallel"
        assert out["sync_p"] == [("SyncLpBatchNorm", 1.0)]
        assert out["sharded_len"] == 3  # 20 examples -> 10 per process -> batches of 4, 4, 2
