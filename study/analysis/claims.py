"""Verdicts on the paper's claims: each `claims:` entry of a space (claim_spec.Claim) tested on a
study's finished runs, `supported`, `contradicted` or `inconclusive` by its 95% interval.

The rule (the report's glossary says it too): a claim is supported when the interval of its
statistic lies wholly on the side of "no difference" (its `null`) that the paper claims,
contradicted when it lies wholly on the other side, inconclusive otherwise, including when there
are too few seeds to put an interval on it, and whenever the claim's scope is not whole: a cell of
it short of 3 finished seeds of a compared method (a trial still running, failed or stopped), or
planned trials not yet started. A verdict on the cells that happen to be complete could flip on
the rest (the worst lr of `worst_lr_accuracy` is the cell most likely still training), and a
result holds every trial of its plan or says it does not. Statistics are means over cells of
per-cell means (or the cell-level quantity the statistic names), so every lr x clip cell weighs
alike, and their intervals come from stats.stratified_interval, which resamples seeds within
each cell.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from study.analysis.load import Trial
from study.analysis.stats import (
    MIN_SEEDS,
    Analysis,
    RunResult,
    newcombe_interval,
    p_better_interval,
    pooled_mean,
    stratified_interval,
    wilson_interval,
)
from study.claim_spec import BINARY_STATISTICS, Claim, same_value

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
# Params that are not "the same setting" across the compared methods, or that are the seed.
_NOT_SETTING = ("method", "p_detach", "seed")


@dataclass(frozen=True)
class ClaimResult:
    """One claim tested on one study."""

    claim: Claim
    study: str
    verdict: str
    value: float  # the statistic (NaN when it could not be computed)
    interval: tuple[float, float]  # its 95% interval (NaN, NaN when none)
    runs: int  # finished runs the statistic used, both methods together
    seeds: tuple[int, ...]
    cells: int  # settings (lr x clip x ...) compared
    budget_fraction: float  # iterations run / the file's iterations (NaN when unknown)
    reason: str = ""  # why a claim is inconclusive without an interval
    # The statistic of each side alone (method, baseline), to set beside published numbers;
    # NaN for p_better, which exists only as a comparison.
    method_value: float = math.nan
    baseline_value: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.claim.to_dict(),
            "study": self.study,
            "verdict": self.verdict,
            "value": _finite(self.value),
            "interval": [_finite(self.interval[0]), _finite(self.interval[1])],
            "runs": self.runs,
            "seeds": list(self.seeds),
            "cells": self.cells,
            "budget_fraction": _finite(self.budget_fraction),
            "reason": self.reason,
            "method_value": _finite(self.method_value),
            "baseline_value": _finite(self.baseline_value),
        }


def verdict(value: float, interval: tuple[float, float], null: float, expect: str) -> str:
    """supported / contradicted / inconclusive from where the interval lies against `null`."""
    low, high = interval
    if math.isnan(value) or math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    above, below = low > null, high < null
    if expect == "higher":
        return SUPPORTED if above else CONTRADICTED if below else INCONCLUSIVE
    return SUPPORTED if below else CONTRADICTED if above else INCONCLUSIVE


def evaluate_claims(
    analysis: Analysis, claims: tuple[Claim, ...], base_iterations: int | None
) -> list[ClaimResult]:
    """Every claim's result on the analysed runs, in the order the space lists them."""
    return [evaluate_claim(analysis, claim, base_iterations) for claim in claims]


