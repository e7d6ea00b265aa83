"""The report's verdict sentences, one per thing a study can say (best setting, P(better),
clipping dependence, lr sensitivity, IQM), each with its number and interval, and its status
lines (counts, failed and pending trials)."""

from __future__ import annotations

import math

from study.analysis.claims import ClaimResult
from study.analysis.load import Study
from study.analysis.stats import GOOD_LR_FRACTION, MIN_SEEDS, Analysis, wilson_interval
from study.analysis.text import (
    budget_text,
    decades_text,
    format_clip,
    format_float,
    interval_text,
    lr_range_text,
    percent_text,
    seed_range,
    variant_label,
    variant_name,
)
from study.overrides import overrides_text
from study.tasks import TASKS


def verdicts(analysis: Analysis) -> list[str]:
    """One sentence per claim the study can speak to, each with its number and interval."""
    lines: list[str] = []
    for task in analysis.tasks:
        lines += _best_setting_verdict(analysis, task)
        lines += _paired_verdicts(analysis, task)
        lines += _clipping_verdicts(analysis, task)
        lines += _lr_verdicts(analysis, task)
        lines += _iqm_verdict(analysis, task)
    return lines


def _best_setting_verdict(analysis: Analysis, task: str) -> list[str]:
    # Tuning-playbook practice: compare methods each at its own best nuisance setting.
    target = percent_text(analysis.study.target)
    parts = []
    for variant in variants(analysis, task):
        cells = [c for c in analysis.cells if (c.task, *c.variant) == (task, *variant)]
        enough = [c for c in cells if c.n >= MIN_SEEDS]
        name = variant_label(*variant)
        if not enough:
            parts.append(f"{name}: not enough data (no cell with {MIN_SEEDS} finished seeds)")
            continue
        best = max(enough, key=lambda c: (c.success_rate, c.best.median, -c.lr))
        test = "" if math.isnan(best.test_at_best) else f", median test {best.test_at_best:.3f}"
        # Picked as the best of several cells, its rate flatters the method (the best of many
        # noisy rates is high by chance): the reader is told how many it was picked from.
        picked = f", best of {len(enough)} cells" if len(enough) > 1 else ""
        parts.append(
            f"{name} (lr={format_float(best.lr)}, clip={format_clip(best.clip_norm)}{picked}) "
            f"reached {target} in {best.successes}/{best.n} seeds "
            f"{interval_text(best.success_ci)}, "
            f"median best val {best.best.median:.3f}{test}"
        )
    return [f"{task}, each method at its best lr x clip: " + "; ".join(parts) + "."]


def _paired_verdicts(analysis: Analysis, task: str) -> list[str]:
    target = percent_text(analysis.study.target)
    lines = []
    for p in (p for p in analysis.paired if p.task == task):
        name = variant_label(p.method, p.p_detach)
        if p.n_pairs == 0:
            lines.append(
                f"{task}: {name} vs vanilla: not enough data (no lr x clip cell with "
                f"{MIN_SEEDS} seeds run by both)."
            )
            continue
        left_out = (
            f" ({p.cells_left_out} cell(s) with fewer than {MIN_SEEDS} pairs left out)"
            if p.cells_left_out
            else ""
        )
        lines.append(
            f"{task}: over {p.n_pairs} runs paired by seed and setting in {p.n_cells} cell(s)"
            f"{left_out}, {name} reached {target} in {p.successes}/{p.n_pairs} "
            f"{interval_text(wilson_interval(p.successes, p.n_pairs))} and vanilla in "
            f"{p.baseline_successes}/{p.n_pairs} "
            f"{interval_text(wilson_interval(p.baseline_successes, p.n_pairs))}; "
            f"P({name} better, by best val accuracy) = {p.p_better:.2f} "
            f"{interval_text(p.p_better_ci)}."
        )
    return lines


