"""Studies on real Ray (2 CPUs) and real MLflow: end to end, failure, Optuna, server, resume."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FASHION_MNIST, free_port, printed_study, tiny_copying, write_space
from mlflow import MlflowClient
from runner_fixtures import (
    LINE,
    STUDY,
    as_logged,
    children,
    kill_driver_when,
    kill_session,
    logged_curve,
    not_idx_files,
    resume_to_completion,
    run,
    running_with_steps,
    saved_state,
    solo_curve,
    steps,
    without_ray_address,
)

from study import space, tracking
from study.cli import main
from study.errors import ConfigError
from study.pack_layout import KNOWN_GPUS
from study.runner import resume_study
from study.runner.state import STATE_FILE, TRIAL_STATES, StudyState
from study.spec import load_spec
from study.tracking.stores import driving
from study.tracking.tags import pack_gpu_from_tags


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
    parent = tracking.open_store(uri).find_parent("smoke4")
    assert parent.status == "FINISHED" and parent.name == "smoke4"
    tags = parent.tags
    assert tags["study.n_trials"] == "4" and tags["study.target"] == "0.99"
    assert tags["study.spec_hash"] == spec.spec_hash() and tags["study.version"]
    assert "study.git_commit" in tags  # the tests run in a git checkout
    spec_file = client.download_artifacts(parent.run_id, "spec.yaml", str(tmp_path))
    assert Path(spec_file).read_text() == spec.to_yaml()
    assert client.get_experiment_by_name("smoke4").artifact_location.endswith("mlartifacts/smoke4")

    planned = {t.trial_id: t.config for t in space.plan_trials(spec)}
    runs = children(uri, "smoke4")
    assert list(runs) == list(planned) == ["t0000", "t0001", "t0002", "t0003"]
    for trial_id, run_ in runs.items():
        assert run_.info.run_name == trial_id
        assert run_.info.status == "FINISHED" and run_.data.tags["outcome"] == "completed"
        assert run_.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run_.data.tags["role.method"] == "scientific"
        assert run_.data.tags["device.used"] == "cpu"
        assert run_.data.tags["cpu_cells.used"] == "compiled"  # gcc is there
        assert "switches.set" not in run_.data.tags  # none set where the workers run
        assert run_.data.params == tracking.flatten(planned[trial_id])
        for key in ("train/loss", "train/grad_norm", "val/loss", "val/accuracy"):
            assert steps(uri, run_.info.run_id, key) == [10, 20], key
        assert "test/accuracy" not in run_.data.metrics  # copying has no test split

    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 4
    assert all(re.match(LINE.format(total=4), line) for line in progress)
    assert any(line.startswith("smoke4: 4 trials: 4 completed") for line in lines)
    assert lines[-1] == f"MLflow UI: study ui --output {output.absolute()}"
    assert (output / "ray" / "smoke4" / STATE_FILE).is_file()
    assert (output / "ray" / "smoke4" / "t0000").is_dir()

    with pytest.raises(ConfigError, match="already exists.*study resume smoke4"):
        run(spec, output)
    changed = load_spec(write_space(tmp_path, "smoke4", {**auto, "fixed": {"lr": 0.02}}))
    with pytest.raises(ConfigError, match="from a different search space; run this one into"):
        run(changed, output)
    # Another store into the same output: this folder's Ray state (its trials' saved states)
    # belongs to the first study and must neither pass for the new one's nor be repointed.
    state_file = output / "ray" / "smoke4" / STATE_FILE
    before = state_file.read_text()
    other = tmp_path / "other.db"
    with pytest.raises(ConfigError, match=r"ray/smoke4 holds the Ray state of an earlier run"):
        run(spec, output, tracking_uri=f"sqlite:///{other}")
    assert state_file.read_text() == before and not other.exists()

    # Resume without Tune's snapshot (a driver killed in its first moments): the trials MLflow
    # does not hold as finished run again, each in its own run, no step logged twice.
    for snapshot in (output / "ray" / "smoke4").glob("experiment_state-*.json"):
        snapshot.unlink()
    tracking.open_store(uri).reopen(runs["t0003"].info.run_id)
    lines.clear()
    assert resume_study("smoke4", output, echo=lines.append) == 0
    assert [line[:11] for line in lines if line.startswith("[")] == ["[4/4] t0003"]
    again = children(uri, "smoke4")
    assert list(again) == list(runs)
    assert again["t0003"].info.status == "FINISHED"
    assert steps(uri, again["t0003"].info.run_id, "val/accuracy") == [10, 20]
    assert tracking.open_store(uri).find_parent("smoke4").status == "FINISHED"


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
    assert tracking.open_store(uri).find_parent("failing").status == "FAILED"
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
    assert tracking.open_store(uri).find_parent("tuned").tags["study.n_trials"] == "4"
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
    parent = tracking.open_store(mlflow_server).find_parent("served")
    assert parent.status == "FINISHED"
    artifacts = MlflowClient(mlflow_server).list_artifacts(parent.run_id)
    assert [a.path for a in artifacts] == ["spec.yaml"]
    assert lines[-1] == f"MLflow UI: open {mlflow_server} in a browser"
    # `study resume` finds the server again from the study's state file.
    assert StudyState.load(tmp_path / "out", "served").tracking_uri == mlflow_server


def test_a_trial_stopped_before_tune_set_it_up_is_left_to_close_unfinished() -> None:
    """Ctrl-C in the first seconds: Tune's result for a trial it never started has no config
    (members_of raised TypeError on it, a traceback instead of the summary)."""
    from ray.tune import Result

    from study.runner.driver import _reconcile

    never = Result(metrics=None, checkpoint=None, error=None, path="/tmp/ray/quick/t0000")
    assert never.config is None
    assert _reconcile(None, None, [never]) == {}  # type: ignore[arg-type]  # nothing to mark


def test_resume_says_at_once_when_the_studys_server_is_down(tmp_path: Path) -> None:
    port = free_port()
    saved_state(tmp_path / "out", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"^study kept's tracking URI http://127.0.0.1:{port}: "):
        resume_study("kept", tmp_path / "out")
    assert time.monotonic() - started < 30  # MLflow's own retries take minutes


def test_resume_after_the_studys_database_was_deleted_creates_no_empty_one(
    tmp_path: Path,
) -> None:
    saved_state(tmp_path / "out")  # its state file names out/mlflow.db, which is not there
    database = tmp_path / "out" / "mlflow.db"
    with pytest.raises(ConfigError, match=f"^study kept: its MLflow database {database} is not"):
        resume_study("kept", tmp_path / "out")
    assert not database.exists()


def test_resume_is_refused_while_the_study_runs(tmp_path: Path) -> None:
    """A second driver would restore the same Tune state and train each trial twice."""
    saved_state(tmp_path / "out")
    with driving(tmp_path / "out" / "ray" / "kept", "kept"):
        with pytest.raises(ConfigError, match=r"^study kept is running now \(driver pid \d+"):
            resume_study("kept", tmp_path / "out")


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
        summary = tracking.open_store(uri).summarize("killed")
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
    # Bit for bit: MLflow keeps doubles exactly, and a resume that drifted in the last bits
    # would hide in a tolerance (val/accuracy moves in steps of 1/val_size).
    assert logged_loss == [p["train/loss"] for p in reference]


@pytest.mark.slow
def test_sigterm_stops_a_study_as_ctrl_c_does(tmp_path: Path) -> None:
    body = tiny_copying(
        model={"hidden_size": 64}, fixed={"iterations": 800, "eval_every": 40, "batch_size": 50}
    )
    path = write_space(tmp_path, "termed", body)
    output = tmp_path / "out"
    uri = tracking.store_uri(output)
    env = without_ray_address()
    returncode, out, _ = _sigterm_midway(path, output, "termed", env)
    assert returncode == 130, out
    assert "SIGTERM" not in out and "Traceback" not in out
    assert f"unfinished; continue with: {printed_study()} resume termed --output {output}" in out
    assert tracking.open_store(uri).find_parent("termed").status == "KILLED"
    # Each child run ends as its trial did: none is left RUNNING (issue #21, item 6).
    statuses = {r.info.status for r in children(uri, "termed").values()}
    assert statuses and statuses <= {"FINISHED", "KILLED"}, statuses
    resume_to_completion("termed", 4, output, env)


@pytest.mark.slow
def test_timeouts_sigterm_to_its_whole_group_stops_the_study_as_ctrl_c_does(
    tmp_path: Path,
) -> None:
    """`timeout` signals the driver, then its own process group, which Ray's GCS and raylet had
    joined: they died with it, and the driver waited 60 s for its GCS, printed no summary and
    left its runs RUNNING. `timeout 1h study run ...` whose hour ends once trials run: the
    SIGALRM its timer gets is what makes it signal (a fixed 20 s found no trial started yet on
    a loaded machine)."""
    body = tiny_copying(
        model={"hidden_size": 64}, fixed={"iterations": 8000, "eval_every": 40, "batch_size": 50}
    )
    path = write_space(tmp_path, "grouped", body)
    output = tmp_path / "out"
    returncode, out, stopped_s = _sigterm_midway(
        path, output, "grouped", without_ray_address(), to="timeout"
    )
    assert returncode == 124, out  # timeout's own status for "the time ran out"
    assert stopped_s < 50, out  # not the GCS's 60 s
    assert "Traceback" not in out and "Failed to connect to GCS" not in out, out
    assert f"unfinished; continue with: {printed_study()} resume grouped --output {output}" in out
    uri = tracking.store_uri(output)
    assert tracking.open_store(uri).find_parent("grouped").status == "KILLED"
    statuses = {r.info.status for r in children(uri, "grouped").values()}
    assert statuses and statuses <= {"FINISHED", "KILLED"}, statuses


@pytest.mark.slow
@pytest.mark.parametrize("to", ["driver_group", "script_group"])
def test_sigterm_to_the_drivers_process_group_stops_the_study_as_ctrl_c_does(
    tmp_path: Path, to: str
) -> None:
    """`kill -- -PGID` of a `setsid study run` (the driver leads its group) or of a batch script
    that runs it: Ray's GCS and raylet, in the driver's group, died with it (60 s, no summary);
    and a driver that left the script's group for one of its own did not stop at all."""
    body = tiny_copying(
        model={"hidden_size": 64}, fixed={"iterations": 4000, "eval_every": 40, "batch_size": 50}
    )
    path = write_space(tmp_path, "grouped", body)
    output = tmp_path / "out"
    _, out, stopped_s = _sigterm_midway(path, output, "grouped", without_ray_address(), to=to)
    assert stopped_s < 50, out  # not the GCS's 60 s on top
    assert "Traceback" not in out and "Failed to connect to GCS" not in out, out
    assert f"unfinished; continue with: {printed_study()} resume grouped --output {output}" in out
    uri = tracking.store_uri(output)
    assert tracking.open_store(uri).find_parent("grouped").status == "KILLED"


