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

import numpy as np
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
    difference of two methods' such tables) and its interval with both sources of chance: the
    seeds, and the sampling of the items (the test split is one sample of images, the same for
    every seed). As a two-way random-effects table x_si = mu + S_s + I_i + E_si, the mean's
    variance is sigma_S^2 / k + sigma_I^2 / n + sigma_E^2 / (k n), estimated without bias by

        V = a + (b - c),  a = var_s(mean over items) / k,  b = var_i(mean over seeds) / n,
                          c = (residual mean square) / (k n)

    (a and b each contain sigma_E^2 / (k n): adding them alone counts the interaction twice). The
    seeds' part is at least c, the images' part b - c at least zero; Student's t at the
    Satterthwaite degrees of freedom of the mean squares used, e.g. V^2 / (a^2/(k-1) + b^2/(n-1) +
    c^2/((k-1)(n-1))): k - 1 when the seeds dominate, n - 1 when the images do. With the seed part alone, three seeds that each miss one more image
    would give an interval of zero width; with k = 1 the interval is unbounded, as for `mean_ci`."""
    table = np.asarray(values, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] < 2:
        raise ValueError("a table with one row per seed, all of one length >= 2")
    k, n = table.shape
    seed_means, item_means = table.mean(1), table.mean(0)
    mean = float(table.mean())
    if k == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    residual = table - seed_means[:, None] - item_means[None, :] + mean
    a, b = seed_means.var(ddof=1) / k, item_means.var(ddof=1) / n
    c = float((residual ** 2).sum()) / ((k - 1) * (n - 1)) / (k * n)
    # The seeds' part a is at least the interaction's share c; the images' own part b - c is
    # truncated at zero. Degrees of freedom by Satterthwaite over the mean squares each part uses.
    seeds, seeds_df = (a, k - 1) if a >= c else (c, (k - 1) * (n - 1))
    v, spread = seeds, seeds ** 2 / seeds_df
    if b > c:
        v, spread = v + b - c, spread + b ** 2 / (n - 1) + c ** 2 / ((k - 1) * (n - 1))
    if v <= 0:
        return Interval(mean, mean, mean, k)
    df = v ** 2 / spread
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(v)
    return Interval(mean, mean - half, mean + half, k)


DECISIONS = ("better", "worse", "equivalent", "inconclusive")


def decide(diff: Interval, margin: float) -> str:
    """A method against the reference from the interval of their paired difference (method minus
    reference, lower is better) and a margin of practical equivalence: better or worse when the
    interval excludes 0, equivalent when it lies within (-margin, margin) (two one-sided tests
    at the interval's level), inconclusive otherwise."""
    if diff.high < 0:
        return "better"
    if diff.low > 0:
        return "worse"
    if -margin < diff.low and diff.high < margin:
        return "equivalent"
    return "inconclusive"


def probability_of_improvement(errors: Sequence[float], reference: Sequence[float], level: float = 0.95,
                               resamples: int = 10_000, seed: int = 0) -> Interval:
    """P(the method's error is below the reference's on a random seed), ties counting one half
    (Bouthillier et al. 2021; Agarwal et al. 2021, rliable), from seeds paired by index, with a
    percentile bootstrap interval over the seeds (a fixed generator: the same numbers every run)."""
    if len(errors) != len(reference) or not errors:
        raise ValueError(f"paired samples need equal, non-zero lengths (got {len(errors)} and {len(reference)})")
    wins = np.sign(np.asarray(reference, dtype=np.float64) - np.asarray(errors, dtype=np.float64)) / 2 + 0.5
    draws = np.random.default_rng(seed).integers(0, len(wins), (resamples, len(wins)))
    boot = wins[draws].mean(1)
    tail = (1 - level) / 2
    return Interval(float(wins.mean()), float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail)), len(wins))
