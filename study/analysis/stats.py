"""Robustness statistics: per-run scores, per-cell summaries over seeds, cross-cell comparisons.

Works on the plain records of load.py (no MLflow here). Intervals come from scipy: Wilson
intervals from `binomtest(...).proportion_ci`, bootstrap intervals from `scipy.stats.bootstrap`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from study.analysis.load import Study, Trial

CONFIDENCE = 0.95
# A cell enters a cross-cell statistic only with this many finished seeds: one seed says nothing
# about seed-to-seed spread, and at two the 95% bootstrap intervals held the truth in only 73-76%
# of simulated studies, at three in 92-94% (`python -m study.analysis.coverage`, 2000 studies).
MIN_SEEDS = 3
# "Good" learning rates reach at least this fraction of the best lr's median best accuracy.
GOOD_LR_FRACTION = 0.95
# Fixed so that the same study always gives the same report.
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 4999
VANILLA = ("none", 0.0)
# An Optuna study's cell value of a param tuned per seed (lr, p_detach, clip_norm: never < 0).
TUNED, TUNED_LABEL = -1.0, "tuned"
# Accuracies are ratios of counts; tolerate float round-off when comparing with the target.
_TARGET_TOLERANCE = 1e-9


@dataclass(frozen=True)
class RunResult:
    """What one finished trial scored."""

    trial: Trial
    best: float  # best validation accuracy over the run
    final: float  # validation accuracy at the last evaluation
    reached_at: float  # first iteration with val accuracy >= target; inf when never
    auc: float  # area under the validation curve / budget, in [0, 1]

    @property
    def success(self) -> bool:
        return math.isfinite(self.reached_at)


@dataclass(frozen=True)
class Spread:
    median: float
    q25: float
    q75: float
    min: float


@dataclass(frozen=True)
class CellStats:
    """One cell (task x method x p x lr x clip) summarised over its seeds."""

    task: str
    method: str
    p_detach: float
    lr: float
    clip_norm: float | None
    n: int  # finished runs (completed + diverged): the seeds every statistic below is over
    n_diverged: int
    n_failed: int
    n_running: int
    best: Spread
    final: Spread
    divergence_rate: float
    successes: int
    success_rate: float
    success_ci: tuple[float, float]
    iters_to_target: float  # median over seeds; inf when at least half never reach the target
    auc: float  # median
    test_at_best: float  # median; NaN for tasks without a test split

    @property
    def variant(self) -> tuple[str, float]:
        return (self.method, self.p_detach)


@dataclass(frozen=True)
class LrSensitivity:
    """Median best accuracy against lr for one method and clip setting."""

    task: str
    method: str
    p_detach: float
    clip_norm: float | None
    lrs: list[float]
    median_best: list[float]
    relative: list[float]  # median_best / the best lr's median_best
    best_lr: float
    good_lrs: tuple[float, float]  # smallest and largest lr of the good range
    good_lr_decades: float  # log10(largest / smallest good lr)


@dataclass(frozen=True)
class ClipDependence:
    """Success rate with a clip norm minus without clipping, over the lrs run both ways."""

    task: str
    method: str
    p_detach: float
    clip_norm: float
    lrs: list[float]
    with_successes: int
    with_n: int
    without_successes: int
    without_n: int
    difference: float
    difference_ci: tuple[float, float]


@dataclass(frozen=True)
class PairedComparison:
    """A method against vanilla on runs paired by seed and setting (_pairing_key)."""

    task: str
    method: str
    p_detach: float
    n_pairs: int
    n_cells: int  # lr x clip cells with >= MIN_SEEDS pairs (the ones used)
    cells_left_out: int  # lr x clip cells with some pairs but fewer than MIN_SEEDS
    p_better: float
    p_better_ci: tuple[float, float]
    successes: int  # of the method, over the pairs
    baseline_successes: int


@dataclass(frozen=True)
class IQM:
    """Interquartile mean of best val accuracy over every run of a method (cells as strata)."""

    task: str
    method: str
    p_detach: float
    n_runs: int
    n_cells: int
    value: float
    ci: tuple[float, float]


@dataclass(frozen=True)
class ExpectedBest:
    """Expected best val accuracy after n random trials, n = 1..n_trials (Dodge et al. 2019)."""

    task: str
    method: str
    p_detach: float
    mean: list[float]
    std: list[float]


@dataclass
class Analysis:
    """Everything the report shows, computed once."""

    study: Study
    trials: list[Trial]  # the trials analysed: the study's, or an Optuna study's best tuned ones
    runs: list[RunResult]
    cells: list[CellStats]
    lr_sensitivity: list[LrSensitivity] = field(default_factory=list)
    clipping: list[ClipDependence] = field(default_factory=list)
    paired: list[PairedComparison] = field(default_factory=list)
    iqm: list[IQM] = field(default_factory=list)
    expected_best: list[ExpectedBest] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return sorted({trial.task for trial in self.trials})


def analyse(study: Study) -> Analysis:
    """All statistics of a study; only finished runs (completed or diverged) are scored. In an
    Optuna study, each seed's best tuned trial stands for its scientific point."""
    trials = best_tuned_trials(study.trials, study.tuned) if study.tuned else study.trials
    runs = [score_run(trial, study.target) for trial in trials if trial.finished]
    cells = cell_stats(trials, runs)
    return Analysis(
        study=study,
        trials=trials,
        runs=runs,
        cells=cells,
        lr_sensitivity=lr_sensitivity(cells),
        clipping=clipping_dependence(runs),
        paired=paired_comparisons(runs),
        iqm=interquartile_means(runs),
        expected_best=expected_best_curves(runs),
    )


