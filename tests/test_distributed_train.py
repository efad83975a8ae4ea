"""Multi-process training with the real trainer (normmatters.experiments.trainer under DDP).

The central property (issue 9): 2 gloo processes with a global batch B train the same model as
one process with batch B — same examples per step (sharded one-process order, augmentation a
function of the example), synchronized batch norms, each process's loss its share of the global
mean — so the weights agree to rounding, also through an uneven last step and a last step where
one process has no example. A run stopped after one epoch and resumed by both processes ends
with the same weights, bit for bit, as an uninterrupted one; only rank 0 writes.

The models run in float64. In float32 the two runs differ by rounding (~1e-7), and a ReLU input
or an L1 deviation that lies within that of zero switches sides in one run and not the other:
with augmentation that happens within the first steps and moves weights by ~1e-4, as any other
split of the same batch would. In float64 the runs agree to ~1e-14 after two epochs at the
default learning rate, so a tolerance of 1e-9 leaves no room for a wrong weighting or order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _multiprocess import start_method
from normmatters.experiments.checkpoint import load_checkpoint
from normmatters.experiments.config import TrainConfig
from normmatters.experiments.data import ExampleSeededDataset, get_dataloaders, get_dataset, set_loader_epoch
from normmatters.experiments.data.base import EpochSampler
from normmatters.experiments.distributed import barrier, cleanup_distributed, init_distributed, shard_loader
from normmatters.experiments.errors import ConfigError
from normmatters.experiments.trainer import _batches, _global_batch_sizes, train

WORLD = 2


def _start_method() -> str:
    return start_method(["normmatters.experiments.trainer"])


def _cfg(**kw) -> TrainConfig:
    base = dict(model="resnet_digits", dataset="digits", norm="l1", epochs=2, batch_size=64, eval_batch_size=500,
                augment=True, device="cpu", amp=False, plots=False)
    base.update(kw)
    return TrainConfig(**base)


# 359 training examples: 5 steps of 64, then 39 = 20 + 19 (uneven shards).
UNEVEN = _cfg(dataset_kwargs={"test_fraction": 0.8})
# 321 training examples: 5 steps of 64, then 1 example (rank 1's shard is empty).
EMPTY = _cfg(norm="top3", epochs=1, dataset_kwargs={"test_fraction": 1797 - 321})


class Float64(nn.Module):
    """The model in float64, fed the float32 examples converted exactly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.double())


class _StopAfter:
    """Stops the run after epoch n, as a kill after that epoch's checkpoint would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, state) -> None:
        if state.epoch >= self.n:
            state.should_stop = True


class _Record:
    """What one process saw: its model's norm layers, its final weights, its step count."""

    def __init__(self) -> None:
        self.out: dict = {}

    def on_train_begin(self, state) -> None:
        self.out["norms"] = [(type(m).__name__, getattr(m, "p", None)) for m in state.model.modules()
                             if "BatchNorm" in type(m).__name__]
        self.out["world"] = (state.rank, state.world_size)

    def on_epoch_end(self, state) -> None:
        self.out["state"] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        self.out["step"] = state.step


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    out = Path(outdir)
    res: dict = {}
    # Joined here, as a script would, with a short timeout so that a bug fails instead of
    # hanging; train() uses the group (the command line's own joining is tested below).
    init_distributed(device="cpu", timeout_s=120)
    try:
        rec = _Record()
        res["uneven"] = train(UNEVEN, out / "uneven", progress=False, callbacks=[rec], model_transform=Float64)
        res["uneven_rec"] = rec.out
        res["stopped"] = train(UNEVEN, out / "stopped", progress=False, callbacks=[_StopAfter(1)],
                               model_transform=Float64)
        if rank == 0:  # the parent resumes "stopped" in one process
            shutil.copytree(out / "stopped", out / "resumed")
        barrier()
        res["resumed"] = train(UNEVEN, out / "resumed", progress=False, resume=True, model_transform=Float64)
        rec = _Record()
        res["empty"] = train(EMPTY, out / "empty", progress=False, callbacks=[rec], model_transform=Float64)
        res["empty_rec"] = rec.out
        try:  # refused on every process before any of them waits for the others
            train(_cfg(batch_size=63, epochs=1), None, progress=False)
            res["odd_batch"] = "no error"
        except ConfigError as exc:
            res["odd_batch"] = str(exc)
        torch.save(res, out / f"rank{rank}.pt")
    finally:
        cleanup_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp_train")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children
    try:
        mp.start_processes(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True,
                           start_method=_start_method())
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    single = {"uneven": train(UNEVEN, tmp / "single_uneven", progress=False, model_transform=Float64),
              "empty": train(EMPTY, tmp / "single_empty", progress=False, model_transform=Float64),
              # the run two processes stopped after one epoch, continued by one
              "resumed": train(UNEVEN, tmp / "stopped", progress=False, resume=True, model_transform=Float64)}
    return {"dir": tmp, "ranks": [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)],
            "single": single}


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def _assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=tol, atol=tol, msg=k)


