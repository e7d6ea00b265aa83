"""`write_report` end to end on synthetic studies in a real MLflow store: numbers, files, HTML."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import matplotlib.image
import pytest
from analysis_fixtures import CHROMIUM, grid, make_trial, screenshot, write_study
from mlflow import MlflowClient

from study.analysis.report import write_report
from study.config import ConfigError

# Curves evaluated every 100 of 1000 iterations. Vanilla with clipping: one seed of three reaches
# exactly the 0.99 target, at iteration 500.
VANILLA_REACH = [0.3, 0.5, 0.7, 0.9] + [0.99] * 6
MISS = [0.3, 0.5] + [0.6] * 8
DIVERGED = [0.3, 0.2]  # stopped at iteration 200
H_FAST = [0.5] + [1.0] * 9  # reaches at 200
H_SLOW = [0.5, 0.9] + [1.0] * 8  # reaches at 300
LRS = (1.0e-3, 1.0e-2)


@pytest.fixture(scope="module")
def dominating(tmp_path_factory):
    """h-detach beats vanilla on every (lr, clip, seed); the report written once for all tests."""
    tmp_path = tmp_path_factory.mktemp("dominating")
    vanilla = {}
    for lr in LRS:
        vanilla[(lr, 1.0)] = [VANILLA_REACH, MISS, MISS]
        vanilla[(lr, None)] = [MISS, MISS, DIVERGED]
    h_detach = {key: [H_FAST, H_FAST, H_SLOW] for key in vanilla}
    trials = grid({("none", 0.0): vanilla, ("h_detach", 0.5): h_detach})
    for trial in trials:
        if trial.val_acc.tolist() == DIVERGED:
            trial.state = "diverged"
    uri, parent_id = write_study(tmp_path, "dominating", trials, target=0.99)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report_dir = write_report("dominating", tmp_path, None)
    summary = json.loads((report_dir / "summary.json").read_text())
    return report_dir, uri, parent_id, stdout.getvalue(), summary


def test_report_folder_and_files(dominating):
    report_dir, _, _, _, _ = dominating
    assert report_dir.name == "dominating" and report_dir.parent.name == "reports"
    for name in ("index.html", "summary.md", "cells.csv", "summary.json"):
        assert (report_dir / name).stat().st_size > 0
    assert len(list((report_dir / "figures").glob("*.png"))) == 4


def test_dominating_method_gets_p_better_one(dominating):
    _, _, _, _, summary = dominating
    (paired,) = summary["paired"]
    assert (paired["method"], paired["n_pairs"], paired["n_cells"]) == ("h_detach", 12, 4)
    # 12 wins out of 12: the interval is the Wilson interval of 12/12.
    assert paired["p_better"] == 1.0 and paired["p_better_ci"][1] == 1.0
    assert paired["p_better_ci"][0] == pytest.approx(0.7575, abs=1e-4)
    assert (paired["successes"], paired["baseline_successes"]) == (12, 2)
    assert any("P(h-detach p=0.5 better) = 1.00 [0.76, 1.00]" in v for v in summary["verdicts"])
    # Each method's best setting was picked from its 4 cells: the verdict says so.
    best = next(v for v in summary["verdicts"] if "each method at its best" in v)
    assert best.count(", best of 4 cells) reached") == 2, best


def test_success_counts_and_iterations_match_hand_counts(dominating):
    _, _, _, _, summary = dominating
    cells = {(c["method"], c["lr"], c["clip_norm"]): c for c in summary["cells"]}
    assert len(cells) == 8
    for lr in LRS:
        clipped, unclipped = cells[("none", lr, 1.0)], cells[("none", lr, None)]
        assert (clipped["successes"], clipped["n"], clipped["iters_to_target_median"]) == (
            1, 3, "inf",
        )  # fmt: skip
        assert (unclipped["successes"], unclipped["n_diverged"]) == (0, 1)
        assert unclipped["divergence_rate"] == pytest.approx(1 / 3)
        # Best: 0.99, 0.6, 0.6; final equal; min 0.6.
        assert (clipped["best_median"], clipped["best_min"]) == (0.6, 0.6)
        for clip in (1.0, None):
            h = cells[("h_detach", lr, clip)]
            # Reach times 200, 200, 300 -> median 200. AUC = 100 * sum(curve) / 1000: fast runs
            # (0.5 + 9) / 10 = 0.95, the slow one (0.5 + 0.9 + 8) / 10 = 0.94 -> median 0.95.
            assert (h["successes"], h["iters_to_target_median"]) == (3, 200)
            assert h["auc_median"] == pytest.approx(0.95)
    runs = {r["trial_id"]: r for r in summary["runs"]}
    assert (
        runs["t0000"]["reached_target_at"] == 500 and runs["t0001"]["reached_target_at"] == "inf"
    )


def test_cells_csv_has_one_row_per_cell(dominating):
    report_dir, _, _, _, _ = dominating
    with (report_dir / "cells.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    row = next(r for r in rows if r["method"] == "none" and r["clip_norm"] == "none")
    assert (row["successes"], row["n"], row["iters_to_target_median"]) == ("0", "3", "inf")


def test_clipping_dependence_and_iqm(dominating):
    _, _, _, _, summary = dominating
    by_method = {d["method"]: d for d in summary["clipping"]}
    vanilla = by_method["none"]
    assert (vanilla["with_successes"], vanilla["with_n"]) == (2, 6)
    assert (vanilla["without_successes"], vanilla["without_n"]) == (0, 6)
    assert vanilla["difference"] == pytest.approx(1 / 3)
    assert by_method["h_detach"]["difference"] == 0.0
    iqm = {i["method"]: i for i in summary["iqm"]}
    # 12 h-detach runs, all best 1.0; vanilla bests: two 0.99, six 0.6, four 0.3 (diverged 0.3).
    assert iqm["h_detach"]["value"] == 1.0
    assert iqm["none"]["value"] == pytest.approx(0.6)


def test_expected_best_of_one_is_the_mean_best(dominating):
    _, _, _, _, summary = dominating
    curves = {e["method"]: e["mean"] for e in summary["expected_best"]}
    assert curves["none"][0] == pytest.approx((2 * 0.99 + 8 * 0.6 + 2 * 0.3) / 12)
    assert curves["h_detach"] == pytest.approx([1.0] * 12)


def test_artifacts_logged_on_the_parent_run(dominating):
    _, uri, parent_id, _, _ = dominating
    client = MlflowClient(tracking_uri=uri)
    paths = {a.path for a in client.list_artifacts(parent_id, "report")}
    expected = {"index.html", "summary.md", "cells.csv", "summary.json", "figures"}
    assert paths == {f"report/{name}" for name in expected}
    assert len(client.list_artifacts(parent_id, "report/figures")) == 4


def test_stdout_has_verdicts_and_the_html_path(dominating):
    report_dir, _, _, stdout, summary = dominating
    assert stdout.startswith("study dominating: 24 planned trials: 22 completed, 2 diverged")
    for verdict in summary["verdicts"]:
        assert verdict in stdout
    assert stdout.strip().endswith(f"report: {(report_dir / 'index.html').resolve()}")


def test_html_is_self_contained(dominating):
    report_dir, _, _, _, _ = dominating
    page = (report_dir / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "<script" not in page and 'src="http' not in page and "<link" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")
def test_html_renders_in_headless_chromium(dominating, tmp_path):
    report_dir, _, _, _, _ = dominating
    shot = tmp_path / "shot.png"
    screenshot(report_dir / "index.html", shot, width=1280, height=4000)
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (4000, 1280)
    # Not a blank page: text, tables and figures give plenty of non-white pixels.
    assert (image[..., :3].mean(axis=-1) < 0.9).mean() > 0.02


def test_partial_study_says_what_is_missing(tmp_path):
    trials = [
        make_trial("t0000", MISS, seed=0),
        make_trial("t0001", MISS, seed=1),
        make_trial("t0002", H_FAST, method="h_detach", p_detach=0.5, seed=0),
        make_trial("t0003", [0.2], method="h_detach", p_detach=0.5, seed=1, state="failed",
                   error="RuntimeError: boom"),
        make_trial("t0004", [0.4], method="h_detach", p_detach=0.5, seed=2, state="running"),
    ]  # fmt: skip
    write_study(tmp_path, "partial", trials, n_trials=8)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        report_dir = write_report("partial", tmp_path, None)
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["counts"] == {
        "completed": 3, "diverged": 0, "failed": 1, "running": 1, "pending": 3,
    }  # fmt: skip
    status = "\n".join(summary["status"])
    assert "3 trial(s) pending" in status
    assert "t0003 (h-detach p=0.5, lr=0.001, clip=1, seed 1): RuntimeError: boom" in status
    assert "running or interrupted, not scored (curve dashed): t0004" in status
    verdicts = "\n".join(summary["verdicts"])
    # h-detach has one finished seed: no claim about it, only "not enough data".
    assert "h-detach p=0.5: not enough data" in verdicts
    assert "h-detach p=0.5 vs vanilla: not enough data" in verdicts
    assert "P(" not in verdicts
    assert "RuntimeError: boom" in stdout.getvalue()
    assert "RuntimeError: boom" in (report_dir / "index.html").read_text()


def test_optuna_study_compares_each_seeds_best_tuned_trial(tmp_path):
    """Optuna tunes lr and clip_norm per method x seed (the fixture's roles: both nuisance): two
    samples each, one good, at values no two seeds share."""
    trials = []
    for seed in range(3):
        for method, p_detach, good in (("none", 0.0, VANILLA_REACH), ("h_detach", 0.5, H_FAST)):
            for sample, curve in enumerate((MISS, good)):
                lr = 1e-3 * (1 + seed + 0.1 * sample + (method == "none"))
                trials.append(
                    make_trial(f"t{len(trials):04d}", curve, method=method, p_detach=p_detach,
                               lr=lr, clip_norm=(None, 0.5 + seed)[sample], seed=seed)
                )  # fmt: skip
    write_study(tmp_path, "tuned", trials, searcher="optuna")
    with contextlib.redirect_stdout(io.StringIO()):
        report_dir = write_report("tuned", tmp_path, None)
    summary = json.loads((report_dir / "summary.json").read_text())
    status = "\n".join(summary["status"])
    assert "Optuna study: clip_norm, lr tuned per scientific point and seed" in status
    assert "the 6 of 12 trials scored" in status
    verdicts = "\n".join(summary["verdicts"])
    assert "h-detach p=0.5 (lr=tuned, clip=tuned) reached 99% in 3/3 seeds" in verdicts
    assert "vanilla (lr=tuned, clip=tuned) reached 99% in 3/3 seeds" in verdicts
    assert "over 3 runs paired by" in verdicts and "not enough data" not in verdicts
    cells = list(csv.DictReader((report_dir / "cells.csv").open()))
    assert [(row["method"], row["lr"], row["n"]) for row in cells] == [
        ("none", "tuned", "3"), ("h_detach", "tuned", "3"),
    ]  # fmt: skip
    # Each run keeps what its seed's search found.
    assert {run["trial_id"]: run["tuned"]["clip_norm"] for run in summary["runs"]} == {
        "t0001": "0.5", "t0003": "0.5", "t0005": "1.5", "t0007": "1.5", "t0009": "2.5",
        "t0011": "2.5",
    }  # fmt: skip
    assert "lr -1" not in (report_dir / "index.html").read_text()


def test_unknown_study_is_a_config_error_naming_study_and_uri(tmp_path):
    write_study(tmp_path, "present", [make_trial("t0", MISS)])
    with pytest.raises(ConfigError, match=r"'absent'.*sqlite:///.*mlflow\.db"):
        write_report("absent", tmp_path, None)
    assert not (tmp_path / "reports" / "absent").exists()


def test_a_report_from_another_store_does_not_replace_the_folders_report(tmp_path):
    trials = [make_trial(f"t000{seed}", MISS, seed=seed) for seed in range(3)]
    (tmp_path / "here").mkdir()
    (tmp_path / "other").mkdir()
    write_study(tmp_path / "here", "same", trials)
    other_uri, _ = write_study(tmp_path / "other", "same", trials)
    with contextlib.redirect_stdout(io.StringIO()):
        report_dir = write_report("same", tmp_path / "here", None)
    kept = (report_dir / "summary.json").read_text()
    with pytest.raises(ConfigError, match="holds the report of the study read from"):
        write_report("same", tmp_path / "here", other_uri)  # --tracking-uri, default --output
    assert (report_dir / "summary.json").read_text() == kept
    with contextlib.redirect_stdout(io.StringIO()):  # its own folder: written
        write_report("same", tmp_path / "elsewhere", other_uri)


def test_a_report_folder_that_cannot_be_made_is_a_one_line_error(tmp_path):
    trials = [make_trial(f"t000{seed}", MISS, seed=seed) for seed in range(3)]
    write_study(tmp_path, "blocked", trials)
    (tmp_path / "reports").write_text("a file where the reports folder goes")
    with pytest.raises(ConfigError, match=r"--output .*: cannot make this folder \(Not a dir"):
        write_report("blocked", tmp_path, None)
