"""Format emulation (Hoffer et al. 2018, Sec. 5): rounding equals torch's own casts, each format's real overflow and
underflow, unbiased stochastic rounding, integer quantization."""

import math

import pytest
import torch

from normmatters.precision import (
    FORMATS,
    get_format,
    quantize_int,
    round_to_format,
    stochastic_round,
)

FLOATS = ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]


def _wide(n=100_000):
    # Values spanning ~1e-20 … 1e20, so that every binade, subnormal and overflow region is hit.
    return torch.randn(n) * torch.exp(torch.randn(n) * 10)


@pytest.mark.parametrize("name", FLOATS)
def test_nearest_matches_torch_cast_where_torch_is_the_format(name):
    f = get_format(name)
    x = _wide()
    ours = round_to_format(x, f)
    torch_cast = x.to(f.torch_dtype).float()
    finite = x.abs() <= f.max  # below max torch's cast is the format's rounding for every dtype
    assert torch.equal(ours[finite], torch_cast[finite])
    if f.has_inf:  # fp16, bf16, e5m2: torch's overflow to ±inf is the format's
        assert torch.equal(ours.nan_to_num(0.5), torch_cast.nan_to_num(0.5))


@pytest.mark.parametrize("name", FLOATS)
def test_float64_grid_path_equals_cast_path(name):
    # Two independent implementations: torch's cast (float32 input) and the exact float64 grid.
    x = _wide()
    a = round_to_format(x, name)
    b = round_to_format(x.double(), name).float()
    assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))


@pytest.mark.parametrize("name", FLOATS)
def test_rounding_is_idempotent_and_monotone(name):
    x = _wide(20_000).sort().values
    r = round_to_format(x, name, overflow="saturate")
    assert torch.equal(round_to_format(r, name, overflow="saturate"), r)
    assert bool((r[1:] >= r[:-1]).all())


@pytest.mark.parametrize(
    "name,below,at_threshold,above",
    [
        # (largest value that rounds to max, the tie at max + ulp/2, just above it)
        ("fp16", (65519.0, 65504.0), (65520.0, math.inf), (70000.0, math.inf)),
        ("fp8_e5m2", (61439.0, 57344.0), (61440.0, math.inf), (1e6, math.inf)),
        # e4m3fn: max 448 has an even significand, so the tie at 464 rounds down; no inf: NaN.
        ("fp8_e4m3", (463.0, 448.0), (464.0, 448.0), (465.0, math.nan)),
    ],
)
def test_overflow_per_format(name, below, at_threshold, above):
    for value, expected in (below, at_threshold, above):
        for sign in (1.0, -1.0):
            got = float(round_to_format(torch.tensor([sign * value]), name)[0])
            if math.isnan(expected):
                assert math.isnan(got)
            else:
                assert got == sign * expected
    assert get_format(name).overflow_threshold == at_threshold[0]


def test_e4m3_infinity_becomes_nan_and_saturate_mode_clamps():
    x = torch.tensor([math.inf, -math.inf, 1e9, -500.0, math.nan])
    real = round_to_format(x, "fp8_e4m3")
    assert bool(real.isnan().all())
    sat = round_to_format(x, "fp8_e4m3", overflow="saturate")
    assert sat[:4].tolist() == [448.0, -448.0, 448.0, -448.0] and math.isnan(float(sat[4]))
    # torch's own cast saturates e4m3 (the "satfinite" conversion): pinned, since we correct it.
    assert torch.tensor([1e9]).to(torch.float8_e4m3fn).float().item() == 448.0
    sat16 = round_to_format(torch.tensor([1e9, -math.inf]), "fp16", overflow="saturate")
    assert sat16.tolist() == [65504.0, -65504.0]


@pytest.mark.parametrize("name", FLOATS)
def test_underflow_and_subnormals(name):
    f = get_format(name)
    tiny = f.smallest_subnormal
    x = torch.tensor([tiny, 0.5 * tiny, 0.75 * tiny, 1.5 * tiny, f.smallest_normal], dtype=torch.float64)
    r = round_to_format(x, f).tolist()
    # half the smallest subnormal is a tie between 0 and it: to even, 0; 1.5·tiny ties to 2·tiny.
    assert r == [tiny, 0.0, tiny, 2 * tiny, f.smallest_normal]


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e5m2", "fp8_e4m3"])
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(name):
    f = get_format(name)
    gen = torch.Generator().manual_seed(1)
    # values strictly between grid points, in several binades (and a subnormal one)
    base = torch.tensor([1.3, -2.71, 0.1234, 37.7, 3.3 * f.smallest_subnormal], dtype=torch.float64)
    draws = 40_000
    x = base.repeat(draws, 1)
    r = stochastic_round(x, f, generator=gen)
    lo = torch.minimum(round_to_format(base, f), base)
    for j in range(base.numel()):
        vals = torch.unique(r[:, j])
        assert vals.numel() == 2  # the two neighbours on the grid, nothing else
        ulp = float(vals[1] - vals[0])
        mean = float(r[:, j].mean())
        # the standard error of a two-point variable is at most ulp/2/sqrt(draws); allow 5 of them
        assert abs(mean - float(base[j])) < 5 * 0.5 * ulp / math.sqrt(draws)
    assert lo.numel() == base.numel()


def test_stochastic_rounding_keeps_representable_values():
    x = round_to_format(torch.randn(1000, dtype=torch.float64), "fp8_e4m3")
    assert torch.equal(stochastic_round(x, "fp8_e4m3"), x)


def test_quantize_int_grid_and_saturation():
    s = 0.01
    x = torch.tensor([0.0, 0.004, 0.006, -0.015, 1.26, 1.275, 5.0, -5.0])
    q = quantize_int(x, scale=s)
    # 1.275 → 127.5 → 128 (ties to even) → saturates at 127
    assert torch.allclose(q, torch.tensor([0.0, 0.0, 0.01, -0.02, 1.26, 1.27, 1.27, -1.27]), atol=1e-7)
    # per-channel scale broadcasts; a zero scale gives zeros
    q2 = quantize_int(torch.ones(2, 3), scale=torch.tensor([[0.5], [0.0]]), bits=4)
    assert q2.tolist() == [[1.0] * 3, [0.0] * 3]
    gen = torch.Generator().manual_seed(0)
    draws = quantize_int(torch.full((50_000,), 0.0137), scale=0.01, rounding="stochastic", generator=gen)
    assert abs(float(draws.mean()) - 0.0137) < 2e-4


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown format"):
        get_format("fp12")
    with pytest.raises(ValueError, match="rounding"):
        round_to_format(torch.ones(2), "fp16", rounding="up")
    with pytest.raises(ValueError, match="overflow"):
        round_to_format(torch.ones(2), "fp16", overflow="wrap")
    with pytest.raises(TypeError, match="floating-point"):
        round_to_format(torch.ones(2, dtype=torch.int64), "fp16")
    with pytest.raises(ValueError, match="quantize_int"):
        round_to_format(torch.ones(2), "int8")
    with pytest.raises(ValueError, match="scale"):
        quantize_int(torch.ones(2), scale=-1.0)
    assert set(FORMATS) >= {"fp16", "bf16", "fp8_e4m3", "fp8_e5m2"}
    assert get_format(torch.float8_e5m2) is FORMATS["fp8_e5m2"] and get_format("half") is FORMATS["fp16"]
