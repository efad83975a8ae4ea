"""Tests of ``normmatters reproduce``: the claim registry, the run cache, continuing an interrupted
reproduce, the verdict rules, the report files, the paper-scale data check and the command line.

Claim functions are replaced by fakes (the real claims train for minutes); one slow test trains a
one-epoch run to check that C2 and C3 share their L2 baseline through the cache.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from normmatters.experiments import reproduce as rp
from normmatters.experiments.claims import (
    CLAIMS,
    cached_train,
    completed_summary,
    load_claim,
    missing_paper_data,
    paper_data,
    parse_claims,
    run_folder,
    run_key,
)
from normmatters.experiments.claims import verdict_for
from normmatters.experiments.claims import report as report_mod
from normmatters.experiments.claims.stats import aggregate
from normmatters.experiments.config import TrainConfig
from normmatters.experiments.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
def test_registry_names_five_claims_with_modules():
    assert list(CLAIMS) == ["C1", "C2", "C3", "C4", "C5"]
    for cid, info in CLAIMS.items():
        assert info.id == cid
        assert info.module == f"normmatters.experiments.claims.{cid.lower()}"
        assert info.title and info.embedded and info.paper
        assert set(info.paper_data) <= {"cifar10", "imagenet", "text"}


def test_parse_claims_accepts_case_spaces_numbers_and_rejects_unknown():
    assert parse_claims(None) == list(CLAIMS)
    assert parse_claims("all") == list(CLAIMS)
    assert parse_claims(" c3, C2 ,2") == ["C3", "C2"]  # order kept, duplicates dropped
    assert parse_claims(["C5"]) == ["C5"]
    with pytest.raises(ConfigError, match="C9"):
        parse_claims("C1,C9")
    with pytest.raises(ConfigError):
        parse_claims(",")


def test_load_claim_returns_run_of_own_modules_and_rejects_unknown():
    for cid in ("C2", "C3"):
        assert callable(load_claim(cid))
    with pytest.raises(ConfigError):
        load_claim("C7")


# ---------------------------------------------------------------------------------------------
# Run cache
# ---------------------------------------------------------------------------------------------
def _cfg(**kw) -> TrainConfig:
    base = dict(model="resnet_digits", dataset="digits", epochs=1, amp=False, plots=False)
    base.update(kw)
    return TrainConfig().replace(**base)


def test_run_key_depends_on_what_changes_results_only():
    a = _cfg()
    assert run_key(a) == run_key(_cfg())
    assert run_key(a) != run_key(_cfg(lr=0.05))
    assert run_key(a) != run_key(_cfg(norm_kwargs={"constant": "none"}))
    assert run_key(a) != run_key(_cfg(seed=1))
    assert run_key(a) != run_key(a, "lr-correction")
    # logging / checkpointing switches do not change the numbers
    assert run_key(a) == run_key(_cfg(plots=True, checkpoint=False, threads=1))
    assert run_folder(a, "/x").name.endswith(run_key(a))


class _FakeTrain:
    """Stands in for trainer.train: writes summary.json like the real one and counts calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, out_dir, *, progress=True, resume=False, **kw):
        self.calls.append({"config": config, "out_dir": Path(out_dir), "resume": resume, **kw})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        s = {"model": config.model, "final_test_acc": 0.5, "wall_time": 1.0, "task": "classification"}
        (out / "summary.json").write_text(json.dumps(s))
        return dict(s)


