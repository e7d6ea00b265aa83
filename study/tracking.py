"""MLflow: the study's experiment, its parent run, one child run per trial, and study summaries."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, ViewType
from mlflow.exceptions import MlflowException

from study.config import ConfigError, TrialConfig, check_reachable

PARENT, TRIAL = "parent", "trial"
COMPLETED, DIVERGED, FAILED, RUNNING = "completed", "diverged", "failed", "running"
METRIC_KEYS = (
    "train/loss",
    "train/grad_norm",
    "val/loss",
    "val/accuracy",
    "best/val_accuracy",
    "test/accuracy",
)
# Every evaluation logs train/loss (a diverged one too), so its last step is the trial's last.
STEP_KEY = "train/loss"


def store_uri(output_dir: Path) -> str:
    """The embedded store: a SQLite file in the output folder."""
    return f"sqlite:///{output_dir.absolute()}/mlflow.db"


def check_uri(tracking_uri: str, flag: str = "--tracking-uri") -> str:
    """The URI to use, or a one-line ConfigError for one no store answers at: a bare word or
    path (MLflow >= 3.7 refuses the old folder store unless told otherwise, with a traceback),
    or an MLflow server that does not accept connections (MLflow itself retries for minutes,
    then raises). A relative sqlite:/// path is made absolute: Ray runs each trial in its own
    working directory, where it would name another file. What MLflow cannot open (a missing
    database driver, a file that is no database) is check_store's."""
    try:
        parts = urllib.parse.urlsplit(tracking_uri)
        port = parts.port
    except ValueError as error:
        raise ConfigError(f"{flag} {tracking_uri}: not a valid URI ({error})") from None
    if "://" not in tracking_uri and tracking_uri.split(":")[0] != "databricks":
        raise ConfigError(
            f"{flag} {tracking_uri}: not a tracking URI; use sqlite:///PATH/mlflow.db, "
            "http://HOST:PORT (an mlflow server) or a database URI (postgresql://...)"
        )
    if parts.scheme in ("http", "https"):
        port = port or (443 if parts.scheme == "https" else 80)
        hint = "is `mlflow server` running there?"
        check_reachable(f"{flag} {tracking_uri}", parts.hostname or "", port, hint)
    database = sqlite_path(tracking_uri)
    if database is not None and str(database) != ":memory:" and not database.is_absolute():
        return f"sqlite:///{database.absolute()}"
    return tracking_uri


def check_store(tracking_uri: str, flag: str = "--tracking-uri") -> None:
    """One query, so that a store MLflow cannot open is a one-line error before any work: a
    database driver not installed, a file that is no database, a folder, MLflow's retired
    file store. (A sqlite:/// file that does not exist yet is created, as MLflow would.)"""
    try:
        client(tracking_uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - MLflow, SQLAlchemy, a driver: whatever it raised
        reason = one_line(error)
        raise ConfigError(f"{flag}: MLflow cannot open {tracking_uri} ({reason})") from None


def checked_store(tracking_uri: str, flag: str = "--tracking-uri") -> tuple[str, bool]:
    """(check_uri's URI, whether the store is there), once a server answers there and MLflow
    opens an existing store (check_store): one line otherwise, before any work. A sqlite:///
    file not there yet is not opened, which would create it: the caller decides."""
    tracking_uri = check_uri(tracking_uri, flag)
    exists = store_exists(tracking_uri)
    if exists:
        check_store(tracking_uri, flag)
    return tracking_uri, exists


def store_exists(tracking_uri: str) -> bool:
    """False only for a sqlite:/// file that is not there (yet): servers and other databases
    are taken to exist, and answer for themselves."""
    database = sqlite_path(tracking_uri)
    return database is None or str(database) == ":memory:" or database.is_file()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI; None for any other store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def has_store(output_dir: Path) -> bool:
    return (output_dir / "mlflow.db").is_file()


def artifact_dir(output_dir: Path) -> Path:
    return output_dir.absolute() / "mlartifacts"


def client(tracking_uri: str) -> MlflowClient:
    # MLflow announces creating and migrating a fresh SQLite store at INFO; the study's own
    # lines are the output, so only its warnings get through.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri)


def log_folder(tracking_uri: str, run_id: str, folder: Path, artifact_path: str) -> str | None:
    """Log a folder's files as artifacts of a run: None, or the store's refusal as one line."""
    try:
        client(tracking_uri).log_artifacts(run_id, str(folder), artifact_path=artifact_path)
    except (MlflowException, OSError) as error:
        return one_line(error)
    return None


def one_line(error: BaseException | str) -> str:
    """An error as one line: its type and the first line of its message."""
    if isinstance(error, str):
        text = error.strip().splitlines()[0].strip() if error.strip() else "unknown error"
        return text[:1000]
    message = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {message[0].strip()}" if message else type(error).__name__
    return text[:1000]


def flatten(config: TrialConfig) -> dict[str, str]:
    """TrialConfig as MLflow params: task_options as dotted keys, None written as "none"."""
    flat: dict[str, str] = {}
    for key, value in config.to_dict().items():
        if key == "task_options":
            for option, option_value in sorted(value.items()):
                flat[f"task_options.{option}"] = _text(option_value)
        else:
            flat[key] = _text(value)
    return flat


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None) -> str:
    """The study's experiment id, created if needed (on the driver, before any trial starts:
    a fresh SQLite file does not tolerate concurrent first use)."""
    mlflow = client(tracking_uri)
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            return mlflow.create_experiment(name, artifact_location=artifact_location)
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"study {name}: its MLflow experiment is deleted; restore it in the UI or pick "
                "another --output"
            )
        return experiment.experiment_id
    except MlflowException as error:
        raise ConfigError(f"tracking URI {tracking_uri}: {one_line(error)}") from None