def evaluate_claim(analysis: Analysis, claim: Claim, base_iterations: int | None) -> ClaimResult:
    runs = [run for run in analysis.runs if _applies(run.trial, claim)]
    scope = {_setting(trial) for trial in analysis.trials if _applies(trial, claim)}
    if not scope and not analysis.study.n_pending:
        nothing = (math.nan, math.nan)
        return _result(analysis, claim, math.nan, nothing, [], 0, base_iterations,
                       outside=_outside(claim))  # fmt: skip
    several = _several_p(analysis, claim)
    if several:  # pooled, each baseline run would count once per p, as if independent
        nothing = (math.nan, math.nan)
        return _result(analysis, claim, math.nan, nothing, [], 0, base_iterations,
                       outside=several)  # fmt: skip
    method = _strata(runs, claim.method, claim.statistic)
    baseline = _strata(runs, claim.baseline, claim.statistic) if claim.baseline else {}
    if claim.statistic == "p_better":
        pairs = _pairs(runs, claim)
        used = {key: cell for key, cell in pairs.items() if len(cell) >= MIN_SEEDS}
        scores = [np.array([_score(a.best, b.best) for a, b in cell]) for cell in used.values()]
        value = float(pooled_mean(*scores)) if scores else math.nan
        interval = p_better_interval(scores) if scores else (math.nan, math.nan)
        used_runs = [run for cell in used.values() for pair in cell for run in pair]
        missing = _unwhole(analysis, scope, used)
        return _result(analysis, claim, value, interval, used_runs, len(used), base_iterations,
                       missing)  # fmt: skip
    keys = [
        key
        for key in sorted(method, key=_order)
        if len(method[key]) >= MIN_SEEDS
        and (claim.baseline is None or len(baseline.get(key, [])) >= MIN_SEEDS)
    ]
    used_runs = [run for key in keys for run, _ in (*method[key], *baseline.get(key, []))]
    missing = _unwhole(analysis, scope, keys)
    if not keys:
        nothing = (math.nan, math.nan)
        return _result(analysis, claim, math.nan, nothing, used_runs, 0, base_iterations, missing)
    values_m = [np.array([v for _, v in method[key]]) for key in keys]
    values_b = [np.array([v for _, v in baseline[key]]) for key in keys] if claim.baseline else []
    statistic = _statistic(claim.statistic, len(keys), bool(claim.baseline))
    strata = values_m + values_b
    value = float(statistic(*strata))
    bounds = (-1.0, 1.0) if claim.baseline else (0.0, 1.0)
    interval = stratified_interval(strata, statistic, bounds=bounds)
    if not math.isnan(interval[0]) and interval[0] == interval[1]:
        interval = _agreeing_interval(claim, values_m, values_b)
    result = _result(
        analysis, claim, value, interval, used_runs, len(keys), base_iterations, missing
    )
    alone = _statistic(claim.statistic, len(keys), compared=False)
    return dataclasses.replace(
        result,
        method_value=float(alone(*values_m)),
        baseline_value=float(alone(*values_b)) if values_b else math.nan,
    )


def _statistic(name: str, k: int, compared: bool) -> Callable[..., np.ndarray]:
    """statistic(*strata, axis=-1): the first k strata are the method's cells, the next k (when
    compared) the baseline's, cell by cell; vectorised for scipy's bootstrap."""

    def per_side(strata: tuple[np.ndarray, ...], axis: int) -> np.ndarray:
        if name == "seed_spread":
            return np.mean([np.std(s, axis=axis, ddof=1) for s in strata], axis=0)
        means = [np.mean(s, axis=axis) for s in strata]
        if name == "worst_lr_accuracy":
            return np.min(means, axis=0)
        return np.mean(means, axis=0)

    def statistic(*strata: np.ndarray, axis: int = -1) -> np.ndarray:
        mine = per_side(strata[:k], axis)
        return mine - per_side(strata[k:], axis) if compared else mine

    return statistic


def _agreeing_interval(
    claim: Claim, values_m: list[np.ndarray], values_b: list[np.ndarray]
) -> tuple[float, float]:
    """Where every cell's runs agree, resampling seeds puts no width on the statistic. A rate
    then gets Wilson's interval (or Newcombe's for a difference) from the pooled counts; any
    other statistic gets none: a handful of identical scores is no certainty."""
    if claim.statistic not in BINARY_STATISTICS:
        return (math.nan, math.nan)
    pooled_m = np.concatenate(values_m)
    if not values_b:
        return wilson_interval(float(pooled_m.sum()), len(pooled_m))
    pooled_b = np.concatenate(values_b)
    return newcombe_interval(
        float(pooled_m.mean()), len(pooled_m), float(pooled_b.mean()), len(pooled_b)
    )


def _result(
    analysis: Analysis,
    claim: Claim,
    value: float,
    interval: tuple[float, float],
    runs: list[RunResult],
    cells: int,
    base_iterations: int | None,
    unwhole: str = "",
    outside: str = "",
) -> ClaimResult:
    # The budget of the runs used, else of any finished run, else of any trial started (a study
    # whose every trial is still training has a budget all the same).
    budgets = (
        [run.trial.budget for run in runs]
        or [run.trial.budget for run in analysis.runs]
        or [trial.budget for trial in analysis.study.trials]
    )
    fraction = (
        float(np.median(budgets)) / base_iterations if budgets and base_iterations else math.nan
    )
    reasons = []
    if outside:
        reasons.append(outside)
    elif not cells:
        reasons.append(f"no cell where each compared method has {MIN_SEEDS} finished seeds")
    elif math.isnan(interval[0]):
        reasons.append("every run scored alike: no interval from so few seeds")
    if unwhole:
        reasons.append(unwhole)
    decided = verdict(value, interval, claim.null, claim.expect)
    return ClaimResult(
        claim=claim,
        study=analysis.study.name,
        verdict=INCONCLUSIVE if unwhole else decided,
        value=value,
        interval=interval,
        runs=len(runs),
        seeds=tuple(sorted({run.trial.seed for run in runs})),
        cells=cells,
        budget_fraction=fraction,
        reason="; ".join(reasons),
    )