def test_cached_train_reuses_finished_run_and_resumes_unfinished(tmp_path, monkeypatch):
    from normmatters.experiments import trainer

    fake = _FakeTrain()
    monkeypatch.setattr(trainer, "train", fake)
    cfg = _cfg()
    s1 = cached_train(cfg, tmp_path, progress=False)
    s2 = cached_train(cfg, tmp_path, progress=False)
    assert len(fake.calls) == 1
    assert s1["reused"] is False and s2["reused"] is True
    assert fake.calls[0]["resume"] is False  # nothing to continue from

    assert s2["run_dir"] == str(run_folder(cfg, tmp_path))
    # another config is another run
    cached_train(_cfg(lr=0.01), tmp_path, progress=False)
    assert len(fake.calls) == 2
    # a damaged summary counts as unfinished: the run continues from its checkpoint
    (run_folder(cfg, tmp_path) / "summary.json").write_text("{not json")
    (run_folder(cfg, tmp_path) / "checkpoint.pt").write_bytes(b"")
    assert completed_summary(run_folder(cfg, tmp_path)) is None
    cached_train(cfg, tmp_path, progress=False)
    assert len(fake.calls) == 3 and fake.calls[-1]["resume"] is True


def test_cached_train_requires_variant_for_optimizer_factory(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        cached_train(_cfg(), tmp_path, optimizer_factory=lambda m, c: (None, None))


# ---------------------------------------------------------------------------------------------
# Aggregation and each claim's verdict rule
# ---------------------------------------------------------------------------------------------
def _rows(spec: dict[str, list[float]], key: str = "test_acc", **extra) -> list[dict]:
    return [{"run": name, "seed": i, key: v, **extra} for name, vals in spec.items() for i, v in enumerate(vals)]


def test_aggregate_matches_statistics_and_counts_nonfinite():
    rows = _rows({"a": [0.9, 0.92, 0.95], "b": [0.5, float("nan"), 0.6]})
    rows.append({"run": "c", "seed": 0, "test_acc": None})
    agg = aggregate(rows)
    assert list(agg) == ["a", "b", "c"]
    assert agg["a"]["test_acc"].mean == pytest.approx(statistics.mean([0.9, 0.92, 0.95]))
    assert agg["a"]["test_acc"].std == pytest.approx(statistics.stdev([0.9, 0.92, 0.95]))
    assert math.isnan(agg["b"]["test_acc"].mean) and agg["b"]["test_acc"].nonfinite == 1
    assert agg["c"]["test_acc"].nonfinite == 1
    assert aggregate([{"run": "x", "seed": 0, "test_acc": 0.5}])["x"]["test_acc"].std is None


def _ok(rows):
    return {"status": "ok", "rows": rows}


def _c2(bn_l1, ln_l1, bn_l2=(0.90, 0.91, 0.92), ln_l2=(3.0, 3.0, 3.0)):
    return _rows({"bn-l2": list(bn_l2), "bn-l1": list(bn_l1)}) + \
        _rows({"ln-l2": list(ln_l2), "ln-l1": list(ln_l1)}, key="test_bpc")


def test_c2_is_non_inferiority_and_better_than_l2_is_not_a_failure():
    # L1 layer norm better than L2 by 3.5 % (the old rule's "partly"): supported
    v = verdict_for("C2", _ok(_c2([0.899, 0.911, 0.918], [2.90, 2.89, 2.895])))
    assert v.verdict == "supported"
    assert [c.a for c in v.core] == ["bn-l1", "ln-l1"]
    v = verdict_for("C2", _ok(_c2([0.85, 0.86, 0.87], [2.90, 2.89, 2.895])))
    assert v.verdict.startswith("partly supported")
    v = verdict_for("C2", _ok(_c2([0.85, 0.86, 0.87], [3.3, 3.31, 3.29])))
    assert v.verdict == "not supported"
    # one seed: no interval, so no verdict either way
    one = _rows({"bn-l2": [0.90], "bn-l1": [0.95]}) + _rows({"ln-l2": [3.0], "ln-l1": [2.0]}, key="test_bpc")
    assert verdict_for("C2", _ok(one)).verdict == "inconclusive (1 seed)"
    only_bn = _rows({"bn-l2": [0.90, 0.91, 0.92], "bn-l1": [0.901, 0.909, 0.921]})
    v = verdict_for("C2", _ok(only_bn)).verdict
    assert v.startswith("supported") and "1 of 2" in v
    assert verdict_for("C2", _ok([])).verdict.startswith("inconclusive")


def test_c3_linf_margin_is_two_points_top10_one():
    base = {"bn-l2": [0.90, 0.91, 0.92], "bn-top10": [0.899, 0.909, 0.919]}
    v = verdict_for("C3", _ok(_rows({**base, "bn-linf": [0.885, 0.895, 0.905]})))  # 1.5 pt lower
    assert v.verdict == "supported"
    v = verdict_for("C3", _ok(_rows({**base, "bn-linf": [0.87, 0.88, 0.89]})))     # 3 pt lower
    assert v.verdict.startswith("partly supported")


def _c4(raw_fp16_l2, raw_l2_nonfinite, std_fp16_l2=(0.95, 0.95, 0.95)):
    rows = []
    spec = {"std-fp32-l2": (0.95, 0.95, 0.95), "std-fp32-l1": (0.95, 0.95, 0.95), "std-fp16-l1": (0.951, 0.949, 0.95),
            "std-fp16-l2": std_fp16_l2, "raw-fp32-l2": (0.95, 0.95, 0.95), "raw-fp32-l1": (0.95, 0.95, 0.95),
            "raw-fp16-l1": (0.951, 0.949, 0.95), "raw-fp16-l2": raw_fp16_l2, "raw-int8-l1": (0.94, 0.945, 0.94),
            "std-fp16mean16-l1": (0.95, 0.951, 0.949), "std-fp16mean16-l2": std_fp16_l2,
            "raw-fp16mean16-l1": (0.949, 0.95, 0.951), "raw-fp16mean16-l2": raw_fp16_l2}
    for name, vals in spec.items():
        for s, v in enumerate(vals):
            bad = raw_l2_nonfinite if name in ("raw-fp16-l2", "raw-fp16mean16-l2") else 0
            rows.append({"run": name, "seed": s, "test_acc": v, "nonfinite": bad})
    return rows


def test_c4_l2_fails_by_count_in_the_raw_regime_and_l1_holds_in_both():
    v = verdict_for("C4", _ok(_c4((0.1, 0.1, float("nan")), 1000)))
    assert v.verdict == "supported"
    std_l2 = next(c for c in v.checks if c.a == "std-fp16-l2")
    assert not std_l2.core and std_l2.outcome == "does not fail"
    # L2 fine in fp16 everywhere: the failure part of the claim is against
    v = verdict_for("C4", _ok(_c4((0.951, 0.949, 0.95), 0)))
    assert v.verdict.startswith("partly supported")
    # the count alone decides, even with a single seed
    one = [r for r in _c4((0.5, 0.5, 0.5), 3) if r["seed"] == 0]
    v = verdict_for("C4", _ok(one))
    assert next(c for c in v.core if c.a == "raw-fp16-l2").outcome == "fails"


def test_c4_names_its_accumulation_in_every_low_precision_setting():
    from normmatters.experiments.claims import c4

    for setting, (_, kw, _) in c4.SETTINGS.items():
        if kw:
            assert "compute_dtype" in kw and "accumulate_dtype" in kw, setting
    assert c4.SETTINGS["fp16-l2"][1]["accumulate_dtype"] == "fp32"
    assert c4.SETTINGS["fp16acc16-l2"][1]["accumulate_dtype"] == "fp16"
    assert set(c4.REGIMES) == {"std", "raw"}
    assert all(r in c4.RUNS for r in c4.VOTED)


def test_c1_is_equivalence_and_c5_non_inferiority_with_their_modules_run_names():
    from normmatters.experiments.claims import c1, c5

    c1_rows = _rows({c1.WD_ON: [0.90, 0.91, 0.92], c1.WD_OFF: [0.85, 0.86, 0.85],
                     c1.WD_OFF_LR_CORRECTION: [0.901, 0.909, 0.921], c1.NORM_SCHEDULE: [0.899, 0.911, 0.919]})
    v = verdict_for("C1", _ok(c1_rows))
    assert v.verdict == "supported"
    assert any(not c.core and c.passed is False for c in v.checks)  # WD off differs: context only
    c5_rows = _rows({c5.CNN_BN: [0.95, 0.96, 0.95], c5.CNN_WN: [0.9, 0.9, 0.9], c5.CNN_BWN: [0.951, 0.959, 0.95]}) + \
        _rows({c5.LSTM_PLAIN: [2.5, 2.5, 2.5], c5.LSTM_BWN: [2.9, 2.91, 2.92]}, key="test_bpc")
    assert verdict_for("C5", _ok(c5_rows)).verdict.startswith("partly supported")


def test_speed_verdict_pairs_step_times_of_c2_and_c3():
    from normmatters.experiments.claims import speed

    def timed(spec):
        return [{"run": n, "seed": i, "test_acc": 0.9, "step_cpu_time": t} for n, ts in spec.items()
                for i, t in enumerate(ts)]

    results = {"C2": _ok(timed({"bn-l2": [0.10, 0.11, 0.10], "bn-l1": [0.090, 0.099, 0.091]})),
               "C3": _ok(timed({"bn-l2": [0.10, 0.11, 0.10], "bn-linf": [0.150, 0.160, 0.152]}))}
    v = speed.verdict(results)
    assert [c.a for c in v.core] == ["bn-l1", "bn-linf"]
    l1, linf = v.core
    assert l1.outcome == "supported" and l1.diff["mean"] == pytest.approx(0.9, abs=0.01)
    assert linf.outcome == "not supported"
    assert v.verdict.startswith("partly supported")
    assert l1.seeds == [0, 1, 2]  # C3's copy of the shared L2 run is not counted twice
    assert speed.verdict({"C1": _ok([])}) is None


def test_failed_claim_verdict_says_not_run():
    v = verdict_for("C4", {"status": "error", "error": "ImportError: no module"})
    assert v.verdict == "not run: ImportError: no module"


# ---------------------------------------------------------------------------------------------
# reproduce(): running, reusing, failing, reporting
# ---------------------------------------------------------------------------------------------
class _FakeClaim:
    def __init__(self, cid, rows, *, figure=True):
        self.cid, self.rows, self.figure, self.calls = cid, rows, figure, 0

    def __call__(self, out_dir, *, seeds=(0,), scale="embedded", progress=True, cache_dir=None):
        self.calls += 1
        self.cache_dir = cache_dir
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        figs = []
        if self.figure:
            (out / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
            figs = ["curve.png"]
        rows = [dict(r, seed=s) for s in seeds for r in self.rows]
        return {"claim": self.cid, "rows": rows, "figures": figs, "notes": "fake"}


def _boom(out_dir, *, seeds=(0,), scale="embedded", progress=True):
    raise RuntimeError("boom")


def _c2_rows():
    return [{"run": "bn-l2", "test_acc": 0.9}, {"run": "bn-l1", "test_acc": 0.904},
            {"run": "ln-l2", "test_bpc": 3.0}, {"run": "ln-l1", "test_bpc": 3.02}]


def test_reproduce_writes_report_reuses_finished_claims_and_isolates_failures(tmp_path):
    c2 = _FakeClaim("C2", _c2_rows())
    out = rp.reproduce(tmp_path, claims=["C2", "C3"], seeds=[0], progress=False, runners={"C2": c2, "C3": _boom})
    res = out["results"]
    assert res["C2"]["status"] == "ok" and res["C3"]["status"] == "error"
    assert c2.cache_dir == tmp_path / "runs"  # the shared run cache is passed where accepted
    text = (tmp_path / "REPORT.md").read_text()
    assert "not run: RuntimeError: boom" in text
    assert "RuntimeError" in (tmp_path / "c3" / "error.txt").read_text()
    assert "93.03 / 93.07" in text               # the paper's numbers beside ours
    assert "92.40 / 92.05" in text               # and seed 003's
    assert "| bn-l1 | 1 | 90.40 |" in text       # measured, in percent
    assert "**Verdict: inconclusive (1 seed).**" in text   # one seed: no interval
    assert "| bn-l1 vs bn-l2 | non-inferiority | +0.40 pt (1 seed) | 1 | — | 1 pt | inconclusive (1 seed) | yes |" in text
    assert "![C2 curve](c2/curve.png)" in text   # the module's figure, relative to the report
    assert (tmp_path / "figures" / "c2_summary.png").is_file()
    for word in ("torch", "numpy", "python", "normmatters", "cpu_count"):
        assert f"| {word} |" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["claims"]["C2"]["verdict"]["verdict"] == "inconclusive (1 seed)"
    check = data["claims"]["C2"]["verdict"]["checks"][0]
    assert check["rule"] == "non-inferiority" and check["margin"] == 0.01 and check["diff"]["lo"] is None
    assert data["claims"]["C3"]["status"] == "error"

    # a second invocation reuses the finished claim and retries the failed one
    c2b = _FakeClaim("C2", _c2_rows())
    calls = []

    def c3_ok(out_dir, *, seeds=(0,), scale="embedded", progress=True):
        calls.append(1)
        return {"claim": "C3", "rows": [{"run": "bn-l2", "seed": 0, "test_acc": 0.9}], "figures": [], "notes": ""}

    out = rp.reproduce(tmp_path, claims=["C2", "C3"], seeds=[0], progress=False, runners={"C2": c2b, "C3": c3_ok})
    assert c2b.calls == 0 and out["results"]["C2"]["reused"] is True
    assert calls == [1] and out["results"]["C3"]["status"] == "ok"
    assert "(reused)" in (tmp_path / "REPORT.md").read_text()
    # other seeds or --force run the claim again
    rp.reproduce(tmp_path, claims=["C2"], seeds=[0, 1], progress=False, runners={"C2": c2b})
    assert c2b.calls == 1
    rp.reproduce(tmp_path, claims=["C2"], seeds=[0, 1], progress=False, force=True, runners={"C2": c2b})
    assert c2b.calls == 2


def test_report_shows_spread_over_seeds(tmp_path):
    class Seeded(_FakeClaim):
        def __call__(self, out_dir, *, seeds=(0,), scale="embedded", progress=True):
            return {"claim": "C2", "figures": [], "notes": "",
                    "rows": [{"run": n, "seed": s, "test_acc": 0.9 + 0.01 * s * (n == "bn-l1")}
                             for s in seeds for n in ("bn-l2", "bn-l1")]}

    rp.reproduce(tmp_path, claims=["C2"], seeds=[0, 1, 2], progress=False, runners={"C2": Seeded("C2", [])})
    text = (tmp_path / "REPORT.md").read_text()
    assert "| bn-l1 | 3 | 91.00 ± 1.00 |" in text
    # the summary shows the verdict, the paired interval and the margin: +1.00 pt ± 4.303 · 1.00 / √3
    # with its half-width and minimum detectable difference: (4.303 + 1.061) · 1.00 / √3 = 3.10
    assert ("| L1 batch norm as good as L2 | +1.00 pt [-1.48 pt, +3.48 pt] | ±2.48 pt / 3.10 pt | 1 pt | "
            "inconclusive at this scale |") in text
    data = json.loads((tmp_path / "results.json").read_text())
    check = data["claims"]["C2"]["verdict"]["checks"][0]
    assert check["diff"]["lo"] == pytest.approx(0.01 - 4.302652730 * 0.01 / math.sqrt(3))
    assert "non-inferiority" in data["claims"]["C2"]["verdict"]["rule"] or check["rule"] == "non-inferiority"


def test_nan_results_are_valid_json(tmp_path):
    rows = [{"run": "fp32-l2", "test_acc": 0.9}, {"run": "fp16-l2", "test_acc": float("nan")}]
    rp.reproduce(tmp_path, claims=["C4"], seeds=[0], progress=False,
                 runners={"C4": _FakeClaim("C4", rows, figure=False)})
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN literal
    agg = data["claims"]["C4"]["aggregate"]["fp16-l2"]["test_acc"]
    assert agg["mean"] is None and agg["nonfinite"] == 1


def test_main_exit_status_when_every_claim_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rp, "load_claim", lambda cid: _boom)
    # --jobs 1: worker processes would import the real claim modules, not this test's fakes
    assert rp.main(["--claims", "C1,C2", "--out", str(tmp_path), "--no-progress", "--jobs", "1"]) == 1
    assert "not run" in capsys.readouterr().out
    assert rp.main(["--seeds", "0", "--out", str(tmp_path)]) == 2
    assert rp.main(["--claims", "C8", "--out", str(tmp_path)]) == 2


def test_main_one_claim_ok_exits_zero(tmp_path, monkeypatch):
    fakes = {"C2": _FakeClaim("C2", _c2_rows())}
    monkeypatch.setattr(rp, "load_claim", lambda cid: fakes.get(cid, _boom))
    assert rp.main(["--claims", "C2,C3", "--out", str(tmp_path), "--no-progress", "--jobs", "1"]) == 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def test_parser_defaults_and_flags():
    a = rp.build_parser().parse_args([])
    assert (a.scale, a.claims, a.out, a.seeds, a.force, a.progress, a.quick) == \
        ("embedded", None, None, None, False, True, False)  # no --seeds: each claim's own number
    a = rp.build_parser().parse_args(["--scale", "paper", "--claims", "C2,C3", "--out", "x", "--seeds", "3",
                                      "--data-root", "/d", "--force", "--no-progress"])
    assert (a.scale, a.claims, a.out, a.seeds, a.data_root, a.force, a.progress) == \
        ("paper", "C2,C3", "x", 3, "/d", True, False)
    with pytest.raises(SystemExit):
        rp.build_parser().parse_args(["--scale", "huge"])


def test_default_out_dir_is_reports_scale(tmp_path, monkeypatch):
    seen = {}

    def fake_reproduce(out, **kw):
        seen.update(out=out, **kw)
        return {"results": {}, "report": out / "REPORT.md", "json": out / "results.json", "wall_time": 0.0,
                "interrupted": False}

    monkeypatch.setattr(rp, "reproduce", fake_reproduce)
    monkeypatch.chdir(tmp_path)
    assert rp.main(["--no-progress"]) == 0
    assert seen["out"] == Path("reports") / "embedded"
    assert seen["claims"] == list(CLAIMS) and seen["seeds"] is None and seen["scale"] == "embedded"
    assert seen["jobs"] == "auto"
    rp.main(["--scale", "paper", "--seeds", "2"])
    assert seen["out"] == Path("reports") / "paper" and seen["seeds"] == [0, 1]
    rp.main(["--quick"])
    assert seen["seeds"] == [0]
    assert rp.main(["--quick", "--seeds", "5"]) == 2


def test_cli_dispatches_reproduce(tmp_path, monkeypatch):
    from normmatters.experiments import cli

    monkeypatch.setattr(rp, "load_claim", lambda cid: _FakeClaim(cid, _c2_rows()))
    assert cli.main(["reproduce", "--claims", "C2", "--out", str(tmp_path), "--no-progress", "--jobs", "1"]) == 0
    assert (tmp_path / "REPORT.md").is_file()


def test_resolve_jobs(monkeypatch):
    monkeypatch.setattr(rp, "usable_cpus", lambda: 2)
    assert rp.resolve_jobs("auto", 5) == 2
    assert rp.resolve_jobs("auto", 1) == 1
    monkeypatch.setattr(rp, "usable_cpus", lambda: 64)
    assert rp.resolve_jobs("auto", 5) == 4
    assert rp.resolve_jobs("3", 5) == 3 and rp.resolve_jobs(8, 2) == 2
    for bad in ("0", "many", -1):
        with pytest.raises(ConfigError, match="--jobs"):
            rp.resolve_jobs(bad, 5)
    with pytest.raises(ConfigError, match="jobs=1"):
        rp.reproduce("unused", claims=["C2", "C3"], jobs=2, runners={"C2": _boom})


def test_parallel_claims_in_worker_processes(tmp_path):
    # Paper scale without data: each worker process checks the data and returns at once, which
    # exercises the process pool, the record passing and the report without training.
    out = rp.reproduce(tmp_path / "rep", claims=["C2", "C3"], scale="paper", data_root=str(tmp_path / "none"),
                       progress=False, jobs=2)
    assert list(out["results"]) == ["C2", "C3"]  # claim order, whatever order they finished in
    assert all(r["error"].startswith("data missing") for r in out["results"].values())
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["meta"]["jobs"] == 2


# ---------------------------------------------------------------------------------------------
# Paper scale: missing data
# ---------------------------------------------------------------------------------------------
def test_paper_data_missing_is_reported_with_how_to_provide(tmp_path):
    status = paper_data(tmp_path)
    assert set(status) == {"cifar10", "imagenet", "text"}
    assert not any(d.present for d in status.values())
    assert "cifar-10-python.tar.gz" in status["cifar10"].how
    assert "train" in status["imagenet"].how and "val" in status["imagenet"].how
    assert [d.name for d in missing_paper_data("C2", tmp_path)] == ["cifar10", "imagenet", "text"]


def test_paper_scale_claim_without_data_is_not_run_and_report_says_what_is_missing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()

    def never(*a, **k):
        raise AssertionError("a claim without its data must not be called")

    out = rp.reproduce(tmp_path / "rep", claims=["C3"], scale="paper", data_root=str(data), progress=False,
                       runners={"C3": never})
    rec = out["results"]["C3"]
    assert rec["status"] == "error" and rec["error"] == "data missing: cifar10, imagenet"
    text = (tmp_path / "rep" / "REPORT.md").read_text()
    assert "data missing: cifar10, imagenet" in text
    assert "## Paper-scale data" in text and "cifar-10-python.tar.gz" in text


def test_paper_scale_runs_claims_whose_data_is_present(tmp_path):
    data = tmp_path / "data"
    folder = data / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"")
    assert paper_data(data)["cifar10"].present
    fake = _FakeClaim("C3", [{"run": "bn-l2", "test_acc": 0.9}], figure=False)
    out = rp.reproduce(tmp_path / "rep", claims=["C3"], scale="paper", data_root=str(data), progress=False,
                       runners={"C3": fake})
    assert fake.calls == 1 and out["results"]["C3"]["status"] == "ok"


