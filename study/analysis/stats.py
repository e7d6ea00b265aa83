"""Robustness statistics: per-run scores, per-cell summaries over seeds, cross-cell comparisons.

Works on the plain records of load.py (no MLflow here). Intervals: Wilson score intervals for
proportions, Newcombe's for their differences, and Student-t intervals whose standard error comes
from a bootstrap over seeds (`scipy.stats.bootstrap`) for statistics pooled over cells.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from study.analysis.intervals import (
    expected_best_of_n,
    iqm_interval,
    newcombe_interval,
    p_better_interval,
    pooled_mean,
    stratified_interval,
    wilson_interval,
)
from study.analysis.load import Study, Trial

# A cell enters a cross-cell statistic only with this many finished seeds: one seed says nothing
# about seed-to-seed spread, and two leave a standard error from two values per cell.
MIN_SEEDS = 3
# "Good" learning rates reach at least this fraction of the best lr's median best accuracy.
GOOD_LR_FRACTION = 0.95
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
    # median_best / the highest median_best of any method at this task and clip (NaN for an lr
    # with fewer than MIN_SEEDS finished seeds)
    relative: list[float]
    best_lr: float
    good_lrs: tuple[float, float] | None  # smallest and largest good lr; None: no lr is good
    good_lr_decades: float  # log10(largest / smallest good lr); NaN when no lr is good


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
    # Per task, the methods (method, p_detach) compared: the plan's and those of the trials.
    variants: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    # The space's claims tested on these runs (claims.ClaimResult), filled by the report:
    # claims.py builds on this module, so the type is named there, not here.
    claims: list[Any] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return sorted({trial.task for trial in self.trials})


def analyse(study: Study) -> Analysis:
    """All statistics of a study; only finished runs (completed or diverged) are scored. In an
    Optuna study, each seed's best tuned trial stands for its scientific point."""
    trials = best_tuned_trials(study.trials, study.tuned) if study.tuned else study.trials
    runs = [score_run(trial, study.target) for trial in trials if trial.finished]
    cells = cell_stats(trials, runs)
    variants = {
        task: sorted(
            {t.variant for t in trials if t.task == task} | set(study.planned_variants),
            key=_cell_order,
        )
        for task in {t.task for t in trials}
    }
    return Analysis(
        study=study,
        trials=trials,
        runs=runs,
        cells=cells,
        lr_sensitivity=lr_sensitivity(cells),
        clipping=clipping_dependence(runs),
        paired=paired_comparisons(runs, variants),
        iqm=interquartile_means(runs, variants),
        expected_best=expected_best_curves(runs),
        variants=variants,
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
    """Per task, method and clip setting: median best accuracy at each lr, relative to the
    highest median any method reached at that task and clip (one yardstick for all: relative
    to its own best lr, a method stuck at chance everywhere would look insensitive to lr).

    The good-lr range is the contiguous run of grid lrs around the method's best one whose
    relative median is >= GOOD_LR_FRACTION; an lr with fewer than MIN_SEEDS finished seeds
    breaks the run (it is not known to be good). Its width in decades is a lower bound (the grid
    is finite), 0 when only the best lr qualifies, NaN when none does.
    """
    groups: dict[tuple, list[CellStats]] = defaultdict(list)
    for cell in cells:
        if cell.n and cell.lr != TUNED:  # an Optuna study has no lr axis
            groups[(cell.task, cell.method, cell.p_detach, cell.clip_norm)].append(cell)
    yardstick: dict[tuple, float] = defaultdict(float)  # (task, clip) -> highest median
    for (task, _, _, clip_norm), members in groups.items():
        for cell in members:
            if cell.n >= MIN_SEEDS:
                yardstick[(task, clip_norm)] = max(yardstick[(task, clip_norm)], cell.best.median)
    results = []
    for key in sorted(groups, key=_cell_order):
        members = sorted(groups[key], key=lambda c: c.lr)
        if all(c.n < MIN_SEEDS for c in members):
            continue
        medians = np.array([c.best.median if c.n >= MIN_SEEDS else np.nan for c in members])
        task, method, p_detach, clip_norm = key
        reference = yardstick[(task, clip_norm)]
        relative = medians / reference if reference > 0 else np.full(len(medians), np.nan)
        top = int(np.nanargmax(medians))
        good = relative >= GOOD_LR_FRACTION  # NaN compares False
        low = high = top
        while low > 0 and good[low - 1]:
            low -= 1
        while high < len(members) - 1 and good[high + 1]:
            high += 1
        good_lrs = (members[low].lr, members[high].lr) if good[top] else None
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
                good_lrs=good_lrs,
                good_lr_decades=(
                    float(np.log10(good_lrs[1] / good_lrs[0])) if good_lrs else math.nan
                ),
            )
        )
    return results


