"""``normmatters train`` never overwrites a run or a user's file; bad ``--out`` folders; stray
temporaries; the commands without the ``experiments`` extra.

Every refusal is one line on stderr, exit status 2, and leaves the folder byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from normmatters.experiments import cli
from normmatters.experiments.checkpoint import load_checkpoint, save_checkpoint
from normmatters.experiments.config import TrainConfig
from normmatters.experiments.errors import ConfigError
from normmatters.experiments.trainer import train

QUICK = ["--model", "resnet_digits", "--dataset", "digits", "--batch-size", "128", "--no-progress",
         "--set", "max_train_batches=2", "--set", "plots=false"]


def _one_error_line(capsys, rc, *needles):
    out = capsys.readouterr()
    assert rc == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert lines[0].startswith("normmatters")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: its kind and, for files, a hash of its bytes."""
    if not root.exists():
        return {}
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return snap


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(["train", *QUICK, "--epochs", "1", "--norm", "l1", "--out", str(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# -- an earlier run, a user's folder ------------------------------------------------------------
def test_an_earlier_run_is_refused_without_resume_or_force(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = _snapshot(run)
    capsys.readouterr()
    line = _one_error_line(capsys, cli.main(["train", *QUICK, "--epochs", "1", "--norm", "linf", "--out", str(run)]),
                           str(run), "earlier run", "--resume", "--force")
    assert "checkpoint.pt" in line
    assert _snapshot(run) == before


def test_a_users_folder_is_never_written_nor_cleared(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text('model = "vgg11"\n# my own notes\n')
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = _snapshot(mine)
    for extra in ([], ["--force"]):
        _one_error_line(capsys, cli.main(["train", *QUICK, "--epochs", "1", "--out", str(mine), *extra]),
                        str(mine), "not empty", "config.toml")
        assert _snapshot(mine) == before
    # The same files under their own config file: still refused.
    _one_error_line(capsys, cli.main(["train", "--config", str(mine / "config.toml"), "--out", str(mine)]),
                    "not empty")
    assert _snapshot(mine) == before


def test_force_starts_the_run_over_but_never_deletes_other_files(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # left by a kill
    assert cli.main(["train", *QUICK, "--epochs", "1", "--norm", "linf", "--out", str(run), "--force"]) == 0
    capsys.readouterr()
    assert load_checkpoint(run / "checkpoint.pt")["config"]["norm"] == "linf"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list(run.glob(".*.tmp"))
    assert json.loads((run / "summary.json").read_text())["norm"] == "linf"
    # An earlier run with a file of the user's next to it: --force refuses, nothing changes.
    (run / "notes.txt").write_text("keep me")
    before = _snapshot(run)
    _one_error_line(capsys, cli.main(["train", *QUICK, "--epochs", "1", "--out", str(run), "--force"]),
                    "notes.txt", "--force removes only")
    assert _snapshot(run) == before
    _one_error_line(capsys, cli.main(["train", *QUICK, "--out", str(run), "--force", "--resume"]), "pass one")
    _one_error_line(capsys, cli.main(["train", *QUICK, "--force"]), "--force needs --out")
    assert _snapshot(run) == before


def test_resume_needs_a_checkpoint_and_an_existing_folder(finished_run, tmp_path, capsys):
    # A mistyped folder: an error, not a default-configuration training; nothing is created.
    typo = tmp_path / "rnu"
    _one_error_line(capsys, cli.main(["train", "--out", str(typo), "--resume", "--no-progress"]),
                    str(typo), "does not exist")
    assert not typo.exists()
    # A run killed before its first checkpoint: no checkpoint to resume from.
    run = _copy(finished_run, tmp_path / "run")
    (run / "checkpoint.pt").unlink()
    before = _snapshot(run)
    _one_error_line(capsys, cli.main(["train", "--out", str(run), "--resume", "--no-progress"]),
                    "no checkpoint.pt", "--force")
    assert _snapshot(run) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error_line(capsys, cli.main(["train", "--out", str(empty), "--resume"]), "nothing to resume")
    assert _snapshot(empty) == {}


def test_a_checkpoint_that_is_a_folder_is_found_before_training(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.pt").mkdir()
    before = _snapshot(run)
    _one_error_line(capsys, cli.main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]),
                    "checkpoint.pt", "not a file")
    _one_error_line(capsys, cli.main(["train", *QUICK, "--out", str(run), "--force"]), "checkpoint.pt")
    assert _snapshot(run) == before

    # The library's train(): before the data, the model or an epoch, not after the first epoch.
    class NoEpoch:
        def on_train_begin(self, state):
            raise AssertionError("training started")

    fresh = tmp_path / "fresh"
    (fresh / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(ConfigError, match="checkpoint.pt"):
        train(TrainConfig(model="resnet_digits", dataset="digits", epochs=1, max_train_batches=1, plots=False),
              fresh, progress=False, callbacks=[NoEpoch()])
    assert _snapshot(fresh) == {"checkpoint.pt": "dir"}


# -- bad --out ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "below_a_file", "proc", "sys", "unwritable"])
@pytest.mark.parametrize("cmd", ["train", "reproduce"])
def test_bad_out_is_one_line_and_exit_2(kind, cmd, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    if kind == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes in any folder")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out, needle = locked / "run", "locked"
    elif kind == "sys":  # not writable even by root
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys")
        out, needle = Path("/sys/normmatters-test"), "/sys"
    else:
        out, needle = {"file": (a_file, "not a folder"), "below_a_file": (a_file / "run", "not a folder"),
                       "proc": (Path("/proc/normmatters-test/run"), "/proc")}[kind]
    argv = ["train", *QUICK, "--epochs", "1", "--out", str(out)] if cmd == "train" else \
        ["reproduce", "--claims", "C2", "--out", str(out)]
    before = _snapshot(tmp_path)
    _one_error_line(capsys, cli.main(argv), "--out", needle)
    assert _snapshot(tmp_path) == before


def test_an_unwritable_run_folder_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError about a file in the run folder (a full disk, a folder made read-only) is one line."""
    import normmatters.experiments.trainer as trainer

    def fail(path, payload):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(trainer, "save_checkpoint", fail)
    out = tmp_path / "run"
    _one_error_line(capsys, cli.main(["train", *QUICK, "--epochs", "1", "--out", str(out)]),
                    "cannot write the run folder", "No space left")


# -- stray temporaries ----------------------------------------------------------------------------
def test_stray_checkpoint_temporaries_are_removed(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    strays = [run / ".checkpoint.pt.k1ll3d.tmp", run / ".metrics.jsonl.abc123.tmp"]
    for p in strays:
        p.write_bytes(b"left by a SIGKILL mid-write")
    (run / ".notes.txt.tmp").write_text("not a run's temporary")
    # A resumed run removes them at its start ...
    assert cli.main(["train", "--out", str(run), "--resume", "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert not any(p.exists() for p in strays) and (run / ".notes.txt.tmp").exists()
    # ... and every checkpoint write removes those of the checkpoint.
    stray = run / ".checkpoint.pt.zz9.tmp"
    stray.write_bytes(b"x")
    save_checkpoint(run / "checkpoint.pt", {"epoch": 0})
    assert not stray.exists() and load_checkpoint(run / "checkpoint.pt")["epoch"] == 0


# -- the core install ------------------------------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


EXTRA = ("matplotlib", "sklearn", "mnist1d", "tqdm")


def test_import_normmatters_does_not_import_the_experiments_extra():
    r = _python(f"""
        import sys, json
        import torch  # torch itself imports tqdm when it is installed (torch.hub)
        before = set(sys.modules)
        import normmatters
        new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {EXTRA!r})
        print(json.dumps(new))
    """)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_layers_work_without_the_experiments_extra():
    r = _python(f"""
        import sys
        for m in {EXTRA!r}:
            sys.modules[m] = None  # as if not installed
        import torch, normmatters
        y = normmatters.LpBatchNorm2d(3, p=1)(torch.randn(4, 3, 5, 5))
        print(tuple(y.shape))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(4, 3, 5, 5)"


@pytest.mark.parametrize("missing", ["matplotlib", "tqdm"])
def test_train_and_reproduce_without_the_extra_name_it_in_one_line(missing, tmp_path):
    r = _python(f"""
        import sys
        sys.modules[{missing!r}] = None  # as if not installed
        from normmatters.experiments.cli import main
        rc_train = main(["train", "--out", {str(tmp_path / 'run')!r}, "--no-progress"])
        rc_reproduce = main(["reproduce", "--out", {str(tmp_path / 'report')!r}])
        rc_bench = main(["bench", "--kinds", "batch", "--shapes", "4x3x4x4", "--dtypes", "float32", "--norms", "l1",
                         "--repeat", "1", "--warmup", "0", "--json", {str(tmp_path / 'bench.json')!r}])
        print(rc_train, rc_reproduce, rc_bench)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "2 2 0"
    lines = r.stderr.strip().splitlines()
    dist = {"matplotlib": "matplotlib", "tqdm": "tqdm"}[missing]
    for cmd, line in zip(("train", "reproduce"), lines[:2]):
        assert line.startswith(f"normmatters {cmd}: error:") and "experiments extra" in line and dist in line, line
        assert "pip install 'normmatters[experiments]'" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "report").exists()
    assert (tmp_path / "bench.json").is_file()
