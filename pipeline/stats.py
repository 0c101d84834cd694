"""Means over seeds with confidence intervals, and paired differences (the verdict's arithmetic).

Seeds are few (3 at the embedded scale, 5 or more at paper scale), so intervals use Student's t
with n - 1 degrees of freedom, not the normal approximation. A paired difference compares two
methods on the same seeds (same initialisation, batch order and masks), which removes the
seed-to-seed spread both share.
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
