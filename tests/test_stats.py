"""The verdict's arithmetic on samples worked out by hand."""
import math

import pytest

from pipeline.stats import mean_ci, paired_difference


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
