"""MLflow bookkeeping on a real SQLite store: params, child runs, resumed steps, summaries."""

from __future__ import annotations

import math
import re
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

from study import tracking
from study.config import ConfigError, TrialConfig

ROLES = {"method": "scientific", "lr": "nuisance", "seed": "replicate", "task_options.T": "fixed"}
PACK_TAGS = {"study.pack": "p0001", "study.pack_size": "2"}


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, str]:
    """A fresh embedded store with one study 'demo' of 3 planned trials; (uri, parent run id)."""
    uri = tracking.store_uri(tmp_path)
    experiment = tracking.ensure_experiment(uri, "demo", (tmp_path / "mlartifacts").as_uri())
    parent = tracking.start_parent(uri, experiment, "demo", {"study.n_trials": "3"}, "a: 1\n")
    return uri, parent


def config(**changes: object) -> TrialConfig:
    base = TrialConfig(task="copying", task_options={"T": 5}, method="h_detach", p_detach=0.25)
    return base.replace(**changes)


def test_flatten_uses_dotted_task_options_and_none() -> None:
    flat = tracking.flatten(config(clip_norm=None))
    assert flat["task_options.T"] == "5"
    assert flat["clip_norm"] == "none" and flat["anneal_last"] == "none"
    assert flat["p_detach"] == "0.25" and flat["method"] == "h_detach"
    assert "task_options" not in flat


def test_store_layout(tmp_path: Path) -> None:
    assert tracking.store_uri(tmp_path) == f"sqlite:///{tmp_path.absolute()}/mlflow.db"
    assert tracking.artifact_dir(tmp_path) == tmp_path.absolute() / "mlartifacts"


def test_parent_run_has_tags_and_spec_artifact(store: tuple[str, str], tmp_path: Path) -> None:
    uri, parent_id = store
    parent = tracking.find_parent(uri, "demo")
    assert parent is not None and parent.info.run_id == parent_id
    assert parent.info.run_name == "demo"
    assert parent.data.tags["study.kind"] == "parent"
    assert parent.data.tags["study.name"] == "demo"
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(parent_id)] == ["spec.yaml"]
    experiment = client.get_experiment_by_name("demo")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    # Idempotent: the driver calls it again on resume.
    assert tracking.ensure_experiment(uri, "demo", None) == experiment.experiment_id


def test_trial_run_resumes_without_duplicates(store: tuple[str, str]) -> None:
    uri, parent_id = store
    run = tracking.TrialRun(uri, parent_id, "t0000", config(), ROLES, "demo")
    run.log(10, {"train/loss": 2.0, "val/accuracy": 0.1, "iteration": 10.0})
    run.log(20, {"train/loss": 1.5, "val/accuracy": 0.2})
    # The driver dies; the retried trial replays from an older checkpoint (step 10).
    again = tracking.TrialRun(uri, parent_id, "t0000", config(), ROLES, "demo")
    assert again.run_id == run.run_id and again.last_step == 20
    again.log(10, {"train/loss": 9.0})
    again.log(20, {"train/loss": 9.0})
    again.log(30, {"train/loss": 1.0, "val/accuracy": 0.3, "test/accuracy": 0.25})
    again.finish("completed")

    client = MlflowClient(uri)
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.info.run_name == "t0000"
    tags = finished.data.tags
    assert tags["mlflow.parentRunId"] == parent_id
    assert tags["study.kind"] == "trial" and tags["study.trial_id"] == "t0000"
    assert (tags["task"], tags["method"], tags["seed"]) == ("copying", "h_detach", "0")
    assert tags["role.lr"] == "nuisance" and tags["role.seed"] == "replicate"
    assert tags["outcome"] == "completed"
    assert finished.data.params["task_options.T"] == "5"
    history = client.get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 2.0), (20, 1.5), (30, 1.0)]
    assert "iteration" not in finished.data.metrics  # only the study's metric names are logged


