"""Robustness statistics against hand-computed numbers, plus seeded interval coverage checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from analysis_fixtures import grid, make_trial
from scipy import stats

from study.analysis.intervals import (
    expected_best_of_n,
    newcombe_interval,
    stratified_interval,
    wilson_interval,
)
from study.analysis.load import Study
from study.analysis.stats import (
    TUNED,
    analyse,
    best_tuned_trials,
    cell_stats,
    clipping_dependence,
    interquartile_means,
    lr_sensitivity,
    paired_comparisons,
    score_run,
    spread,
)

TARGET = 0.99
REACH = [0.5, 0.995]  # reaches the target at iteration 200
MISS = [0.5, 0.6]  # never reaches it; best 0.6


def _study(trials, n_planned=None) -> Study:
    return Study("s", "sqlite:///x", "parent", n_planned or len(trials), TARGET, trials)


def _mean(*samples, axis=-1):
    return np.mean(np.concatenate(samples, axis=axis), axis=axis)


def test_score_run_by_hand():
    trial = make_trial("t0", [0.2, 0.5, 0.995, 0.98])
    run = score_run(trial, TARGET)
    assert run.best == 0.995 and run.final == 0.98
    assert run.reached_at == 300 and run.success
    # Right-endpoint sum over the 1000-iteration budget: 100 * (0.2 + 0.5 + 0.995 + 0.98) / 1000.
    assert run.auc == pytest.approx(0.2675)


def test_score_run_never_reaching_or_never_evaluated():
    miss = score_run(make_trial("t0", [0.3, 0.98]), TARGET)
    assert miss.reached_at == math.inf and not miss.success
    empty = score_run(make_trial("t1", [], state="diverged"), TARGET)
    assert (empty.best, empty.final, empty.auc, empty.reached_at) == (0.0, 0.0, 0.0, math.inf)


def test_full_curve_at_one_has_auc_one():
    assert score_run(make_trial("t0", [1.0] * 10), TARGET).auc == pytest.approx(1.0)


def test_spread_matches_numpy_linear_quartiles():
    s = spread([0.9, 0.5, 1.0, 0.7])
    # Sorted 0.5 0.7 0.9 1.0: q25 at position 0.75 = 0.65, q75 at position 2.25 = 0.925.
    assert (s.median, s.q25, s.q75, s.min) == pytest.approx((0.8, 0.65, 0.925, 0.5))


@pytest.mark.parametrize("k, n", [(0, 5), (3, 5), (5, 5), (1, 20), (17, 20)])
def test_wilson_interval_matches_closed_form(k, n):
    z = 1.959963984540054
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half))


def test_cell_stats_counts_by_hand():
    trials = [
        make_trial("t0", [0.5, 0.995], seed=0),  # success at 200
        make_trial("t1", [0.995], seed=1),  # success at 100
        make_trial("t2", [0.4, 0.7, 0.8, 0.9], seed=2),  # never
        make_trial("t3", [0.3, 0.2], seed=3, state="diverged"),  # never, diverged
        make_trial("t4", [0.1], seed=4, state="failed", error="boom"),
        make_trial("t5", [0.99], seed=5, state="running"),
    ]
    runs = [score_run(t, TARGET) for t in trials if t.finished]
    (cell,) = cell_stats(trials, runs)
    assert (cell.n, cell.n_diverged, cell.n_failed, cell.n_running) == (4, 1, 1, 1)
    assert cell.successes == 2 and cell.success_rate == 0.5
    assert cell.divergence_rate == 0.25
    assert cell.success_ci == pytest.approx(wilson_interval(2, 4))
    # Reach times 100, 200, inf, inf: median of the middle two is inf (half never got there).
    assert cell.iters_to_target == math.inf
    # Best 0.995, 0.995, 0.9, 0.3 and final 0.995, 0.995, 0.9, 0.2.
    assert cell.best.median == pytest.approx(0.9475) and cell.best.min == 0.3
    assert cell.final.median == pytest.approx(0.9475) and cell.final.min == 0.2
    # AUC (x1000 budget): 0.1495, 0.0995, 0.28, 0.05 -> median (0.0995 + 0.1495) / 2.
    assert cell.auc == pytest.approx(0.1245)


def test_iterations_to_target_median_counts_misses():
    trials = [
        make_trial("t0", REACH, seed=0),  # 200
        make_trial("t1", [0.2, 0.3, 0.4, 0.995], seed=1),  # 400
        make_trial("t2", MISS, seed=2),  # inf
    ]
    runs = [score_run(t, TARGET) for t in trials]
    (cell,) = cell_stats(trials, runs)
    assert cell.iters_to_target == 400


def test_lr_sensitivity_contiguous_good_range():
    # Median best per lr: 0.96, 0.5, 1.0, 0.97 -> good range is 1e-2..1e-1 only (contiguous).
    accs = {1e-4: 0.96, 1e-3: 0.5, 1e-2: 1.0, 1e-1: 0.97}
    trials = grid({("none", 0.0): {(lr, 1.0): [[a]] * 3 for lr, a in accs.items()}})
    analysis = analyse(_study(trials))
    (s,) = analysis.lr_sensitivity
    assert s.lrs == [1e-4, 1e-3, 1e-2, 1e-1]
    assert s.relative == pytest.approx([0.96, 0.5, 1.0, 0.97])
    assert s.best_lr == 1e-2 and s.good_lrs == (1e-2, 1e-1)
    assert s.good_lr_decades == pytest.approx(1.0)


def test_lr_sensitivity_a_cell_below_min_seeds_is_unknown_and_breaks_the_good_range():
    # 1e-2 has 2 seeds: not known to be good, so 1e-3 and 1e-1 do not join into 2 decades.
    cells = {(1e-3, 1.0): [[1.0]] * 3, (1e-2, 1.0): [[0.1]] * 2, (1e-1, 1.0): [[1.0]] * 3}
    analysis = analyse(_study(grid({("none", 0.0): cells})))
    (s,) = lr_sensitivity(analysis.cells)
    assert s.lrs == [1e-3, 1e-2, 1e-1]
    assert s.relative[0] == s.relative[2] == 1.0 and math.isnan(s.relative[1])
    assert s.good_lrs == (1e-3, 1e-3) and s.good_lr_decades == 0.0


def test_lr_sensitivity_measures_every_method_against_the_best_any_reached():
    # Vanilla sits at chance at every lr; relative to its own best it would be "good" across
    # 2 decades. Against h-detach's best it has no good lr at all.
    lrs = (1e-3, 1e-2, 1e-1)
    h_detach_best = dict(zip(lrs, (0.5, 1.0, 0.6), strict=True))
    trials = grid(
        {
            ("none", 0.0): {(lr, 1.0): [[0.125]] * 3 for lr in lrs},
            ("h_detach", 0.5): {(lr, 1.0): [[a]] * 3 for lr, a in h_detach_best.items()},
        }
    )
    vanilla, h_detach = lr_sensitivity(analyse(_study(trials)).cells)
    assert vanilla.relative == pytest.approx([0.125] * 3)
    assert vanilla.good_lrs is None and math.isnan(vanilla.good_lr_decades)
    assert h_detach.good_lrs == (1e-2, 1e-2) and h_detach.good_lr_decades == 0.0


def test_clipping_dependence_by_hand():
    curves = {
        ("none", 0.0): {
            (1e-3, 1.0): [REACH, REACH, MISS],  # 2/3 with clipping
            (1e-3, None): [MISS, MISS, REACH],  # 1/3 without
            (1e-2, 1.0): [REACH, REACH, REACH],  # 3/3
            (1e-2, None): [MISS, MISS, MISS],  # 0/3
            (1e-1, 1.0): [REACH, REACH, REACH],  # no unclipped partner: left out
            (1e-4, 1.0): [REACH, REACH],  # fewer than MIN_SEEDS: left out
            (1e-4, None): [MISS, MISS],
        }
    }
    runs = [score_run(t, TARGET) for t in grid(curves)]
    (d,) = clipping_dependence(runs)
    assert d.lrs == [1e-3, 1e-2] and d.clip_norm == 1.0
    assert (d.with_successes, d.with_n, d.without_successes, d.without_n) == (5, 6, 1, 6)
    assert d.difference == pytest.approx(4 / 6)
    assert d.difference_ci[0] <= 4 / 6 <= d.difference_ci[1]


def test_clipping_dependence_weighs_each_lr_alike_whatever_its_seed_counts():
    # Success depends on lr only: clipping changes nothing at either lr. Pooled over runs the
    # sides would mix the lrs 5:3 and 3:5 and show +0.25.
    curves = {
        ("none", 0.0): {
            (1e-3, 1.0): [REACH] * 5,
            (1e-2, 1.0): [MISS] * 3,
            (1e-3, None): [REACH] * 3,
            (1e-2, None): [MISS] * 5,
        }
    }
    (d,) = clipping_dependence([score_run(t, TARGET) for t in grid(curves)])
    assert d.difference == 0.0
    # Every cell's runs agree, so resampling seeds gives no spread: Newcombe's interval of the
    # two rates (1/2 each) stands in rather than a zero-width one.
    assert d.difference_ci == pytest.approx(newcombe_interval(0.5, 8, 0.5, 8))
    assert d.difference_ci[0] < -0.3 and d.difference_ci[1] > 0.3


def test_newcombe_interval_by_hand():
    # Newcombe 1998, Table II, example (a): 56/70 - 48/80: [0.0524, 0.3339].
    low, high = newcombe_interval(56 / 70, 70, 48 / 80, 80)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_dominating_method_has_p_better_one():
    cells = {(lr, clip): [REACH] * 3 for lr in (1e-3, 1e-2) for clip in (1.0, None)}
    worse = {key: [MISS] * 3 for key in cells}
    runs = [score_run(t, TARGET) for t in grid({("none", 0.0): worse, ("h_detach", 0.5): cells})]
    (p,) = paired_comparisons(runs)
    assert (p.method, p.p_detach, p.n_pairs, p.n_cells) == ("h_detach", 0.5, 12, 4)
    assert p.p_better == 1.0
    # All 12 pairs won: the bootstrap interval would have zero width; Wilson's of 12/12 instead.
    assert p.p_better_ci == pytest.approx(wilson_interval(12, 12))
    assert p.p_better_ci[0] == pytest.approx(0.7575, abs=1e-4)
    assert (p.successes, p.baseline_successes) == (12, 0)


def test_p_better_ties_and_mixed_by_hand():
    # Pairs by seed: win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4 = 0.625.
    method = [[0.9], [0.2], [0.5], [0.8]]
    vanilla = [[0.1], [0.3], [0.5], [0.7]]
    runs = [
        score_run(t, TARGET)
        for t in grid(
            {("none", 0.0): {(1e-3, 1.0): vanilla}, ("c_detach", 0.25): {(1e-3, 1.0): method}}
        )
    ]
    (p,) = paired_comparisons(runs)
    assert p.p_better == pytest.approx(0.625) and p.n_pairs == 4
    assert p.p_better_ci[0] <= 0.625 <= p.p_better_ci[1]


def test_p_better_pairs_only_runs_that_share_every_other_param():
    """A hidden_size axis outside the cells: each method run meets the vanilla run of its size."""
    trials = []
    for seed in range(3):
        for size, vanilla, method in (("64", MISS, REACH), ("128", REACH, MISS)):
            extra = {"hidden_size": size}
            trials.append(make_trial(f"v{seed}{size}", vanilla, seed=seed, extra_params=extra))
            trials.append(
                make_trial(
                    f"h{seed}{size}", method, method="h_detach", p_detach=0.25, seed=seed,
                    extra_params=extra,
                )
            )  # fmt: skip
    (p,) = paired_comparisons([score_run(t, TARGET) for t in trials])
    # Each size wins at one and loses at the other: 3 wins + 3 losses over 6 pairs.
    assert (p.n_pairs, p.p_better) == (6, 0.5)


def test_p_better_all_ties_has_the_wilson_interval_of_half_the_pairs():
    runs = [
        score_run(t, TARGET)
        for t in grid(
            {
                ("none", 0.0): {(1e-3, 1.0): [REACH] * 3},
                ("h_detach", 0.5): {(1e-3, 1.0): [REACH] * 3},
            }
        )  # fmt: skip
    ]
    (p,) = paired_comparisons(runs)
    assert p.p_better == 0.5 and p.p_better_ci == pytest.approx(wilson_interval(1.5, 3))
    assert p.p_better_ci[0] < 0.2 and p.p_better_ci[1] > 0.8


@pytest.mark.parametrize("tie_cell_first", [True, False])
def test_p_better_with_a_tie_cell_and_a_win_cell_counts_each_pair(tie_cell_first: bool):
    # Within each cell every pair scores alike (no spread to resample): 3 ties and 3 wins give
    # 4.5 of 6, in either cell order.
    tie, win = (1e-3, 1.0), (1e-2, 1.0)
    if not tie_cell_first:
        tie, win = win, tie
    curves = {
        ("none", 0.0): {tie: [REACH] * 3, win: [MISS] * 3},
        ("h_detach", 0.5): {tie: [REACH] * 3, win: [REACH] * 3},
    }
    (p,) = paired_comparisons([score_run(t, TARGET) for t in grid(curves)])
    assert p.p_better == 0.75 and p.p_better_ci == pytest.approx(wilson_interval(4.5, 6))


def test_paired_leaves_out_cells_with_fewer_than_min_seeds_pairs():
    runs = [
        score_run(t, TARGET)
        for t in grid(
            {
                ("none", 0.0): {(1e-3, 1.0): [MISS] * 3, (1e-2, 1.0): [MISS] * 2},
                ("h_detach", 0.5): {(1e-3, 1.0): [REACH] * 3, (1e-2, 1.0): [REACH] * 2},
            }
        )
    ]
    (p,) = paired_comparisons(runs)
    assert (p.n_pairs, p.n_cells, p.cells_left_out) == (3, 1, 1)


def test_no_vanilla_means_no_pairs():
    runs = [score_run(t, TARGET) for t in grid({("h_detach", 0.5): {(1e-3, 1.0): [REACH] * 2}})]
    (p,) = paired_comparisons(runs)
    assert p.n_pairs == 0 and math.isnan(p.p_better)


def test_iqm_by_hand():
    # Two cells of four seeds: best accuracies 0.1..0.8; the 25% trimmed mean keeps 0.3..0.6.
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    curves = {("none", 0.0): {(1e-3, 1.0): [[v] for v in values[:4]],
                              (1e-2, 1.0): [[v] for v in values[4:]]}}  # fmt: skip
    (iqm,) = interquartile_means([score_run(t, TARGET) for t in grid(curves)])
    assert iqm.value == pytest.approx(0.45) and (iqm.n_runs, iqm.n_cells) == (8, 2)
    assert iqm.ci[0] <= 0.45 <= iqm.ci[1]


def test_iqm_compares_methods_on_the_cells_every_method_finished():
    # Identical methods, 0.9 at lr 1e-3 and 0.1 at 1e-2; one h-detach seed at 1e-2 failed to
    # finish. On its own cells h-detach would score 0.9 against vanilla's 0.5.
    curves = {
        ("none", 0.0): {(1e-3, 1.0): [[0.8], [0.9], [1.0]], (1e-2, 1.0): [[0.1]] * 3},
        ("h_detach", 0.5): {(1e-3, 1.0): [[0.8], [0.9], [1.0]], (1e-2, 1.0): [[0.1]] * 2},
    }
    vanilla, h_detach = interquartile_means([score_run(t, TARGET) for t in grid(curves)])
    assert vanilla.value == h_detach.value == pytest.approx(0.9)
    assert (vanilla.n_runs, vanilla.n_cells) == (h_detach.n_runs, h_detach.n_cells) == (3, 1)
    # One cell of 3 seeds: the t interval of their mean, 0.9 +- t(0.975, 2) * 0.1 / sqrt(3).
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert vanilla.ci == pytest.approx((0.9 - half, min(1.0, 0.9 + half)), abs=0.02)


def test_iqm_of_runs_that_all_scored_alike_has_no_interval():
    curves = {("none", 0.0): {(1e-3, 1.0): [REACH] * 3}}
    (iqm,) = interquartile_means([score_run(t, TARGET) for t in grid(curves)])
    assert iqm.value == 0.995 and all(math.isnan(x) for x in iqm.ci)


def test_expected_best_of_n_by_hand_and_by_enumeration():
    values = [0.1, 0.5, 0.9]
    mean, std = expected_best_of_n(values, 3)
    # n = 2: P(max = 0.1) = 1/9, P(0.5) = 3/9, P(0.9) = 5/9.
    assert mean[1] == pytest.approx((0.1 + 3 * 0.5 + 5 * 0.9) / 9)
    for n in (1, 2, 3):
        maxima = [max(draw) for draw in itertools.product(values, repeat=n)]
        assert mean[n - 1] == pytest.approx(np.mean(maxima))
        assert std[n - 1] == pytest.approx(np.std(maxima))


def test_expected_best_with_ties_is_exact():
    mean, _ = expected_best_of_n([0.5, 0.5, 1.0, 1.0], 2)
    # n = 2: max is 0.5 only if both draws are 0.5: probability 1/4.
    assert mean == pytest.approx([0.75, 0.25 * 0.5 + 0.75 * 1.0])


def test_wilson_interval_coverage():
    rng = np.random.default_rng(0)
    truth, n = 0.7, 20
    draws = rng.binomial(n, truth, size=200)
    covered = [lo <= truth <= hi for lo, hi in (wilson_interval(int(k), n) for k in draws)]
    assert np.mean(covered) >= 0.85


def test_stratified_interval_needs_two_values_per_stratum():
    assert all(math.isnan(x) for x in stratified_interval([np.ones(3), np.ones(1)], _mean))
    assert all(math.isnan(x) for x in stratified_interval([], _mean))


def test_stratified_interval_of_one_stratum_is_the_t_interval_of_its_mean():
    values = np.array([0.2, 0.5, 0.6, 0.9])
    low, high = stratified_interval([values], _mean, bounds=(-10.0, 10.0))
    expected = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    # The bootstrap's standard error comes from 4999 resamples: within a few percent of the
    # half-width (0.52).
    assert (low, high) == pytest.approx(expected, abs=0.02)


def test_stratified_interval_stays_within_the_statistics_bounds():
    low, high = stratified_interval([np.array([0.0, 1.0, 1.0])], _mean)
    assert 0.0 <= low and high == 1.0


def test_best_tuned_trials_keep_each_seeds_best_and_mark_what_was_tuned():
    trials = [
        make_trial("t0", MISS, lr=1e-3, seed=0),
        make_trial("t1", REACH, lr=2e-3, clip_norm=None, seed=0),  # vanilla seed 0's best
        make_trial("t2", REACH, method="h_detach", p_detach=0.25, lr=3e-3, seed=0, T=7),
        make_trial("t3", [0.9], method="h_detach", p_detach=0.5, lr=4e-3, seed=0),
        make_trial("t4", [0.1], lr=5e-3, seed=1, state="failed"),  # nothing finished: kept
        make_trial("t5", [0.1], lr=6e-3, seed=1, state="failed"),
    ]
    tuned = ["clip_norm", "lr", "p_detach", "task_options.T"]
    chosen = best_tuned_trials(trials, tuned)
    assert [t.trial_id for t in chosen] == ["t1", "t2", "t4"]
    assert all(t.lr == TUNED == t.clip_norm and t.params["lr"] == "tuned" for t in chosen)
    assert {t.task for t in chosen} == {"copying T=tuned"}  # one cell whatever T each found
    # Vanilla never detaches: its p_detach stays 0, so it is still the baseline.
    assert [(t.method, t.p_detach) for t in chosen] == [
        ("none", 0.0), ("h_detach", TUNED), ("none", 0.0),
    ]  # fmt: skip
    assert chosen[1].tuned_values == {
        "clip_norm": "1.0", "lr": "0.003", "p_detach": "0.25", "task_options.T": "7",
    }  # fmt: skip
    assert [t.lr for t in trials] == [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]  # records untouched
