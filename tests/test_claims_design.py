"""The default reproduce run's design: C2's power, C5's equal-effort LSTM search, C4's fp16 mean
reductions, and the data splits they rest on (fast: no training, the trainer is replaced)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from normmatters.experiments.claims import CLAIMS, c2, c4, c5, stats


# ---------------------------------------------------------------------------------------------
# C2: the default seeds reach the designed half-width
# ---------------------------------------------------------------------------------------------
def test_c2_default_seeds_keep_the_pilot_half_width_within_half_the_margin():
    for key, d in c2.DESIGN.items():
        need = stats.seeds_for_half_width(d["pilot_sd"], d["margin"] / 2)
        assert d["seeds"] >= need, key
        assert stats.half_width(d["pilot_sd"], d["seeds"]) <= d["margin"] / 2, key
    assert CLAIMS["C2"].seeds == max(d["seeds"] for d in c2.DESIGN.values())
    # the margins are the ones stated before the data
    assert c2.DESIGN["bn"]["margin"] == 0.01 and c2.DESIGN["ln"]["margin"] == 0.02


def test_c2_runs_every_arm_on_one_large_generated_test_set():
    base = dict(c2.image_settings("embedded")[0][1])
    l1 = c2.image_config(base, "l1", {}, 3)
    l2 = c2.image_config(base, "l2", {}, 3)
    assert l1.dataset_kwargs == l2.dataset_kwargs == {"num_samples": c2.IMAGE_TRAIN + c2.IMAGE_TEST,
                                                      "test_samples": c2.IMAGE_TEST}
    assert c2.IMAGE_TEST >= 20 * 1000 // 2 and l1.epochs % l1.eval_every == 0
    lm = c2.lm_config("l1", {}, 0)
    assert lm.dataset_kwargs["train_chars"] == c2.LM_TRAIN_CHARS and "max_chars" not in lm.dataset_kwargs


def test_mnist1d_test_samples_sizes_the_split(tmp_path):
    from normmatters.experiments.data.embedded import mnist1d_arrays

    a = mnist1d_arrays(tmp_path, num_samples=300, test_samples=200)
    assert a["x"].shape == (100, 40) and a["x_test"].shape == (200, 40)
    b = mnist1d_arrays(tmp_path, num_samples=300)  # the package's 80/20 split, its own cache file
    assert b["x"].shape == (240, 40) and b["x_test"].shape == (60, 40)
    with pytest.raises(ValueError):
        mnist1d_arrays(tmp_path, num_samples=300, test_samples=300)


def test_text_validation_split_is_carved_from_the_end_of_the_training_text():
    from normmatters.experiments.data.text import load_text

    kw = dict(block_size=8, max_chars=20_000, test_fraction=0.3, val_fraction=0.2)
    tr, info = load_text(split="train", **kw)
    va, _ = load_text(split="val", **kw)
    te, _ = load_text(split="test", **kw)
    assert load_text(train=False, **kw)[0].ids.tolist() == te.ids.tolist()
    assert load_text(train=True, **kw)[0].ids.tolist() == tr.ids.tolist()
    e = info.extra
    assert (e["train_tokens"], e["val_tokens"], e["test_tokens"]) == (11_200, 2_800, 6_000)
    full = load_text(split="train", block_size=8, max_chars=20_000, test_fraction=0.3)[0].ids
    assert full.tolist() == tr.ids.tolist() + va.ids.tolist()  # train + val = the old training text
    with pytest.raises(Exception):
        load_text(split="val", block_size=8, max_chars=20_000)  # no val_fraction, no validation split
    # train_chars: the first train_chars tokens train, the rest tests
    tr2, _ = load_text(split="train", block_size=8, max_chars=20_000, train_chars=15_000)
    te2, _ = load_text(split="test", block_size=8, max_chars=20_000, train_chars=15_000)
    assert len(tr2.ids) == 15_000 and len(te2.ids) == 5_000


# ---------------------------------------------------------------------------------------------
# C5: every LSTM arm gets the same search and keeps its own best rate on validation
# ---------------------------------------------------------------------------------------------
def _fake_val(norm: str, lr: float) -> float:
    # each arm has its own best rate on validation
    best = {"none": 1e-2, "wn": 3e-2, "bwn": 1e-1, "bwn_bounded": 3e-2}[norm]
    return 2.0 + abs(math.log10(lr) - math.log10(best))


def _fake_test(norm: str, lr: float) -> float:
    # test prefers the smallest rate for every arm: a search that peeked at test would pick 3e-3
    return 2.0 + lr


def test_c5_lstm_search_picks_each_arms_rate_on_validation_not_test(tmp_path, monkeypatch):
    calls = []

    def fake_train(config, run_dir, cache_dir, variant, progress, **kw):
        calls.append((config.norm, config.lr, config.seed, dict(config.dataset_kwargs)))
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        val = _fake_val(config.norm, config.lr) + 0.01 * config.seed
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": config.epochs, "val_bpc": val}) + "\n")
        return {"final_test_bpc": _fake_test(config.norm, config.lr), "final_test_loss": 1.0,
                "final_train_loss": 1.0, "wall_time": 0.0, "out_dir": str(run_dir)}

    monkeypatch.setattr(c5, "_train", fake_train)
    lstm = (c5.LSTM_PLAIN, c5.LSTM_WN, c5.LSTM_BWN, c5.LSTM_BOUNDED_BWN)
    res = c5.run(tmp_path, seeds=(0, 1, 2), runs=lstm, progress=False)
    assert res["lr_chosen"] == {c5.LSTM_PLAIN: 1e-2, c5.LSTM_WN: 3e-2, c5.LSTM_BWN: 1e-1, c5.LSTM_BOUNDED_BWN: 3e-2}
    grid = c5.LSTM_LRS["embedded"]
    # the same grid for every arm, with the first seed, on a validation split carved from training
    for norm in ("none", "wn", "bwn", "bwn_bounded"):
        assert sorted(lr for n, lr, s, _ in calls if n == norm and s == 0) == sorted(grid)
    assert all(dk.get("val_fraction", 0) > 0 for *_, dk in calls)
    # later seeds train the chosen rate only, and only the voted arms (not the official code's BWN)
    later = sorted((n, lr) for n, lr, s, _ in calls if s > 0)
    assert later == sorted([("bwn", 1e-1), ("none", 1e-2), ("wn", 3e-2)] * 2)
    # the rows the verdict pairs are the chosen rates' runs; each row says its rate and validation score
    by = {(r["run"], r["seed"]): r for r in res["rows"]}
    assert by[(c5.LSTM_BWN, 0)]["lr"] == 1e-1 and by[(c5.LSTM_PLAIN, 2)]["lr"] == 1e-2
    assert by[(c5.LSTM_PLAIN, 0)]["val_bpc"] == pytest.approx(2.0)
    assert len(res["lr_search"]) == 4 * len(grid)
    assert "learning-rate search" in res["notes"] and "**2.0000" in res["notes"]


# ---------------------------------------------------------------------------------------------
# C4: fp16 accumulation that cannot overflow, voted as the fp16 arms
# ---------------------------------------------------------------------------------------------
def test_c4_fp16_mean_reductions_are_voted_in_both_regimes():
    for p in ("l1", "l2"):
        kw = c4.SETTINGS[f"fp16mean16-{p}"][1]
        assert kw["accumulate_dtype"] == "fp16" and kw["precision_kwargs"]["summation"] == "pairwise_mean"
        assert c4.SETTINGS[f"fp16blk16-{p}"][1]["precision_kwargs"]["summation"] == "blocked_mean"
        assert c4.SETTINGS[f"fp16acc16-{p}"][1]["precision_kwargs"]["summation"] == "pairwise"
        for regime in c4.REGIMES:
            if (regime, p) != ("std", "l2"):  # reported, not voted: the first seed only
                assert c4.run_name(regime, f"fp16mean16-{p}") in c4.VOTED
    rows = [{"run": n, "seed": s, "test_acc": 0.95, "nonfinite": 0} for n in c4.RUNS for s in range(3)]
    core = {(c.a, c.rule) for c in c4.verdict(rows).core}
    assert ("raw-fp16mean16-l2", "failure") in core
    assert ("raw-fp16mean16-l1", "non-inferiority") in core and ("std-fp16mean16-l1", "non-inferiority") in core
    # the table names each arm's reduction
    table = c4._table(rows)
    assert "fp16 / fp16 (pairwise means)" in table and "fp16 / fp16 (pairwise sums)" in table


def test_c4_notes_a_run_that_fits_its_training_data_but_tests_at_chance():
    def row(name, seed, test, train, bad=0):
        return {"run": name, "seed": seed, "test_acc": test, "final_train_acc": train, "nonfinite": bad,
                "nonfinite_by_stage": {}, "first_nonfinite_step": None}

    rows = [row("raw-fp32-l1", 0, 0.98, 1.0), row("raw-fp16mean16-l1", 0, 0.097, 1.0),
            row("raw-fp16-l2", 0, 0.10, 0.10, bad=5)]
    notes = c4._notes(rows, None, 0.0, 8, {})
    assert "Trained but evaluated at chance" in notes and "raw-fp16mean16-l1 (seed 0)" in notes
    assert "raw-fp16-l2 (seed 0): train acc" not in notes  # diverged in training: not an evaluation failure
    assert "Trained but evaluated at chance" not in c4._notes(rows[:1], None, 0.0, 8, {})