def clipping_dependence(runs: list[RunResult]) -> list[ClipDependence]:
    """Success rate with each clip norm minus without clipping, per task and method: the mean
    over lrs of the per-lr differences, so that both sides weigh each lr alike whatever its seed
    counts.

    Only lrs run both ways with >= MIN_SEEDS seeds each enter. The interval is stratified_interval
    over seeds within each (lr, clip) cell; where every cell's runs all agree (which a resampling
    of seeds cannot put a width on), Newcombe's interval of the two rates.
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
                pairs = zip(strata[:k], strata[k:], strict=True)
                per_lr = [a.mean(axis=axis) - b.mean(axis=axis) for a, b in pairs]
                return np.mean(per_lr, axis=0)

            estimate = float(difference(*with_clip, *without))
            with_n, without_n = sum(map(len, with_clip)), sum(map(len, without))
            interval = stratified_interval(with_clip + without, difference, bounds=(-1.0, 1.0))
            if interval[0] == interval[1]:
                with_rate = float(np.mean([s.mean() for s in with_clip]))
                without_rate = float(np.mean([s.mean() for s in without]))
                interval = newcombe_interval(with_rate, with_n, without_rate, without_n)
            task, method, p_detach = key
            results.append(
                ClipDependence(
                    task=task,
                    method=method,
                    p_detach=p_detach,
                    clip_norm=clip,
                    lrs=lrs,
                    with_successes=int(sum(s.sum() for s in with_clip)),
                    with_n=with_n,
                    without_successes=int(sum(s.sum() for s in without)),
                    without_n=without_n,
                    difference=estimate,
                    difference_ci=interval,
                )
            )
    return results


def paired_comparisons(
    runs: list[RunResult], variants: dict[str, list[tuple[str, float]]] | None = None
) -> list[PairedComparison]:
    """P(method better than vanilla) per task and non-vanilla method of `variants` (one with no
    finished run has no pairs), paired by (lr, clip, seed) and every other param (_pairing_key).

    Per pair the score is 1 if the method's best val accuracy is higher, 1/2 on a tie, 0 if lower
    (the "probability of improvement" of Agarwal et al. 2021). Only lr x clip cells with
    >= MIN_SEEDS pairs enter; the interval is p_better_interval.
    """
    by_variant = _group(runs, lambda r: (r.trial.task, *r.trial.variant))
    results = []
    variants = variants or {}
    compared = {(task, *variant) for task in variants for variant in variants[task]}
    for task, method, p_detach in sorted(compared | set(by_variant), key=_cell_order):
        if (method, p_detach) == VANILLA:
            continue
        members = by_variant.get((task, method, p_detach), [])
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
                p_better_ci=p_better_interval(scores),
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


def interquartile_means(
    runs: list[RunResult], variants: dict[str, list[tuple[str, float]]] | None = None
) -> list[IQM]:
    """IQM (25% trimmed mean, scipy) of best val accuracy per task and method, over the runs of
    the lr x clip cells in which every method of the task (`variants`, those with no finished
    run included) has >= MIN_SEEDS finished seeds (the
    cross-cell rule; the same cells for all, or a method could look better for having finished
    only its easy cells). Below 4 runs it trims nothing and is the mean.

    Strata for the interval are the cells: the grid is fixed by design, only the seeds are
    random, so seeds are resampled within each cell (as rliable does per task).
    """
    by_variant = _group(runs, lambda r: (r.trial.task, *r.trial.variant))
    by_task_cell = _group(runs, lambda r: (r.trial.task, r.trial.lr, r.trial.clip_norm))
    variants = variants or {}
    variants_of = _group(runs, lambda r: (r.trial.task,))
    common = {
        (task, lr, clip)
        for (task, lr, clip), members in by_task_cell.items()
        if all(
            sum(r.trial.variant == variant for r in members) >= MIN_SEEDS
            for variant in {r.trial.variant for r in variants_of[(task,)]}
            | set(variants.get(task, []))
        )
    }
    results = []
    compared = {(task, *variant) for task in variants for variant in variants[task]}
    for key in sorted(compared | set(by_variant), key=_cell_order):
        by_cell = _group(by_variant.get(key, []), lambda r: (r.trial.lr, r.trial.clip_norm))
        strata = [
            np.array([r.best for r in members])
            for cell, members in by_cell.items()
            if (key[0], *cell) in common
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
                ci=iqm_interval(strata),
            )
        )
    return results


def expected_best_curves(runs: list[RunResult]) -> list[ExpectedBest]:
    """Per task and method: every finished run is one random trial of (lr, clip, seed)."""
    results = []
    by_variant = _group(runs, lambda r: (r.trial.task, *r.trial.variant))
    for key in sorted(by_variant, key=_cell_order):
        best = [r.best for r in by_variant[key]]
        mean, std = expected_best_of_n(best, len(best))
        results.append(ExpectedBest(*key, mean=mean.tolist(), std=std.tolist()))
    return results


# ---------------------------------------------------------------- helpers


def _improvement(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


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


def _nanmedian(values: Iterable[float]) -> float:
    values = np.asarray(list(values), dtype=float)
    return float(np.median(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else math.nan
