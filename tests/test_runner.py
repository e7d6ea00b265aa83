"""Studies on real Ray (2 CPUs) and real MLflow: end to end, failure, Optuna, server, resume."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FASHION_MNIST, free_port, tiny_copying, write_space
from mlflow import MlflowClient
from ray.tune.experiment import Trial

from study import runner, space, tracking
from study.config import ConfigError, TrialConfig
from study.spec import StudySpec, load_spec
from study.train import train

LINE = r"^\[\d+/{total}\] t\d{{4}} .+: (completed|diverged|failed)"
STUDY = str(Path(sys.executable).parent / "study")


def without_ray_address() -> dict[str, str]:
    """The environment for a `study` subprocess: its own local Ray, whatever the shell says."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run(spec: StudySpec, output: Path, **options: object) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = runner.run_study(spec, output, echo=lines.append, **options)
    return code, lines


def children(uri: str, name: str) -> dict[str, object]:
    """The study's child runs by trial id (asserting there is one run per trial id)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`study.kind` = 'trial'")
    by_id = {run.data.tags["study.trial_id"]: run for run in runs}
    assert len(by_id) == len(runs), "a trial has more than one MLflow run"
    return dict(sorted(by_id.items()))


def steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def solo_curve(config: TrialConfig) -> list[dict[str, float]]:
    """The trial's curve from train() alone, on one thread as in its Ray trial."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config).curve
    finally:
        torch.set_num_threads(threads)


def as_logged(value: float) -> float | str:
    """A curve's value as the study logs it: non-finite ones as NaN (comparable here as text)."""
    return value if math.isfinite(value) else "nan"


