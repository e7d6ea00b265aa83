"""The report's files: cells.csv, summary.json, summary.md and a self-contained index.html, with
the definitions of every statistic shown on the page itself."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import math
from pathlib import Path
from typing import Any

from study.analysis.stats import GOOD_LR_FRACTION, MIN_SEEDS, Analysis, CellStats
from study.analysis.text import (
    budget_text,
    format_clip,
    format_float,
    interval_text,
    iterations_text,
    json_value,
    lr_range_text,
    markdown_table,
    number_text,
    spread_text,
    variant_label,
)
from study.analysis.verdicts import state_counts, study_budget
from study.claim_spec import STATISTICS

DEFINITIONS = {
    "cell": "task x method x p_detach x lr x clip_norm; its seeds are the replicates. Only "
    "finished runs (completed or diverged) are scored; failed and running ones are listed.",
    "best / final": "highest / last logged val accuracy of a run. A run that diverged before its "
    "first evaluation scores 0.",
    "spread": "median [25th, 75th percentile] (numpy linear interpolation) and min over seeds.",
    "divergence rate": "diverged runs / finished runs.",
    "success": "the run's val accuracy reached the study target (tag study.target) at some "
    "evaluation within the budget, even if it diverged later. Interval: Wilson score, 95%.",
    "iterations to target": "first evaluated iteration with val accuracy >= target; a run that "
    "never gets there counts as infinitely slow, so the median is '>budget' once half miss.",
    "AUC": "area under the val accuracy curve / budget: each evaluation holds for the iterations "
    "since the previous one (right-endpoint sum). 1 = perfect from the first evaluation; a run "
    "that stops early gets no area after its last evaluation.",
    "best setting": "per method, the cell with the highest success rate, then the highest "
    "median best val accuracy (ties: the smaller lr), among cells with enough seeds. Picked as "
    "the best of N cells, its rate is optimistic (the best of N noisy rates is high by chance, "
    "more so the larger N); compare methods with P(better) and the IQM.",
    "cross-cell rule": f"a cell enters the statistics below only with >= {MIN_SEEDS} finished "
    "seeds (pairs, for P(better)); fewer gives 'not enough data'.",
    "lr sensitivity": "per method and clip: median best accuracy at each lr / the highest median "
    "any method reached at that task and clip (one yardstick, so that a method failing at every "
    f"lr does not look insensitive to lr). Good-lr range: the contiguous grid lrs around the "
    f"method's best one with ratio >= {GOOD_LR_FRACTION}; an lr with fewer seeds than the "
    "cross-cell rule asks is unknown and ends the range. Width = log10(largest/smallest) in "
    "decades, a lower bound (finite grid), 0 when only the best lr qualifies; 'no good lr' when "
    "even the method's best is below the ratio.",
    "interval over seeds": "95%, for statistics pooled over lr x clip cells (clipping "
    "dependence, P(better), IQM): the statistic +- t(0.975, runs - cells) x its standard "
    "error, estimated by resampling seeds within each cell (scipy.stats.bootstrap, seed 0) and "
    "scaled by sqrt(n/(n-1)), n the smallest cell's seeds; clipped to the statistic's range. "
    "At one cell it is the t interval of a mean. Simulated coverage 91-98% from one cell of 3 "
    "seeds to three of 10 (python -m study.analysis.coverage); the bootstrap's percentiles, "
    "which never leave the range of the values, held 70-95%.",
    "clipping dependence": "success rate with a clip norm minus without clipping: the mean over "
    "the lrs run both ways of the per-lr differences (each lr weighs alike on both sides); "
    "interval over seeds, or Newcombe's (from the two Wilson intervals) where every cell's runs "
    "agree.",
    "P(better)": "runs paired by (lr, clip, seed) and every other param; 1 if the method's best "
    "val accuracy beats vanilla's, 1/2 on a tie, 0 otherwise, averaged over pairs; interval "
    "over seeds, or, where every cell's pairs scored alike (all wins, all ties, ...), the "
    "Wilson interval of the scores' sum over the pairs.",
    "IQM": "interquartile mean (scipy trim_mean, 25% each side) of best val accuracy over the "
    "runs of a method in the lr x clip cells where every method of the task passes the "
    "cross-cell rule (the same cells for all; with fewer than 4 runs it trims nothing: the "
    "mean); interval over seeds, none where every cell's runs scored alike.",
    "expected best of n": "exact expected maximum best val accuracy of n trials drawn with "
    "replacement from the method's finished runs (Dodge et al. 2019, from order statistics).",
    "claim verdict": "a claim of the paper (the space's claims: section) is SUPPORTED when the "
    "95% interval of its statistic lies wholly on the side of no difference that the paper "
    "claims, CONTRADICTED when wholly on the other side, INCONCLUSIVE otherwise, and also when a "
    f"compared cell of the claim has fewer than {MIN_SEEDS} finished seeds (its other trials "
    "running, failed or stopped), when planned trials have not started, or when every run "
    "scored alike (no interval): a verdict rests on the whole plan. Statistics are means over "
    "cells of per-cell values, the method's minus the baseline's cell by cell; intervals over "
    "seeds as above (rates: Wilson or Newcombe where every run agrees). Budget: iterations run "
    "/ the space's iterations without overrides.",
    **{f"claim statistic {name}": text for name, text in STATISTICS.items()},
}


CSV_COLUMNS = [
    "task", "method", "p_detach", "lr", "clip_norm", "n", "n_diverged", "n_failed", "n_running",
    "best_median", "best_q25", "best_q75", "best_min",
    "final_median", "final_q25", "final_q75", "final_min",
    "divergence_rate", "successes", "success_rate", "success_low", "success_high",
    "iters_to_target_median", "auc_median", "test_at_best_median",
]  # fmt: skip


def cell_row(cell: CellStats) -> dict[str, Any]:
    """One cells.csv row; clip_norm "none" = no clipping, iters "inf" = median never reached."""
    return {
        "task": cell.task,
        "method": cell.method,
        "p_detach": json_value(cell.p_detach),
        "lr": json_value(cell.lr),
        "clip_norm": format_clip(cell.clip_norm),
        "n": cell.n,
        "n_diverged": cell.n_diverged,
        "n_failed": cell.n_failed,
        "n_running": cell.n_running,
        **{f"best_{k}": v for k, v in dataclasses.asdict(cell.best).items()},
        **{f"final_{k}": v for k, v in dataclasses.asdict(cell.final).items()},
        "divergence_rate": cell.divergence_rate,
        "successes": cell.successes,
        "success_rate": cell.success_rate,
        "success_low": cell.success_ci[0],
        "success_high": cell.success_ci[1],
        "iters_to_target_median": cell.iters_to_target,
        "auc_median": cell.auc,
        "test_at_best_median": cell.test_at_best,
    }


def write_cells_csv(cells: list[CellStats], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for cell in cells:
            writer.writerow({k: _csv_value(v) for k, v in cell_row(cell).items()})


def summary_dict(analysis: Analysis, verdict_lines: list[str], status: list[str]) -> dict:
    """summary.json: JSON-safe (NaN -> null, inf -> "inf")."""
    study = analysis.study
    runs = [
        {
            "trial_id": r.trial.trial_id,
            "run_id": r.trial.run_id,
            "state": r.trial.state,
            "task": r.trial.task,
            "method": r.trial.method,
            "p_detach": json_value(r.trial.p_detach),
            "lr": json_value(r.trial.lr),
            "clip_norm": json_value(r.trial.clip_norm),
            "tuned": r.trial.tuned_values,
            "seed": r.trial.seed,
            "best": r.best,
            "final": r.final,
            "reached_target_at": r.reached_at,
            "auc": r.auc,
        }
        for r in analysis.runs
    ]
    summary = {
        "study": study.name,
        "tracking_uri": study.tracking_uri,
        "parent_run_id": study.parent_run_id,
        "target": study.target,
        "counts": state_counts(study),
        "status": status,
        "verdicts": verdict_lines,
        "overrides": [[key, value] for key, value in study.overrides],
        "budget_fraction": budget_fraction(analysis),
        "claims": [result.to_dict() for result in analysis.claims],
        "definitions": DEFINITIONS,
        "cells": [cell_row(c) | {"clip_norm": json_value(c.clip_norm)} for c in analysis.cells],
        "runs": runs,
        "lr_sensitivity": [dataclasses.asdict(s) for s in analysis.lr_sensitivity],
        "clipping": [dataclasses.asdict(d) for d in analysis.clipping],
        "paired": [dataclasses.asdict(p) for p in analysis.paired],
        "iqm": [dataclasses.asdict(i) for i in analysis.iqm],
        "expected_best": [dataclasses.asdict(e) for e in analysis.expected_best],
    }
    return _json_safe(summary)


def render_markdown(
    analysis: Analysis, verdict_lines: list[str], status: list[str], images: dict[str, bytes]
) -> str:
    study = analysis.study
    rows = [_table_cells(c) for c in analysis.cells]
    lines = [
        f"# Robustness report: {study.name}",
        "",
        f"Target val accuracy {study.target:g}; tracking URI `{study.tracking_uri}`; "
        f"parent run `{study.parent_run_id}`.",
        "",
        "## Study status",
        *(f"- {line}" for line in status),
        "",
        *_markdown_claims(analysis),
        "## Verdicts",
        *(f"- {line}" for line in verdict_lines),
        "",
        "## Cells (over seeds)",
        *markdown_table(CELL_HEADERS, rows),
        "",
        "## Figures",
        *(f"![{name}](figures/{name})" for name in images),
        "",
        "## Definitions",
        *(f"- **{key}**: {text}" for key, text in DEFINITIONS.items()),
        "",
    ]
    return "\n".join(lines)


CELL_HEADERS = [
    "task", "method", "lr", "clip", "seeds", "best val: median [IQR] min",
    "final val: median [IQR] min", "diverged", "success [95% CI]", "iters to target",
    "AUC", "test at best",
]  # fmt: skip


def _table_cells(c: CellStats) -> list[str]:
    extra = f" (+{c.n_failed} failed)" if c.n_failed else ""
    extra += f" (+{c.n_running} running)" if c.n_running else ""
    return [
        c.task,
        variant_label(c.method, c.p_detach),
        format_float(c.lr),
        format_clip(c.clip_norm),
        f"{c.n}{extra}",
        spread_text(c.best),
        spread_text(c.final),
        f"{c.n_diverged}/{c.n}",
        f"{c.successes}/{c.n} {interval_text(c.success_ci)}",
        iterations_text(c.iters_to_target),
        number_text(c.auc),
        number_text(c.test_at_best),
    ]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f2f2f2; }
li { margin: 0.3rem 0; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.status li.warning { color: #8a4b00; }
dt { font-weight: bold; } dd { margin: 0 0 0.5rem 1rem; }
"""


