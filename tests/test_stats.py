"""The verdict's arithmetic on samples worked out by hand."""
import math

import numpy as np
import pytest
import scipy.stats

from pipeline.stats import Interval, decide, mean_ci, paired_difference, probability_of_improvement, seeds_and_items_ci


def test_mean_ci_of_a_hand_sample():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302652729749464 -> half width 4.3027 / sqrt(3)
    got = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert (got.mean, got.n) == (2.0, 3)
    assert got.low == pytest.approx(2 - half, rel=1e-12) and got.high == pytest.approx(2 + half, rel=1e-12)


def test_the_level_widens_the_interval():
    narrow, wide = mean_ci([0.10, 0.12, 0.11, 0.13], 0.90), mean_ci([0.10, 0.12, 0.11, 0.13], 0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_paired_difference_removes_the_shared_seed_spread():
    """Seeds vary a lot, the gap between methods does not: paired, the gap is significant."""
    baseline = [0.10, 0.20, 0.30]
    tuned = [0.09, 0.19, 0.285]
    diff = paired_difference(tuned, baseline)
    assert diff.mean == pytest.approx(-(0.01 + 0.01 + 0.015) / 3, rel=1e-12)
    assert diff.excludes_zero and diff.high < 0
    unpaired = mean_ci(tuned)
    assert unpaired.high - unpaired.low > 10 * (diff.high - diff.low)


def test_one_seed_has_no_interval_and_bad_input_is_refused():
    one = mean_ci([0.2])
    assert one.mean == 0.2 and math.isinf(one.low) and not one.excludes_zero
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        mean_ci([])


def test_seeds_and_items_interval_of_a_hand_table():
    # 2 seeds x 4 items. Seed means 0.5, 0.25 (var 0.03125); item means 1, 0.5, 0, 0
    # (mean 0.375, var (0.390625 + 0.015625 + 0.140625 * 2) / 3 = 0.6875 / 3). Residuals
    # x - seed mean - item mean + 0.375: seed 0 -1/8, 3/8, -1/8, -1/8; seed 1 the negatives; squares
    # sum to 0.375, the residual mean square is 0.375 / ((2 - 1) * (4 - 1)) and c = that / (2 * 4).
    table = [[1, 1, 0, 0], [1, 0, 0, 0]]
    got = seeds_and_items_ci(table)
    a, b, c = 0.03125 / 2, (0.6875 / 3) / 4, (0.375 / 3) / 8
    v = a + b - c
    df = v ** 2 / (a ** 2 / 1 + b ** 2 / 3 + c ** 2 / 3)
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(v)
    assert got.mean == 0.375 and got.n == 2
    assert got.low == pytest.approx(0.375 - half, rel=1e-12) and got.high == pytest.approx(0.375 + half, rel=1e-12)


def test_three_seeds_that_each_miss_one_more_image_are_not_significant():
    """The seed spread alone is zero here (every seed differs by one image of 360): the interval
    must still carry the test split's sampling, and one image on three seeds decides nothing."""
    n = 360
    diff = [[-1 if i == s else 0 for i in range(n)] for s in range(3)]  # a different image per seed
    by_seeds = mean_ci([sum(row) / n for row in diff])
    assert by_seeds.low == by_seeds.high  # the degenerate seed-only interval
    got = seeds_and_items_ci(diff)
    assert got.mean == pytest.approx(-1 / n) and not got.excludes_zero


def test_many_images_on_every_seed_are_significant():
    n = 360
    diff = [[-1 if i < 30 + s else 0 for i in range(n)] for s in range(3)]  # ~8 points fewer errors, all seeds
    got = seeds_and_items_ci(diff)
    assert got.excludes_zero and got.high < 0


def test_the_degrees_of_freedom_follow_the_dominant_part():
    """Seeds only (every image alike within a seed): t at k - 1 = 2, as mean_ci over the seeds."""
    table = [[0.1] * 50, [0.2] * 50, [0.4] * 50]
    got, by_seeds = seeds_and_items_ci(table), mean_ci([0.1, 0.2, 0.4])
    assert got.low == pytest.approx(by_seeds.low, rel=1e-9) and got.high == pytest.approx(by_seeds.high, rel=1e-9)


def simulated_coverage(sigma_seed, sigma_item, sigma_cell, k=10, n=200, tables=2000, seed=0) -> float:
    """Share of 95% intervals that cover the true mean 0 over tables x_si = S_s + I_i + E_si."""
    rng, covered = np.random.default_rng(seed), 0
    for _ in range(tables):
        table = (rng.normal(0, sigma_seed, (k, 1)) + rng.normal(0, sigma_item, (1, n))
                 + rng.normal(0, sigma_cell, (k, n)))
        got = seeds_and_items_ci(table)
        covered += got.low <= 0 <= got.high
    return covered / tables


@pytest.mark.parametrize("components", [(0.05, 0.1, 1.0), (1.0, 0.3, 0.5), (0.2, 1.0, 0.5)])
def test_the_interval_covers_the_mean_95_times_in_100_over_simulated_tables(components):
    """Known variance components (seed, image, seed x image). The first table is mostly seed x image
    interaction: an estimator that counts it twice (the seed part's and the image part's variance
    both contain it) covers 98% there."""
    assert 0.93 <= simulated_coverage(*components) <= 0.97


def test_decisions_from_the_interval_and_the_margin():
    margin = 0.005
    assert decide(Interval(-0.01, -0.02, -0.001, 5), margin) == "better"
    assert decide(Interval(0.01, 0.001, 0.02, 5), margin) == "worse"
    assert decide(Interval(0.0, -0.004, 0.003, 5), margin) == "equivalent"
    assert decide(Interval(0.0, -0.006, 0.003, 5), margin) == "inconclusive"
    assert decide(Interval(0.0, -math.inf, math.inf, 1), margin) == "inconclusive"


def test_a_table_with_no_seed_spread_is_not_better():
    """Every seed misses the same images, the method one image fewer of 1,000: the seeds agree
    perfectly, the test split's sampling still decides nothing."""
    diff = [[-1 if i == 0 else 0 for i in range(1000)] for _ in range(10)]
    got = seeds_and_items_ci(diff)
    assert got.mean == pytest.approx(-0.001) and not got.excludes_zero
    assert decide(got, 0.005) == "equivalent" and decide(got, 0.001) == "inconclusive"


def test_probability_of_improvement_counts_wins_and_half_ties():
    errors, reference = [0.10, 0.12, 0.20, 0.15], [0.11, 0.12, 0.19, 0.16]  # win, tie, loss, win
    got = probability_of_improvement(errors, reference)
    assert got.mean == pytest.approx(0.625) and got.n == 4
    assert 0 <= got.low <= got.mean <= got.high <= 1 and got.low < got.high
    assert probability_of_improvement(errors, reference) == got  # a fixed generator: the same interval
    always = probability_of_improvement([0.1] * 5, [0.2] * 5)
    assert (always.mean, always.low, always.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="equal"):
        probability_of_improvement([0.1], [0.1, 0.2])