def test_c2_paper_scale_without_any_data_raises_data_not_found(tmp_path):
    from normmatters.experiments.claims import c2
    from normmatters.experiments.errors import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="cifar10"):
        c2.run(tmp_path / "c2", scale="paper", data_root=tmp_path / "nothing", progress=False)


# ---------------------------------------------------------------------------------------------
# The real C2 and C3 share their L2 run through the cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_c2_and_c3_share_the_l2_baseline(tmp_path, monkeypatch):
    from normmatters.experiments.claims import c2, c3

    monkeypatch.setattr(c2, "IMAGE_EPOCHS", 1)
    cache = tmp_path / "runs"
    r2 = c2.run(tmp_path / "c2", runs=["bn-l2"], cache_dir=cache, progress=False)
    r3 = c3.run(tmp_path / "c3", runs=["bn-l2"], cache_dir=cache, progress=False)
    (row2,), (row3,) = r2["rows"], r3["rows"]
    assert row2["reused"] is False and row3["reused"] is True
    assert row2["run_dir"] == row3["run_dir"]
    assert row3["test_acc"] == row2["test_acc"] and 0.0 <= row2["test_acc"] <= 1.0
    assert len(list(cache.iterdir())) == 1


# ---------------------------------------------------------------------------------------------
# The output folder: its own report is continued, anything else refused
# ---------------------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def test_out_folder_with_other_files_is_refused_and_left_untouched(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "config.toml").write_text("[train]\n")
    before = _tree(folder)
    c2 = _FakeClaim("C2", _c2_rows())
    with pytest.raises(ConfigError, match="not a normmatters reproduce report"):
        rp.reproduce(folder, claims=["C2"], seeds=[0], progress=False, runners={"C2": c2})
    assert c2.calls == 0 and _tree(folder) == before
    # through the command line: one line on stderr, exit status 2, nothing changed
    assert rp.main(["--claims", "C2", "--out", str(folder), "--no-progress", "--jobs", "1", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normmatters reproduce: error: --out:")
    assert _tree(folder) == before
    # a file is refused too
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        rp.check_out_dir(tmp_path / "afile")


def test_out_folder_of_an_earlier_reproduce_is_continued(tmp_path):
    folder = tmp_path / "rep"
    c2 = _FakeClaim("C2", _c2_rows())
    rp.reproduce(folder, claims=["C2"], seeds=[0], progress=False, runners={"C2": c2})
    assert (folder / rp.MARKER_NAME).is_file()
    rp.reproduce(folder, claims=["C2"], seeds=[0], progress=False, runners={"C2": c2})
    assert c2.calls == 1  # the finished claim is reused
    # an empty folder is fine; a report folder written before the marker existed is recognised
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rp.check_out_dir(empty) == empty
    (folder / rp.MARKER_NAME).unlink()
    assert rp.check_out_dir(folder) == folder


def test_each_claim_runs_its_own_default_seeds_unless_seeds_are_given(tmp_path):
    seen = {}

    def recorder(cid):
        def run(out_dir, *, seeds=(0,), scale="embedded", progress=True):
            seen[cid] = list(seeds)
            return {"claim": cid, "rows": [{"run": "x", "seed": s, "test_acc": 0.9} for s in seeds]}
        return run

    runners = {"C2": recorder("C2"), "C3": recorder("C3")}
    out = rp.reproduce(tmp_path / "a", claims=["C2", "C3"], progress=False, runners=runners)
    assert seen == {"C2": list(range(CLAIMS["C2"].seeds)), "C3": list(range(CLAIMS["C3"].seeds))}
    assert CLAIMS["C2"].seeds == 5 and CLAIMS["C3"].seeds == rp.DEFAULT_SEEDS == 3
    assert out["results"]["C2"]["seeds"] == [0, 1, 2, 3, 4]
    head = (tmp_path / "a" / "REPORT.md").read_text(encoding="utf-8")
    assert "seeds: C2: 0–4; C3: 0–2;" in head
    meta = json.loads((tmp_path / "a" / "results.json").read_text(encoding="utf-8"))["meta"]
    assert meta["claim_seeds"] == {"C2": [0, 1, 2, 3, 4], "C3": [0, 1, 2]}
    # --seeds N gives every claim the same N, and the header lists them once
    rp.reproduce(tmp_path / "b", claims=["C2", "C3"], seeds=[0, 1], progress=False, runners=runners)
    assert seen == {"C2": [0, 1], "C3": [0, 1]}
    assert "seeds: 0, 1;" in (tmp_path / "b" / "REPORT.md").read_text(encoding="utf-8")


def test_a_verdict_rule_that_fails_to_import_does_not_cost_the_report(tmp_path, monkeypatch, capsys):
    # a claim module edited while the runs went on can fail to import when its verdict is asked for
    def broken(cid, result):
        raise ImportError("cannot import name 'Something' from 'normmatters.optim'")

    monkeypatch.setattr(rp, "verdict_for", broken)
    monkeypatch.setattr(report_mod, "verdict_for", broken)
    c2 = _FakeClaim("C2", _c2_rows())
    out = rp.reproduce(tmp_path, claims=["C2"], seeds=[0, 1], progress=False, runners={"C2": c2})
    text = out["report"].read_text(encoding="utf-8")
    assert "the verdict rule failed: ImportError" in text
    assert out["results"]["C2"]["status"] == "ok" and (tmp_path / "c2" / "result.json").is_file()
