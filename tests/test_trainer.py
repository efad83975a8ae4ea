"""Tests of normmatters.experiments.trainer, config and checkpoint: schedules, groups, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from normmatters.experiments.checkpoint import load_checkpoint
from normmatters.experiments.config import TrainConfig, load_config
from normmatters.experiments.errors import CheckpointError, ConfigError
from normmatters.experiments.models import create_model
from normmatters.experiments.trainer import build_optimizer, evaluate, lr_factor, train


def param_groups(model, weight_decay, *, exclude_norm_bias=False, last_layer_only=False):
    """The trainer's groups for these options: the ones build_optimizer passes to the optimizer."""
    cfg = TrainConfig(weight_decay=weight_decay, wd_exclude_norm_bias=exclude_norm_bias,
                      wd_last_layer_only=last_layer_only)
    return build_optimizer(model, cfg).param_groups


def _cfg(**kw):
    base = dict(model="resnet_digits", dataset="digits", norm="l1", epochs=2, batch_size=64, eval_batch_size=400,
                max_train_batches=4, plots=False)
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- config ---------------------------------------------------------------------------------------
def test_config_toml_round_trip(tmp_path):
    cfg = TrainConfig(model="vgg11", norm="top10", lr=0.05, lr_milestones=[3, 6.5], norm_kwargs={"constant": "paper"},
                      betas=[0.8, 0.99], data_root="/x y/z")
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "resnet20"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(path)
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig().replace(epochs="ten")
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig().replace(epochs=0)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig().replace(optimizer="lion")
    with pytest.raises(ConfigError, match="norm"):
        TrainConfig().replace(norm="l7")
    assert TrainConfig().replace(lr=1).lr == 1.0 and isinstance(TrainConfig().replace(lr=1).lr, float)
    path.write_text("[train]\nnorm = 'l1'\nepochs = 3\n")
    assert load_config(path, lr=0.2) == TrainConfig(norm="l1", epochs=3, lr=0.2)


# -- schedule and groups --------------------------------------------------------------------------
def test_lr_schedules():
    cos = TrainConfig(epochs=10, lr=0.1, lr_schedule="cosine", warmup_epochs=2)
    spe = 5
    assert lr_factor(0, cos, spe) == pytest.approx(1 / 10)
    assert lr_factor(9, cos, spe) == pytest.approx(1.0)
    assert lr_factor(10, cos, spe) == pytest.approx(1.0)  # warm-up ends at the cosine's start
    assert lr_factor(30, cos, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lr_factor(50, cos, spe) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(epochs=10, lr_schedule="step", lr_milestones=[4, 8], lr_gamma=0.2)
    assert [lr_factor(e * spe, step, spe) for e in (0, 3, 4, 7, 8, 9)] == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])
    default_step = TrainConfig(epochs=8, lr_schedule="step")
    assert lr_factor(4 * spe - 1, default_step, spe) == 1 and lr_factor(4 * spe, default_step, spe) == pytest.approx(0.1)
    assert lr_factor(17, TrainConfig(lr_schedule="constant"), spe) == 1