def logged_curve(uri: str, run_id: str, key: str) -> list[tuple[int, float | str]]:
    history = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, as_logged(m.value)) for m in history)


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path: Path) -> None:
    # As the paper's spaces: a GPU per trial where Ray has one (none here), trained on it.
    auto = tiny_copying(resources={"gpus": "auto"}, fixed={"device": "auto"})
    spec = load_spec(write_space(tmp_path, "smoke4", auto))
    output = tmp_path / "out"
    code, lines = run(spec, output)
    assert code == 0, lines
    assert "resources.gpus: auto -> 0 per trial (GPUs in Ray: 0)" in lines

    uri = tracking.store_uri(output)
    client = MlflowClient(uri)
    parent = tracking.find_parent(uri, "smoke4")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "smoke4"
    tags = parent.data.tags
    assert tags["study.n_trials"] == "4" and tags["study.target"] == "0.99"
    assert tags["study.spec_hash"] == spec.spec_hash() and tags["study.version"]
    assert "study.git_commit" in tags  # the tests run in a git checkout
    spec_file = client.download_artifacts(parent.info.run_id, "spec.yaml", str(tmp_path))
    assert Path(spec_file).read_text() == spec.to_yaml()
    assert client.get_experiment_by_name("smoke4").artifact_location.endswith("mlartifacts/smoke4")

    planned = {t.trial_id: t.config for t in space.plan_trials(spec)}
    runs = children(uri, "smoke4")
    assert list(runs) == list(planned) == ["t0000", "t0001", "t0002", "t0003"]
    for trial_id, run_ in runs.items():
        assert run_.info.run_name == trial_id
        assert run_.info.status == "FINISHED" and run_.data.tags["outcome"] == "completed"
        assert run_.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run_.data.tags["role.method"] == "scientific"
        assert run_.data.tags["device.used"] == "cpu"
        assert run_.data.params == tracking.flatten(planned[trial_id])
        for key in ("train/loss", "train/grad_norm", "val/loss", "val/accuracy"):
            assert steps(uri, run_.info.run_id, key) == [10, 20], key
        assert "test/accuracy" not in run_.data.metrics  # copying has no test split

    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 4
    assert all(re.match(LINE.format(total=4), line) for line in progress)
    assert any(line.startswith("smoke4: 4 trials: 4 completed") for line in lines)
    assert lines[-1] == f"MLflow UI: study ui --output {output.absolute()}"
    assert (output / "ray" / "smoke4" / runner.STATE_FILE).is_file()
    assert (output / "ray" / "smoke4" / "t0000").is_dir()

    with pytest.raises(ConfigError, match="already exists.*study resume smoke4"):
        run(spec, output)
    changed = load_spec(write_space(tmp_path, "smoke4", {**auto, "fixed": {"lr": 0.02}}))
    with pytest.raises(ConfigError, match="from a different search space; run this one into"):
        run(changed, output)
    # Another store into the same output: this folder's Ray state (its trials' saved states)
    # belongs to the first study and must neither pass for the new one's nor be repointed.
    state_file = output / "ray" / "smoke4" / runner.STATE_FILE
    before = state_file.read_text()
    other = tmp_path / "other.db"
    with pytest.raises(ConfigError, match=r"ray/smoke4 holds the Ray state of an earlier run"):
        run(spec, output, tracking_uri=f"sqlite:///{other}")
    assert state_file.read_text() == before and not other.exists()

    # Resume without Tune's snapshot (a driver killed in its first moments): the trials MLflow
    # does not hold as finished run again, each in its own run, no step logged twice.
    for snapshot in (output / "ray" / "smoke4").glob("experiment_state-*.json"):
        snapshot.unlink()
    tracking.reopen_run(uri, runs["t0003"].info.run_id)
    lines.clear()
    assert runner.resume_study("smoke4", output, echo=lines.append) == 0
    assert [line[:11] for line in lines if line.startswith("[")] == ["[4/4] t0003"]
    again = children(uri, "smoke4")
    assert list(again) == list(runs)
    assert again["t0003"].info.status == "FINISHED"
    assert steps(uri, again["t0003"].info.run_id, "val/accuracy") == [10, 20]
    assert tracking.find_parent(uri, "smoke4").info.status == "FINISHED"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resources": {"gpus": 1}}, r"resources.gpus: 1 per trial, but Ray has 0 GPU\(s\)"),
        ({"fixed": {"device": "cuda"}}, r"device: cuda needs resources.gpus >= 1"),
        (
            {"fixed": {"device": "cuda"}, "resources": {"gpus": "auto"}},
            r"device: cuda needs a GPU, but resources.gpus: auto found none in Ray",
        ),
    ],
)
def test_gpu_requests_ray_cannot_meet_stop_before_the_study_starts(
    tmp_path: Path, ray_cluster, changes: dict, message: str
) -> None:
    """Tune would keep such trials pending for ever, saying so only in Ray's log."""
    import ray

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray has a GPU, which such trials would get")
    spec = load_spec(write_space(tmp_path, "gpu", tiny_copying(**changes)))
    with pytest.raises(ConfigError, match=message):
        run(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no MLflow run, no Ray state to refuse a rerun


def test_on_a_cluster_missing_gpus_are_waited_for_and_said(tmp_path: Path, ray_cluster) -> None:
    """An autoscaler may still add GPU nodes to a cluster: say so, do not refuse."""
    import ray

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray has a GPU")
    spec = load_spec(write_space(tmp_path, "gpu", tiny_copying(resources={"gpus": 1})))
    lines: list[str] = []
    runner._check_gpus(spec, "head:6379", lines.append)  # as after `--address head:6379`
    assert lines == [
        "resources.gpus: 1 per trial, but Ray has 0 GPU(s): trials wait for a GPU node"
    ]


def test_an_address_nobody_answers_at_is_one_line_at_once() -> None:
    closed = free_port()  # nothing listens there
    with pytest.raises(ConfigError, match=rf"--address 127.0.0.1:{closed}: cannot connect"):
        runner._check_ray_address(f"127.0.0.1:{closed}")
    runner._check_ray_address("auto")  # Ray's own forms are Ray's to resolve
    with pytest.raises(ConfigError, match=r"^--address: empty; expected HOST:PORT of a Ray head"):
        runner._check_ray_address(" ")


def test_an_address_from_ray_address_is_named_so(tmp_path: Path) -> None:
    closed = free_port()
    path = write_space(tmp_path, "env", tiny_copying())
    ran = subprocess.run(
        [STUDY, "run", str(path), "--output", str(tmp_path / "out")],
        env={**without_ray_address(), "RAY_ADDRESS": f"127.0.0.1:{closed}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 2
    assert ran.stderr.startswith(f"study run: error: RAY_ADDRESS 127.0.0.1:{closed}: cannot ")
    assert ran.stderr.count("\n") == 1


def not_idx_files(folder: Path) -> Path:
    """A data_dir whose four files are there (a study starts) but unreadable (its trials fail)."""
    folder.mkdir()
    for name in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        kind = "idx3" if name.endswith("images") else "idx1"
        (folder / f"{name}-{kind}-ubyte").write_text("not an IDX file\n")
    return folder


@pytest.mark.slow
def test_failing_trial_is_recorded_while_others_complete(tmp_path: Path) -> None:
    corrupt = not_idx_files(tmp_path / "corrupt")
    body = {
        "task": {"name": "pixel_mnist", "dataset": "fashion_mnist", "subset": 20},
        "model": {"hidden_size": 4},
        "fixed": {"iterations": 2, "eval_every": 1, "batch_size": 10},
        # One grid point reads files that are no IDX files: train() raises ConfigError. (A
        # missing folder is refused before the study starts.)
        "scientific": {"data_dir": [str(FASHION_MNIST), str(corrupt)]},
        "resources": {"cpus": 1, "max_concurrent": 2, "max_failures": 1},
    }
    spec = load_spec(write_space(tmp_path, "failing", body))
    code, lines = run(spec, tmp_path / "out")
    assert code == 1

    uri = tracking.store_uri(tmp_path / "out")
    runs = children(uri, "failing")
    assert list(runs) == ["t0000", "t0001"]  # the retry reused its run
    good, bad = runs["t0000"], runs["t0001"]
    assert good.info.status == "FINISHED" and good.data.tags["outcome"] == "completed"
    assert steps(uri, good.info.run_id, "test/accuracy") == [1, 2]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["error"].startswith("ConfigError: task_options.data_dir:")
    assert "\n" not in bad.data.tags["error"]
    assert tracking.find_parent(uri, "failing").info.status == "FAILED"
    assert any("t0001" in line and "retrying" in line for line in lines), lines
    # Either trial may finish first: the failing one does not wait for the data to load.
    failed = r"\[[12]/2\] t0001 .*: failed: ConfigError: task_options.data_dir: "
    assert any(re.match(failed, line) for line in lines), lines
    assert any("failed t0001: ConfigError" in line for line in lines)


@pytest.mark.slow
def test_optuna_tunes_nuisance_inside_each_cell(tmp_path: Path) -> None:
    body = tiny_copying(
        nuisance={"lr": {"min": 1.0e-3, "max": 3.0e-2, "scaling": "log"}},
        replicates={"seeds": 1},
        search={"searcher": "optuna", "samples_per_cell": 2, "seed": 3},
    )
    spec = load_spec(write_space(tmp_path, "tuned", body))
    code, lines = run(spec, tmp_path / "out")
    assert code == 0, lines
    # Optuna's INFO lines ("A new study created in memory ...") would sit between our trial
    # lines; its handler keeps the stderr of its import, so check its level, not the output.
    assert not logging.getLogger("optuna").isEnabledFor(logging.INFO)

    uri = tracking.store_uri(tmp_path / "out")
    runs = children(uri, "tuned")
    assert list(runs) == ["t0000", "t0001", "t0002", "t0003"]
    assert [runs[t].data.params["method"] for t in runs] == [
        "none",
        "none",
        "h_detach",
        "h_detach",
    ]
    for run_ in runs.values():
        assert 1.0e-3 <= float(run_.data.params["lr"]) <= 3.0e-2
        assert run_.data.tags["role.lr"] == "nuisance"
        assert run_.info.status == "FINISHED"
    assert runs["t0000"].data.params["lr"] != runs["t0001"].data.params["lr"]
    assert tracking.find_parent(uri, "tuned").data.tags["study.n_trials"] == "4"
    assert sorted(p.name for p in (tmp_path / "out" / "ray" / "tuned").glob("cell*")) == [
        "cell000",
        "cell001",
    ]


@pytest.mark.slow
def test_logs_to_an_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    # Plain SGD at lr 1e36 overflows within a few steps: a diverged trial, which is an outcome.
    body = tiny_copying(
        fixed={"optimizer": "sgd", "clip_norm": None},
        scientific={"lr": [1.0e-2, 1.0e36]},
        replicates={"seeds": 1},
    )
    body["scientific"] = {"lr": [1.0e-2, 1.0e36]}
    path = write_space(tmp_path, "served", body)
    ran = subprocess.run(
        [
            STUDY,
            "run",
            str(path),
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            mlflow_server,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=without_ray_address(),
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "NaN or Inf" not in ran.stdout + ran.stderr  # divergence is reported as an outcome
    lines = ran.stdout.splitlines()
    assert not (tmp_path / "out" / "mlflow.db").exists()
    runs = children(mlflow_server, "served")
    assert list(runs) == ["t0000", "t0001"]
    completed, diverged = runs["t0000"], runs["t0001"]
    assert completed.data.tags["outcome"] == "completed"
    assert steps(mlflow_server, completed.info.run_id, "val/accuracy") == [10, 20]
    assert diverged.info.status == "FINISHED" and diverged.data.tags["outcome"] == "diverged"
    # One point, at the step that overflowed, before the first evaluation (iteration 10).
    (diverged_at,) = steps(mlflow_server, diverged.info.run_id, "train/loss")
    assert diverged_at < 10
    assert any("t0001 lr=1e+36 seed=0: diverged" in line for line in lines)
    parent = tracking.find_parent(mlflow_server, "served")
    assert parent.info.status == "FINISHED"
    artifacts = MlflowClient(mlflow_server).list_artifacts(parent.info.run_id)
    assert [a.path for a in artifacts] == ["spec.yaml"]
    assert lines[-1] == f"MLflow UI: open {mlflow_server} in a browser"
    # `study resume` finds the server again from the study's state file.
    assert runner.StudyState.load(tmp_path / "out", "served").tracking_uri == mlflow_server


def _session_processes(session: int) -> list[int]:
    """Processes of the session whose leader we started (the driver, Ray's daemons, workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # field 6 of stat: session id
            found.append(int(entry.name))
    return found


def _kill_session(session: int) -> None:
    """SIGKILL every process of the session at once, again until none is left.

    Killing only the driver's process group is not enough: Ray's workers sit in other groups of
    the same session and would go on training (and logging) while the driver is reaped.
    """
    deadline = time.monotonic() + 30
    while (alive := _session_processes(session)) and time.monotonic() < deadline:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert not _session_processes(session), "Ray processes outlived the killed driver"


def running_with_steps(uri: str, name: str, at_least: int, at_most: int) -> str | None:
    """A trial whose run is RUNNING with `at_least`..`at_most` evaluations logged, if any.

    The upper bound keeps a trial that is about to finish from being picked: on a fast machine
    it could complete between the poll and the kill.
    """
    for trial_id, run_ in children(uri, name).items():
        if run_.info.status != "RUNNING":
            continue
        if at_least <= len(steps(uri, run_.info.run_id, "train/loss")) <= at_most:
            return trial_id
    return None


def kill_driver_when(
    path: Path, output: Path, env: dict[str, str], ready: Callable[[], str | None]
) -> str:
    """Run `study run PATH` and SIGKILL its whole session once `ready()` names a trial."""
    log_path = output.parent / "run.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    driver = subprocess.Popen(
        [STUDY, "run", str(path), "--output", str(output)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own session: every process it starts can be found
    )
    found = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            # The state file is written once the driver has created the store: reading a
            # fresh SQLite file while MLflow migrates it would break the migration.
            if not (output / "ray" / path.stem / runner.STATE_FILE).exists():
                continue
            found = ready()
            if found is not None:
                break
        assert found is not None, log_path.read_text()
    finally:
        _kill_session(driver.pid)  # the driver leads the session: it goes with the rest
        driver.wait()
        log.close()
    return found


def resume_to_completion(name: str, trials: int, output: Path, env: dict[str, str]) -> None:
    """`study resume NAME` after a kill: it must finish every trial."""
    resumed = subprocess.run(
        [STUDY, "resume", name, "--output", str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {name}: {trials} trials" in resumed.stdout
    assert f"{name}: {trials} trials: {trials} completed" in resumed.stdout
    assert ": running, " not in resumed.stdout  # no trial of an earlier session printed again


def test_a_data_dir_missing_here_stops_a_local_study_before_it_starts(tmp_path: Path) -> None:
    body = {
        "task": {"name": "pixel_mnist", "subset": 20},
        "fixed": {"iterations": 2, "eval_every": 1, "batch_size": 10},
        "scientific": {"data_dir": [str(FASHION_MNIST), str(tmp_path / "fashion-mnst")]},
    }
    path = write_space(tmp_path, "typo", body)
    with pytest.raises(ConfigError) as raised:
        runner.run_study(load_spec(path), tmp_path / "out", echo=lambda line: None)
    assert str(raised.value) == (
        f"{path}: task_options.data_dir: {tmp_path}/fashion-mnst is no folder; point data_dir at "
        "a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz), or set download=true to "
        "fetch them"
    )
    assert not (tmp_path / "out").exists()  # nothing made: fixing the file and rerunning works


def _saved_state(output: Path, tracking_uri: str | None = None) -> runner.StudyState:
    spec = load_spec(write_space(output.parent, "kept", tiny_copying()))
    uri = tracking_uri or tracking.store_uri(output)
    state = runner.StudyState(spec, output.absolute(), uri, "parent-run-id")
    state.save()
    return state


def test_a_study_folder_copied_or_moved_is_not_resumed_into_the_old_store(tmp_path: Path) -> None:
    _saved_state(tmp_path / "first")
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    with pytest.raises(ConfigError) as raised:
        runner.StudyState.load(tmp_path / "copy", "kept")
    assert str(raised.value) == (
        f"study kept: its MLflow store {tmp_path}/first/mlflow.db belongs to {tmp_path}/first, "
        f"not {tmp_path}/copy (MLflow keeps absolute paths); resume it with --output "
        f"{tmp_path}/first, moving the folder back first if it was moved"
    )
    assert runner.StudyState.load(tmp_path / "first", "kept").parent_run_id == "parent-run-id"
    # A study logged to another store (a server, another SQLite file) may move freely.
    _saved_state(tmp_path / "served", "http://127.0.0.1:5000")
    shutil.move(tmp_path / "served", tmp_path / "moved")
    assert runner.StudyState.load(tmp_path / "moved", "kept").output == tmp_path / "moved"


@pytest.mark.parametrize("record", ['{"name": ', "{}", "[1, 2]"])
def test_an_unreadable_study_record_is_one_line(tmp_path: Path, record: str) -> None:
    _saved_state(tmp_path / "out")
    path = tmp_path / "out" / "ray" / "kept" / runner.STATE_FILE
    path.write_text(record)
    with pytest.raises(ConfigError) as raised:
        runner.StudyState.load(tmp_path / "out", "kept")
    assert str(raised.value).startswith(f"{path}: not a readable study record (")
    assert "\n" not in str(raised.value)


def test_resume_says_at_once_when_the_studys_server_is_down(tmp_path: Path) -> None:
    port = free_port()
    _saved_state(tmp_path / "out", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"^study kept's tracking URI http://127.0.0.1:{port}: "):
        runner.resume_study("kept", tmp_path / "out")
    assert time.monotonic() - started < 30  # MLflow's own retries take minutes


def test_a_trial_finished_in_an_earlier_session_is_not_printed_again() -> None:
    # After a killed driver, Tune's snapshot can predate t0000's completion: on resume Tune runs
    # it again, it returns at once, and Tune ends it with the snapshot's last result (running).
    printed: list[str] = []
    before = {"t0000", "t0001"}
    reporter = runner._Reporter(None, 4, before, before, printed.append)  # type: ignore[arg-type]
    results = {
        "t0000": {"outcome": "running", "best/val_accuracy": 0.139, "time_total_s": 9.0},
        "t0002": {"outcome": "completed", "best/val_accuracy": 0.186, "time_total_s": 12.0},
    }
    for trial_id, result in results.items():
        trial = Trial(
            "__fake",
            config={"trial": {"point": {"method": "none", "seed": 0}}},
            trial_id=trial_id,
            stub=True,
            trial_name_creator=lambda trial: trial.trial_id,
        )
        trial.run_metadata.last_result = result
        reporter.lines(trial)
    assert printed == ["[3/4] t0002 none seed=0: completed, best val/accuracy 0.186 (12 s)"]


@pytest.mark.slow
def test_resume_after_sigkill_of_the_driver(tmp_path: Path) -> None:
    # A wider model and batch than tiny_copying's: a trial must outlast the poll that finds it
    # midway and the kill that follows.
    body = tiny_copying(
        model={"hidden_size": 64},
        fixed={"iterations": 800, "eval_every": 40, "batch_size": 50},
        resources={"max_failures": 0},
    )
    path = write_space(tmp_path, "killed", body)
    output = tmp_path / "out"
    env = without_ray_address()
    uri = tracking.store_uri(output)

    def one_completed_one_midway() -> str | None:
        summary = tracking.summarize(uri, "killed")
        if summary is None or not summary.count("completed"):
            return None
        return running_with_steps(uri, "killed", 5, 12)

    midway = kill_driver_when(path, output, env, one_completed_one_midway)
    before = children(uri, "killed")
    assert before[midway].info.status == "RUNNING"
    logged_before = steps(uri, before[midway].info.run_id, "train/loss")
    assert 0 < len(logged_before) < 20

    resume_to_completion("killed", 4, output, env)

    runs = children(uri, "killed")
    assert list(runs) == [f"t{i:04d}" for i in range(4)]
    expected_steps = list(range(40, 801, 40))
    for run_ in runs.values():
        assert run_.info.status == "FINISHED"
        for key in ("train/loss", "val/accuracy", "best/val_accuracy"):
            assert steps(uri, run_.info.run_id, key) == expected_steps, (run_.info.run_name, key)

    # Tune restarted the interrupted trial, which continued from its saved state (its first
    # report after the restart is past the first evaluation) on the uninterrupted curve
    results = (output / "ray" / "killed" / midway / "result.json").read_text().splitlines()
    rows = [json.loads(line) for line in results]
    # (Tune starts the restarted trial's result.json afresh.)
    first = next(row for row in rows if row["training_iteration"] == 1)
    assert first["iteration"] > 40, [row["iteration"] for row in rows]
    config = next(t.config for t in space.plan_trials(load_spec(path)) if t.trial_id == midway)
    reference = solo_curve(config)
    history = MlflowClient(uri).get_metric_history(runs[midway].info.run_id, "val/accuracy")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert logged == [point["val/accuracy"] for point in reference]
    losses = MlflowClient(uri).get_metric_history(runs[midway].info.run_id, "train/loss")
    logged_loss = [m.value for m in sorted(losses, key=lambda m: m.step)]
    assert logged_loss == pytest.approx([p["train/loss"] for p in reference], rel=1e-6)


@pytest.mark.slow
def test_sigterm_stops_a_study_as_ctrl_c_does(tmp_path: Path) -> None:
    body = tiny_copying(
        model={"hidden_size": 64}, fixed={"iterations": 800, "eval_every": 40, "batch_size": 50}
    )
    path = write_space(tmp_path, "termed", body)
    output = tmp_path / "out"
    uri = tracking.store_uri(output)
    env = without_ray_address()
    driver = subprocess.Popen(
        [STUDY, "run", str(path), "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            if (output / "ray" / "termed" / runner.STATE_FILE).exists() and running_with_steps(
                uri, "termed", 2, 12
            ):
                break
        driver.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` or a scheduler
        out, _ = driver.communicate(timeout=120)
    finally:
        _kill_session(driver.pid)
    assert driver.returncode == 130, out
    assert "SIGTERM" not in out and "Traceback" not in out
    assert f"unfinished; continue with: study resume termed --output {output}" in out
    assert tracking.find_parent(uri, "termed").info.status == "KILLED"
    resume_to_completion("termed", 4, output, env)


@pytest.mark.slow
def test_packed_study_trains_each_member_as_its_solo_run(tmp_path: Path, ray_cluster) -> None:
    # Adam at lr 1e36 overflows at the second step: t0001 diverges inside p0000 while its two
    # pack mates train on; p0001 holds t0003 alone, which diverges too.
    body = tiny_copying(
        fixed={"iterations": 40, "clip_norm": None},
        nuisance={"lr": [1.0e-2, 1.0e36]},
        replicates={"seeds": 1},
        resources={"pack": 3},
    )
    spec = load_spec(write_space(tmp_path, "packed", body))
    assert [[t.trial_id for t in p.trials] for p in space.plan_packs(spec)] == [
        ["t0000", "t0001", "t0002"],
        ["t0003"],
    ]
    output = tmp_path / "out"
    code, lines = run(spec, output)
    assert code == 0, lines
    assert lines[0].startswith(
        "running packed: 4 trials (0 finished), grid search, 2 packs of <= 3"
    )

    uri = tracking.store_uri(output)
    planned = {t.trial_id: t.config for t in space.plan_trials(spec)}
    runs = children(uri, "packed")
    assert list(runs) == list(planned)
    packs = {"t0000": "p0000", "t0001": "p0000", "t0002": "p0000", "t0003": "p0001"}
    for trial_id, run_ in runs.items():
        tags = run_.data.tags
        assert run_.data.params == tracking.flatten(planned[trial_id])
        assert run_.info.status == "FINISHED" and run_.info.run_name == trial_id
        assert tags["study.pack"] == packs[trial_id]
        assert tags["study.pack_size"] == ("3" if packs[trial_id] == "p0000" else "1")
        assert tags["role.lr"] == "nuisance" and tags["role.method"] == "scientific"
        reference = solo_curve(planned[trial_id])
        for key in ("train/loss", "train/grad_norm", "val/loss", "val/accuracy"):
            expected = [(p["iteration"], as_logged(p[key])) for p in reference if key in p]
            assert logged_curve(uri, run_.info.run_id, key) == expected, (trial_id, key)
    outcomes = {t: r.data.tags["outcome"] for t, r in runs.items()}
    assert outcomes == {
        "t0000": "completed",
        "t0001": "diverged",
        "t0002": "completed",
        "t0003": "diverged",
    }
    assert steps(uri, runs["t0001"].info.run_id, "train/loss") == [2]
    assert steps(uri, runs["t0002"].info.run_id, "val/accuracy") == [10, 20, 30, 40]

    # One Ray trial per pack; Tune's last result holds each member's outcome and metrics.
    experiment = output / "ray" / "packed"
    ray_trials = {p.name for p in experiment.iterdir() if p.is_dir()} - {runner.TRIAL_STATES}
    assert sorted(ray_trials) == ["p0000", "p0001"]
    states = sorted(p.name for p in (experiment / runner.TRIAL_STATES).iterdir())
    assert states == ["p0000.pt", "p0001.pt"]  # one saved state per Ray trial, no leftovers
    last = json.loads((experiment / "p0000" / "result.json").read_text().splitlines()[-1])
    assert (last["outcome"], last["iteration"]) == ("completed", 40)
    assert last["t0001/outcome"] == "diverged" and last["t0002/outcome"] == "completed"
    best = max(last["t0000/val/accuracy"], last["t0002/val/accuracy"])
    assert last["val/accuracy"] == best
    progress = [line for line in lines if line.startswith("[")]
    assert sorted(line.split(" ")[1] for line in progress) == list(planned)
    assert all(re.match(LINE.format(total=4), line) for line in progress)
    assert any(line.startswith("packed: 4 trials: 2 completed, 2 diverged") for line in lines)


@pytest.mark.slow
def test_resume_a_packed_study_after_sigkill_of_the_driver(tmp_path: Path) -> None:
    body = tiny_copying(
        model={"hidden_size": 64},  # as in the test above
        fixed={"iterations": 600, "eval_every": 20, "batch_size": 50},
        resources={"pack": 2, "max_failures": 0},
    )
    path = write_space(tmp_path, "killed_packs", body)
    spec = load_spec(path)
    packs = {t.trial_id: p for p in space.plan_packs(spec) for t in p.trials}
    output = tmp_path / "out"
    env = without_ray_address()
    uri = tracking.store_uri(output)
    midway = kill_driver_when(
        path, output, env, lambda: running_with_steps(uri, "killed_packs", 3, 20)
    )
    pack = packs[midway]
    assert len(pack.trials) == 2
    before = children(uri, "killed_packs")
    logged_before = steps(uri, before[midway].info.run_id, "train/loss")
    assert 0 < len(logged_before) < 30

    resume_to_completion("killed_packs", 4, output, env)

    runs = children(uri, "killed_packs")  # still one run per trial
    assert list(runs) == [f"t{i:04d}" for i in range(4)]
    expected_steps = list(range(20, 601, 20))
    for trial_id, run_ in runs.items():
        assert run_.info.status == "FINISHED" and run_.data.tags["outcome"] == "completed"
        assert run_.data.tags["study.pack"] == packs[trial_id].pack_id
        for key in ("train/loss", "val/accuracy", "best/val_accuracy"):
            assert steps(uri, run_.info.run_id, key) == expected_steps, (trial_id, key)

    # The interrupted pack continued from its saved state, each member on its own solo curve.
    results = (output / "ray" / "killed_packs" / pack.pack_id / "result.json").read_text()
    rows = [json.loads(line) for line in results.splitlines()]
    first = next(row for row in rows if row["training_iteration"] == 1)
    assert first["iteration"] > 20, [row["iteration"] for row in rows]  # not from scratch
    for trial in pack.trials:
        reference = solo_curve(trial.config)
        run_id = runs[trial.trial_id].info.run_id
        for key in ("train/loss", "val/accuracy"):
            expected = [(p["iteration"], as_logged(p[key])) for p in reference]
            assert logged_curve(uri, run_id, key) == expected, (trial.trial_id, key)


@pytest.mark.slow
def test_failing_pack_fails_each_member_in_its_own_run(tmp_path: Path, ray_cluster) -> None:
    body = {
        "task": {"name": "pixel_mnist", "dataset": "fashion_mnist", "subset": 20},
        "model": {"hidden_size": 4},
        "fixed": {"iterations": 2, "eval_every": 1, "batch_size": 10},
        # One data_dir holds no IDX files: train_packed raises ConfigError for its pack, twice
        # (a retry).
        "scientific": {"data_dir": [str(FASHION_MNIST), str(not_idx_files(tmp_path / "bad"))]},
        "replicates": {"seeds": 2},
        "resources": {"cpus": 1, "max_concurrent": 2, "max_failures": 1, "pack": 2},
    }
    spec = load_spec(write_space(tmp_path, "failing_pack", body))
    assert [[t.trial_id for t in p.trials] for p in space.plan_packs(spec)] == [
        ["t0000", "t0001"],
        ["t0002", "t0003"],
    ]
    code, lines = run(spec, tmp_path / "out")
    assert code == 1

    uri = tracking.store_uri(tmp_path / "out")
    runs = children(uri, "failing_pack")  # the retry reused each member's run
    assert list(runs) == ["t0000", "t0001", "t0002", "t0003"]
    for trial_id in ("t0000", "t0001"):
        assert runs[trial_id].data.tags["outcome"] == "completed"
        assert steps(uri, runs[trial_id].info.run_id, "test/accuracy") == [1, 2]
    for trial_id in ("t0002", "t0003"):
        run_ = runs[trial_id]
        assert run_.info.status == "FAILED" and run_.data.tags["study.pack"] == "p0001"
        assert run_.data.tags["error"].startswith("ConfigError: task_options.data_dir:")
    assert any(line.startswith("      p0001: retrying after ConfigError") for line in lines)
    for trial_id in ("t0002", "t0003"):
        failed = rf"\[[1-4]/4\] {trial_id} .*: failed: ConfigError: task_options.data_dir: "
        assert any(re.match(failed, line) for line in lines), lines
