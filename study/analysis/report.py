"""`study report`: verdicts, then index.html, summary.md, cells.csv and summary.json for one study.

The written report is also logged on the study's parent run (through tracking.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from study.analysis.cell_curves import cell_metrics, cells_of
from study.analysis.claims import evaluate_claims
from study.analysis.figures import all_figures, png_bytes
from study.analysis.load import curve_of, load_study
from study.analysis.render import render_html, render_markdown, summary_dict, write_cells_csv
from study.analysis.stats import Analysis, analyse
from study.analysis.verdicts import claim_lines, status_lines, verdicts
from study.errors import ConfigError, make_folder
from study.tracking import log_folder, open_store, store_uri
from study.tracking.stores import check_own_store
from study.tracking.summaries import replace_cell_runs, trial_histories


def write_report(study_name: str, output_dir: Path, tracking_uri: str | None) -> Path:
    """Write DIR/reports/NAME/ for the study, log it on the parent run, print the verdicts."""
    if tracking_uri is None:
        # A moved or copied folder's store names the old folder's paths (MLflow keeps them
        # absolute): refuse as resume does, rather than write into the old folder.
        check_own_store(output_dir, study_name, "report")
    uri = tracking_uri or store_uri(output_dir)
    study = load_study(study_name, uri)
    analysis = analyse(study)
    analysis.claims = evaluate_claims(analysis, study.claims, study.base_iterations)
    report_dir = output_dir / "reports" / study_name
    # The store as the study names it (made absolute), as summary.json records it: a relative
    # sqlite:/// URI typed again from the same folder is the same store.
    _refuse_another_stores_report(report_dir, study.tracking_uri, output_dir)
    figure_dir = report_dir / "figures"
    make_folder(figure_dir, "--output")
    # A rerun must not re-log figures of an earlier report (e.g. of a task since renamed).
    for stale in figure_dir.glob("*.png"):
        stale.unlink()

    images = {}
    for name, figure in all_figures(analysis).items():
        images[name] = png_bytes(figure)
        (figure_dir / name).write_bytes(images[name])
    verdict_lines = claim_lines(analysis) + verdicts(analysis)
    status = status_lines(analysis)
    (report_dir / "index.html").write_text(render_html(analysis, verdict_lines, status, images))
    (report_dir / "summary.md").write_text(
        render_markdown(analysis, verdict_lines, status, images)
    )
    write_cells_csv(analysis.cells, report_dir / "cells.csv")
    summary = summary_dict(analysis, verdict_lines, status)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))

    n_cells = log_cell_runs(analysis, uri)
    written = ["index.html", "summary.md", "cells.csv", "summary.json",
               *(f"figures/{name}" for name in images)]  # fmt: skip
    with tempfile.TemporaryDirectory() as staged:
        # What this report wrote, and only that: a file the user keeps in the folder is theirs,
        # not an artifact of the study.
        for relative in written:
            (Path(staged) / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report_dir / relative, Path(staged) / relative)
        refusal = log_folder(
            uri, analysis.study.parent_run_id, Path(staged), artifact_path="report"
        )
    if refusal is not None:
        # The files are on disk already; a store that refuses artifacts must not lose them.
        print(f"warning: report not logged to MLflow: {refusal}", file=sys.stderr)

    print(f"study {study_name}: {status[0]}")
    for line in status[1:] + verdict_lines:
        print(f"  - {line}")
    print(f"MLflow: {n_cells} cell runs (median, quartiles over seeds) under the parent run")
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


def log_cell_runs(analysis: Analysis, uri: str) -> int:
    """One run per cell under the parent, its metrics the quantiles over seeds of each step's
    val accuracy and training loss (refreshed at every report)."""
    tracker = open_store(uri)
    cells = []
    for cell, members in cells_of(analysis.trials):
        histories = trial_histories(tracker, [t.run_id for t in members], "train/loss")
        losses = {run_id: curve_of(points) for run_id, points in histories.items()}
        cells.append((cell.name, cell.params, cell_metrics(members, losses)))
    return replace_cell_runs(tracker, analysis.study.parent_run_id, analysis.study.name, cells)
