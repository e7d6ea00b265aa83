"""How often the report's 95% intervals hold the truth, by simulation at few seeds."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np

from study.analysis.intervals import (
    iqm_interval,
    p_better_interval,
    pooled_iqm,
    pooled_mean,
    stratified_bootstrap,
)

Interval = Callable[[list[np.ndarray]], tuple[float, float]]
# Each kind: the population's value of the statistic, one draw of a cell of n seeds, the
# report's interval of it and the statistic (for the percentile interval it is compared with).
# "p_better" draws paired scores 1 (win), 1/2 (tie), 0 (loss) with probabilities .5, .2, .3.
KINDS: dict[str, tuple[float, Callable[..., np.ndarray], Interval, Callable[..., np.ndarray]]] = {
    "accuracy_iqm": (  # symmetric: IQM = mean
        0.8,
        lambda rng, n: rng.normal(0.8, 0.05, n),
        iqm_interval,
        pooled_iqm,
    ),
    "p_better": (
        0.6,
        lambda rng, n: rng.choice([0.0, 0.5, 1.0], n, p=[0.3, 0.2, 0.5]),
        p_better_interval,
        pooled_mean,
    ),
}
# Cells x seeds per cell: one cell (the quick study), and three cells (an lr x clip grid).
LAYOUTS = ((3,), (5,), (2, 2, 2), (3, 3, 3), (3, 4, 5), (5, 5, 5), (10, 10, 10))


def percentile_interval(kind: str) -> Interval:
    """The stratified percentile bootstrap interval of the kind's statistic: what the report
    gave before, and what rliable gives; its ends never leave the resampled statistics' range."""
    statistic = KINDS[kind][3]

    def interval(strata: list[np.ndarray]) -> tuple[float, float]:
        if any(len(s) < 2 for s in strata):
            return (math.nan, math.nan)
        result = stratified_bootstrap(strata, statistic)
        return (float(result.confidence_interval.low), float(result.confidence_interval.high))

    return interval


def coverage(
    kind: str, seeds: tuple[int, ...], interval: Interval | None = None,
    repeats: int = 200, seed: int = 0,
) -> float:  # fmt: skip
    """Fraction of `repeats` simulated studies (one cell per entry of `seeds`, that many seeds
    each) whose interval (default: the report's) of the kind's statistic holds the truth."""
    truth, draw, report_interval, _ = KINDS[kind]
    interval = interval or report_interval
    rng = np.random.default_rng(seed)
    held = 0
    for _ in range(repeats):
        low, high = interval([draw(rng, n) for n in seeds])
        held += low <= truth <= high
    return held / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2000, help="simulated studies per row")
    args = parser.parse_args()
    error = (0.95 * 0.05 / args.repeats) ** 0.5  # the binomial standard error near 95%
    print(
        f"coverage of 95% intervals, {args.repeats} simulated studies per row "
        f"(standard error about {error:.3f})"
    )
    print(f"{'statistic':<14}{'seeds per cell':<16}{'percentile':>12}{'report':>10}")
    for kind in KINDS:
        for seeds in LAYOUTS:
            plain = coverage(kind, seeds, percentile_interval(kind), args.repeats)
            report = coverage(kind, seeds, repeats=args.repeats)
            label = "/".join(map(str, seeds))
            print(f"{kind:<14}{label:<16}{plain:>12.3f}{report:>10.3f}")


if __name__ == "__main__":
    main()
