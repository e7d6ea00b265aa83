"""MLflow bookkeeping on a real SQLite store through its one tracker: params, child runs,
resumed steps, failures, summaries, and the checks of a store."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import socket
from pathlib import Path

import pytest
from conftest import tiny_copying, write_space
from mlflow import MlflowClient

from study import tracking
from study.config import TrialConfig
from study.errors import ConfigError, one_line
from study.pack_layout import KNOWN_GPUS, GpuModel
from study.space import make_plan
from study.spec import load_spec
from study.tracking import StudyContext, Tracker
from study.tracking.stores import driving
from study.tracking.tags import pack_gpu_from_tags, parent_tags, variants_from_tags

ROLES = {"method": "scientific", "lr": "nuisance", "seed": "replicate", "task_options.T": "fixed"}
PACK_TAGS = {"study.pack": "p0001", "study.pack_size": "2"}


@pytest.fixture
def store(tmp_path: Path) -> tuple[Tracker, StudyContext]:
    """A fresh embedded store with one study 'demo' of 3 planned trials: its tracker, and the
    context its trials carry."""
    tracker = tracking.open_store(tracking.store_uri(tmp_path))
    experiment = tracker.ensure_experiment("demo", tmp_path)
    parent = tracker.start_parent(experiment, "demo", {"study.n_trials": "3"}, "a: 1\n")
    context = StudyContext(
        name="demo",
        tracking_uri=tracker.uri,
        parent_run_id=parent,
        roles=ROLES,
        metric="val/accuracy",
        mode="max",
        cpus=1.0,
        task_options=("T",),
        trial_states=str(tmp_path / "trial_states"),
    )
    return tracker, context


def trial_run(store: tuple[Tracker, StudyContext], trial_id: str, **changes: object):
    tracker, context = store
    return tracking.TrialRun(tracker, context, trial_id, config(**changes), {})


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


def test_one_folder_named_two_ways_is_one_store(tmp_path: Path, monkeypatch) -> None:
    # `--output ../studies` from a subfolder is the store `--output studies` made: with `..`
    # kept in its URI, a report took it for another store, and its artifact location named
    # the subfolder, which a later command would make again.
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert tracking.store_uri(Path("../studies")) == tracking.store_uri(tmp_path / "studies")
    assert tracking.artifact_dir(Path("../studies")) == tmp_path / "studies" / "mlartifacts"
    named = f"sqlite:///{tmp_path}/sub/../studies/mlflow.db"
    assert tracking.check_uri(named) == f"sqlite:///{tmp_path}/studies/mlflow.db"
    assert tracking.check_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/sub/x.db"


def test_an_explicit_sqlite_store_keeps_its_artifacts_beside_it_not_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `study run --tracking-uri sqlite:///...` (and import, scorecard) from some other folder:
    # MLflow's own default root would be ./mlruns there, one more folder per place run from.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    database = tmp_path / "stores" / "team.db"
    database.parent.mkdir()
    tracker = tracking.open_store(f"sqlite:///{database}")
    parent = tracker.start_parent(
        tracker.ensure_experiment("demo", elsewhere), "demo", {}, "a: 1\n"
    )
    location = (tmp_path / "stores" / "mlartifacts" / "demo").as_uri()
    assert MlflowClient(tracker.uri).get_experiment_by_name("demo").artifact_location == location
    assert [path.name for path in (tmp_path / "stores").rglob("spec.yaml")] == ["spec.yaml"]
    assert MlflowClient(tracker.uri).list_artifacts(parent)[0].path == "spec.yaml"
    assert list(elsewhere.iterdir()) == []
    # A server keeps its own root (its --default-artifact-root or --artifacts-destination).
    assert tracking.stores.artifact_location("http://127.0.0.1:5000", "demo", tmp_path) is None


def test_a_database_without_a_folder_keeps_its_artifacts_in_the_output_folder(
    tmp_path: Path,
) -> None:
    # postgresql:// has no folder of its own; the command's --output holds the files.
    # (tests/test_team_stack.py runs a study so, on a real PostgreSQL.)
    uri = "postgresql+psycopg2://user@db/mlflow"
    expected = (tmp_path.absolute() / "mlartifacts" / "demo").as_uri()
    assert tracking.stores.artifact_location(uri, "demo", tmp_path) == expected
    for own_root in ("databricks", "https://mlflow.example.org", "file:///srv/mlruns"):
        assert tracking.stores.artifact_location(own_root, "demo", tmp_path) is None


def test_parent_run_has_tags_and_spec_artifact(store, tmp_path: Path) -> None:
    tracker, context = store
    parent_id = context.parent_run_id
    parent = tracker.find_parent("demo")
    assert parent is not None and parent.run_id == parent_id
    assert parent.name == "demo" and parent.status == "RUNNING"
    assert parent.tags["study.kind"] == "parent"
    assert parent.tags["study.name"] == "demo"
    client = MlflowClient(tracker.uri)
    assert [a.path for a in client.list_artifacts(parent_id)] == ["spec.yaml"]
    experiment = client.get_experiment_by_name("demo")
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "demo").as_uri()
    # Idempotent: the driver calls it again on resume.
    assert tracker.ensure_experiment("demo", tmp_path) == experiment.experiment_id
    assert tracker.experiment_id("demo") == experiment.experiment_id
    assert tracker.experiment_id("missing") is None and tracker.find_parent("missing") is None
    tracker.end(parent_id, "KILLED")
    assert tracker.find_parent("demo").status == "KILLED"
    tracker.reopen(parent_id)
    assert tracker.find_parent("demo").status == "RUNNING"


def test_one_tracker_per_store_and_a_context_that_travels(store) -> None:
    tracker, context = store
    assert tracking.open_store(tracker.uri) is tracker  # one client per store, not per call
    # The context goes into Ray with every trial's config as plain values (and from Tune's
    # JSON experiment state, its tuples come back as lists).
    assert pickle.loads(pickle.dumps(context)) == context
    plain = json.loads(json.dumps(context.to_dict()))
    assert StudyContext.from_dict(plain) == context
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.name = "other"  # type: ignore[misc]


def test_trial_run_resumes_without_duplicates(store) -> None:
    tracker, context = store
    uri, parent_id = tracker.uri, context.parent_run_id
    run = trial_run(store, "t0000")
    run.set_tags({"ray.node_id": "n1", "device.used": "cpu"})
    run.log(10, {"train/loss": 2.0, "val/accuracy": 0.1, "iteration": 10.0})
    run.log(20, {"train/loss": 1.5, "val/accuracy": 0.2})
    # The driver dies; the retried trial replays from an older checkpoint (step 10).
    again = trial_run(store, "t0000")
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
    assert (tags["ray.node_id"], tags["device.used"]) == ("n1", "cpu")
    assert finished.data.params["task_options.T"] == "5"
    history = client.get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 2.0), (20, 1.5), (30, 1.0)]
    points = tracker.history(run.run_id, "train/loss")
    assert sorted((p.step, p.value) for p in points) == [(10, 2.0), (20, 1.5), (30, 1.0)]
    assert all(p.timestamp > 0 for p in points)
    assert "iteration" not in finished.data.metrics  # only the study's metric names are logged


def test_a_diverged_point_is_logged_as_nan_with_the_values_in_a_tag(store) -> None:
    uri = store[0].uri
    run = trial_run(store, "t0002")
    run.log(10, {"train/loss": 2.0, "train/grad_norm": 1.0, "val/accuracy": 0.1})
    run.log(13, {"train/loss": math.inf, "train/grad_norm": math.nan})
    run.finish("diverged")
    client = MlflowClient(uri)
    losses = [m.value for m in client.get_metric_history(run.run_id, "train/loss")]
    assert losses[0] == 2.0 and math.isnan(losses[1])  # not MLflow's 1.8e308 for inf
    tags = client.get_run(run.run_id).data.tags
    assert tags["nonfinite"] == "iteration 13: train/loss=inf, train/grad_norm=nan"
    assert tags["outcome"] == "diverged"
    again = trial_run(store, "t0002")
    assert again.last_step == 13  # the diverged point still marks the trial's last step


def test_failed_trial_and_retry(store) -> None:
    tracker = store[0]
    uri = tracker.uri
    run = trial_run(store, "t0001")
    run.fail(ConfigError("task_options.data_dir: /nope lacks train-images\nmore detail"))
    client = MlflowClient(uri)
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert (
        failed.data.tags["error"] == "ConfigError: task_options.data_dir: /nope lacks train-images"
    )
    retry = trial_run(store, "t0001")
    assert retry.run_id == run.run_id
    reopened = client.get_run(run.run_id)
    assert reopened.info.status == "RUNNING" and "error" not in reopened.data.tags
    retry.finish("diverged")
    assert tracker.summarize("demo").trials[0].state == "diverged"


def test_record_failure_creates_or_marks_the_run(store) -> None:
    tracker, context = store
    parent_id = context.parent_run_id
    tracker.record_failure(context, "t0002", "ActorDiedError: worker died", config(), {})
    run = tracker.find_trial(parent_id, "t0002")
    assert run.status == "FAILED" and run.tags["error"] == "ActorDiedError: worker died"
    assert run.params["method"] == "h_detach"
    # A packed trial that diverged before its pack failed keeps its outcome; the others fail.
    diverged = tracking.TrialRun(tracker, context, "t0003", config(), PACK_TAGS)
    diverged.finish("diverged")
    for trial_id in ("t0003", "t0004"):
        tracker.record_failure(context, trial_id, "ActorDiedError: died", config(), PACK_TAGS)
    kept = tracker.find_trial(parent_id, "t0003")
    assert kept.status == "FINISHED" and kept.tags["outcome"] == "diverged"
    created = tracker.find_trial(parent_id, "t0004")
    assert created.status == "FAILED"
    for run_ in (kept, created):
        assert run_.tags["study.pack"] == "p0001"
        assert run_.tags["study.pack_size"] == "2"
    assert tracker.find_trial(parent_id, "t0009") is None


def test_summary_and_list_count_pending(store, tmp_path: Path) -> None:
    tracker = store[0]
    uri = tracker.uri
    done = trial_run(store, "t0000")
    done.log(10, {"train/loss": 1.0, "best/val_accuracy": 0.75})
    done.finish("completed")
    trial_run(store, "t0001", seed=1)  # interrupted
    summary = tracker.summarize("demo")
    assert summary is not None and summary.n_trials == 3
    assert [t.state for t in summary.trials] == ["completed", "running"]
    assert summary.trials[0].best_val_accuracy == 0.75
    assert (summary.count("completed"), summary.count("failed"), summary.pending) == (1, 0, 2)
    # An experiment without a parent run is not a study.
    tracker.ensure_experiment("not-a-study", tmp_path)
    assert [s.name for s in tracking.list_studies(uri)] == ["demo"]
    assert tracker.summarize("missing") is None
    parent = tracker.find_parent("demo")
    records = sorted(tracker.trials(parent), key=lambda run: run.name)
    assert [(run.name, run.status) for run in records] == [
        ("t0000", "FINISHED"),
        ("t0001", "RUNNING"),
    ]
    assert records[0].metrics["best/val_accuracy"] == 0.75
    assert records[0].experiment_id == parent.experiment_id


def test_one_line() -> None:
    # What the trial runs' error tags hold (study.errors.one_line).
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line("  boom \n trace") == "boom"


def test_log_folder_logs_files_or_says_why_not(store, tmp_path: Path) -> None:
    uri, parent = store[0].uri, store[1].parent_run_id
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


def test_a_sqlite_uri_naming_a_folder_is_one_line_at_once(tmp_path: Path) -> None:
    # Before, MLflow retried for two minutes, then raised with a traceback.
    (tmp_path / "mlflow.db").mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError) as named:
        tracking.check_uri(uri, "--tracking-uri")
    assert str(named.value) == (
        f"--tracking-uri: {tmp_path}/mlflow.db is a folder, not a SQLite database file; use "
        f"sqlite:///{tmp_path}/mlflow.db/mlflow.db for a store in it"
    )
    with pytest.raises(ConfigError) as output:
        tracking.check_uri(tracking.store_uri(tmp_path), f"--output {tmp_path}")
    assert str(output.value).endswith("the store is a file of that name: move the folder away")


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
    MlflowClient(existing).search_experiments()  # MLflow makes the database
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


def test_a_study_experiment_opens_on_its_runs_in_the_mlflow_ui(store) -> None:
    # MLflow 3's UI shows an experiment of unknown kind in its GenAI (traces) view.
    tracker, context = store
    experiment = MlflowClient(tracking_uri=tracker.uri).get_experiment_by_name("demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_deleted_experiment_is_refused_in_one_line_not_written_into(
    store, tmp_path: Path
) -> None:
    tracker, _ = store
    experiment_id = tracker.ensure_experiment("demo", tmp_path)
    MlflowClient(tracking_uri=tracker.uri).delete_experiment(experiment_id)
    with pytest.raises(ConfigError) as error:
        tracker.ensure_experiment("demo", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert f"experiment demo (id {experiment_id})" in message
    assert f"restore --experiment-id {experiment_id}" in message


def auto_packed_spec(tmp_path: Path, pack: object = "auto"):
    """tiny_copying's 4 trials with `resources.pack: PACK`, on `device: auto` (auto leaves a
    trial pinned to the CPU in a pack of its own)."""
    body = tiny_copying(fixed={"device": "auto"}, resources={"pack": pack})
    return load_spec(write_space(tmp_path, "auto_packed", body))


def test_the_gpu_that_sized_auto_packs_travels_in_the_parent_runs_tags(
    tmp_path: Path,
) -> None:
    h200 = KNOWN_GPUS["h200"]
    plan = make_plan(auto_packed_spec(tmp_path), h200)
    tags = parent_tags(plan)
    # Hidden 8, batch 10: one program a trial, so an H200's 132 SMs hold 132 of them.
    assert tags["study.pack_auto"] == "132" == str(plan.pack_size)
    assert json.loads(tags["study.pack_gpu"]) == {"key": "h200", "name": h200.name, "sms": 132}
    # Through a real store, as `study resume` reads them back.
    tracker = tracking.open_store(tracking.store_uri(tmp_path))
    experiment = tracker.ensure_experiment("auto_packed", tmp_path)
    tracker.start_parent(experiment, "auto_packed", tags, plan.spec.to_yaml())
    stored = tracker.find_parent("auto_packed").tags
    assert pack_gpu_from_tags(stored) == h200
    assert make_plan(plan.spec, pack_gpu_from_tags(stored)).packs == plan.packs
    # A local device that is no known GPU (an H100 PCIe's 114 SMs) comes back as it was.
    local = GpuModel("local", "NVIDIA H100 PCIe", 114)
    assert pack_gpu_from_tags(parent_tags(make_plan(plan.spec, local))) == local


def test_the_plans_methods_travel_in_the_parent_runs_tags() -> None:
    """So that the report names a method none of whose trials has started."""
    tags = parent_tags(make_plan(load_spec("search_spaces/quick.yaml")))
    assert json.loads(tags["study.variants"]) == [["h_detach", 0.25], ["none", 0.0]]
    assert variants_from_tags(tags) == (("h_detach", 0.25), ("none", 0.0))
    assert variants_from_tags({}) == ()  # an Optuna study's, or one from before the tag


def test_no_pack_gpu_tag_without_auto_or_without_a_gpu(tmp_path: Path) -> None:
    h200 = KNOWN_GPUS["h200"]
    fixed = parent_tags(make_plan(auto_packed_spec(tmp_path, pack=2), h200))
    assert "study.pack_gpu" not in fixed and "study.pack_auto" not in fixed
    assert pack_gpu_from_tags(fixed) is None
    # Auto without a GPU: packs of 1, recorded as such, and no GPU to plan for again.
    no_gpu = parent_tags(make_plan(auto_packed_spec(tmp_path)))
    assert no_gpu["study.pack_auto"] == "1" and "study.pack_gpu" not in no_gpu
    assert pack_gpu_from_tags(no_gpu) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "Expecting value"),
        ('{"key": "h200", "name": "NVIDIA H200", "sms": 0}', "not a GPU record"),
        ('{"key": "h200", "name": "NVIDIA H200"}', "not a GPU record"),
        ('["h200"]', "not a GPU record"),
    ],
)
def test_a_damaged_pack_gpu_tag_is_a_one_line_error(text: str, message: str) -> None:
    # A value that is no GPU record is refused (resume and import say so in one line), never
    # read as another GPU, which would plan other packs than the study ran.
    with pytest.raises(ConfigError, match=f"parent run tag study.pack_gpu: .*{message}"):
        pack_gpu_from_tags({"study.pack_gpu": text})


def test_a_second_driver_of_a_study_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    folder = tmp_path / "ray" / "kept"
    with driving(folder, "kept"):
        with pytest.raises(ConfigError) as raised, driving(folder, "kept"):
            pass
        assert str(raised.value) == (
            f"study kept is running now (driver pid {os.getpid()}, lock {folder}/driver.lock): "
            "stop it first (Ctrl-C, or kill PID), or wait for it to end"
        )
    with driving(folder, "kept"):  # released with the first driver's block
        pass
