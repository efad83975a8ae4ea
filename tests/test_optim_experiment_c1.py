"""Claim C1's experiment wiring (normmatters.experiments.claims.c1), on a two-epoch run.

No accuracy claims here: the checks are identities of the four runs — the corrected and the
norm-scheduled runs have exactly the reference run's per-channel effective learning rate.
"""

from __future__ import annotations

import json
import math

import pytest

c1 = pytest.importorskip("normmatters.experiments.claims.c1")


@pytest.mark.slow
def test_four_runs_share_the_reference_effective_lr(tmp_path, monkeypatch) -> None:
    result = c1.run(tmp_path, seeds=(0,), progress=False,
                    overrides={"epochs": 2, "lr_milestones": [1]})
    assert result["claim"] == "C1"
    rows = {r["run"]: r for r in result["rows"]}
    assert set(rows) == set(c1.RUNS)
    for r in rows.values():
        assert r["scale_invariant_params"] > 0
        assert r["test_acc"] is not None and 0.0 <= r["test_acc"] <= 1.0
    # Every channel of the corrected run steps with η·‖w_i‖²/‖w_ref,i‖² / ‖w_i‖² = η/‖w_ref,i‖²;
    # the norm-scheduled run (fixed η, norms set to ‖w_ref,i‖/√f) with η f/‖w_ref,i‖²: both the
    # reference's rate, so the medians agree with WD on's at every epoch.
    logs = {}
    for name in c1.RUNS:
        lines = (tmp_path / f"{name}-s0" / "norms.jsonl").read_text().splitlines()
        logs[name] = [json.loads(x) for x in lines]
        assert [e["epoch"] for e in logs[name]] == [0, 1, 2]
    for name in ("wd_off_lr_correction", "norm_schedule"):
        for a, b in zip(logs[name], logs["wd_on"]):
            assert math.isclose(a["eff_lr"], b["eff_lr"], rel_tol=1e-5), (name, a["epoch"])
    # Without weight decay the norms grow and the effective LR falls below WD on's.
    assert logs["wd_off"][-1]["eff_lr"] < logs["wd_on"][-1]["eff_lr"]
    for fig in result["figures"]:
        assert (tmp_path / fig).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "wd_on-s0" / "reference_norms.pt").is_file()
    with pytest.raises(ValueError, match="unknown runs"):
        c1.run(tmp_path, runs=("wd_sometimes",), progress=False)
    # A second call in the same folder reuses the finished runs instead of training them again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("normmatters.experiments.trainer.train", no_training)
    again = c1.run(tmp_path, seeds=(0,), progress=False, overrides={"epochs": 2, "lr_milestones": [1]})
    assert again["rows"] == json.loads(json.dumps(result["rows"], default=float))
