"""`study report`: verdicts, then index.html, summary.md, cells.csv and summary.json for one study.

The written report is also logged on the study's parent run (through tracking.py).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from study.analysis.figures import all_figures, png_bytes
from study.analysis.load import Study, load_study
from study.analysis.stats import (
    GOOD_LR_FRACTION,
    MIN_SEEDS,
    Analysis,
    CellStats,
    Spread,
    analyse,
    format_clip,
    format_float,
    json_value,
    variant_label,
    wilson_interval,
)
from study.config import ConfigError, make_folder
from study.tracking import log_folder, store_uri

# How each statistic is defined; shown in the report itself so a reader need not find this file.
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
    "which never leave the range of the values, held 71-94%.",
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
}


def write_report(study_name: str, output_dir: Path, tracking_uri: str | None) -> Path:
    """Write DIR/reports/NAME/ for the study, log it on the parent run, print the verdicts."""
    uri = tracking_uri or store_uri(output_dir)
    analysis = analyse(load_study(study_name, uri))
    report_dir = output_dir / "reports" / study_name
    _refuse_another_stores_report(report_dir, uri, output_dir)
    figure_dir = report_dir / "figures"
    make_folder(figure_dir, "--output")
    # A rerun must not re-log figures of an earlier report (e.g. of a task since renamed).
    for stale in figure_dir.glob("*.png"):
        stale.unlink()

    images = {}
    for name, figure in all_figures(analysis).items():
        images[name] = png_bytes(figure)
        (figure_dir / name).write_bytes(images[name])
    verdict_lines = verdicts(analysis)
    status = status_lines(analysis)
    (report_dir / "index.html").write_text(render_html(analysis, verdict_lines, status, images))
    (report_dir / "summary.md").write_text(
        render_markdown(analysis, verdict_lines, status, images)
    )
    write_cells_csv(analysis.cells, report_dir / "cells.csv")
    summary = summary_dict(analysis, verdict_lines, status)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))

    refusal = log_folder(uri, analysis.study.parent_run_id, report_dir, artifact_path="report")
    if refusal is not None:
        # The files are on disk already; a store that refuses artifacts must not lose them.
        print(f"warning: report not logged to MLflow: {refusal}", file=sys.stderr)

    print(f"study {study_name}: {status[0]}")
    for line in status[1:] + verdict_lines:
        print(f"  - {line}")
    print(f"report: {(report_dir / 'index.html').resolve()}")
    return report_dir


def _refuse_another_stores_report(report_dir: Path, uri: str, output_dir: Path) -> None:
    """A report of a same-named study from another store (e.g. --tracking-uri without
    --output) must not replace the one already in the folder."""
    try:
        earlier = json.loads((report_dir / "summary.json").read_text()).get("tracking_uri")
    except (OSError, ValueError, AttributeError):
        return  # no earlier report (or not one of ours): nothing to keep
    if earlier is not None and earlier != uri:
        raise ConfigError(
            f"--output {output_dir}: {report_dir} holds the report of the study read from "
            f"{earlier}; give this one (from {uri}) another folder with --output DIR"
        )


# ---------------------------------------------------------------- verdicts


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
    target = _percent(analysis.study.target)
    parts = []
    for variant in _variants(analysis, task):
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
            f"reached {target} in {best.successes}/{best.n} seeds {_interval(best.success_ci)}, "
            f"median best val {best.best.median:.3f}{test}"
        )
    return [f"{task}, each method at its best lr x clip: " + "; ".join(parts) + "."]


def _paired_verdicts(analysis: Analysis, task: str) -> list[str]:
    target = _percent(analysis.study.target)
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
            f"{_interval(wilson_interval(p.successes, p.n_pairs))} and vanilla in "
            f"{p.baseline_successes}/{p.n_pairs} "
            f"{_interval(wilson_interval(p.baseline_successes, p.n_pairs))}; "
            f"P({name} better) = {p.p_better:.2f} {_interval(p.p_better_ci)}."
        )
    return lines


def _clipping_verdicts(analysis: Analysis, task: str) -> list[str]:
    target = _percent(analysis.study.target)
    lines = []
    for variant in _variants(analysis, task):
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
                f"{_interval(wilson_interval(d.without_successes, d.without_n))}, with "
                f"clip={d.clip_norm:g} {d.with_successes}/{d.with_n} "
                f"{_interval(wilson_interval(d.with_successes, d.with_n))}; clipping dependence "
                f"(with - without) = {d.difference:+.2f} {_interval(d.difference_ci)} over "
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
        parts = [
            f"{variant_label(s.method, s.p_detach)} {_decades(s.good_lr_decades)} "
            f"({_lr_range(s.good_lrs)} of {len(s.lrs)} lrs)"
            for s in sorted(entries, key=lambda s: (s.method != "none", s.method, s.p_detach))
        ]
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
                f"{name} {i.value:.3f} {_interval(i.ci)} ({i.n_runs} runs, {i.n_cells} cells)"
            )
    if not parts:
        return []
    return [
        f"{task}: IQM of best val accuracy over the lr x clip cells where every method has "
        f"{MIN_SEEDS} finished seeds: " + "; ".join(parts) + "."
    ]


# ---------------------------------------------------------------- what is missing


def status_lines(analysis: Analysis) -> list[str]:
    """First line: counts by state. Then one line per thing a reader should know is missing."""
    study = analysis.study
    counts = _counts(study)
    lines = [
        f"{study.n_planned} planned trials: "
        + ", ".join(f"{counts[state]} {state}" for state in counts)
    ]
    if counts["pending"]:
        lines.append(
            f"{counts['pending']} trial(s) pending (no MLflow run yet): their cells may be "
            "missing or have fewer seeds below; run `study resume` to finish the study."
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
    if study.pooled_params:
        lines.append(
            f"{', '.join(study.pooled_params)} vary across trials but are not cell axes: "
            "their values are pooled with the seeds."
        )
    return lines


def _counts(study: Study) -> dict[str, int]:
    counts = {state: 0 for state in ("completed", "diverged", "failed", "running")}
    for trial in study.trials:
        counts[trial.state] += 1
    counts["pending"] = study.n_pending
    return counts


# ---------------------------------------------------------------- files


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
            "p_detach": r.trial.p_detach,
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
        "counts": _counts(study),
        "status": status,
        "verdicts": verdict_lines,
        "definitions": DEFINITIONS,
        "cells": [cell_row(c) | {"clip_norm": c.clip_norm} for c in analysis.cells],
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
        "## Verdicts",
        *(f"- {line}" for line in verdict_lines),
        "",
        "## Cells (over seeds)",
        "| " + " | ".join(CELL_HEADERS) + " |",
        "|" + "---|" * len(CELL_HEADERS),
        *("| " + " | ".join(row) + " |" for row in rows),
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
        _spread(c.best),
        _spread(c.final),
        f"{c.n_diverged}/{c.n}",
        f"{c.successes}/{c.n} {_interval(c.success_ci)}",
        _iterations(c.iters_to_target),
        _number(c.auc),
        _number(c.test_at_best),
    ]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f2f2f2; }
li { margin: 0.3rem 0; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.status li { color: #8a4b00; }
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
        *(f"<li>{e(line)}</li>" for line in status),
        "</ul><h2>Verdicts</h2><ul>",
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
                f"{format_float(lr)}: {_number(m)} ({_number(r, 2)})"
                for lr, m, r in zip(s.lrs, s.median_best, s.relative, strict=True)
            ),
            _lr_range(s.good_lrs),
            _number(s.good_lr_decades, 1),
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
            f"{d.difference:+.2f} {_interval(d.difference_ci)}",
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
            f"{_number(p.p_better, 2)} {_interval(p.p_better_ci)}",
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
            f"{_number(i.value)} {_interval(i.ci)}",
        ]
        for i in analysis.iqm
    ]
    return headers, rows


# ---------------------------------------------------------------- formatting


def _variants(analysis: Analysis, task: str) -> list[tuple[str, float]]:
    found = {t.variant for t in analysis.trials if t.task == task}
    return sorted(found, key=lambda v: (v[0] != "none", *v))


def _lr_range(lrs: tuple[float, float] | None) -> str:
    if lrs is None:
        return "no lr"
    low, high = format_float(lrs[0]), format_float(lrs[1])
    return f"lr {low} only" if low == high else f"lr {low} to {high}"


def _decades(value: float) -> str:
    return "no good lr" if math.isnan(value) else f"{value:.1f} decades"


def _percent(value: float) -> str:
    return f"{100 * value:g}%"


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _interval(ci: tuple[float, float]) -> str:
    if any(math.isnan(x) for x in ci):
        return "[no interval]"
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _spread(s: Spread) -> str:
    if math.isnan(s.median):
        return "n/a"
    return f"{s.median:.3f} [{s.q25:.3f}, {s.q75:.3f}] {s.min:.3f}"


def _iterations(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return ">budget" if math.isinf(value) else f"{value:g}"


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
