"""How often the report's 95% bootstrap intervals hold the truth, by simulation at few seeds."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from study.analysis.stats import pooled_iqm, pooled_mean, stratified_bootstrap_ci

Interval = Callable[[list[np.ndarray], Callable[..., np.ndarray]], tuple[float, float]]
# Each kind: the population's value of the statistic, and one draw of a cell of n seeds.
# "p_better" draws paired scores 1 (win), 1/2 (tie), 0 (loss) with probabilities .5, .2, .3.
KINDS: dict[str, tuple[float, Callable[..., np.ndarray]]] = {
    "accuracy_iqm": (0.8, lambda rng, n: rng.normal(0.8, 0.05, n)),  # symmetric: IQM = mean
    "p_better": (0.6, lambda rng, n: rng.choice([0.0, 0.5, 1.0], n, p=[0.3, 0.2, 0.5])),
}


def plain_percentile(
    strata: list[np.ndarray], statistic: Callable[..., np.ndarray]
) -> tuple[float, float]:
    """The unexpanded stratified percentile interval, for comparison."""
    return stratified_bootstrap_ci(strata, statistic, expand=False)


def coverage(
    kind: str, seeds: tuple[int, ...], interval: Interval = stratified_bootstrap_ci,
    repeats: int = 200, seed: int = 0,
) -> float:  # fmt: skip
    """Fraction of `repeats` simulated studies (one cell per entry of `seeds`, that many seeds
    each) whose interval of the kind's statistic holds the population value."""
    truth, draw = KINDS[kind]
    statistic = pooled_iqm if kind == "accuracy_iqm" else pooled_mean
    rng = np.random.default_rng(seed)
    held = 0
    for _ in range(repeats):
        low, high = interval([draw(rng, n) for n in seeds], statistic)
        held += low <= truth <= high
    return held / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2000, help="simulated studies per row")
    args = parser.parse_args()
    error = (0.95 * 0.05 / args.repeats) ** 0.5  # the binomial standard error near 95%
    print(
        f"coverage of 95% intervals, {args.repeats} simulated studies of 3 cells per row "
        f"(standard error about {error:.3f})"
    )
    print(f"{'statistic':<14}{'seeds per cell':<16}{'plain percentile':>18}{'expanded':>10}")
    for kind in KINDS:
        for seeds in ((2, 2, 2), (3, 3, 3), (3, 4, 5), (5, 5, 5), (10, 10, 10)):
            plain = coverage(kind, seeds, plain_percentile, args.repeats)
            expanded = coverage(kind, seeds, repeats=args.repeats)
            label = "/".join(map(str, seeds))
            print(f"{kind:<14}{label:<16}{plain:>18.3f}{expanded:>10.3f}")


if __name__ == "__main__":
    main()