def _unwhole(analysis: Analysis, scope: set[tuple], complete: Iterable[tuple]) -> str:
    """Why the claim's scope is not whole ("" when it is): its cells (settings of the trials it
    applies to) that lack MIN_SEEDS finished seeds of a compared method, and planned trials not
    started, whose cells the store does not know yet."""
    parts = []
    complete = set(complete)
    short = len(scope - complete)
    if short and complete:
        parts.append(
            f"{short} of {len(scope)} cell(s) short of {MIN_SEEDS} finished seeds of a compared "
            "method (trials running, failed or stopped, or runs with no value of the "
            "statistic): no verdict on part of the claim"
        )
    if analysis.study.n_pending:
        parts.append(f"{analysis.study.n_pending} planned trial(s) not started")
    return "; ".join(parts)


def _outside(claim: Claim) -> str:
    """Why a claim has no verdict when no trial of the study is one it is about: a typo in its
    `where:` or a grid narrowed by --set or smoke, which the reader should see, not a shortfall
    of seeds."""
    methods = f"method {claim.method}" + (f" or {claim.baseline}" if claim.baseline else "")
    scope = ", ".join(f"{key}={value}" for key, value in claim.where.items())
    return (
        f"no trial of this study is one the claim is about ({methods}"
        f"{f' at {scope}' if scope else ''}): its grid lacks them"
    )


def _several_p(analysis: Analysis, claim: Claim) -> str:
    """Why a claim without `where: p_detach` has no verdict where its method runs at several p
    ("" where it runs at one): a method at each p is a method of its own (the report's lines
    compare each), and pooled they would pair every baseline run more than once."""
    for method in (claim.method, claim.baseline):
        values = {t.p_detach for t in analysis.trials if t.method == method and _applies(t, claim)}
        if method not in (None, "none") and len(values) > 1:
            shown = ", ".join(f"{p:g}" for p in sorted(values))
            return (
                f"{method} runs at p_detach {shown} here: the claim must name one "
                "(where: {p_detach: ...})"
            )
    return ""


def _applies(trial: Trial, claim: Claim) -> bool:
    """Whether a trial is one the claim is about. `p_detach` in `where` selects the detaching
    method's trials only: vanilla LSTM has no p (it is 0), and is the baseline at every p."""
    if trial.method not in (claim.method, claim.baseline):
        return False
    for key, wanted in claim.where.items():
        if key == "p_detach" and trial.method == "none":
            continue
        if not same_value(_param(trial, key), wanted):
            return False
    return True


def _param(trial: Trial, key: str) -> Any:
    if key in ("lr", "p_detach", "clip_norm"):
        return getattr(trial, key)
    text = trial.params.get(f"task_options.{key}", trial.params.get(key))
    return yaml.safe_load(text) if isinstance(text, str) else text


def _setting(trial: Trial) -> tuple:
    """What a method's cell and its baseline's share: every param but method, p and seed."""
    params = trial.params
    return tuple(sorted((k, v) for k, v in params.items() if k not in _NOT_SETTING))


def _strata(
    runs: list[RunResult], method: str | None, statistic: str
) -> dict[tuple, list[tuple[RunResult, float]]]:
    """The method's runs by setting, each with its per-run value of the statistic."""
    cells: dict[tuple, list[tuple[RunResult, float]]] = defaultdict(list)
    for run in runs:
        if run.trial.method != method:
            continue
        value = _run_value(run, statistic)
        if not math.isnan(value):
            cells[_setting(run.trial)].append((run, value))
    return cells


def _run_value(run: RunResult, statistic: str) -> float:
    if statistic == "success_rate":
        return float(run.success)
    if statistic == "divergence_rate":
        return float(run.trial.state == "diverged")
    if statistic == "final_accuracy":
        return run.final
    if statistic == "convergence_auc":
        return run.auc
    if statistic == "test_at_best":
        return run.trial.test_at_best
    return run.best  # best_accuracy, worst_lr_accuracy, seed_spread


def _pairs(runs: list[RunResult], claim: Claim) -> dict[tuple, list[tuple[RunResult, RunResult]]]:
    """Method runs paired with the baseline run of the same setting and seed, by setting."""
    base = {
        (_setting(run.trial), run.trial.seed): run
        for run in runs
        if run.trial.method == claim.baseline
    }
    cells: dict[tuple, list[tuple[RunResult, RunResult]]] = defaultdict(list)
    for run in runs:
        if run.trial.method == claim.method:
            partner = base.get((_setting(run.trial), run.trial.seed))
            if partner is not None:
                cells[_setting(run.trial)].append((run, partner))
    return cells


def _score(mine: float, theirs: float) -> float:
    """A pair's P(better) score: 1 if the method's run is higher, 1/2 on a tie, 0 if lower."""
    return 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0


def _order(key: tuple) -> tuple:
    return tuple(str(part) for part in key)


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