def _sigterm_midway(
    path: Path, output: Path, name: str, env: dict, to: str = "driver"
) -> tuple[int, str, float]:
    """`study run` of the space, SIGTERM once a trial has logged 2 to 12 steps: to the driver
    alone (`kill PID`), to its process group (it leads it: `kill -- -PID`), to the group of a
    shell script that runs it, or from `timeout` (its driver, then its group) when its time is
    up; (exit status, output, seconds from the signal to the exit)."""
    uri = tracking.store_uri(output)
    command = [STUDY, "run", str(path), "--output", str(output)]
    if to == "script_group":  # `; true`: the shell forks the driver into its group, no exec
        command = ["sh", "-c", '"$@"; true', "sh", *command]
    if to == "timeout":
        command = ["timeout", "-s", "TERM", "1h", *command]
    driver = subprocess.Popen(
        command,
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
            if (output / "ray" / name / STATE_FILE).exists() and running_with_steps(
                uri, name, 2, 12
            ):
                break
        signalled = time.monotonic()
        if to == "driver":
            driver.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` or a scheduler
        elif to == "timeout":
            driver.send_signal(signal.SIGALRM)  # timeout's timer going off: the hour is up
        else:
            os.killpg(driver.pid, signal.SIGTERM)  # the group the Popen'd process leads
        out, _ = driver.communicate(timeout=120)
    finally:
        kill_session(driver.pid)
    return driver.returncode, out, time.monotonic() - signalled


@pytest.mark.slow
def test_sigterm_stops_an_optuna_study_in_its_cell_not_after_the_next(tmp_path: Path) -> None:
    """Each cell is its own Tuner: the signal ends the running cell's fit, and the study, not
    the cell, stops (the next cell's Tuner is not started)."""
    body = tiny_copying(
        model={"hidden_size": 64},
        fixed={"iterations": 800, "eval_every": 40, "batch_size": 50},
        nuisance={"lr": {"min": 1.0e-3, "max": 3.0e-2, "scaling": "log"}},
        replicates={"seeds": 1},
        search={"searcher": "optuna", "samples_per_cell": 2, "seed": 3},
    )
    path = write_space(tmp_path, "tunedterm", body)
    output = tmp_path / "out"
    env = without_ray_address()
    returncode, out, _ = _sigterm_midway(path, output, "tunedterm", env)
    assert returncode == 130, out
    assert "stopped in cell000: the cells after it are not started" in out
    assert not (output / "ray" / "tunedterm" / "cell001").exists()
    assert set(children(tracking.store_uri(output), "tunedterm")) <= {"t0000", "t0001"}
    resume_to_completion("tunedterm", 4, output, env)


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
    assert [[t.trial_id for t in p.trials] for p in space.make_plan(spec).packs] == [
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
    ray_trials = {p.name for p in experiment.iterdir() if p.is_dir()} - {TRIAL_STATES}
    assert sorted(ray_trials) == ["p0000", "p0001"]
    states = sorted(p.name for p in (experiment / TRIAL_STATES).iterdir())
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
    packs = {t.trial_id: p for p in space.make_plan(spec).packs for t in p.trials}
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
    assert [[t.trial_id for t in p.trials] for p in space.make_plan(spec).packs] == [
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


@pytest.mark.slow
def test_resume_plans_the_packs_of_the_gpu_the_study_ran_for(
    tmp_path: Path, ray_cluster, capsys: pytest.CaptureFixture
) -> None:
    # Two shapes (batch 10, 20), which never share a pack: sized for an H200, 2 packs of 2
    # whose members interleave; planned on this GPU-less machine, 4 packs of 1. `device: auto`
    # trains them here all the same (auto leaves `device: cpu` trials in packs of 1).
    body = tiny_copying(
        fixed={"device": "auto"},
        scientific={"batch_size": [10, 20]},
        replicates={"seeds": 1},
        resources={"pack": "auto"},
    )
    path = write_space(tmp_path, "auto_resumed", body)
    assert main(["plan", str(path), "--gpu", "h200"]) == 0
    text = capsys.readouterr().out.splitlines()
    sized = [line for line in text if line.startswith("  packs: auto -> ")]
    # Hidden 8 in one 16-unit program, a batch of 10 or 20 in one program: 132 // 1 a pack.
    assert len(sized) == 2, text
    assert all(
        line.startswith("  packs: auto -> 132 trials per pack on h200 (132 SMs; ")
        for line in sized
    )
    assert "at batch 10, hidden 8" in sized[0] and "at batch 20, hidden 8" in sized[1]
    assert (
        "  4 trials in 2 packs of <= 132 (one batched model and one Ray trial per pack):" in text
    )
    planned = {"t0000": "p0000", "t0001": "p0001", "t0002": "p0000", "t0003": "p0001"}
    shown = [line.split()[:2] for line in text if re.match(r"  t\d{4}  p\d{4}  ", line)]
    assert dict(shown) == planned

    output = tmp_path / "out"
    assert main(["run", str(path), "--output", str(output), "--gpu", "h200"]) == 0
    ran = capsys.readouterr().out
    assert "running auto_resumed: 4 trials (0 finished), grid search, 2 packs of <= 132;" in ran
    uri = tracking.store_uri(output)
    parent = tracking.open_store(uri).find_parent("auto_resumed")
    assert parent.tags["study.pack_auto"] == "132"
    assert pack_gpu_from_tags(parent.tags) == KNOWN_GPUS["h200"]
    runs = children(uri, "auto_resumed")
    packs = pack_tags_of(runs)
    assert packs == {trial_id: (pack_id, "2") for trial_id, pack_id in planned.items()}
    assert all(r.data.tags["device.used"] == "cpu" for r in runs.values())
    experiment = output / "ray" / "auto_resumed"
    ray_trials = {p.name for p in experiment.iterdir() if p.is_dir()} - {TRIAL_STATES}
    assert sorted(ray_trials) == ["p0000", "p0001"]

    # Interrupted as a driver killed before Tune's first snapshot, t0002 unfinished: resume
    # trains p0000 again for t0002 alone, planned for the H200 its parent run names.
    for snapshot in experiment.glob("experiment_state-*.json"):
        snapshot.unlink()
    tracking.open_store(uri).reopen(runs["t0002"].info.run_id)
    assert main(["resume", "auto_resumed", "--output", str(output)]) == 0
    resumed = capsys.readouterr().out
    assert "resuming auto_resumed: 4 trials (3 finished), grid search, 2 packs of <= 132;" in (
        resumed
    )
    assert re.search(r"^\[\d/4\] t0002 .*: completed", resumed, re.MULTILINE), resumed
    # One Ray trial, p0000 (a plan without the GPU would have trained a Ray trial t0002).
    assert {p.name for p in experiment.iterdir() if p.is_dir()} - {TRIAL_STATES} == ray_trials
    # What Tune was given to run: the H200 plan's pack p0000 (2 members), t0002 left to train.
    pack = json.loads((experiment / "p0000" / "params.json").read_text())["pack"]
    members = [member["id"] for member in pack["members"]]
    assert (pack["id"], pack["size"], members) == ("p0000", 2, ["t0002"])
    again = children(uri, "auto_resumed")
    assert list(again) == list(runs) and pack_tags_of(again) == packs
    assert again["t0002"].info.status == "FINISHED"
    assert steps(uri, again["t0002"].info.run_id, "val/accuracy") == [10, 20]


def pack_tags_of(runs: dict[str, object]) -> dict[str, tuple[str, str]]:
    """(study.pack, study.pack_size) of each trial's run, by trial id."""
    return {
        t: (r.data.tags["study.pack"], r.data.tags["study.pack_size"]) for t, r in runs.items()
    }