def render_html(
    analysis: Analysis, verdict_lines: list[str], status: list[str], images: dict[str, bytes]
) -> str:
    """One self-contained page: inline CSS, figures as base64 data URIs, no scripts."""
    study = analysis.study
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Robustness report: {e(study.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Robustness report: {e(study.name)}</h1>",
        f"<p>Target val accuracy {study.target:g}; tracking URI <code>{e(study.tracking_uri)}"
        f"</code>; parent run <code>{e(study.parent_run_id)}</code>.</p>",
        '<h2>Study status</h2><ul class="status">',
        # The first line is the counts; the others are what a reader must know is missing.
        f"<li>{e(status[0])}</li>",
        *(f'<li class="warning">{e(line)}</li>' for line in status[1:]),
        "</ul>",
        *_html_claims(analysis),
        "<h2>Verdicts</h2><ul>",
        *(f"<li>{e(line)}</li>" for line in verdict_lines),
        "</ul><h2>Cells (over seeds)</h2>",
        _html_table(CELL_HEADERS, [_table_cells(c) for c in analysis.cells]),
        "<h2>Across cells</h2>",
        "<h3>Learning-rate sensitivity</h3>",
        _html_table(*_lr_table(analysis)),
        "<h3>Clipping dependence (success rate)</h3>",
        _html_table(*_clip_table(analysis)),
        "<h3>Paired against vanilla by seed and setting</h3>",
        _html_table(*_paired_table(analysis)),
        "<h3>Interquartile mean</h3>",
        _html_table(*_iqm_table(analysis)),
        "<h2>Figures</h2>",
    ]
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}"></figure>')
    parts.append("<h2>Definitions</h2><dl>")
    parts += [f"<dt>{e(key)}</dt><dd>{e(text)}</dd>" for key, text in DEFINITIONS.items()]
    parts.append("</dl></body></html>")
    return "\n".join(parts)


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p>not enough data</p>"
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _lr_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    headers = ["task", "method", "clip", "lr: median best (relative)", "good lrs", "decades"]
    rows = [
        [
            s.task,
            variant_label(s.method, s.p_detach),
            format_clip(s.clip_norm),
            ", ".join(
                f"{format_float(lr)}: {number_text(m)} ({number_text(r, 2)})"
                for lr, m, r in zip(s.lrs, s.median_best, s.relative, strict=True)
            ),
            lr_range_text(s.good_lrs),
            number_text(s.good_lr_decades, 1),
        ]
        for s in analysis.lr_sensitivity
    ]
    return headers, rows


