"""Tests of the ``normmatters`` command: train, exact resume, bad input (exit 2, one line), dispatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from normmatters.experiments import cli
from normmatters.experiments.checkpoint import load_checkpoint
from normmatters.experiments.config import load_config

QUICK = ["--model", "resnet_digits", "--dataset", "digits", "--batch-size", "128", "--no-progress",
         "--set", "max_train_batches=3", "--set", "plots=false"]


def _one_error_line(capsys, rc, *needles):
    out = capsys.readouterr()
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert lines[0].startswith("normmatters")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_train_writes_run_folder_and_prints_one_summary_line(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", *QUICK, "--norm", "l1", "--epochs", "2", "--lr", "0.05", "--seed", "3",
                   "--weight-decay", "1e-4", "--set", "plots=true", "--set", "norm_kwargs.constant='paper'",
                   "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and "resnet_digits" in lines[0] and "accuracy" in lines[0] and str(out) in lines[0]
    cfg = load_config(out / "config.toml")
    assert (cfg.norm, cfg.epochs, cfg.lr, cfg.seed, cfg.weight_decay) == ("l1", 2, 0.05, 3, 1e-4)
    assert cfg.norm_kwargs == {"constant": "paper"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    for name in ("checkpoint.pt", "loss.png", "accuracy.png", "lr.png", "summary.json", "environment.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_file_and_flags(tmp_path, capsys):
    conf = tmp_path / "c.toml"
    conf.write_text('model = "resnet_digits"\ndataset = "digits"\nnorm = "linf"\nepochs = 1\nlr = 0.3\n'
                    'max_train_batches = 2\nplots = false\n[norm_kwargs]\nconstant = "paper"\n')
    rc = cli.main(["train", "--config", str(conf), "--lr", "0.01", "--out", str(tmp_path / "r"), "--no-progress",
                   "--set", "norm_kwargs.momentum=0.2"])
    assert rc == 0, capsys.readouterr().err
    cfg = load_config(tmp_path / "r" / "config.toml")
    assert cfg.norm == "linf" and cfg.lr == 0.01  # the flag wins over the file
    assert cfg.norm_kwargs == {"constant": "paper", "momentum": 0.2}  # --set KEY.SUB merges into the table


def test_resume_continues_exactly(tmp_path, capsys):
    """2 epochs straight == 1 epoch, then --resume to 2 (constant LR so the first run is a prefix)."""
    common = [*QUICK, "--norm", "l1", "--lr-schedule", "constant"]
    assert cli.main(["train", *common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert cli.main(["train", "--out", str(tmp_path / "b"), "--resume", "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert load_config(tmp_path / "b" / "config.toml").epochs == 2


@pytest.mark.parametrize("argv,needles", [
    (["--model", "resnet21"], ["resnet21", "resnet20"]),
    (["--dataset", "mnist2d"], ["mnist2d", "mnist1d"]),
    (["--norm", "l3"], ["l3", "top10"]),
    (["--set", "learning_rate=0.1"], ["learning_rate"]),
    (["--set", "epochs=-1"], ["epochs"]),
])
def test_bad_names_exit_2_with_one_line(argv, needles, capsys):
    _one_error_line(capsys, cli.main(["train", "--no-progress", *argv]), *needles)


def test_unknown_key_in_config_file(tmp_path, capsys):
    conf = tmp_path / "bad.toml"
    conf.write_text('model = "resnet20"\nbatchsize = 64\n')
    _one_error_line(capsys, cli.main(["train", "--config", str(conf)]), "batchsize", "batch_size")
    conf.write_text('model = "resnet20\n')
    _one_error_line(capsys, cli.main(["train", "--config", str(conf)]), "TOML")
    _one_error_line(capsys, cli.main(["train", "--config", str(tmp_path / "none.toml")]), "none.toml")


def test_missing_data_folder(tmp_path, capsys):
    folder = tmp_path / "data"
    line = _one_error_line(capsys, cli.main(["train", "--dataset", "cifar10", "--data-root", str(folder),
                                             "--out", str(tmp_path / "r"), "--no-progress"]),
                           str(folder / "cifar-10-batches-py"), "data_batch_1")
    assert "--download" in line


def test_truncated_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["train", *QUICK, "--epochs", "1", "--out", str(out)]) == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    _one_error_line(capsys, cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]),
                    "checkpoint", "truncated")
    _one_error_line(capsys, cli.main(["train", "--resume"]), "--out")


def test_dispatch_to_reproduce_and_bench(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("fake_reproduce")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fake_reproduce", fake)
    monkeypatch.setitem(cli._DISPATCH, "reproduce", "fake_reproduce")
    assert cli.main(["reproduce", "--quick", "C2"]) == 0 and calls == [["--quick", "C2"]]
    monkeypatch.setitem(cli._DISPATCH, "bench", "normmatters.kernels.no_such_bench")
    _one_error_line(capsys, cli.main(["bench"]), "bench", "missing")
    _one_error_line(capsys, cli.main(["frobnicate"]), "frobnicate")
    assert cli.main(["--help"]) == 0 and "reproduce" in capsys.readouterr().out


def test_python_dash_m_and_version(capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "normmatters", "train", "--norm", "l5"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "l5" in r.stderr
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("normmatters ")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a CLI run mid-way (whenever that happens to be), resume it, compare with a full run.

    Wherever the kill lands — before the first checkpoint, mid-write, between epochs — the atomic
    checkpoint and exact resume make the final weights equal to an uninterrupted run's.
    """
    import signal
    import time

    # The uninterrupted run in this process; the child processes use the same thread count, so
    # their floating-point reductions run in the same order.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    assert cli.main(["train", *QUICK, "--epochs", "4", "--out", str(tmp_path / "full")]) == 0
    args = [sys.executable, "-m", "normmatters", "train", *QUICK, "--epochs", "4", "--no-progress"]
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([*args, "--out", str(tmp_path / "killed"), "--resume"], env=env, capture_output=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]


def test_toml_reading_keeps_the_python_310_promise(monkeypatch):
    """tomllib is Python 3.11+: config.py falls back to the tomli backport (a dependency on 3.10), and
    nothing else in the package imports tomllib itself."""
    import sys
    import types
    from pathlib import Path

    import normmatters
    from normmatters.experiments import config

    src = Path(config.__file__).read_text(encoding="utf-8")
    start = src.index("try:  # Python 3.11+")
    block = src[start: src.index("import tomli as tomllib", start) + len("import tomli as tomllib")]
    fake = types.ModuleType("tomli")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on 3.10: the import fails
    monkeypatch.setitem(sys.modules, "tomli", fake)
    ns: dict = {}
    exec(block, ns)
    assert ns["tomllib"] is fake
    root = Path(normmatters.__file__).parent
    direct = [p.relative_to(root) for p in root.rglob("*.py") if p != Path(config.__file__)
              and any(line.strip() == "import tomllib" for line in p.read_text(encoding="utf-8").splitlines())]
    assert direct == []
    pyproject = (root.parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert 'requires-python = ">=3.10"' in pyproject and "tomli>=1.1; python_version < \\\"3.11\\\"" in pyproject
