"""Means over seeds with confidence intervals, and paired differences (the verdict's arithmetic).

Seeds are few (3 at the embedded scale, 5 or more at paper scale), so intervals use Student's t
with n - 1 degrees of freedom, not the normal approximation. A paired difference compares two
methods on the same seeds (same initialisation, batch order and masks), which removes the
seed-to-seed spread both share. The verdict uses `seeds_and_items_ci`, which adds the sampling
of the test images to the seed spread; `mean_ci` and `paired_difference` are its seeds-only forms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and its two-sided `level` confidence interval (Student's t); n = 1 gives an
    unbounded interval (one seed says nothing about the spread)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """a - b seed by seed, with the interval of its mean."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths (got {len(a)} and {len(b)})")
    return mean_ci([x - y for x, y in zip(a, b)], level)


def seeds_and_items_ci(values: Sequence[Sequence[float]], level: float = 0.95) -> Interval:
    """Mean of a seeds x items table (e.g. 1 where seed s got test image i wrong, or the paired
    difference of two methods' such tables) and its interval with both sources of chance:
    the seed-to-seed spread of the per-seed means, and the sampling of the items (the test split
    is one sample of images, the same for every seed):

        var = a + b,  a = var_s(mean over items) / k,  b = var_i(mean over seeds) / n

    with Student's t at the Welch-Satterthwaite degrees of freedom (a + b)^2 / (a^2/(k-1) + b^2/(n-1)):
    k - 1 when the seeds dominate, n - 1 when the images do. With the seed part alone, three seeds
    that each miss one more image would give an interval of zero width; with k = 1 the interval
    is unbounded, as for `mean_ci`."""
    k, n = len(values), len(values[0]) if values else 0
    if k == 0 or n < 2 or any(len(row) != n for row in values):
        raise ValueError("a table with one row per seed, all of one length >= 2")
    seed_means = [sum(row) / n for row in values]
    item_means = [sum(row[i] for row in values) / k for i in range(n)]
    mean = sum(seed_means) / k
    if k == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    a, b = _variance(seed_means) / k, _variance(item_means) / n
    if a + b == 0:
        return Interval(mean, mean, mean, k)
    df = (a + b) ** 2 / (a ** 2 / (k - 1) + b ** 2 / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(a + b)
    return Interval(mean, mean - half, mean + half, k)


def _variance(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