def best_tuned_trials(trials: list[Trial], tuned: list[str]) -> list[Trial]:
    """One trial per scientific point x seed of an Optuna study: the finished one with the best
    val accuracy (tuning playbook: compare methods at their best nuisance setting). Its tuned
    fields read TUNED (task options: "T=tuned" in the task label), so that a cell's seeds meet
    whatever values each seed's search found; those values stay in `tuned_values`. A point with
    no finished trial keeps its first, so that its failures still show. p_detach is never tuned
    for vanilla, which does not detach."""
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for trial in trials:
        point = tuple(sorted((k, v) for k, v in trial.params.items() if k not in tuned))
        groups[point].append(trial)
    options = {k.removeprefix("task_options.") for k in tuned if k.startswith("task_options.")}
    chosen = []
    for members in groups.values():
        finished = [t for t in members if t.finished]
        best = max(finished, key=lambda t: score_run(t, 1.0).best) if finished else members[0]
        marked = [k for k in tuned if k in best.params]
        if best.method == "none" and "p_detach" in marked:
            marked.remove("p_detach")
        task = " ".join(
            f"{word.split('=')[0]}={TUNED_LABEL}" if word.split("=")[0] in options else word
            for word in best.task.split(" ")
        )
        chosen.append(
            dataclasses.replace(
                best,
                task=task,
                lr=TUNED if "lr" in marked else best.lr,
                p_detach=TUNED if "p_detach" in marked else best.p_detach,
                clip_norm=TUNED if "clip_norm" in marked else best.clip_norm,
                params={**best.params, **dict.fromkeys(marked, TUNED_LABEL)},
                tuned_values={k: best.params[k] for k in marked},
            )
        )
    return sorted(chosen, key=lambda t: t.trial_id)


# ---------------------------------------------------------------- per run and per cell


def score_run(trial: Trial, target: float) -> RunResult:
    """Best, final, iterations-to-target and normalised area of one run's validation curve."""
    if len(trial.val_acc) == 0:
        # Diverged (or finished) before its first evaluation: it learned nothing we can show.
        return RunResult(trial, best=0.0, final=0.0, reached_at=math.inf, auc=0.0)
    # A NaN accuracy can only come from a broken model; it counts as nothing learned.
    acc = np.nan_to_num(trial.val_acc, nan=0.0)
    steps = trial.val_steps
    hits = np.flatnonzero(acc >= target - _TARGET_TOLERANCE)
    reached_at = float(steps[hits[0]]) if len(hits) else math.inf
    # Right-endpoint sum: each evaluation stands for the iterations since the previous one, so a
    # run at 100% from the first evaluation scores 1 and a run that stops early (diverged) gets
    # no area after its last evaluation.
    auc = float(np.sum(acc * np.diff(steps, prepend=0)) / trial.budget)
    best, final = float(acc.max()), float(acc[-1])
    return RunResult(trial, best=best, final=final, reached_at=reached_at, auc=auc)