def find_parent(tracking_uri: str, name: str) -> Any | None:
    """The study's parent run, or None when the study was never started in this store. One
    parent per study by contract; should there be more, the newest (as study report reads)."""
    mlflow = client(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`study.kind` = 'parent'",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def start_parent(
    tracking_uri: str, experiment_id: str, name: str, tags: dict[str, str], spec_yaml: str
) -> str:
    """Create the study's parent run with its tags and the resolved spec as spec.yaml."""
    mlflow = client(tracking_uri)
    run = mlflow.create_run(
        experiment_id,
        run_name=name,
        tags={"study.name": name, "study.kind": PARENT, **tags},
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.yaml"
        path.write_text(spec_yaml)
        mlflow.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    client(tracking_uri).update_run(run_id, status="RUNNING")


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


class TrialRun:
    """A trial's child run, opened inside the trial process so its curve is live in the UI.

    A retried or resumed trial finds its own run (tag study.trial_id under the parent) and logs
    only the steps beyond the last one logged, so no run and no step is ever duplicated.
    """

    def __init__(
        self,
        tracking_uri: str,
        parent_run_id: str,
        trial_id: str,
        config: TrialConfig,
        roles: dict[str, str],
        study_name: str,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.mlflow = client(tracking_uri)
        existing = find_trial_run(tracking_uri, parent_run_id, trial_id)
        if existing is None:
            self.run_id = _create_trial_run(
                self.mlflow, parent_run_id, trial_id, config, roles, study_name, tags
            )
            self.last_step = -1
        else:
            self.run_id = existing.info.run_id
            self.mlflow.update_run(self.run_id, status="RUNNING")
            for key in ("error", "outcome"):
                if key in existing.data.tags:
                    self.mlflow.delete_tag(self.run_id, key)
            history = self.mlflow.get_metric_history(self.run_id, STEP_KEY)
            self.last_step = max((m.step for m in history), default=-1)

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        if iteration <= self.last_step:
            return  # already logged before a retry or resume: the replayed curve is the same
        now = int(time.time() * 1000)
        logged = {key: float(value) for key, value in metrics.items() if key in METRIC_KEYS}
        # MLflow stores +-inf as +-1.8e308, which its UI shows as a real latest/max loss; NaN
        # stays NaN ("NaN (step=N)" there, no point in the chart). The exact values: a tag.
        nonfinite = {key: value for key, value in logged.items() if not math.isfinite(value)}
        if nonfinite:
            values = ", ".join(f"{key}={value}" for key, value in nonfinite.items())
            self.mlflow.set_tag(self.run_id, "nonfinite", f"iteration {iteration}: {values}")
        batch = [
            Metric(key, value if math.isfinite(value) else math.nan, now, iteration)
            for key, value in logged.items()
        ]
        self.mlflow.log_batch(self.run_id, metrics=batch)
        self.last_step = iteration

    def finish(self, outcome: str) -> None:
        self.mlflow.set_tag(self.run_id, "outcome", outcome)
        self.mlflow.set_terminated(self.run_id, status="FINISHED")

    def fail(self, error: BaseException | str) -> None:
        self.mlflow.set_tag(self.run_id, "error", one_line(error))
        self.mlflow.set_terminated(self.run_id, status="FAILED")


def _create_trial_run(
    mlflow: MlflowClient,
    parent_run_id: str,
    trial_id: str,
    config: TrialConfig,
    roles: dict[str, str],
    study_name: str,
    extra_tags: dict[str, str] | None = None,
) -> str:
    parent = mlflow.get_run(parent_run_id)
    tags = {
        "mlflow.parentRunId": parent_run_id,
        "study.name": study_name,
        "study.kind": TRIAL,
        "study.trial_id": trial_id,
        "task": config.task,
        "method": config.method,
        "seed": str(config.seed),
        **{f"role.{param}": role for param, role in roles.items()},
        **(extra_tags or {}),
    }
    run = mlflow.create_run(parent.info.experiment_id, run_name=trial_id, tags=tags)
    params = [Param(key, value) for key, value in flatten(config).items()]
    mlflow.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def find_trial_run(tracking_uri: str, parent_run_id: str, trial_id: str) -> Any | None:
    mlflow = client(tracking_uri)
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
            f"and tags.`study.trial_id` = '{trial_id}'"
        ),
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def record_failure(
    tracking_uri: str,
    parent_run_id: str,
    trial_id: str,
    error: str,
    config: TrialConfig,
    roles: dict[str, str],
    study_name: str,
    tags: dict[str, str] | None = None,
) -> None:
    """Mark a trial FAILED from the driver: its process died before it could say so itself.

    A run already FINISHED keeps its outcome: a packed trial can diverge before its pack fails.
    """
    mlflow = client(tracking_uri)
    run = find_trial_run(tracking_uri, parent_run_id, trial_id)
    if run is None:
        run_id = _create_trial_run(
            mlflow, parent_run_id, trial_id, config, roles, study_name, tags
        )
    elif run.info.status == "FINISHED" or (
        run.info.status == "FAILED" and "error" in run.data.tags
    ):
        return
    else:
        run_id = run.info.run_id
    mlflow.set_tag(run_id, "error", one_line(error))
    mlflow.set_terminated(run_id, status="FAILED")


@dataclass
class TrialSummary:
    trial_id: str
    state: str  # completed | diverged | failed | running
    method: str
    p_detach: float
    params: dict[str, str]
    best_val_accuracy: float
    error: str


@dataclass
class StudySummary:
    name: str
    n_trials: int
    trials: list[TrialSummary]

    def count(self, state: str) -> int:
        return sum(trial.state == state for trial in self.trials)

    @property
    def pending(self) -> int:
        finished = self.count(COMPLETED) + self.count(DIVERGED) + self.count(FAILED)
        return max(self.n_trials - finished, 0)


def trial_state(status: str, tags: dict[str, str]) -> str:
    if status == "FINISHED":
        return DIVERGED if tags.get("outcome") == DIVERGED else COMPLETED
    if status in ("FAILED", "KILLED"):
        return FAILED
    return RUNNING


def summarize(tracking_uri: str, name: str) -> StudySummary | None:
    """The study's trials as MLflow holds them; None when the store has no such study."""
    parent = find_parent(tracking_uri, name)
    if parent is None:
        return None
    mlflow = client(tracking_uri)
    children = search_all_runs(
        mlflow,
        parent.info.experiment_id,
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`study.kind` = 'trial'",
    )
    trials = []
    for run in children:
        tags, params = run.data.tags, run.data.params
        best = run.data.metrics.get("best/val_accuracy", math.nan)
        trials.append(
            TrialSummary(
                trial_id=tags.get("study.trial_id", run.info.run_name or run.info.run_id),
                state=trial_state(run.info.status, tags),
                method=params.get("method", "?"),
                p_detach=float(params.get("p_detach", "0")),
                params=dict(params),
                best_val_accuracy=best,
                error=tags.get("error", ""),
            )
        )
    trials.sort(key=lambda trial: trial.trial_id)
    return StudySummary(name, int(parent.data.tags.get("study.n_trials", len(trials))), trials)


def list_studies(tracking_uri: str, flag: str = "--tracking-uri") -> list[StudySummary]:
    """Every experiment in the store that holds a study (a parent run), by name; none (and no
    database file created) where a sqlite:/// URI names no file."""
    tracking_uri, exists = checked_store(tracking_uri, flag)
    if not exists:
        return []
    mlflow = client(tracking_uri)
    summaries = []
    for experiment in mlflow.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        summary = summarize(tracking_uri, experiment.name)
        if summary is not None:
            summaries.append(summary)
    return sorted(summaries, key=lambda summary: summary.name)


def search_all_runs(mlflow: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    """All active runs of an experiment matching the filter, following MLflow's pages."""
    runs, token = [], None
    while True:
        page = mlflow.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def serve_ui(output_dir: Path, port: int, echo: Any = print) -> int:
    """Run the MLflow UI for the embedded store of `output_dir` on 127.0.0.1 until Ctrl-C or
    SIGTERM, either of which stops the server and its workers (their own process group)."""
    if not has_store(output_dir):
        missing = output_dir.absolute() / "mlflow.db"
        raise ConfigError(f"--output {output_dir}: no MLflow store there ({missing} is missing)")
    _check_port_free(port)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store_uri(output_dir),
        "--default-artifact-root", artifact_dir(output_dir).as_uri(),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    server = subprocess.Popen(command, start_new_session=True)
    echo(f"MLflow UI for {output_dir}: http://127.0.0.1:{port}  (Ctrl-C to stop)")
    try:
        return server.wait()  # the server ended by itself
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.returncode is None:  # Ctrl-C or SIGTERM here: stop the server's group
            _stop_group(server)


def _check_port_free(port: int) -> None:
    """`study ui` prints its URL before the server binds: a taken port is said first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: a port left in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise ConfigError(
                f"--port {port}: 127.0.0.1:{port} is not free ({reason}); pick another --port"
            ) from None


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server and its workers), then SIGKILL to
    what is left. The server is reaped last: until then its id cannot name another group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, server.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()