def test_a_diverged_point_is_logged_as_nan_with_the_values_in_a_tag(
    store: tuple[str, str],
) -> None:
    uri, parent_id = store
    run = tracking.TrialRun(uri, parent_id, "t0002", config(), ROLES, "demo")
    run.log(10, {"train/loss": 2.0, "train/grad_norm": 1.0, "val/accuracy": 0.1})
    run.log(13, {"train/loss": math.inf, "train/grad_norm": math.nan})
    run.finish("diverged")
    client = MlflowClient(uri)
    losses = [m.value for m in client.get_metric_history(run.run_id, "train/loss")]
    assert losses[0] == 2.0 and math.isnan(losses[1])  # not MLflow's 1.8e308 for inf
    tags = client.get_run(run.run_id).data.tags
    assert tags["nonfinite"] == "iteration 13: train/loss=inf, train/grad_norm=nan"
    assert tags["outcome"] == "diverged"
    again = tracking.TrialRun(uri, parent_id, "t0002", config(), ROLES, "demo")
    assert again.last_step == 13  # the diverged point still marks the trial's last step


def test_failed_trial_and_retry(store: tuple[str, str]) -> None:
    uri, parent_id = store
    run = tracking.TrialRun(uri, parent_id, "t0001", config(), ROLES, "demo")
    run.fail(ConfigError("task_options.data_dir: /nope lacks train-images\nmore detail"))
    client = MlflowClient(uri)
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert (
        failed.data.tags["error"] == "ConfigError: task_options.data_dir: /nope lacks train-images"
    )
    retry = tracking.TrialRun(uri, parent_id, "t0001", config(), ROLES, "demo")
    assert retry.run_id == run.run_id
    reopened = client.get_run(run.run_id)
    assert reopened.info.status == "RUNNING" and "error" not in reopened.data.tags
    retry.finish("diverged")
    assert tracking.summarize(uri, "demo").trials[0].state == "diverged"


def test_record_failure_creates_or_marks_the_run(store: tuple[str, str]) -> None:
    uri, parent_id = store
    tracking.record_failure(
        uri, parent_id, "t0002", "ActorDiedError: worker died", config(), ROLES, "demo"
    )
    run = tracking.find_trial_run(uri, parent_id, "t0002")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "ActorDiedError: worker died"
    assert run.data.params["method"] == "h_detach"
    # A packed trial that diverged before its pack failed keeps its outcome; the others fail.
    diverged = tracking.TrialRun(uri, parent_id, "t0003", config(), ROLES, "demo", PACK_TAGS)
    diverged.finish("diverged")
    for trial_id in ("t0003", "t0004"):
        tracking.record_failure(
            uri, parent_id, trial_id, "ActorDiedError: died", config(), ROLES, "demo", PACK_TAGS
        )
    kept = tracking.find_trial_run(uri, parent_id, "t0003")
    assert kept.info.status == "FINISHED" and kept.data.tags["outcome"] == "diverged"
    created = tracking.find_trial_run(uri, parent_id, "t0004")
    assert created.info.status == "FAILED"
    for run_ in (kept, created):
        assert run_.data.tags["study.pack"] == "p0001"
        assert run_.data.tags["study.pack_size"] == "2"


def test_summary_and_list_count_pending(store: tuple[str, str]) -> None:
    uri, parent_id = store
    done = tracking.TrialRun(uri, parent_id, "t0000", config(), ROLES, "demo")
    done.log(10, {"train/loss": 1.0, "best/val_accuracy": 0.75})
    done.finish("completed")
    tracking.TrialRun(uri, parent_id, "t0001", config(seed=1), ROLES, "demo")  # interrupted
    summary = tracking.summarize(uri, "demo")
    assert summary is not None and summary.n_trials == 3
    assert [t.state for t in summary.trials] == ["completed", "running"]
    assert summary.trials[0].best_val_accuracy == 0.75
    assert (summary.count("completed"), summary.count("failed"), summary.pending) == (1, 0, 2)
    # An experiment without a parent run is not a study.
    tracking.ensure_experiment(uri, "not-a-study", None)
    assert [s.name for s in tracking.list_studies(uri)] == ["demo"]
    assert tracking.summarize(uri, "missing") is None


def test_one_line() -> None:
    assert tracking.one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert tracking.one_line(RuntimeError()) == "RuntimeError"
    assert tracking.one_line("  boom \n trace") == "boom"


