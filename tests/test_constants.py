"""The constants of SPEC §2: closed forms, limits and Monte Carlo agreement."""

import math

import pytest
import torch

from normmatters.functional import C_L1, lp_constant, paper_constant, topk_constant


def test_c_l1_is_inverse_mean_abs_gaussian():
    assert C_L1 == pytest.approx(math.sqrt(math.pi / 2), rel=1e-15)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 131072])
def test_top_n_is_l1(n):
    # The mean of all n absolute values is L1: C_n(n) = sqrt(pi/2) exactly.
    assert topk_constant(n, n) == pytest.approx(C_L1, rel=1e-12)


def test_max_of_two_closed_form():
    # E max(|Z1|, |Z2|) = 2/sqrt(pi) for i.i.d. standard normals.
    assert topk_constant(2, 1) == pytest.approx(math.sqrt(math.pi) / 2, rel=1e-9)


def test_k_equals_n_minus_one_matches_exact_sum_identity():
    # sum(top n-1) = sum(all) - min, so E[min] = n E|Z| - (n-1) E[top_{n-1} mean].
    # For n=2: E min(|Z1|,|Z2|) = 2 sqrt(2/pi) - 2/sqrt(pi).
    e_top1 = 1 / topk_constant(2, 1)
    e_min = 2 * math.sqrt(2 / math.pi) - e_top1
    assert e_min == pytest.approx(2 * math.sqrt(2 / math.pi) - 2 / math.sqrt(math.pi), rel=1e-9)
    assert e_min == pytest.approx(math.sqrt(2 / math.pi) * (2 - math.sqrt(2)), rel=1e-9)


def test_constant_increases_with_k():
    n = 500
    values = [topk_constant(n, k) for k in (1, 2, 5, 10, 50, 250, 499, 500)]
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("n,k", [(5, 1), (10, 3), (64, 10), (1000, 1), (4096, 10), (3000, 1500)])
def test_monte_carlo(n, k):
    g = torch.Generator().manual_seed(1234 + n + k)
    trials = max(2000, min(200_000, 20_000_000 // n))
    x = torch.randn(trials, n, generator=g, dtype=torch.float64).abs()
    m = x.topk(k, dim=1).values.mean(dim=1)
    se = (m.std() / math.sqrt(trials)).item()
    assert abs(m.mean().item() - 1 / topk_constant(n, k)) < 5 * se


def test_paper_constant_formula_and_overestimate():
    n = 64 * 32 * 32
    expected = (1 + math.sqrt(math.pi * math.log(4))) / (2 * math.sqrt(2 * math.log(n)))
    assert paper_constant(n) == pytest.approx(expected, rel=1e-15)
    # The official constant overestimates sigma at ResNet sizes (SPEC §2: by 10-45 %).
    ratio = paper_constant(n) / topk_constant(n, 1)
    assert 1.1 < ratio < 1.5


def test_lp_constant_dispatch():
    assert lp_constant(2, None, 100) == 1.0
    assert lp_constant(1, None, 100) == C_L1
    assert lp_constant("inf", None, 100) == topk_constant(100, 1)
    assert lp_constant(float("inf"), 10, 100) == topk_constant(100, 10)
    assert lp_constant("inf", 10, 100, "paper") == paper_constant(100)
    assert lp_constant(1, None, 100, "none") == 1.0


@pytest.mark.parametrize(
    "args,match",
    [((3, None, 10), "p must be"), (("inf", 11, 10), "k <= n"), (("inf", 0, 10), "positive integer"),
     ((1, None, 10, "bogus"), "constant must be")],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        lp_constant(*args)