def test_param_groups_exclude_norms_and_biases_and_last_layer_only():
    model = create_model("resnet_digits", norm="l1")
    groups = {g["name"]: g for g in param_groups(model, 5e-4, exclude_norm_bias=True)}
    decay = {id(p) for p in groups["decay"]["params"]}
    assert all(p.dim() > 1 for p in groups["decay"]["params"])
    for m in model.modules():
        if type(m).__name__.startswith("LpBatchNorm"):
            assert id(m.weight) not in decay and id(m.bias) not in decay
    assert id(model.fc.bias) not in decay and id(model.fc.weight) in decay
    assert groups["no_decay"]["weight_decay"] == 0.0
    n_all = sum(1 for _ in model.parameters())
    assert len(groups["decay"]["params"]) + len(groups["no_decay"]["params"]) == n_all
    last = {g["name"]: g for g in param_groups(model, 5e-4, last_layer_only=True)}
    assert {id(p) for p in last["decay"]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(param_groups(model, 5e-4)) == 1  # all decayed, no empty group


def test_build_optimizer_options():
    model = create_model("resnet_digits")
    sgd = build_optimizer(model, TrainConfig(nesterov=True, momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, betas=[0.9, 0.95]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


# -- training -------------------------------------------------------------------------------------
def test_cpu_run_is_deterministic_and_writes_run_folder(tmp_path):
    s1 = train(_cfg(), tmp_path / "a", progress=False)
    s2 = train(_cfg(), tmp_path / "b", progress=False)
    _assert_same_state(load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"],
                       load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"])
    assert s1["final_test_acc"] == s2["final_test_acc"]
    run = tmp_path / "a"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all("test_acc" in r and "lr" in r for r in lines)
    assert load_config(run / "config.toml") == _cfg()
    assert json.loads((run / "summary.json").read_text())["final_test_acc"] == s1["final_test_acc"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert s1["steps"] == 8 and s1["epochs"] == 2


def test_different_seed_gives_different_weights(tmp_path):
    train(_cfg(epochs=1), tmp_path / "a", progress=False)
    train(_cfg(epochs=1, seed=1), tmp_path / "b", progress=False)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


class _StopAfter:
    """Stops the run after epoch n, as a kill after that epoch's checkpoint would."""

    def __init__(self, n):
        self.n = n

    def on_epoch_end(self, state):
        if state.epoch >= self.n:
            state.should_stop = True


@pytest.mark.parametrize("schedule,augment", [("cosine", True), ("step", False)])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, schedule, augment):
    """Run 3 epochs; separately, stop after 1, resume to 3: the final weights are identical."""
    cfg = _cfg(epochs=3, lr_schedule=schedule, lr_milestones=[1.5], augment=augment, warmup_epochs=0.5,
               max_train_batches=3)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, callbacks=[_StopAfter(1)])
    assert part["epochs"] == 1 and part["stopped_early"]
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert resumed["final_test_acc"] == full["final_test_acc"] and resumed["steps"] == full["steps"]
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    for x, y in zip(a["history"], b["history"]):
        assert x["train_loss"] == y["train_loss"] and x["lr"] == y["lr"]


def test_resume_of_wrong_or_truncated_checkpoint(tmp_path):
    train(_cfg(epochs=1), tmp_path / "r", progress=False)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="norm"):
        train(_cfg(epochs=2, norm="l2"), tmp_path / "r", progress=False, resume=True)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        train(_cfg(epochs=2), tmp_path / "r", progress=False, resume=True)
    with pytest.raises(CheckpointError, match="not found"):
        train(_cfg(epochs=2), tmp_path / "r", progress=False, resume=tmp_path / "none.pt")
    torch.save({"model": {}}, ckpt)
    with pytest.raises(CheckpointError, match="not written by"):
        load_checkpoint(ckpt)


def test_callbacks_see_every_step_and_log_metrics(tmp_path):
    class Recorder:
        def __init__(self):
            self.begin, self.steps, self.epochs = 0, [], []

        def on_train_begin(self, state):
            self.begin += 1

        def on_step_end(self, state):
            self.steps.append(state.step)
            assert state.loss is not None and state.optimizer is not None

        def on_epoch_end(self, state):
            self.epochs.append(state.epoch)
            state.metrics["weight_norm"] = float(state.model.fc.weight.detach().norm())

    rec = Recorder()
    train(_cfg(), tmp_path, progress=False, callbacks=[rec])
    assert rec.begin == 1 and rec.steps == list(range(1, 9)) and rec.epochs == [1, 2]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("weight_norm" in r for r in lines)


def test_optimizer_factory_and_model_transform(tmp_path):
    seen = {}

    def factory(model, config):
        seen["config"] = config
        return torch.optim.SGD(model.parameters(), lr=0.0), None  # None: the config's schedule

    def transform(model):
        seen["transformed"] = True
        return model

    model = create_model("resnet_digits", norm="l2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = train(_cfg(epochs=1), None, progress=False, model=model, optimizer_factory=factory, model_transform=transform)
    assert seen["transformed"] and seen["config"].epochs == 1 and s["out_dir"] is None
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k  # lr 0: parameters untouched


def test_evaluate_counts_correct_predictions():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float() * 10

    x = torch.tensor([[0.0], [1.0], [2.0], [1.0]])
    y = torch.tensor([0, 1, 1, 1])
    loader = [(x, y)]
    out = evaluate(Fixed(), loader, torch.device("cpu"))
    assert out["acc"] == 0.75
    ref = torch.nn.functional.cross_entropy(Fixed()(x), y).item()
    assert out["loss"] == pytest.approx(ref)


def test_language_model_reports_bits_per_character(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    cfg = TrainConfig(model="transformer_lm", dataset="text", norm="l1", epochs=1, batch_size=8, lr=3e-3,
                      optimizer="adamw", weight_decay=0.01, dataset_kwargs={"path": str(corpus), "block_size": 32},
                      model_kwargs={"n_layer": 1, "d_model": 32, "n_head": 2}, grad_clip=1.0, plots=True)
    s = train(cfg, tmp_path / "lm", progress=False)
    assert s["task"] == "lm"
    assert s["final_test_bpc"] == pytest.approx(s["final_test_loss"] / math.log(2))
    assert s["final_test_ppl"] == pytest.approx(math.exp(s["final_test_loss"]))
    assert (tmp_path / "lm" / "bpc.png").is_file() and (tmp_path / "lm" / "lr.png").is_file()
    lstm = cfg.replace(model="lstm_lm", norm="bwn", model_kwargs={"embed_size": 16, "hidden_size": 16})
    assert train(lstm, None, progress=False)["final_test_bpc"] > 0


def test_task_mismatch_and_bad_model_option():
    with pytest.raises(ConfigError, match="lm"):
        train(_cfg(model="transformer_lm"), None, progress=False)
    with pytest.raises(ConfigError, match="model_kwargs"):
        train(_cfg(model_kwargs={"colour": 1}), None, progress=False)


@pytest.mark.slow
def test_mnist1d_resnet20_learns(tmp_path):
    """A short real run: ResNet-20 (1-D) with L1 batch norm on MNIST-1D beats chance by far."""
    cfg = TrainConfig(model="resnet20", dataset="mnist1d", norm="l1", epochs=3, data_root=str(tmp_path))
    s = train(cfg, tmp_path / "run", progress=False)
    assert s["final_test_acc"] > 0.5  # chance is 0.1
    assert (tmp_path / "run" / "accuracy.png").is_file()


def test_presets_are_valid_configs():
    from normmatters.experiments.config import PRESETS, preset

    for name in PRESETS:
        cfg = preset(name)
        cfg.validate()
        assert cfg == load_config_from_text(cfg.to_toml())
    assert preset("digits", epochs=3).epochs == 3
    with pytest.raises(ConfigError, match="digits"):
        preset("nope")


def load_config_from_text(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.toml"
        p.write_text(text)
        return load_config(p)
