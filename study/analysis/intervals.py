"""Interval math for the report, free of study records: Wilson and Newcombe intervals for
proportions, and Student-t intervals whose standard error comes from a bootstrap over seeds
within cells (`scipy.stats.bootstrap`) for statistics pooled over cells."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95

# Fixed so that the same study always gives the same report.
BOOTSTRAP_SEED = 0

BOOTSTRAP_RESAMPLES = 4999


def wilson_interval(
    successes: float, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Wilson score interval for a proportion (closed form, as scipy's binomtest gives it for
    whole counts; `successes` may be a sum of scores in [0, 1]); (NaN, NaN) when n = 0."""
    if n == 0:
        return (math.nan, math.nan)
    z = stats.norm.ppf(0.5 + confidence / 2)
    rate = successes / n
    center = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def newcombe_interval(
    rate_a: float, n_a: int, rate_b: float, n_b: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Interval of rate_a - rate_b from the two Wilson intervals (Newcombe 1998, method 10)."""
    low_a, high_a = wilson_interval(rate_a * n_a, n_a, confidence)
    low_b, high_b = wilson_interval(rate_b * n_b, n_b, confidence)
    difference = rate_a - rate_b
    return (
        difference - math.hypot(rate_a - low_a, high_b - rate_b),
        difference + math.hypot(high_a - rate_a, rate_b - low_b),
    )


def p_better_interval(scores: list[np.ndarray]) -> tuple[float, float]:
    """Interval of P(better) from the pair scores of each cell: stratified_interval, unless
    every cell's pairs all scored the same (all wins in one cell, all ties in another, ...),
    which resampling seeds cannot put a width on: then the Wilson interval of the scores' sum
    over the pairs (a win counts 1, a tie 1/2)."""
    ci = stratified_interval(scores, pooled_mean)
    if math.isnan(ci[0]) or ci[0] < ci[1]:
        return ci
    pooled = np.concatenate(scores)
    return wilson_interval(float(pooled.sum()), len(pooled))


def iqm_interval(strata: list[np.ndarray]) -> tuple[float, float]:
    """Interval of the pooled IQM of the strata: stratified_interval, and none (NaN) where every
    cell's runs scored alike (say, all 1.0): resampling seeds cannot put a width on that, and a
    zero-width interval would claim certainty from a few seeds."""
    ci = stratified_interval(strata, pooled_iqm)
    return (math.nan, math.nan) if ci[0] == ci[1] else ci


def stratified_interval(
    strata: list[np.ndarray],
    statistic: Callable[..., np.ndarray],
    bounds: tuple[float, float] = (0.0, 1.0),
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Student-t interval around statistic(*strata), its standard error from a bootstrap that
    resamples seeds within each stratum (cell), clipped to the statistic's `bounds`.

    `statistic(*strata, axis=-1)` sees one resample of every stratum: scipy.stats.bootstrap
    resamples each sample of a multi-sample call independently, which is stratified resampling.
    Not the bootstrap's percentiles: those never leave the range of the resampled statistics,
    which with one cell of 3 seeds is the range of the 3 values, an interval that holds the truth
    3 times in 4 whatever its nominal level (`python -m study.analysis.coverage` compares them).
    Here the half-width is t_{1 - alpha/2, N - cells} (N: all values) times the bootstrap
    standard error scaled by sqrt(n / (n - 1)), n the smallest cell's size (a resample's spread
    is (n - 1)/n of the sample's): at one cell that is the textbook t interval of a mean.

    (NaN, NaN) when there is no stratum or one has fewer than 2 values; zero width when every
    stratum's values are equal, which the callers replace (iqm_interval, p_better_interval).
    """
    if not strata or any(len(s) < 2 for s in strata):
        return (math.nan, math.nan)
    estimate = float(statistic(*strata))
    if all(np.all(s == s[0]) for s in strata):
        return (estimate, estimate)
    result = stratified_bootstrap(strata, statistic, confidence)
    n, runs = min(len(s) for s in strata), sum(len(s) for s in strata)
    t = stats.t.ppf(0.5 + confidence / 2, runs - len(strata))
    half = t * math.sqrt(n / (n - 1)) * float(result.standard_error)
    return (max(bounds[0], estimate - half), min(bounds[1], estimate + half))


def stratified_bootstrap(
    strata: list[np.ndarray], statistic: Callable[..., np.ndarray], confidence: float = CONFIDENCE
) -> Any:
    """scipy.stats.bootstrap (its BootstrapResult) over seeds within each stratum (seeded: the
    same study gives the same report): standard error, percentile interval at `confidence`."""
    return stats.bootstrap(
        tuple(strata),
        statistic,
        vectorized=True,
        paired=False,
        axis=-1,
        confidence_level=confidence,
        method="percentile",
        n_resamples=BOOTSTRAP_RESAMPLES,
        rng=BOOTSTRAP_SEED,
    )


def pooled_mean(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over the concatenation of samples: every run weighs the same."""
    return np.mean(np.concatenate(samples, axis=axis), axis=axis)


def pooled_iqm(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean (25% trimmed each side) over the concatenation of samples."""
    return stats.trim_mean(np.concatenate(samples, axis=axis), 0.25, axis=axis)


def expected_best_of_n(values: Iterable[float], n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact expected maximum (and its std) of n draws with replacement, n = 1..n_max.

    Dodge et al. 2019, "Show your work": with the N observed values sorted, v_(1) <= ... <= v_(N),
    P(max of n draws = v_(i)) = (i/N)^n - ((i-1)/N)^n, so E[max] = sum_i v_(i) * that weight.
    """
    v = np.sort(np.asarray(list(values), dtype=float))
    i = np.arange(1, len(v) + 1)
    n = np.arange(1, n_max + 1)[:, None]
    weights = (i / len(v)) ** n - ((i - 1) / len(v)) ** n
    mean = weights @ v
    # Clip tiny negative round-off before the square root.
    std = np.sqrt(np.maximum(weights @ v**2 - mean**2, 0.0))
    return mean, std
