"""study/console.py: what the console tells a user (trial lines, tables, what to type next) and
the MLflow UI that `study ui` serves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from study import tracking
from study.console import ls_table, serve_ui, summary_table, trial_line, ui_command
from study.errors import ConfigError
from study.tracking import StudySummary, TrialSummary


def test_ui_command_points_at_the_store_the_study_used() -> None:
    # The study folder's own store, an MLflow server, and another SQLite file (--tracking-uri).
    assert ui_command("runs/a b", None) == "study ui --output 'runs/a b'"
    assert ui_command("runs", "http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"
    other = "sqlite:////tmp/other.db"
    assert ui_command("runs", other) == f"mlflow ui --backend-store-uri {other}"


def test_summary_says_which_pending_trials_started() -> None:
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


def test_trial_lines_and_the_ls_table() -> None:
    point = {"method": "h_detach", "p_detach": 0.25, "lr": 0.003, "seed": 1}
    assert trial_line(3, 8, "t0002", point, "completed", 0.9123, 42.0) == (
        "[3/8] t0002 h_detach p=0.25 lr=0.003 seed=1: completed, best val/accuracy 0.912 (42 s)"
    )
    failed = trial_line(4, 8, "t0003", {"seed": 0}, "failed", None, None, "ValueError: x")
    assert failed == "[4/8] t0003 seed=0: failed: ValueError: x"
    summary = StudySummary("s", 3, [TrialSummary("t0000", "completed", "none", 0.0, {}, 0.5, "")])
    assert ls_table([summary]).splitlines()[1].split() == ["s", "3", "1", "0", "0", "2"]


def test_ui_refuses_a_damaged_store_in_one_line_before_starting_mlflow(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_text("garbage\n")
    with pytest.raises(ConfigError) as refused:
        serve_ui(tmp_path, 5000)
    assert str(refused.value).startswith(f"--output {tmp_path}: MLflow cannot open sqlite:///")
    assert "file is not a database" in str(refused.value)


def test_ui_refuses_a_taken_port_in_one_line(tmp_path: Path) -> None:
    tracking.open_store(tracking.store_uri(tmp_path)).ensure_experiment("demo", tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^--port {port}: 127.0.0.1:{port} is not free"):
            serve_ui(tmp_path, port)


def test_ui_stopped_by_sigterm_stops_its_server(tmp_path: Path) -> None:
    tracking.open_store(tracking.store_uri(tmp_path)).ensure_experiment("demo", tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "ui", "--output", str(tmp_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert urllib.request.urlopen(url, timeout=5).status == 200
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "the UI never served"
                time.sleep(1)
        ui.send_signal(signal.SIGTERM)  # as `kill PID` or `docker stop` would
        assert ui.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server and its workers are gone: port free
            try:
                urllib.request.urlopen(url, timeout=2)
            except OSError:
                break
            time.sleep(1)
        else:
            pytest.fail(f"{url} still answers after the UI was stopped")
    finally:
        if ui.poll() is None:
            os.kill(ui.pid, signal.SIGKILL)