def test_log_folder_logs_files_or_says_why_not(store: tuple[str, str], tmp_path: Path) -> None:
    uri, parent = store
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "summary.md").write_text("# hi\n")
    assert tracking.log_folder(uri, parent, folder, artifact_path="report") is None
    logged = MlflowClient(tracking_uri=uri).list_artifacts(parent, "report")
    assert [artifact.path for artifact in logged] == ["report/summary.md"]
    refusal = tracking.log_folder(uri, "no-such-run", folder, artifact_path="report")
    assert refusal is not None and "\n" not in refusal and "no-such-run" in refusal


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("bogus", "not a tracking URI"),
        ("mlruns/", "not a tracking URI"),
        ("http://127.0.0.1:notaport", "not a valid URI \\(Port could not be cast"),
        ("http://127.0.0.1:99999", "not a valid URI \\(Port out of range 0-65535\\)"),
        ("http://[::1", "not a valid URI \\(Invalid IPv6 URL\\)"),
    ],
)
def test_check_uri_refuses_what_no_store_answers_at(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^--tracking-uri {re.escape(uri)}: {message}"):
        tracking.check_uri(uri)


def test_check_uri_accepts_stores_and_tries_servers(tmp_path: Path) -> None:
    tracking.check_uri(tracking.store_uri(tmp_path))
    tracking.check_uri("postgresql+psycopg2://user@db/mlflow")  # its server is MLflow's to find
    tracking.check_uri("databricks")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        port = listening.getsockname()[1]
    with pytest.raises(ConfigError, match="cannot connect.*is `mlflow server` running there"):
        tracking.check_uri(f"http://127.0.0.1:{port}")


def test_a_relative_sqlite_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray runs each trial in its own working directory: a relative path would name another file.
    monkeypatch.chdir(tmp_path)
    assert tracking.check_uri("sqlite:///stores/x.db") == f"sqlite:///{tmp_path}/stores/x.db"
    assert tracking.check_uri(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"


@pytest.mark.parametrize(
    "uri,reason",
    [
        ("sqlite:///{tmp}/not_a_database", "DatabaseError: (sqlite3.DatabaseError) file is not"),
        ("file:///{tmp}/mlruns", "MlflowException: The filesystem tracking backend"),
        ("foo://bar", "UnsupportedModelRegistryStoreURIException: "),
    ],
)
def test_a_store_mlflow_cannot_open_is_one_line(tmp_path: Path, uri: str, reason: str) -> None:
    (tmp_path / "not_a_database").write_text("hello\n")
    uri = uri.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as raised:
        tracking.check_store(uri, "--tracking-uri")
    message = str(raised.value)
    assert message.startswith(f"--tracking-uri: MLflow cannot open {uri} ({reason}")
    assert "\n" not in message
    assert (tmp_path / "not_a_database").read_text() == "hello\n"  # left as it was


def test_checked_store_opens_what_exists_and_creates_nothing(tmp_path: Path) -> None:
    existing = tracking.store_uri(tmp_path / "kept")
    (tmp_path / "kept").mkdir()
    tracking.client(existing).search_experiments()  # MLflow makes the database
    assert tracking.checked_store(existing) == (existing, True)
    missing = f"sqlite:///{tmp_path}/absent/mlflow.db"
    assert tracking.checked_store(missing) == (missing, False)
    assert not (tmp_path / "absent").exists()
    (tmp_path / "junk.db").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"^--output x: MLflow cannot open sqlite:///"):
        tracking.checked_store(f"sqlite:///{tmp_path}/junk.db", "--output x")


def test_listing_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    assert tracking.list_studies(f"sqlite:///{tmp_path}/absent/mlflow.db") == []
    assert not (tmp_path / "absent").exists()


def test_ui_refuses_a_taken_port_in_one_line(tmp_path: Path) -> None:
    tracking.ensure_experiment(tracking.store_uri(tmp_path), "demo", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^--port {port}: 127.0.0.1:{port} is not free"):
            tracking.serve_ui(tmp_path, port)


def test_ui_stopped_by_sigterm_stops_its_server(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    tracking.ensure_experiment(tracking.store_uri(tmp_path), "demo", None)
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
