"""Claim verdicts on synthetic studies with known answers (study/analysis/claims.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from analysis_fixtures import BUDGET, make_trial

from study.analysis.claims import CONTRADICTED, INCONCLUSIVE, SUPPORTED, evaluate_claim, verdict
from study.analysis.load import Study
from study.analysis.stats import analyse
from study.claim_spec import Claim

LRS = (1.0e-3, 1.0e-4)


def _study(scores: dict[str, list[float]], seeds: int = 5, state_of=None, T: int = 100) -> Study:
    """One cell per lr; each method's seed s at lr i ends at scores[method][i] + 0.01 s."""
    trials = []
    for method, finals in scores.items():
        p = 0.0 if method == "none" else 0.25
        for lr, final in zip(LRS, finals, strict=True):
            for seed in range(seeds):
                end = min(final + 0.01 * seed, 1.0)
                state = state_of(method, seed) if state_of else "completed"
                trials.append(
                    make_trial(
                        f"t{len(trials):04d}",
                        [0.1, end / 2, end],
                        method=method,
                        p_detach=p,
                        lr=lr,
                        seed=seed,
                        state=state,
                        T=T,
                    )
                )
    return Study("synthetic", "sqlite://", "parent", len(trials), 0.9, trials)


def _claim(statistic: str, expect: str = "higher", **changes) -> Claim:
    values = dict(
        id="fig9-test",
        figure=9,
        claim="a claim",
        method="h_detach",
        baseline="none",
        statistic=statistic,
        expect=expect,
        null=0.5 if statistic == "p_better" else 0.0,
    )
    values.update(changes)
    return Claim(**values)


@pytest.mark.parametrize(
    "statistic",
    ["best_accuracy", "final_accuracy", "convergence_auc", "p_better", "worst_lr_accuracy"],
)
def test_a_clearly_better_method_is_supported_and_a_worse_one_contradicted(statistic):
    study = _study({"h_detach": [0.9, 0.8], "none": [0.5, 0.3]})
    better = evaluate_claim(analyse(study), _claim(statistic), BUDGET)
    assert better.verdict == SUPPORTED, better
    assert better.cells == 2 and better.runs == 20 and better.seeds == (0, 1, 2, 3, 4)
    assert better.interval[0] > better.claim.null
    worse = evaluate_claim(analyse(study), _claim(statistic, method="none", baseline="h_detach"),
                           BUDGET)  # fmt: skip
    assert worse.verdict == CONTRADICTED, worse


def test_equal_methods_are_inconclusive():
    study = _study({"h_detach": [0.7, 0.6], "none": [0.7, 0.6]})
    for statistic in ("best_accuracy", "p_better", "worst_lr_accuracy", "seed_spread"):
        result = evaluate_claim(analyse(study), _claim(statistic), BUDGET)
        assert result.verdict == INCONCLUSIVE, (statistic, result)


def test_a_two_seed_study_is_inconclusive_with_its_reason():
    study = _study({"h_detach": [0.9, 0.8], "none": [0.5, 0.3]}, seeds=2)
    result = evaluate_claim(analyse(study), _claim("best_accuracy"), BUDGET)
    assert result.verdict == INCONCLUSIVE
    assert math.isnan(result.value) and result.cells == 0
    assert "3 finished seeds" in result.reason


def test_a_claim_whose_scope_is_not_whole_is_inconclusive_whatever_its_complete_cells_say():
    """h-detach's worst lr (1e-4, 0.3 against vanilla's 0.6) is contradicted on the whole
    study; with that cell's seeds still running, the cells that happen to be complete would say
    supported (its best lr alone), so the verdict waits for the whole scope."""
    whole = _study({"h_detach": [0.9, 0.3], "none": [0.6, 0.6]})
    assert evaluate_claim(analyse(whole), _claim("worst_lr_accuracy"), BUDGET).verdict == (
        CONTRADICTED
    )
    running = [
        dataclasses.replace(trial, state="running")
        if trial.method == "h_detach" and trial.lr == LRS[1] and trial.seed >= 2
        else trial
        for trial in whole.trials
    ]
    partial = dataclasses.replace(whole, trials=running)
    result = evaluate_claim(analyse(partial), _claim("worst_lr_accuracy"), BUDGET)
    assert result.verdict == INCONCLUSIVE and result.cells == 1 and result.value > 0
    assert "1 of 2 cell(s) short of 3 finished seeds" in result.reason
    unstarted = dataclasses.replace(whole, n_planned=len(whole.trials) + 4)
    result = evaluate_claim(analyse(unstarted), _claim("best_accuracy"), BUDGET)
    assert result.verdict == INCONCLUSIVE and result.cells == 2
    assert result.reason == "4 planned trial(s) not started"