def _clip_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    headers = ["task", "method", "clip", "success with", "success without", "with - without"]
    rows = [
        [
            d.task,
            variant_label(d.method, d.p_detach),
            format_clip(d.clip_norm),
            f"{d.with_successes}/{d.with_n}",
            f"{d.without_successes}/{d.without_n}",
            f"{d.difference:+.2f} {interval_text(d.difference_ci)}",
        ]
        for d in analysis.clipping
    ]
    return headers, rows


def _paired_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    headers = ["task", "method vs vanilla", "pairs", "cells", "successes (method / vanilla)",
               "P(method better)"]  # fmt: skip
    rows = [
        [
            p.task,
            variant_label(p.method, p.p_detach),
            str(p.n_pairs),
            str(p.n_cells),
            f"{p.successes} / {p.baseline_successes}",
            f"{number_text(p.p_better, 2)} {interval_text(p.p_better_ci)}",
        ]
        for p in analysis.paired
    ]
    return headers, rows


def _iqm_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    headers = ["task", "method", "runs", "cells", "IQM best val [95% CI]"]
    rows = [
        [
            i.task,
            variant_label(i.method, i.p_detach),
            str(i.n_runs),
            str(i.n_cells),
            f"{number_text(i.value)} {interval_text(i.ci)}",
        ]
        for i in analysis.iqm
    ]
    return headers, rows


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return "inf" if math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


