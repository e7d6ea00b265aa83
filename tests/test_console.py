"""study/console.py: what the console tells a user to type next."""

from __future__ import annotations

from study.console import summary_table, ui_command


def test_ui_command_points_at_the_store_the_study_used() -> None:
    # The study folder's own store, an MLflow server, and another SQLite file (--tracking-uri).
    assert ui_command("runs/a b", None) == "study ui --output 'runs/a b'"
    assert ui_command("runs", "http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"
    other = "sqlite:////tmp/other.db"
    assert ui_command("runs", other) == f"mlflow ui --backend-store-uri {other}"


def test_summary_says_which_pending_trials_started() -> None:
    from study.tracking import StudySummary, TrialSummary

    def trial(trial_id: str, state: str) -> TrialSummary:
        return TrialSummary(trial_id, state, "none", 0.0, {}, 0.5, "")

    # 4 planned: one done, one interrupted (its run left RUNNING), two never started.
    summary = StudySummary("s", 4, [trial("t0000", "completed"), trial("t0001", "running")])
    lines = summary_table(summary).splitlines()
    headline = "s: 4 trials: 1 completed, 0 diverged, 0 failed, 3 pending"
    assert lines[0] == f"{headline} (1 of them started, unfinished)"
    assert lines[1].split()[:7] == [
        "method", "trials", "completed", "diverged", "failed", "unfinished", "best",
    ]  # fmt: skip
    assert lines[2].split()[:6] == ["none", "2", "1", "0", "0", "1"]
