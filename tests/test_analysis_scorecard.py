"""`study scorecard`: every claim of every study in a store on one page, logged as its own run."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
from analysis_fixtures import CHROMIUM, grid, screenshot, write_study
from conftest import REPO
from mlflow import MlflowClient

from study.analysis.scorecard import write_store_scorecard
from study.claim_spec import Claim
from study.cli import main
from study.tracking import list_studies

# Three seeds each, a little apart (identical runs would leave no spread to put an interval on).
GOOD = [[0.5] + [end] * 9 for end in (0.96, 0.98, 1.0)]
BAD = [[0.3] + [end] * 9 for end in (0.58, 0.6, 0.62)]


def _claims_tag(*claims: Claim) -> dict[str, str]:
    return {"study.claims": json.dumps([c.to_dict() for c in claims]),
            "study.base_iterations": "1000"}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two studies with claims (one that holds, one built to fail) and one without claims."""
    tmp_path = tmp_path_factory.mktemp("scorecard")
    cells = {(1.0e-3, 1.0): None}
    better = grid({("none", 0.0): {k: BAD for k in cells},
                   ("h_detach", 0.25): {k: GOOD for k in cells}})  # fmt: skip
    claim = Claim("fig7-pmnist-test", 7, "h-detach at least as good", "h_detach",
                  "best_accuracy", "higher", baseline="none",
                  published="authors: 92.3% test")  # fmt: skip
    write_study(tmp_path, "fig7_permuted_mnist", better, parent_tags=_claims_tag(claim))
    worse = Claim("fig5-c-detach", 5, "c-detach is worse", "h_detach", "best_accuracy",
                  "lower", baseline="none")  # fmt: skip
    write_study(tmp_path, "fig5_copying_c_detach", better, parent_tags=_claims_tag(worse))
    write_study(tmp_path, "quick", better)
    lines: list[str] = []
    # From another working folder: MLflow's default artifact root would be ./mlruns there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    previous = os.getcwd()
    os.chdir(elsewhere)
    try:
        folder = write_store_scorecard(tmp_path, None, echo=lines.append)
    finally:
        os.chdir(previous)
    return tmp_path, folder, lines


def test_scorecard_has_every_claim_with_its_verdict_and_the_published_number(store):
    _, folder, lines = store
    payload = json.loads((folder / "scorecard.json").read_text())
    verdicts = {(c["study"], c["id"]): c["verdict"] for c in payload["claims"]}
    assert verdicts == {
        ("fig5_copying_c_detach", "fig5-c-detach"): "contradicted",
        ("fig7_permuted_mnist", "fig7-pmnist-test"): "supported",
    }
    markdown = (folder / "scorecard.md").read_text()
    assert "| fig7_permuted_mnist | fig7-pmnist-test: h-detach at least as good | 7 |" in markdown
    assert "98.00% / 60.00% | authors: 92.3% test |" in markdown
    assert lines[-2].startswith("scorecard: 2 claims of 2 studies: 1 supported, 1 contradicted")


def test_scorecard_is_its_own_run_and_no_study(store):
    tmp_path, _, _ = store
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("study-scorecard")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["study.kind"] == "scorecard"
    assert run.data.metrics["claims/supported"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "scorecard")}
    assert {"scorecard/index.html", "scorecard/scorecard.md"} <= artifacts
    # Beside the store, as a study's artifacts are, never in the working folder.
    assert list((tmp_path / "mlartifacts" / "study-scorecard").rglob("index.html"))
    assert not (tmp_path / "elsewhere" / "mlruns").exists()
    names = [summary.name for summary in list_studies(uri)]
    assert names == ["fig5_copying_c_detach", "fig7_permuted_mnist", "quick"]


def test_scorecard_command_on_a_folder_without_a_store_is_one_line(tmp_path, capsys):
    assert main(["scorecard", "--output", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no MLflow store there" in error


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")
def test_scorecard_renders_in_headless_chromium(store, tmp_path):
    _, folder, _ = store
    shot = tmp_path / "scorecard.png"
    with contextlib.redirect_stderr(io.StringIO()):
        screenshot(folder / "index.html", shot, width=1400, height=800)
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_paper_smoke_study_prints_claim_lines_in_report_and_scorecard(tmp_path, capsys):
    """As a new user would: fig4 --smoke, then `study report` and `study scorecard`."""
    space = REPO / "search_spaces" / "paper" / "fig4_pixel_mnist_no_clip.yaml"
    out = str(tmp_path / "studies")
    assert main(["run", str(space), "--smoke", "--output", out]) == 0
    assert main(["report", "fig4_pixel_mnist_no_clip", "--output", out]) == 0
    report = capsys.readouterr().out
    assert "claim fig4-no-clip-divergence (Fig. 4): INCONCLUSIVE" in report
    assert "budget 0.004% of the space file's iterations" in report
    assert main(["scorecard", "--output", out]) == 0
    scorecard = capsys.readouterr().out
    assert "fig4-no-clip-accuracy" in scorecard and "2 claims of 1 studies" in scorecard
    if CHROMIUM is not None:
        pages = tmp_path / "studies" / "reports" / "fig4_pixel_mnist_no_clip" / "index.html"
        for number, page in enumerate((pages, tmp_path / "studies" / "scorecard" / "index.html")):
            shot = tmp_path / f"page{number}.png"
            screenshot(page, shot, width=1280, height=1200)
            assert shot.stat().st_size > 10_000
