"""`write_report` end to end on synthetic studies in a real MLflow store: numbers, files, HTML."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
import urllib.request

import matplotlib.image
import pytest
from analysis_fixtures import CHROMIUM, grid, make_trial, screenshot, write_study
from conftest import free_port, stop_process_group, wait_for_http
from mlflow import MlflowClient

from study.analysis.report import write_report
from study.claim_spec import Claim
from study.errors import ConfigError

# Curves evaluated every 100 of 1000 iterations. Vanilla with clipping: one seed of three reaches
# exactly the 0.99 target, at iteration 500.
VANILLA_REACH = [0.3, 0.5, 0.7, 0.9] + [0.99] * 6
MISS = [0.3, 0.5] + [0.6] * 8
DIVERGED = [0.3, 0.2]  # stopped at iteration 200
H_FAST = [0.5] + [1.0] * 9  # reaches at 200
H_SLOW = [0.5, 0.9] + [1.0] * 8  # reaches at 300
LRS = (1.0e-3, 1.0e-2)


def dominating_trials() -> list:
    """h-detach beats vanilla on every (lr, clip, seed); vanilla diverges once per no-clip cell."""
    vanilla = {}
    for lr in LRS:
        vanilla[(lr, 1.0)] = [VANILLA_REACH, MISS, MISS]
        vanilla[(lr, None)] = [MISS, MISS, DIVERGED]
    h_detach = {key: [H_FAST, H_FAST, H_SLOW] for key in vanilla}
    trials = grid({("none", 0.0): vanilla, ("h_detach", 0.5): h_detach})
    for trial in trials:
        if trial.val_acc.tolist() == DIVERGED:
            trial.state = "diverged"
    return trials


@pytest.fixture(scope="module")
def dominating(tmp_path_factory):
    """h-detach beats vanilla on every (lr, clip, seed); the report written once for all tests."""
    tmp_path = tmp_path_factory.mktemp("dominating")
    trials = dominating_trials()
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
    assert any(
        "P(h-detach p=0.5 better, by best val accuracy) = 1.00 [0.76, 1.00]" in v
        for v in summary["verdicts"]
    )
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


def test_files_of_the_users_in_the_report_folder_are_not_logged(tmp_path):
    uri, parent_id = write_study(tmp_path, "mine", dominating_trials(), target=0.99)
    notes = tmp_path / "reports" / "mine" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("my own notes\n")
    with contextlib.redirect_stdout(io.StringIO()):
        write_report("mine", tmp_path, None)
    paths = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent_id, "report")}
    assert "report/notes.txt" not in paths and "report/index.html" in paths
    assert notes.read_text() == "my own notes\n"  # left where it was


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
    # summary.json says "tuned" where a cell's value was tuned, never the internal -1.0.
    assert {(c["lr"], c["clip_norm"]) for c in summary["cells"]} == {("tuned", "tuned")}


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


def test_a_report_rewritten_from_a_relative_store_uri_replaces_its_own(tmp_path, monkeypatch):
    trials = [make_trial(f"t000{seed}", MISS, seed=seed) for seed in range(3)]
    write_study(tmp_path, "rel", trials)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second report is of the same store: written, not refused
        with contextlib.redirect_stdout(io.StringIO()):
            report_dir = write_report("rel", tmp_path / "out", "sqlite:///mlflow.db")
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"


def test_a_report_folder_that_cannot_be_made_is_a_one_line_error(tmp_path):
    trials = [make_trial(f"t000{seed}", MISS, seed=seed) for seed in range(3)]
    write_study(tmp_path, "blocked", trials)
    (tmp_path / "reports").write_text("a file where the reports folder goes")
    with pytest.raises(ConfigError, match=r"--output .*: cannot make this folder \(Not a dir"):
        write_report("blocked", tmp_path, None)


# ---------------------------------------------------------------- the paper's claims

CLAIMS = [
    # Constructed to hold: h-detach beats vanilla on every pair (P(better) 1 in every cell).
    Claim("fig3-better", 3, "h-detach trains better", "h_detach", "p_better", "higher",
          baseline="none", null=0.5),
    # Constructed to fail: the same data, claimed the other way round.
    Claim("fig3-worse", 3, "h-detach trains worse", "h_detach", "best_accuracy", "lower",
          baseline="none"),
    # Constructed to be undecidable: vanilla diverges in 1 of 3 seeds per no-clip cell only.
    Claim("fig4-diverges", 4, "no-clip vanilla diverges", "h_detach", "divergence_rate",
          "lower", baseline="none", where={"clip_norm": None}),
]  # fmt: skip


@pytest.fixture(scope="module")
def claimed(tmp_path_factory):
    """The dominating study again, with claims on its parent run and a tenth of the budget."""
    tmp_path = tmp_path_factory.mktemp("claimed")
    trials = dominating_trials()
    tags = {
        "study.claims": json.dumps([claim.to_dict() for claim in CLAIMS]),
        "study.base_iterations": "10000",  # the trials ran 1000: budget 10%
        "study.overrides": json.dumps([["fixed.iterations", 1000]]),
    }
    write_study(tmp_path, "claimed", trials, target=0.99, parent_tags=tags)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report_dir = write_report("claimed", tmp_path, None)
    summary = json.loads((report_dir / "summary.json").read_text())
    return tmp_path, report_dir, stdout.getvalue(), summary


def test_each_claim_gets_the_verdict_it_was_built_for(claimed):
    _, _, stdout, summary = claimed
    verdicts = {claim["id"]: claim["verdict"] for claim in summary["claims"]}
    assert verdicts == {
        "fig3-better": "supported",
        "fig3-worse": "contradicted",
        "fig4-diverges": "inconclusive",
    }
    better = summary["claims"][0]
    for key in ("id", "figure", "verdict", "statistic", "value", "interval", "runs"):
        assert key in better
    assert better["value"] == 1.0 and better["interval"][0] > 0.5 and better["runs"] == 24
    assert "claim fig3-better (Fig. 3): SUPPORTED" in stdout


def test_a_smaller_budget_is_said_with_its_fraction(claimed):
    _, _, stdout, summary = claimed
    assert all(claim["budget_fraction"] == pytest.approx(0.1) for claim in summary["claims"])
    assert summary["budget_fraction"] == pytest.approx(0.1)
    assert summary["overrides"] == [["fixed.iterations", 1000]]
    assert "budget 10% of the space file's iterations" in stdout
    assert "run with --set fixed.iterations=1000" in stdout


def test_the_report_lists_the_claims_and_defines_the_rule(claimed):
    _, report_dir, _, summary = claimed
    page = (report_dir / "index.html").read_text()
    assert "Claims of the paper" in page and "fig3-worse" in page
    assert "claim verdict" in summary["definitions"]
    assert "Claims of the paper" in (report_dir / "summary.md").read_text()


def test_the_report_logs_one_run_per_cell_with_seed_quartiles(claimed):
    tmp_path, _, _, _ = claimed
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("claimed")
    cells = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`study.kind` = 'cell'"
    )
    assert len(cells) == 8  # 2 methods x 2 lrs x 2 clips
    one = next(
        r for r in cells if r.data.tags["study.cell"].endswith("vanilla | lr=0.001 | clip=1")
    )
    median = client.get_metric_history(one.info.run_id, "val/accuracy_median")
    # Seeds VANILLA_REACH, MISS, MISS: the median at each step is MISS's value.
    assert [m.value for m in sorted(median, key=lambda m: m.step)] == MISS
    assert {"val/accuracy_q25", "val/accuracy_q75", "train/loss_median"} <= set(one.data.metrics)
    # A second report replaces the cell runs instead of adding to them.
    with contextlib.redirect_stdout(io.StringIO()):
        write_report("claimed", tmp_path, None)
    again = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`study.kind` = 'cell'"
    )
    assert len(again) == 8


@pytest.mark.slow
def test_the_mlflow_ui_serves_the_cell_runs_through_its_rest_api(claimed):
    """What the UI shows comes from this API: the cell runs are there, tagged and named."""
    tmp_path, _, _, _ = claimed
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=90, process=server)
        by_name = f"{base}/experiments/get-by-name?experiment_name=claimed"
        with urllib.request.urlopen(by_name) as response:
            experiment_id = json.load(response)["experiment"]["experiment_id"]
        query = {
            "experiment_ids": [experiment_id],
            "filter": "tags.`study.kind` = 'cell'",
            "max_results": 100,
        }
        request = urllib.request.Request(
            f"{base}/runs/search",
            data=json.dumps(query).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            runs = json.load(response)["runs"]
    finally:
        stop_process_group(server)
    assert len(runs) == 8
    names = sorted(run["info"]["run_name"] for run in runs)
    assert names[0] == "copying T=100 | h-detach p=0.5 | lr=0.001 | clip=1"
    metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
    assert {"val/accuracy_median", "val/accuracy_q25", "val/accuracy_q75"} <= metrics
