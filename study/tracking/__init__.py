"""MLflow: one Tracker per store holds every read and write of a study's runs (its experiment, its
parent run, one child run per trial, and what the console and the report read back)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from study.config import TrialConfig
from study.errors import ConfigError, absolute, check_reachable, one_line
from study.tracking import stores
from study.tracking.stores import artifact_dir as artifact_dir
from study.tracking.stores import refuse_folder, sqlite_path
from study.tracking.stores import store_exists as store_exists
from study.tracking.stores import store_uri as store_uri
from study.vocabulary import COMPLETED, DIVERGED, FAILED, RUNNING

PARENT, TRIAL = "parent", "trial"
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
Tags = dict[str, str]


@dataclass(frozen=True)
class StudyContext:
    """What a trial needs besides its config, carried into Ray with it: where and under which
    parent run it logs, its parameters' roles, what Tune ranks it by, its cores, and the folder
    of the trials' saved states."""

    name: str
    tracking_uri: str
    parent_run_id: str
    roles: dict[str, str]  # as the `role.<param>` tags of each trial run
    metric: str
    mode: str  # max | min
    cpus: float
    task_options: tuple[str, ...]  # the task's option names: sampled ones go into task_options
    trial_states: str  # absolute folder

    # Into Ray as plain values: Tune swaps any other object in a param_space for a placeholder
    # that only the Tuner which made it resolves, so a restored Tuner's trials would get that.
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StudyContext:
        return cls(**{**values, "task_options": tuple(values["task_options"])})


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as plain values."""

    run_id: str
    name: str
    experiment_id: str
    status: str  # MLflow's: RUNNING, SCHEDULED, FINISHED, FAILED, KILLED
    start_time: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # each metric's latest value


@dataclass(frozen=True)
class MetricPoint:
    step: int
    timestamp: int  # ms since the epoch
    value: float


class StoreError(Exception):
    """The store refused a read; its message is one line."""


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
    refuse_folder(database, flag)
    if database is not None and str(database) != ":memory:" and absolute(database) != database:
        return f"sqlite:///{absolute(database)}"  # relative, or with .. in it: one URI a file
    return tracking_uri


def check_store(tracking_uri: str, flag: str = "--tracking-uri") -> None:
    """One query, so that a store MLflow cannot open is a one-line error before any work: a
    database driver not installed, a file that is no database, a folder, MLflow's retired
    file store. (A sqlite:/// file that does not exist yet is created, as MLflow would.)"""
    try:
        open_store(tracking_uri)._mlflow.search_experiments(max_results=1)
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


def store_label(tracking_uri: str) -> str:
    """A store as the console names it: a SQLite store by its file, any other by its URI."""
    database = sqlite_path(tracking_uri)
    return str(database) if database is not None else tracking_uri


def has_store(output_dir: Path) -> bool:
    return (output_dir / "mlflow.db").is_file()


@functools.cache
def open_store(tracking_uri: str) -> Tracker:
    """The process's one Tracker of the store at `tracking_uri` (MLflow creates a sqlite:///
    file that is not there yet: callers check with checked_store first)."""
    return Tracker(tracking_uri)


def log_folder(tracking_uri: str, run_id: str, folder: Path, artifact_path: str) -> str | None:
    """Log a folder's files as artifacts of a run: None, or the store's refusal as one line."""
    return open_store(tracking_uri).log_folder(run_id, folder, artifact_path)


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


def trial_state(status: str, tags: dict[str, str]) -> str:
    """A trial run's state from its MLflow status and its outcome tag."""
    if status == "FINISHED":
        return DIVERGED if tags.get("outcome") == DIVERGED else COMPLETED
    if status == "FAILED":  # KILLED: interrupted (Ctrl-C), so it runs again on resume
        return FAILED
    return RUNNING


class Tracker:
    """One MLflow store through one client: every read and write of a study's runs."""

    def __init__(self, tracking_uri: str) -> None:
        # MLflow announces creating and migrating a fresh SQLite store at INFO; the study's own
        # lines are the output, so only its warnings get through.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # Nor MLflow's "View run ... at: URL" lines for each run ended through a server.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = tracking_uri
        self._mlflow = stores.client(tracking_uri)  # a fresh SQLite file: made once, locked

    def ensure_experiment(self, name: str, folder: Path) -> str:
        """The study's experiment id, created if needed (on the driver, before any trial
        starts: a fresh SQLite file does not tolerate concurrent first use), its artifacts
        where stores.artifact_location says (`folder`: the command's --output)."""
        try:
            experiment = self._mlflow.get_experiment_by_name(name)
            if experiment is None:
                # The MLflow 3 UI opens an experiment of unknown kind in its GenAI (traces)
                # view; a study is model training, so say so: it lands on the runs.
                return self._mlflow.create_experiment(
                    name,
                    artifact_location=stores.artifact_location(self.uri, name, folder),
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            if experiment.lifecycle_stage == "deleted":
                # Not undeleted behind the user's back: they may have deleted it on purpose.
                raise ConfigError(
                    f"MLflow experiment {name} (id {experiment.experiment_id}) is deleted; "
                    f"restore it (`MLFLOW_TRACKING_URI={self.uri} mlflow experiments restore "
                    f"--experiment-id {experiment.experiment_id}`) or use another store"
                )
            return experiment.experiment_id
        except MlflowException as error:
            raise ConfigError(f"tracking URI {self.uri}: {one_line(error)}") from None

    def experiment_id(self, name: str) -> str | None:
        """The id of experiment `name`, None when there is none; StoreError if unreadable."""
        try:
            experiment = self._mlflow.get_experiment_by_name(name)
        except MlflowException as error:
            raise StoreError(one_line(error)) from None
        return experiment.experiment_id if experiment is not None else None

    def find_parent(self, name: str) -> RunRecord | None:
        """The study's parent run, or None when the study was never started in this store."""
        experiment_id = self.experiment_id(name)
        return self.newest_parent(experiment_id) if experiment_id is not None else None

    def newest_parent(self, experiment_id: str) -> RunRecord | None:
        """One parent per study by contract; should there be more (a study restarted from
        scratch), the newest."""
        return self._newest(experiment_id, f"tags.`study.kind` = '{PARENT}'")

    def start_parent(
        self, experiment_id: str, name: str, tags: dict[str, str], spec_yaml: str
    ) -> str:
        """Create the study's parent run with its tags and the resolved spec as spec.yaml."""
        run = self._mlflow.create_run(
            experiment_id, run_name=name, tags={"study.name": name, "study.kind": PARENT, **tags}
        )
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "spec.yaml"
            path.write_text(spec_yaml)
            self._mlflow.log_artifact(run.info.run_id, str(path))
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        self._mlflow.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str) -> None:
        self._mlflow.set_terminated(run_id, status=status)

    def trials(self, parent: RunRecord) -> list[RunRecord]:
        """Every active trial run under the parent run."""
        return self._search_all(
            parent.experiment_id,
            f"tags.`mlflow.parentRunId` = '{parent.run_id}' and tags.`study.kind` = '{TRIAL}'",
        )

    def find_trial(self, parent_run_id: str, trial_id: str) -> RunRecord | None:
        """A trial's run under the parent (the newest, should there be two)."""
        experiment_id = self._mlflow.get_run(parent_run_id).info.experiment_id
        return self._newest(
            experiment_id,
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
            f"and tags.`study.trial_id` = '{trial_id}'",
        )

    def history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every logged point of a metric, as the store returns them."""
        points = self._mlflow.get_metric_history(run_id, key)
        return [MetricPoint(m.step, m.timestamp, m.value) for m in points]

    def record_failure(
        self, context: StudyContext, trial_id: str, error: str, config: TrialConfig, tags: Tags
    ) -> None:
        """Mark a trial FAILED from the driver: its process died before it could say so itself.

        A run already FINISHED keeps its outcome: a packed trial can diverge before its pack
        fails.
        """
        run = self.find_trial(context.parent_run_id, trial_id)
        if run is None:
            run_id = self._create_trial_run(context, trial_id, config, tags)
        elif run.status == "FINISHED" or (run.status == "FAILED" and "error" in run.tags):
            return
        else:
            run_id = run.run_id
        self._mlflow.set_tag(run_id, "error", one_line(error))
        self._mlflow.set_terminated(run_id, status="FAILED")

    def summarize(self, name: str) -> StudySummary | None:
        """The study's trials as the store holds them; None when it has no such study."""
        parent = self.find_parent(name)
        if parent is None:
            return None
        trials = [
            TrialSummary(
                trial_id=run.tags.get("study.trial_id", run.name or run.run_id),
                state=trial_state(run.status, run.tags),
                method=run.params.get("method", "?"),
                p_detach=float(run.params.get("p_detach", "0")),
                params=dict(run.params),
                best_val_accuracy=run.metrics.get("best/val_accuracy", math.nan),
                error=run.tags.get("error", ""),
            )
            for run in self.trials(parent)
        ]
        trials.sort(key=lambda trial: trial.trial_id)
        n_trials = int(parent.tags.get("study.n_trials", len(trials)))
        return StudySummary(name, n_trials, trials)

    def experiment_names(self) -> list[str]:
        return [e.name for e in self._mlflow.search_experiments(view_type=ViewType.ACTIVE_ONLY)]

    def log_folder(self, run_id: str, folder: Path, artifact_path: str) -> str | None:
        """Log a folder's files as artifacts of a run: None, or the store's refusal as one line."""
        try:
            self._mlflow.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
        except (MlflowException, OSError) as error:
            return one_line(error)
        return None

    def _create_trial_run(
        self, context: StudyContext, trial_id: str, config: TrialConfig, extra_tags: Tags
    ) -> str:
        parent = self._mlflow.get_run(context.parent_run_id)
        tags = {
            "mlflow.parentRunId": context.parent_run_id,
            "study.name": context.name,
            "study.kind": TRIAL,
            "study.trial_id": trial_id,
            "task": config.task,
            "method": config.method,
            "seed": str(config.seed),
            **{f"role.{param}": role for param, role in context.roles.items()},
            **extra_tags,
        }
        run = self._mlflow.create_run(parent.info.experiment_id, run_name=trial_id, tags=tags)
        params = [Param(key, value) for key, value in flatten(config).items()]
        self._mlflow.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def _newest(self, experiment_id: str, filter_string: str) -> RunRecord | None:
        runs = self._mlflow.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time DESC"],
        )
        return _record(runs[0]) if runs else None

    def _search_all(self, experiment_id: str, filter_string: str) -> list[RunRecord]:
        """All active runs of an experiment matching the filter, following MLflow's pages."""
        runs, token = [], None
        while True:
            page = self._mlflow.search_runs(
                [experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                page_token=token,
            )
            runs.extend(_record(run) for run in page)
            token = page.token
            if not token:
                return runs


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        name=info.run_name or "",
        experiment_id=info.experiment_id,
        status=info.status,
        start_time=info.start_time or 0,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics=dict(data.metrics),
    )