def spread(values: Iterable[float]) -> Spread:
    """Median, quartiles (numpy's linear interpolation) and minimum; NaN when empty."""
    values = np.asarray(list(values), dtype=float)
    if len(values) == 0:
        return Spread(math.nan, math.nan, math.nan, math.nan)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return Spread(float(median), float(q25), float(q75), float(values.min()))


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (scipy); (NaN, NaN) when n = 0."""
    if n == 0:
        return (math.nan, math.nan)
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def cell_stats(trials: list[Trial], runs: list[RunResult]) -> list[CellStats]:
    """One CellStats per cell that has any run, sorted by cell."""
    by_cell: dict[tuple, list[Trial]] = defaultdict(list)
    for trial in trials:
        by_cell[trial.cell].append(trial)
    scored = {run.trial.run_id: run for run in runs}
    cells = []
    for cell in sorted(by_cell, key=_cell_order):
        members = by_cell[cell]
        done = [scored[t.run_id] for t in members if t.run_id in scored]
        n = len(done)
        successes = sum(run.success for run in done)
        n_diverged = sum(run.trial.state == "diverged" for run in done)
        task, method, p_detach, lr, clip_norm = cell
        cells.append(
            CellStats(
                task=task,
                method=method,
                p_detach=p_detach,
                lr=lr,
                clip_norm=clip_norm,
                n=n,
                n_diverged=n_diverged,
                n_failed=sum(t.state == "failed" for t in members),
                n_running=sum(t.state == "running" for t in members),
                best=spread(run.best for run in done),
                final=spread(run.final for run in done),
                divergence_rate=n_diverged / n if n else math.nan,
                successes=successes,
                success_rate=successes / n if n else math.nan,
                success_ci=wilson_interval(successes, n),
                # np.median handles inf: runs that never reach the target count as slowest.
                iters_to_target=float(np.median([r.reached_at for r in done])) if n else math.nan,
                auc=spread(run.auc for run in done).median,
                test_at_best=_nanmedian(run.trial.test_at_best for run in done),
            )
        )
    return cells


# ---------------------------------------------------------------- across cells


def lr_sensitivity(cells: list[CellStats]) -> list[LrSensitivity]:
    """Per task, method and clip setting: median best accuracy relative to the best lr.

    The good-lr range is the contiguous run of grid lrs around the best one whose relative median
    is >= GOOD_LR_FRACTION; its width in decades is a lower bound (the grid is finite) and 0 when
    only the best lr qualifies.
    """
    groups: dict[tuple, list[CellStats]] = defaultdict(list)
    for cell in cells:
        if cell.n >= MIN_SEEDS and cell.lr != TUNED:  # an Optuna study has no lr axis
            groups[(cell.task, cell.method, cell.p_detach, cell.clip_norm)].append(cell)
    results = []
    for key in sorted(groups, key=_cell_order):
        members = sorted(groups[key], key=lambda c: c.lr)
        medians = np.array([c.best.median for c in members])
        top = int(np.argmax(medians))
        relative = medians / medians[top] if medians[top] > 0 else np.full(len(medians), np.nan)
        low = high = top
        while low > 0 and relative[low - 1] >= GOOD_LR_FRACTION:
            low -= 1
        while high < len(members) - 1 and relative[high + 1] >= GOOD_LR_FRACTION:
            high += 1
        task, method, p_detach, clip_norm = key
        results.append(
            LrSensitivity(
                task=task,
                method=method,
                p_detach=p_detach,
                clip_norm=clip_norm,
                lrs=[c.lr for c in members],
                median_best=medians.tolist(),
                relative=relative.tolist(),
                best_lr=members[top].lr,
                good_lrs=(members[low].lr, members[high].lr),
                good_lr_decades=float(np.log10(members[high].lr / members[low].lr)),
            )
        )
    return results


def clipping_dependence(runs: list[RunResult]) -> list[ClipDependence]:
    """Success rate with each clip norm minus without clipping, per task and method.

    Only lrs run both ways with >= MIN_SEEDS seeds each enter, so the lr mix is the same on both
    sides. The interval is a bootstrap over seeds within each (lr, clip) cell.
    """
    results = []
    by_variant = _group(runs, lambda r: (r.trial.task, *r.trial.variant))
    for key in sorted(by_variant, key=_cell_order):
        by_cell = _group(by_variant[key], lambda r: (r.trial.lr, r.trial.clip_norm))
        clips = sorted({clip for _, clip in by_cell if clip is not None})
        for clip in clips:
            lrs = sorted(
                lr
                for lr, c in by_cell
                if c == clip
                and len(by_cell[(lr, clip)]) >= MIN_SEEDS
                and len(by_cell.get((lr, None), [])) >= MIN_SEEDS
            )
            if not lrs:
                continue
            with_clip = [_successes(by_cell[(lr, clip)]) for lr in lrs]
            without = [_successes(by_cell[(lr, None)]) for lr in lrs]
            k = len(lrs)

            def difference(*strata: np.ndarray, axis: int = -1, k: int = k) -> np.ndarray:
                return pooled_mean(*strata[:k], axis=axis) - pooled_mean(*strata[k:], axis=axis)

            task, method, p_detach = key
            results.append(
                ClipDependence(
                    task=task,
                    method=method,
                    p_detach=p_detach,
                    clip_norm=clip,
                    lrs=lrs,
                    with_successes=int(sum(s.sum() for s in with_clip)),
                    with_n=sum(len(s) for s in with_clip),
                    without_successes=int(sum(s.sum() for s in without)),
                    without_n=sum(len(s) for s in without),
                    difference=float(difference(*with_clip, *without)),
                    difference_ci=stratified_bootstrap_ci(with_clip + without, difference),
                )
            )
    return results


def paired_comparisons(runs: list[RunResult]) -> list[PairedComparison]:
    """P(method better than vanilla) per task and non-vanilla method, paired by (lr, clip, seed)
    and every other param (_pairing_key).

    Per pair the score is 1 if the method's best val accuracy is higher, 1/2 on a tie, 0 if lower
    (the "probability of improvement" of Agarwal et al. 2021). Only lr x clip cells with
    >= MIN_SEEDS pairs enter; the interval is a bootstrap over seeds within each cell.
    """
    by_variant = _group(runs, lambda r: (r.trial.task, *r.trial.variant))
    results = []
    for (task, method, p_detach), members in sorted(by_variant.items(), key=_item_order):
        if (method, p_detach) == VANILLA:
            continue
        baseline = {_pairing_key(r.trial): r for r in by_variant.get((task, *VANILLA), [])}
        cells: dict[tuple, list[tuple[RunResult, RunResult]]] = defaultdict(list)
        for run in members:
            base = baseline.get(_pairing_key(run.trial))
            if base is not None:
                cells[(run.trial.lr, run.trial.clip_norm)].append((run, base))
        used = [pairs for pairs in cells.values() if len(pairs) >= MIN_SEEDS]
        scores = [np.array([_improvement(a.best, b.best) for a, b in pairs]) for pairs in used]
        pairs = [pair for cell in used for pair in cell]
        results.append(
            PairedComparison(
                task=task,
                method=method,
                p_detach=p_detach,
                n_pairs=len(pairs),
                n_cells=len(used),
                cells_left_out=len(cells) - len(used),
                p_better=float(pooled_mean(*scores)) if scores else math.nan,
                p_better_ci=_p_better_interval(scores),
                successes=sum(a.success for a, _ in pairs),
                baseline_successes=sum(b.success for _, b in pairs),
            )
        )
    return results


def _pairing_key(trial: Trial) -> tuple:
    """What a method run and its vanilla partner share: lr, clip and seed, and every other param
    (a hidden_size or batch_size axis, pooled into the cells, must not pair across its values)."""
    others = sorted((k, v) for k, v in trial.params.items() if k not in ("method", "p_detach"))
    return (trial.lr, trial.clip_norm, trial.seed, tuple(others))


def _p_better_interval(scores: list[np.ndarray]) -> tuple[float, float]:
    """Stratified bootstrap interval of P(better), unless every pair scored the same.

    Identical scores give a zero-width bootstrap interval, i.e. certainty from a handful of
    seeds. All wins (or all losses) are then a plain binomial count, so the Wilson interval of
    n out of n (or 0 out of n) is used; all ties get no interval.
    """
    ci = stratified_bootstrap_ci(scores, pooled_mean)
    if math.isnan(ci[0]) or ci[0] < ci[1]:
        return ci
    pooled = np.concatenate(scores)
    if pooled[0] in (0.0, 1.0):
        return wilson_interval(int(pooled.sum()), len(pooled))
    return (math.nan, math.nan)


def interquartile_means(runs: list[RunResult]) -> list[IQM]:
    """IQM (25% trimmed mean, scipy) of best val accuracy per task and method, over the runs of
    every cell with >= MIN_SEEDS finished seeds (the cross-cell rule; below 4 runs it trims
    nothing and is the mean).

    Strata for the bootstrap are the lr x clip cells: the grid is fixed by design, only the seeds
    are random, so seeds are resampled within each cell (as rliable does per task).
    """
    by_variant = _group(runs, lambda r: (r.trial.task, *r.trial.variant))
    results = []
    for key in sorted(by_variant, key=_cell_order):
        by_cell = _group(by_variant[key], lambda r: (r.trial.lr, r.trial.clip_norm))
        strata = [
            np.array([r.best for r in members])
            for members in by_cell.values()
            if len(members) >= MIN_SEEDS
        ]
        pooled = np.concatenate(strata) if strata else np.array([])
        task, method, p_detach = key
        results.append(
            IQM(
                task=task,
                method=method,
                p_detach=p_detach,
                n_runs=len(pooled),
                n_cells=len(strata),
                value=float(stats.trim_mean(pooled, 0.25)) if len(pooled) else math.nan,
                ci=stratified_bootstrap_ci(strata, pooled_iqm),
            )
        )
    return results


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


def expected_best_curves(runs: list[RunResult]) -> list[ExpectedBest]:
    """Per task and method: every finished run is one random trial of (lr, clip, seed)."""
    results = []
    by_variant = _group(runs, lambda r: (r.trial.task, *r.trial.variant))
    for key in sorted(by_variant, key=_cell_order):
        best = [r.best for r in by_variant[key]]
        mean, std = expected_best_of_n(best, len(best))
        results.append(ExpectedBest(*key, mean=mean.tolist(), std=std.tolist()))
    return results


def stratified_bootstrap_ci(
    strata: list[np.ndarray],
    statistic: Callable[..., np.ndarray],
    confidence: float = CONFIDENCE,
    expand: bool = True,
) -> tuple[float, float]:
    """Expanded percentile bootstrap interval, resampling within each stratum (scipy.stats).

    `statistic(*strata, axis=-1)` sees one resample of every stratum. scipy resamples each sample
    of a multi-sample call independently, which is exactly stratified resampling. Percentile
    rather than BCa: BCa returns NaN when every value is equal (e.g. P(better) = 1).

    "Expanded" (Hesterberg 2015, "What teachers should know about the bootstrap", Sec. 5): at a
    handful of seeds per cell the plain percentile interval is too narrow (a resample's spread is
    (n-1)/n of the sample's, and normal rather than t quantiles): it held the truth in 84-86% of
    simulated studies at 3 seeds per cell, the expanded one in 92-94% (study/analysis/coverage.py).
    The percentiles taken are those of level 2 Phi(sqrt(n / (n - 1)) t_{1 - alpha/2, N - cells})
    - 1, with n the smallest cell's size and N all values (expand=False: the plain interval,
    for that comparison). (NaN, NaN) when there is no stratum or one has fewer than 2 values.
    """
    if not strata or any(len(s) < 2 for s in strata):
        return (math.nan, math.nan)
    n, runs = min(len(s) for s in strata), sum(len(s) for s in strata)
    t = stats.t.ppf(0.5 + confidence / 2, runs - len(strata))
    expanded = 2 * stats.norm.cdf(math.sqrt(n / (n - 1)) * t) - 1 if expand else confidence
    result = stats.bootstrap(
        tuple(strata),
        statistic,
        vectorized=True,
        paired=False,
        axis=-1,
        confidence_level=expanded,
        method="percentile",
        n_resamples=BOOTSTRAP_RESAMPLES,
        rng=BOOTSTRAP_SEED,
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


# ---------------------------------------------------------------- helpers


def variant_label(method: str, p_detach: float) -> str:
    """Human name of a compared method: "vanilla", "h-detach p=0.25", "h-detach p=tuned"."""
    if method == "none":
        return "vanilla"
    return f"{method.replace('_', '-')} p={format_float(p_detach)}"


def format_float(value: float) -> str:
    """A cell's lr or p_detach as the report shows it: "0.001", or "tuned" (Optuna)."""
    return TUNED_LABEL if value == TUNED else f"{value:g}"


