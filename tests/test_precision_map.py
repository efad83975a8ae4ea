"""The precision map (Hoffer et al. 2018, Sec. 5, measured further): its cells follow the formats'
arithmetic (float32 passes everywhere; with fp16 sums L2 fails exactly beyond the sum-of-squares
overflow, where L1 still passes; with float32 sums L2 fails only where its squares overflow), and
it writes its table and figure."""

import math

import numpy as np
import pytest

from normmatters.precision.precision_map import precision_map


def test_fp32_passes_everywhere_and_fp16_l2_fails_where_its_sum_overflows(tmp_path):
    scales = [1e-2, 1.0, 4.0, 8.0]
    n = 4096
    pm = precision_map(
        formats=[("fp32", "fp32", None), ("fp16", "fp16", "fp16")],
        norms=[("L1", 1.0, None), ("L2", 2.0, None), ("Top10", math.inf, 10)],
        sizes=[n], scales=scales, channels=4,
    )
    ok = pm.passes()
    assert ok[0].all()  # float32 is within 1% of float64 at every cell
    assert float(np.nanmax(pm.errors[0])) < 1e-5
    # fp16 with fp16 sums: Σd² ≈ n·s² overflows 65504 for s = 8 (262144) but not for s = 1;
    # Σ|d| ≈ 0.8·n·s does not overflow at s = 8 (26000)
    l1, l2 = ok[1, 0, 0], ok[1, 1, 0]
    assert l2[1] and not l2[3] and math.isinf(pm.errors[1, 1, 0, 3])
    assert l1[1] and l1[3]
    rows = pm.table()
    assert {r["norm"] for r in rows} == {"L1", "L2", "Top10"} and len(rows) == 6
    r = next(r for r in rows if r["format"] == "fp16" and r["norm"] == "L2")
    assert r["scale_max"] < 8.0
    md = pm.to_markdown()
    assert md.count("\n") == 1 + 2  # header, rule, one line per (format, n)
    path = pm.plot(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000 and str(path).endswith("map.png")


def test_topk_cells_below_k_are_undefined_and_bad_input_is_refused():
    pm = precision_map(formats=[("bf16", "bf16", "bf16")], norms=[("Top10", math.inf, 10)],
                       sizes=[8, 64], scales=[1.0], channels=2)
    assert np.isnan(pm.errors[0, 0, 0, 0]) and not np.isnan(pm.errors[0, 0, 1, 0])
    with pytest.raises(ValueError, match="positive"):
        precision_map(scales=[0.0])
    with pytest.raises(ValueError, match="unknown format"):
        precision_map(formats=[("x", "fp9", None)])


def test_rows_default_to_float32_sums_and_may_choose_their_reduction():
    # s = 8, n = 4096: fp16 sums of d² (≈ 262144) overflow; float32 sums of the same fp16 squares
    # (each ≤ ~1600) and the fp16 pairwise mean (≈ 64) do not. At s = 400 the squares themselves
    # overflow (|d| > 256): L2 fails with any accumulation, L1 passes with float32 sums or means.
    pm = precision_map(
        formats=[("fp16", "fp16", None), ("fp16 sums", "fp16", "fp16"),
                 ("fp16 mean", "fp16", "fp16", "pairwise_mean")],
        norms=[("L1", 1.0, None), ("L2", 2.0, None)], sizes=[4096], scales=[8.0, 400.0], channels=4,
    )
    ok = pm.passes()[:, :, 0]  # (format, norm, scale)
    assert ok[0, 1, 0] and not ok[1, 1, 0] and ok[2, 1, 0]
    assert ok[0, 0, 1] and not ok[1, 0, 1] and ok[2, 0, 1]
    assert not ok[:, 1, 1].any()
    with pytest.raises(ValueError, match="format row"):
        precision_map(formats=[("x", "fp16")])