def test_two_processes_equal_one_process_with_the_global_batch(runs):
    tmp, ranks = runs["dir"], runs["ranks"]
    _assert_close(_model(tmp / "uneven"), _model(tmp / "single_uneven"), 1e-9)
    # Both processes hold the same model, and report the same, globally reduced, metrics.
    a, b = (r["uneven_rec"]["state"] for r in ranks)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key, value in ranks[0]["uneven"].items():
        if "time" not in key:
            assert ranks[1]["uneven"][key] == value, key
    single = runs["single"]["uneven"]
    assert ranks[0]["uneven"]["steps"] == single["steps"] == 2 * 6
    assert ranks[0]["uneven"]["world_size"] == 2 and single["world_size"] == 1
    ddp_hist = load_checkpoint(tmp / "uneven" / "checkpoint.pt")["history"]
    one_hist = load_checkpoint(tmp / "single_uneven" / "checkpoint.pt")["history"]
    for d, s in zip(ddp_hist, one_hist):
        assert d["lr"] == s["lr"]
        assert d["train_acc"] == s["train_acc"] and d["test_acc"] == s["test_acc"]
        # The trainer's loss is float32 (cross-entropy of float32 logits), summed in another order.
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-6)
        assert d["test_loss"] == pytest.approx(s["test_loss"], rel=1e-6)


def test_batch_norms_are_synchronized_and_keep_their_kind(runs):
    for rank, r in enumerate(runs["ranks"]):
        assert r["uneven_rec"]["world"] == (rank, WORLD)
        assert r["uneven_rec"]["norms"] and all(n == ("SyncLpBatchNorm", 1.0) for n in r["uneven_rec"]["norms"])
        assert r["empty_rec"]["norms"] and all(n == ("SyncLpBatchNorm", math.inf) for n in r["empty_rec"]["norms"])