CLAIM_HEADERS = ["claim", "figure", "verdict", "statistic [95% CI]", "runs", "cells", "budget"]


def claim_rows(analysis: Analysis) -> list[list[str]]:
    """The claims table: one row per claim, as the scorecard shows it too."""
    return [claim_row(result) for result in analysis.claims]


def claim_row(result: Any) -> list[str]:
    claim = result.claim
    value = number_text(result.value)
    return [
        f"{claim.id}: {claim.claim}",
        str(claim.figure),
        result.verdict,
        f"{claim.statistic} = {value} {interval_text(result.interval)}",
        str(result.runs),
        str(result.cells),
        budget_text(result.budget_fraction).removeprefix("budget "),
    ]


def budget_fraction(analysis: Analysis) -> float | None:
    """The study's iterations per trial (median) over the space's own, or None when unknown."""
    fraction = study_budget(analysis.study)
    return None if math.isnan(fraction) else fraction


def _markdown_claims(analysis: Analysis) -> list[str]:
    if not analysis.claims:
        return []
    return [
        "## Claims of the paper",
        *markdown_table(CLAIM_HEADERS, claim_rows(analysis)),
        "",
    ]


def _html_claims(analysis: Analysis) -> list[str]:
    if not analysis.claims:
        return []
    return ["<h2>Claims of the paper</h2>", _html_table(CLAIM_HEADERS, claim_rows(analysis))]
