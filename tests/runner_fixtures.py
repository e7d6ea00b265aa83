"""Helpers of the runner tests: a study in-process, its MLflow runs, a `study` subprocess killed
midway and resumed."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import tiny_copying, write_space
from mlflow import MlflowClient

from study import tracking
from study.config import TrialConfig
from study.runner import run_study
from study.runner.state import STATE_FILE, StudyState
from study.spec import StudySpec, load_spec
from study.train import train

LINE = r"^\[\d+/{total}\] t\d{{4}} .+: (completed|diverged|failed)"
STUDY = str(Path(sys.executable).parent / "study")


def without_ray_address() -> dict[str, str]:
    """The environment for a `study` subprocess: its own local Ray, whatever the shell says."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run(spec: StudySpec, output: Path, **options: object) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_study(spec, output, echo=lines.append, **options)
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


def not_idx_files(folder: Path) -> Path:
    """A data_dir whose four files are there (a study starts) but unreadable (its trials fail)."""
    folder.mkdir()
    for name in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        kind = "idx3" if name.endswith("images") else "idx1"
        (folder / f"{name}-{kind}-ubyte").write_text("not an IDX file\n")
    return folder


def session_processes(session: int) -> list[int]:
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


def kill_session(session: int) -> None:
    """SIGKILL every process of the session at once, again until none is left.

    Killing only the driver's process group is not enough: Ray's workers sit in other groups of
    the same session and would go on training (and logging) while the driver is reaped.
    """
    deadline = time.monotonic() + 30
    while (alive := session_processes(session)) and time.monotonic() < deadline:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert not session_processes(session), "Ray processes outlived the killed driver"


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
            if not (output / "ray" / path.stem / STATE_FILE).exists():
                continue
            found = ready()
            if found is not None:
                break
        assert found is not None, log_path.read_text()
    finally:
        kill_session(driver.pid)  # the driver leads the session: it goes with the rest
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
    # Tune restored its callbacks: this session's printer got them, so the trials it finished
    # have their lines.
    assert any(line.startswith("[") for line in resumed.stdout.splitlines()), resumed.stdout


def saved_state(output: Path, tracking_uri: str | None = None) -> StudyState:
    spec = load_spec(write_space(output.parent, "kept", tiny_copying()))
    uri = tracking_uri or tracking.store_uri(output)
    state = StudyState(spec, output.absolute(), uri, "parent-run-id")
    state.save()
    return state
