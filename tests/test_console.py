"""study/console.py: what the console tells a user to type next."""

from __future__ import annotations

from study.console import ui_command


def test_ui_command_points_at_the_store_the_study_used() -> None:
    # The study folder's own store, an MLflow server, and another SQLite file (--tracking-uri).
    assert ui_command("runs/a b", None) == "study ui --output 'runs/a b'"
    assert ui_command("runs", "http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"
    other = "sqlite:////tmp/other.db"
    assert ui_command("runs", other) == f"mlflow ui --backend-store-uri {other}"
