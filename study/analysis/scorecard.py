"""`study scorecard`: one page over every study in a store that has claims: each claim's verdict,
statistic and interval, runs and budget, with the published numbers beside ours."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path

from study.analysis.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    ClaimResult,
    evaluate_claims,
)
from study.analysis.load import Study, load_study
from study.analysis.render import CLAIM_HEADERS, claim_row
from study.analysis.stats import analyse
from study.analysis.text import markdown_table
from study.errors import ConfigError, make_folder
from study.tracking import checked_store, open_store, store_uri
from study.tracking.summaries import log_scorecard

HEADERS = ["study", *CLAIM_HEADERS, "ours (method / baseline)", "published"]
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.supported { background: #e3f4e1; } td.contradicted { background: #fbe3e1; }
"""


def score_studies(studies: list[Study]) -> list[ClaimResult]:
    """Every claim of every study that has claims, studies in name order."""
    results = []
    for study in sorted(studies, key=lambda s: s.name):
        if study.claims:
            analysis = analyse(study)
            results += evaluate_claims(analysis, study.claims, study.base_iterations)
    return results


def rows(results: list[ClaimResult]) -> list[list[str]]:
    return [[result.study, *claim_row(result), _ours(result), result.claim.published or "-"]
            for result in results]  # fmt: skip


def _ours(result: ClaimResult) -> str:
    """The statistic of each side alone, in the published numbers' units (accuracies in %)."""

    def show(value: float) -> str:
        if math.isnan(value):
            return "n/a"
        percent = result.claim.statistic in ("best_accuracy", "final_accuracy", "test_at_best")
        return f"{100 * value:.2f}%" if percent else f"{value:.3f}"

    if math.isnan(result.method_value):
        return "-"
    if result.claim.baseline is None:
        return show(result.method_value)
    return f"{show(result.method_value)} / {show(result.baseline_value)}"


def render_markdown(results: list[ClaimResult], source: str) -> str:
    table = rows(results)
    lines = [
        "# h-detach: the paper's claims, measured",
        "",
        f"Studies read from `{source}`. A claim is supported or contradicted only when the 95% "
        "interval of its statistic excludes no difference; see each study's report glossary.",
        "",
        *markdown_table(HEADERS, table),
        "",
    ]
    if not table:
        lines.insert(4, "No study in this store has claims (paper spaces have a claims: section).")
    return "\n".join(lines)


def render_html(results: list[ClaimResult], source: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    body = []
    for result, row in zip(results, rows(results), strict=True):
        cells = []
        for index, value in enumerate(row):
            css = f' class="{e(result.verdict)}"' if HEADERS[index] == "verdict" else ""
            cells.append(f"<td{css}>{e(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    empty = "" if results else "<p>No study in this store has claims.</p>"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>h-detach scorecard</title><style>{_CSS}</style></head><body>",
            "<h1>h-detach: the paper's claims, measured</h1>",
            f"<p>Studies read from <code>{e(source)}</code>. A claim is supported or "
            "contradicted only when the 95% interval of its statistic excludes no difference."
            "</p>",
            empty,
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
            "</body></html>",
        ]
    )


def write_scorecard(
    studies: list[Study], folder: Path, source: str, echo: Callable[[str], None] = print
) -> list[ClaimResult]:
    """Write folder/index.html, folder/scorecard.md and folder/scorecard.json; print the lines."""
    results = score_studies(studies)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(render_html(results, source))
    (folder / "scorecard.md").write_text(render_markdown(results, source))
    payload = {"source": source, "claims": [result.to_dict() for result in results]}
    (folder / "scorecard.json").write_text(json.dumps(payload, indent=2, allow_nan=False))
    for row in rows(results):
        echo("  " + " | ".join(row))
    if not results:
        echo("no study in this store has claims (paper spaces have a claims: section)")
    return results


def write_store_scorecard(
    output_dir: Path, tracking_uri: str | None, echo: Callable[[str], None] = print
) -> Path:
    """`study scorecard`: every study with claims in the store, scored, written to
    DIR/scorecard/ and logged to MLflow as its own run."""
    flag = "--tracking-uri" if tracking_uri else f"--output {output_dir}"
    uri, exists = checked_store(tracking_uri or store_uri(output_dir), flag)
    if not exists:
        raise ConfigError(f"{flag}: no MLflow store there; run a study first")
    tracker = open_store(uri)
    names = [name for name in tracker.experiment_names() if tracker.find_parent(name)]
    studies = [load_study(name, uri) for name in sorted(names)]
    folder = output_dir / "scorecard"
    make_folder(folder, "--output")
    results = write_scorecard(studies, folder, uri, echo)
    counts = {verdict: 0 for verdict in (SUPPORTED, CONTRADICTED, INCONCLUSIVE)}
    for result in results:
        counts[result.verdict] += 1
    run_id = log_scorecard(tracker, folder, counts, output_dir)
    with_claims = sum(1 for study in studies if study.claims)
    echo(
        f"scorecard: {len(results)} claims of {with_claims} studies: "
        + ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
    )
    echo(f"scorecard: {(folder / 'index.html').resolve()} (MLflow run {run_id})")
    return folder