def _clipping_verdicts(analysis: Analysis, task: str) -> list[str]:
    target = percent_text(analysis.study.target)
    lines = []
    for variant in variants(analysis, task):
        trials = [t for t in analysis.trials if (t.task, *t.variant) == (task, *variant)]
        clips = {t.clip_norm for t in trials}
        if None not in clips or len(clips) < 2:
            continue  # the study does not vary clipping for this method: no claim to make
        name = variant_label(*variant)
        found = [
            d for d in analysis.clipping if (d.task, d.method, d.p_detach) == (task, *variant)
        ]
        if not found:
            lines.append(
                f"{task}, {name}, clipping: not enough data (no lr run both with and without "
                f"clipping with {MIN_SEEDS} seeds each)."
            )
        for d in found:
            lines.append(
                f"{task}, {name}: without clipping {d.without_successes}/{d.without_n} runs "
                f"reached {target} "
                f"{interval_text(wilson_interval(d.without_successes, d.without_n))}, with "
                f"clip={d.clip_norm:g} {d.with_successes}/{d.with_n} "
                f"{interval_text(wilson_interval(d.with_successes, d.with_n))}; "
                "clipping dependence "
                f"(with - without) = {d.difference:+.2f} {interval_text(d.difference_ci)} over "
                f"lr {', '.join(format_float(lr) for lr in d.lrs)}."
            )
    return lines


def _lr_verdicts(analysis: Analysis, task: str) -> list[str]:
    trials = [t for t in analysis.trials if t.task == task]
    if len({t.lr for t in trials}) < 2:
        return []  # one lr by design: the study does not speak to lr sensitivity
    lines = []
    for clip in sorted({t.clip_norm for t in trials}, key=lambda c: (c is not None, c or 0)):
        entries = [s for s in analysis.lr_sensitivity if s.task == task and s.clip_norm == clip]
        entries = [s for s in entries if sum(not math.isnan(m) for m in s.median_best) >= 2]
        head = f"{task}, clip={format_clip(clip)}, good-lr range (median best val >= "
        head += f"{GOOD_LR_FRACTION:.0%} of the best any method reached)"
        if not entries:
            lines.append(f"{head}: not enough data (fewer than 2 lrs with {MIN_SEEDS} seeds).")
            continue
        found = {(s.method, s.p_detach): s for s in entries}
        # Every method of the grid is named, also one short of data, as the other lines do:
        # leaving it out would read as if the study had not run it.
        variants = {t.variant for t in trials if t.clip_norm == clip} | set(found)
        parts = []
        for method, p_detach in sorted(variants, key=lambda v: (v[0] != "none", v)):
            name = variant_label(method, p_detach)
            s = found.get((method, p_detach))
            if s is None:
                parts.append(f"{name} not enough data (fewer than 2 lrs with {MIN_SEEDS} seeds)")
            else:
                parts.append(
                    f"{name} {decades_text(s.good_lr_decades)} "
                    f"({lr_range_text(s.good_lrs)} of {len(s.lrs)} lrs)"
                )
        lines.append(f"{head}: " + "; ".join(parts) + ".")
    return lines


def _iqm_verdict(analysis: Analysis, task: str) -> list[str]:
    entries = [i for i in analysis.iqm if i.task == task]
    parts = []
    for i in sorted(entries, key=lambda i: (i.method != "none", i.method, i.p_detach)):
        name = variant_label(i.method, i.p_detach)
        if i.n_cells == 0:
            parts.append(f"{name} not enough data")
        else:
            parts.append(
                f"{name} {i.value:.3f} {interval_text(i.ci)} ({i.n_runs} runs, {i.n_cells} cells)"
            )
    if not parts:
        return []
    return [
        f"{task}: IQM of best val accuracy over the lr x clip cells where every method has "
        f"{MIN_SEEDS} finished seeds: " + "; ".join(parts) + "."
    ]