class TrialRun:
    """A trial's child run, opened inside the trial process so its curve is live in the UI.

    A retried or resumed trial finds its own run (tag study.trial_id under the parent) and logs
    only the steps beyond the last one logged, so no run and no step is ever duplicated.
    """

    def __init__(
        self,
        tracker: Tracker,
        context: StudyContext,
        trial_id: str,
        config: TrialConfig,
        tags: Tags,
    ) -> None:
        self._mlflow = tracker._mlflow
        existing = tracker.find_trial(context.parent_run_id, trial_id)
        if existing is None:
            self.run_id = tracker._create_trial_run(context, trial_id, config, tags)
            self.last_step = -1
        else:
            self.run_id = existing.run_id
            self._mlflow.update_run(self.run_id, status="RUNNING")
            for key in ("error", "outcome"):
                if key in existing.tags:
                    self._mlflow.delete_tag(self.run_id, key)
            history = tracker.history(self.run_id, STEP_KEY)
            self.last_step = max((point.step for point in history), default=-1)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

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
            self._mlflow.set_tag(self.run_id, "nonfinite", f"iteration {iteration}: {values}")
        batch = [
            Metric(key, value if math.isfinite(value) else math.nan, now, iteration)
            for key, value in logged.items()
        ]
        self._mlflow.log_batch(self.run_id, metrics=batch)
        self.last_step = iteration

    def finish(self, outcome: str) -> None:
        self._mlflow.set_tag(self.run_id, "outcome", outcome)
        self._mlflow.set_terminated(self.run_id, status="FINISHED")

    def fail(self, error: BaseException | str) -> None:
        self._mlflow.set_tag(self.run_id, "error", one_line(error))
        self._mlflow.set_terminated(self.run_id, status="FAILED")


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


def list_studies(tracking_uri: str, flag: str = "--tracking-uri") -> list[StudySummary]:
    """Every experiment in the store that holds a study (a parent run), by name; none (and no
    database file created) where a sqlite:/// URI names no file."""
    tracking_uri, exists = checked_store(tracking_uri, flag)
    if not exists:
        return []
    tracker = open_store(tracking_uri)
    summaries = [tracker.summarize(name) for name in tracker.experiment_names()]
    return sorted((s for s in summaries if s is not None), key=lambda summary: summary.name)