def test_a_study_with_no_finished_run_still_has_its_budget():
    study = _study({"h_detach": [0.9, 0.8], "none": [0.5, 0.3]}, state_of=lambda *_: "running")
    result = evaluate_claim(analyse(study), _claim("best_accuracy"), BUDGET * 10)
    assert result.runs == 0 and result.budget_fraction == pytest.approx(0.1)


def test_divergence_where_vanilla_always_diverges_is_supported_from_newcombe():
    study = _study(
        {"h_detach": [0.9, 0.8], "none": [0.5, 0.3]},
        state_of=lambda method, seed: "diverged" if method == "none" else "completed",
    )
    result = evaluate_claim(analyse(study), _claim("divergence_rate", "lower"), BUDGET)
    assert result.value == -1.0
    assert result.verdict == SUPPORTED and result.interval[1] < 0  # Newcombe: no resampled width


def test_one_sample_claim_and_where_filter():
    study = _study({"none": [0.95, 0.95]})
    claim = _claim("success_rate", method="none", baseline=None, null=0.5, where={"T": 100})
    assert evaluate_claim(analyse(study), claim, BUDGET).verdict == SUPPORTED
    elsewhere = _claim("success_rate", method="none", baseline=None, null=0.5, where={"T": 300})
    outside = evaluate_claim(analyse(study), elsewhere, BUDGET)
    assert outside.runs == 0 and outside.verdict == INCONCLUSIVE
    # Not "short of seeds": no trial of the grid has T=300 (a typo, or a grid narrowed by --set).
    assert outside.reason == (
        "no trial of this study is one the claim is about (method none at T=300): its grid "
        "lacks them"
    )


def test_budget_fraction_is_iterations_run_over_the_files():
    study = _study({"h_detach": [0.9, 0.8], "none": [0.5, 0.3]})
    result = evaluate_claim(analyse(study), _claim("best_accuracy"), BUDGET * 10)
    assert result.budget_fraction == pytest.approx(0.1)
    assert evaluate_claim(analyse(study), _claim("best_accuracy"), None).budget_fraction != 0.1


@pytest.mark.parametrize(
    ("interval", "expect", "wanted"),
    [
        ((0.1, 0.2), "higher", SUPPORTED),
        ((-0.2, -0.1), "higher", CONTRADICTED),
        ((-0.1, 0.1), "higher", INCONCLUSIVE),
        ((-0.2, -0.1), "lower", SUPPORTED),
        ((0.1, 0.2), "lower", CONTRADICTED),
        ((math.nan, math.nan), "lower", INCONCLUSIVE),
    ],
)
def test_the_verdict_rule(interval, expect, wanted):
    assert verdict(0.15 if interval[0] > 0 else -0.15, interval, 0.0, expect) == wanted


def test_a_claim_over_several_p_names_one_instead_of_pooling_them():
    """Pooled, each vanilla run paired with h-detach at both p, as two independent pairs."""
    study = _study({"h_detach": [0.9, 0.8], "none": [0.5, 0.3]})
    at_half = [dataclasses.replace(t, p_detach=0.5, trial_id=t.trial_id + "b",
                                   params={**t.params, "p_detach": "0.5"})
               for t in study.trials if t.method == "h_detach"]  # fmt: skip
    both = dataclasses.replace(study, trials=study.trials + at_half)
    result = evaluate_claim(analyse(both), _claim("p_better"), BUDGET)
    assert result.verdict == INCONCLUSIVE and result.runs == 0
    assert result.reason == (
        "h_detach runs at p_detach 0.25, 0.5 here: the claim must name one "
        "(where: {p_detach: ...})"
    )
    named = _claim("p_better", where={"p_detach": 0.5})
    assert evaluate_claim(analyse(both), named, BUDGET).verdict == SUPPORTED