def status_lines(analysis: Analysis) -> list[str]:
    """First line: counts by state. Then one line per thing a reader should know is missing."""
    study = analysis.study
    counts = state_counts(study)
    lines = [
        f"{study.n_planned} planned trials: "
        + ", ".join(f"{counts[state]} {state}" for state in counts)
    ]
    if counts["pending"]:
        finish = (
            "train them with the study's `study trial --space` commands (`study plan SPACE "
            "--commands`), then `study import` their folder"
            if study.imported
            else "run `study resume` to finish the study"
        )
        lines.append(
            f"{counts['pending']} trial(s) pending (no MLflow run yet): their cells may be "
            f"missing or have fewer seeds below; {finish}."
        )
    for trial in study.trials:
        where = (
            f"{trial.trial_id} ({variant_label(*trial.variant)}, lr={trial.lr:g}, "
            f"clip={format_clip(trial.clip_norm)}, seed {trial.seed})"
        )
        if trial.state == "failed":
            lines.append(f"failed, not scored: {where}: {trial.error or 'no error recorded'}")
        elif trial.state == "running":
            lines.append(f"running or interrupted, not scored (curve dashed): {where}")
    if study.overrides:
        lines.append(
            f"run with --set {overrides_text(study.overrides)} (not the space's own settings); "
            f"{budget_text(study_budget(study))}."
        )
    lines += _chance_lines(analysis)
    thin = [c for c in analysis.cells if c.n < MIN_SEEDS]
    if thin:
        lines.append(
            f"{len(thin)} cell(s) with fewer than {MIN_SEEDS} finished seeds are left out of "
            "the cross-cell statistics."
        )
    if study.tuned:
        lines.append(
            f"Optuna study: {', '.join(study.tuned)} tuned per scientific point and seed; each "
            "seed enters its cell with its best tuned trial (best val accuracy), the "
            f"{len(analysis.trials)} of {len(study.trials)} trials scored below."
        )
    if study.split_params:
        lines.append(
            f"{', '.join(study.split_params)} vary across trials: each value makes cells of its "
            "own, named with the task (never pooled with the seeds)."
        )
    return lines


def state_counts(study: Study) -> dict[str, int]:
    counts = {state: 0 for state in ("completed", "diverged", "failed", "running")}
    for trial in study.trials:
        counts[trial.state] += 1
    counts["pending"] = study.n_pending
    return counts


def variants(analysis: Analysis, task: str) -> list[tuple[str, float]]:
    """The methods compared at `task`, vanilla first: the plan's, a method with no run
    included, and those of the trials."""
    return analysis.variants.get(task, [])  # stats.analyse: vanilla first


def claim_lines(analysis: Analysis) -> list[str]:
    """One line per claim of the space: its verdict, the statistic with its interval, the runs,
    seeds and cells it rests on, and the budget as a fraction of the paper's."""
    return [claim_line(result) for result in analysis.claims]


def claim_line(result: ClaimResult) -> str:
    claim = result.claim
    compared = variant_name(claim.method)
    if claim.baseline is not None:
        compared += f" vs {variant_name(claim.baseline)}"
    value = f"{result.value:.3f}" if not math.isnan(result.value) else "n/a"
    against = f" ({'no difference' if claim.baseline else 'against'}: {claim.null:g})"
    seeds = f"seeds {seed_range(result.seeds)}" if result.seeds else "no seeds"
    budget = budget_text(result.budget_fraction)
    why = f"; {result.reason}" if result.reason else ""
    return (
        f'claim {claim.id} (Fig. {claim.figure}): {result.verdict.upper()}: "{claim.claim}" '
        f"{claim.statistic} {compared} = {value} {interval_text(result.interval)}{against}, "
        f"expected {claim.expect}; {result.runs} runs, {seeds}, {result.cells} cell(s); "
        f"{budget}{why}"
    )


def _chance_lines(analysis: Analysis) -> list[str]:
    """Runs whose best val accuracy never rose above the task's chance level: at a small budget
    (a smoke run, a copying task still on its memoryless plateau) a flat curve is no result."""
    lines = []
    for task in sorted({run.trial.params.get("task", "") for run in analysis.runs}):
        if task not in TASKS:
            continue
        chance = TASKS[task].chance_accuracy
        runs = [run for run in analysis.runs if run.trial.params.get("task") == task]
        flat = [run for run in runs if run.best <= chance + 1e-9]
        if flat:
            lines.append(
                f"{task}: {len(flat)} of {len(runs)} finished runs never rose above chance "
                f"(best val accuracy <= {chance:.3g}): they learned nothing at this budget, "
                "so the comparisons below are between curves that never left chance."
            )
    return lines


def study_budget(study: Study) -> float:
    """The study's median iterations per trial over the space's own (NaN when unknown)."""
    budgets = sorted(trial.budget for trial in study.trials)
    if not budgets or not study.base_iterations:
        return math.nan
    return budgets[len(budgets) // 2] / study.base_iterations