def test_last_step_with_an_empty_shard_equals_one_process(runs):
    tmp = runs["dir"]
    assert runs["ranks"][1]["empty"]["steps"] == runs["single"]["empty"]["steps"] == 6
    _assert_close(_model(tmp / "empty"), _model(tmp / "single_empty"), 1e-9)


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(runs):
    tmp, ranks = runs["dir"], runs["ranks"]
    assert all(r["stopped"]["epochs"] == 1 and r["stopped"]["stopped_early"] for r in ranks)
    a, b = load_checkpoint(tmp / "uneven" / "checkpoint.pt"), load_checkpoint(tmp / "resumed" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert all(r["resumed"]["final_test_acc"] == r["uneven"]["final_test_acc"] for r in ranks)
    lines = [json.loads(x) for x in (tmp / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


def test_two_process_checkpoint_resumes_in_one_process(runs):
    tmp = runs["dir"]
    assert runs["single"]["resumed"]["steps"] == 12 and runs["single"]["resumed"]["world_size"] == 1
    assert load_checkpoint(tmp / "stopped" / "checkpoint.pt")["world_size"] == 1
    _assert_close(_model(tmp / "stopped"), _model(tmp / "single_uneven"), 1e-9)


def test_only_rank_zero_writes_the_run_folder(runs):
    run = runs["dir"] / "uneven"
    names = {p.name for p in run.iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "summary.json", "config.toml", "environment.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    # Each process appending its own line would log every epoch twice.
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    assert load_checkpoint(run / "checkpoint.pt")["world_size"] == 2


def test_global_batch_must_divide_over_processes(runs):
    for r in runs["ranks"]:
        assert "batch_size" in r["odd_batch"] and "multiple" in r["odd_batch"]


# ---------------------------------------------------------------- pieces, one process


def test_global_batch_sizes_and_empty_tail():
    assert _global_batch_sizes(10, 4, 3) == [4, 4, 2]
    assert _global_batch_sizes(10, 4, 2) == [4, 4]  # max_train_batches
    loader = DataLoader(TensorDataset(torch.arange(6.0).view(3, 2), torch.arange(3)), batch_size=2)
    got = list(_batches(loader, 4))
    assert [len(y) for _, y in got] == [2, 1, 0, 0]
    assert got[-1][0].shape == (0, 2) and got[-1][1].dtype == torch.long
    assert [len(y) for _, y in _batches(loader, 1)] == [2]


def test_augmentation_depends_only_on_example_and_epoch():
    ds = ExampleSeededDataset(get_dataset("digits", augment=True), seed=3)
    plain = get_dataset("digits", augment=False)
    ds.set_epoch(1)
    first = torch.stack([ds[i][0] for i in range(40)])
    torch.manual_seed(123)  # the global stream does not matter, and is left as it was
    before = torch.get_rng_state()
    backwards = torch.stack([ds[i][0] for i in reversed(range(40))]).flip(0)
    assert torch.equal(first, backwards) and torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(first, torch.stack([plain[i][0] for i in range(40)]))  # it does augment
    ds.set_epoch(2)
    assert not torch.equal(first, torch.stack([ds[i][0] for i in range(40)]))
    assert len(ds) == len(plain) and torch.equal(ds.y, plain.y)  # attributes of the wrapped set


def test_set_loader_epoch_reaches_sharded_loaders():
    tr, _, _ = get_dataloaders("digits", batch_size=64, seed=5, augment=True)
    shards = [shard_loader(tr, batch_size=32, rank=r, world_size=WORLD, pad=False) for r in range(WORLD)]
    for epoch in (1, 2):
        set_loader_epoch(tr, epoch)
        ref = next(iter(tr))
        seed_after_single = tr.generator.initial_seed()
        tr.generator.manual_seed(0)
        for s in shards:
            set_loader_epoch(s, epoch)
        assert shards[0].generator.initial_seed() == seed_after_single  # reseeded from the base sampler
        got = [next(iter(s)) for s in shards]
        x = torch.empty_like(ref[0])
        x[0::2], x[1::2] = got[0][0], got[1][0]
        assert torch.equal(x, ref[0]), epoch  # same examples, same augmentation
    assert isinstance(shards[0].sampler.base, EpochSampler)


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """``python -m torch.distributed.run --nproc_per_node=2 -m normmatters train``: one summary
    line, one run folder, a checkpoint that resumes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
            "-m", "normmatters", "train", "--model", "resnet_digits", "--dataset", "digits", "--norm", "l1",
            "--batch-size", "64", "--epochs", "1", "--no-progress", "--set", "max_train_batches=2",
            "--set", "plots=false", "--out", str(tmp_path / "run")]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if "resnet_digits" in x]
    assert len(lines) == 1 and "accuracy" in lines[0], r.stdout
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2