def format_clip(clip: float | None) -> str:
    """A clip norm as the report shows it: "1", "none" (no clipping) or "tuned"."""
    return "none" if clip is None else format_float(clip)


def json_value(value: float | None) -> float | str | None:
    """A cell value for cells.csv and summary.json: the number, or "tuned"."""
    return TUNED_LABEL if value == TUNED else value


def pooled_mean(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over the concatenation of samples: every run weighs the same."""
    return np.mean(np.concatenate(samples, axis=axis), axis=axis)


def _improvement(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def pooled_iqm(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean (25% trimmed each side) over the concatenation of samples."""
    return stats.trim_mean(np.concatenate(samples, axis=axis), 0.25, axis=axis)


def _successes(runs: list[RunResult]) -> np.ndarray:
    return np.array([float(r.success) for r in runs])


def _group(runs: list[RunResult], key: Callable[[RunResult], tuple]) -> dict[tuple, list]:
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return groups


def _cell_order(key: tuple) -> tuple:
    # Display order: method "none" (vanilla) first, and no clipping (None) before any clip norm.
    return tuple((value != "none", value is not None, value or 0) for value in key)


def _item_order(item: tuple) -> tuple:
    return _cell_order(item[0])


def _nanmedian(values: Iterable[float]) -> float:
    values = np.asarray(list(values), dtype=float)
    return float(np.median(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else math.nan
