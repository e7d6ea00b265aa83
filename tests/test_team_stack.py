"""The team's stack for real: PostgreSQL, an MLflow server on it, and the `study` CLI using it."""

from __future__ import annotations

import json
import os
import pwd
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, free_port, printed_study, stop_process_group, wait_for_http

pytestmark = pytest.mark.slow

STUDY = Path(sys.executable).with_name("study")
QUICK = REPO / "search_spaces" / "quick.yaml"
_SMOKE_FIXED = yaml.safe_load(QUICK.read_text())["smoke"]["fixed"]
SMOKE = {key: _SMOKE_FIXED[key] for key in ("iterations", "eval_every")}
PASSWORD = "team-stack-test"  # a throwaway cluster on 127.0.0.1, gone when the tests end


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("pg_ctl")
    folders = [Path(on_path).resolve().parent] if on_path else []
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    folders += sorted(debian, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])[
        ::-1
    ]
    for folder in folders:
        if (folder / "pg_ctl").is_file() and (folder / "initdb").is_file():
            return folder
    return None


def as_server_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no `postgres` user to run PostgreSQL as")
    if shutil.which("runuser") is None:
        pytest.skip("running as root and no runuser to run PostgreSQL as `postgres`")
    return ["runuser", "-u", "postgres", "--"]


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command[:3]}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own on a free port of 127.0.0.1, password auth (as compose's);
    yields MLflow's backend URI for a database `mlflow` in it."""
    psycopg2 = pytest.importorskip(
        "psycopg2",
        reason="psycopg2-binary (MLflow's PostgreSQL driver, in the lock) not installed",
    )
    folder = postgres_bin()
    if folder is None:
        pytest.skip(
            "PostgreSQL not installed (no initdb and pg_ctl on PATH or in "
            "/usr/lib/postgresql/*/bin): apt-get install postgresql (.ci/run does)"
        )
    prefix = as_server_user()
    # Under /tmp, not pytest's tmp_path: the `postgres` user cannot enter root's 0700 folders.
    home = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    if prefix:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", free_port()
    (home / "password").write_text(PASSWORD + "\n")
    run([*prefix, str(folder / "initdb"), "-D", str(data), "-U", "mlflow", "-E", "UTF8",
         "--auth=scram-sha-256", f"--pwfile={home / 'password'}"], cwd=home)  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home}"
    pg_ctl = [*prefix, str(folder / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log")]
    run([*pg_ctl, "-w", "-t", "60", "-o", options, "start"], cwd=home)
    try:
        connection = psycopg2.connect(
            host="127.0.0.1", port=port, user="mlflow", password=PASSWORD, dbname="postgres"
        )
        # CREATE DATABASE cannot run in a transaction (which `with connection` would open).
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://mlflow:{PASSWORD}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, cwd=home)
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Server:
    """`mlflow server` on the PostgreSQL store with proxied artifacts, as compose starts it."""

    backend: str
    artifacts: Path
    log: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
            "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_http(f"{self.uri}/health", timeout=180, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None


@pytest.fixture(scope="module")
def server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    server = Server(postgres, folder / "artifacts", folder / "server.log", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def study(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI, as a user runs it (a fresh process, its own working folder)."""
    return subprocess.run(
        [str(STUDY), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=1200
    )


def api(uri: str, path: str, body: dict[str, Any] | None = None, **query: str) -> Any:
    """MLflow's REST API: GET with a query, or POST a JSON body."""
    url = f"{uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def runs_of(uri: str, name: str) -> list[dict[str, Any]]:
    """The study's parent and trial runs (not the per-cell summary runs `study report` adds)."""
    experiment = api(uri, "experiments/get-by-name", experiment_name=name)["experiment"]
    found = api(uri, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})
    return [r for r in found.get("runs", []) if tags(r).get("study.kind") in ("parent", "trial")]


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def curve(uri: str, run: dict[str, Any]) -> list[int]:
    """The steps of a run's val/accuracy history, in order."""
    found = api(
        uri, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="val/accuracy"
    )
    return sorted(m["step"] for m in found.get("metrics", []))


def assert_finished_with_full_curves(
    uri: str, name: str, trials: int, iterations: int, eval_every: int
) -> list[dict[str, Any]]:
    """Every run of the study (parent and trials) FINISHED, one run per trial, and each trial's
    curve has one evaluation every eval_every steps: none missing, none twice."""
    runs = runs_of(uri, name)
    assert {r["info"]["run_name"]: r["info"]["status"] for r in runs} == {
        r["info"]["run_name"]: "FINISHED" for r in runs
    }
    trial_runs = [r for r in runs if tags(r).get("study.kind") == "trial"]
    assert len(trial_runs) == trials, [r["info"]["run_name"] for r in runs]
    expected = list(range(eval_every, iterations + 1, eval_every))
    for run in trial_runs:
        assert curve(uri, run) == expected, run["info"]["run_name"]
    return runs


@pytest.fixture(scope="module")
def smoke(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README's quick study (smoke) run once on the stack; its output, folder and runs."""
    cwd = tmp_path_factory.mktemp("smoke")
    result = study("run", QUICK, "--smoke", "--tracking-uri", server.uri, "--output", "studies",
                   cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return {"cwd": cwd, "stdout": result.stdout, "runs": runs_of(server.uri, "quick")}


def test_a_smoke_study_logs_every_trial_to_postgres_with_proxied_artifacts(
    server: Server, smoke: dict[str, Any]
) -> None:
    assert "quick: 2 trials: 2 completed, 0 diverged, 0 failed, 0 pending" in smoke["stdout"]
    runs = assert_finished_with_full_curves(server.uri, "quick", trials=2, **SMOKE)
    # The study's own run keeps its spec as an artifact, uploaded through the server's proxy.
    (parent,) = [r for r in runs if tags(r).get("study.kind") == "parent"]
    assert parent["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    listed = api(server.uri, "artifacts/list", run_id=parent["info"]["run_id"])
    assert "spec.yaml" in [f["path"] for f in listed.get("files", [])]
    assert list(server.artifacts.rglob("spec.yaml")), "not under --artifacts-destination"


def test_a_study_straight_into_postgres_keeps_its_artifacts_in_its_output_folder(
    postgres: str, tmp_path: Path
) -> None:
    # No server: `--tracking-uri postgresql://...` alone. MLflow's default artifact root for a
    # database is ./mlruns of the working folder; the study's files belong in its --output.
    result = study("run", QUICK, "--smoke", "--name", "direct", "--tracking-uri", postgres,
                   "--output", "studies", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "direct: 2 trials: 2 completed, 0 diverged, 0 failed, 0 pending" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["studies"]
    specs = list((tmp_path / "studies" / "mlartifacts" / "direct").rglob("spec.yaml"))
    assert len(specs) == 1, specs


def test_the_report_reads_the_study_back_from_the_server(
    server: Server, smoke: dict[str, Any]
) -> None:
    result = study("report", "quick", "--tracking-uri", server.uri, cwd=smoke["cwd"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "h-detach p=0.25" in result.stdout and "vanilla" in result.stdout
    # MLflow prints a "View run ... at: URL" line for every run ended through a server; the
    # report's output is its own lines only.
    assert "View run" not in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("report: ")


def test_running_the_study_again_refuses_in_one_line_naming_resume(
    server: Server, smoke: dict[str, Any]
) -> None:
    # What a RayJob applied again after a delete does (docker/README.md): the second `study run`
    # into the same folder and server must not start a second copy of the study.
    result = study("run", QUICK, "--smoke", "--tracking-uri", server.uri, "--output", "studies",
                   cwd=smoke["cwd"])  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"study quick already exists in {server.uri}" in line, line
    assert f"{printed_study()} resume quick --output " in line, line
    assert [r["info"]["run_id"] for r in runs_of(server.uri, "quick")] == [
        r["info"]["run_id"] for r in smoke["runs"]
    ]


def first_trial_line(driver: subprocess.Popen, timeout: float) -> list[str]:
    """The driver's output up to its first finished-trial line ("[1/N] ..."), read on a thread so
    that a hung driver fails the test instead of blocking it."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in driver.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            raise TimeoutError(f"no trial finished within {timeout} s: {seen}") from None
        assert line is not None, f"the driver ended before a trial finished: {seen}"
        seen.append(line)
        if re.match(r"\[1/\d+\] ", line):
            return seen


def test_a_killed_driver_resumes_every_trial_to_its_full_curve(
    server: Server, tmp_path: Path
) -> None:
    # Four trials two at a time, ten evaluations each: when the first finishes the driver is
    # SIGKILLed (no handler runs, as when its machine or the OOM killer ends it), with trials
    # still running or waiting; `study resume` must bring each to its full curve, on its own run.
    spec = yaml.safe_load(QUICK.read_text())
    spec["smoke"] = {
        "fixed": {"iterations": 200, "eval_every": 20},
        "task": {"val_size": 200},
        "replicates": {"seeds": 2},
    }
    space = tmp_path / "killed.yaml"
    space.write_text(yaml.safe_dump(spec, sort_keys=False))
    driver = subprocess.Popen(
        [str(STUDY), "run", str(space), "--smoke", "--tracking-uri", server.uri,
         "--output", "studies"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        first_trial_line(driver, timeout=600)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        # Ray's local processes die with the driver (they share its fate); whatever of the
        # driver's session might not is stopped before the resume.
        time.sleep(5)
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        driver.stdout.close()
    interrupted = runs_of(server.uri, "killed")
    trial_runs = [r for r in interrupted if tags(r).get("study.kind") == "trial"]
    assert len(trial_runs) < 4 or any(r["info"]["status"] != "FINISHED" for r in trial_runs), (
        "the study ended before the kill: nothing to resume"
    )

    result = study("resume", "killed", "--output", "studies", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "killed: 4 trials: 4 completed, 0 diverged, 0 failed, 0 pending" in result.stdout
    assert_finished_with_full_curves(server.uri, "killed", trials=4, iterations=200, eval_every=20)
    report = study("report", "killed", "--tracking-uri", server.uri, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr


def test_with_the_server_down_a_study_fails_in_one_line_and_nothing_is_lost(
    server: Server, smoke: dict[str, Any], tmp_path: Path
) -> None:
    before = {r["info"]["run_id"]: r["info"]["status"] for r in runs_of(server.uri, "quick")}
    server.stop()
    try:
        result = study("run", QUICK, "--smoke", "--tracking-uri", server.uri,
                       "--output", "studies", cwd=tmp_path)  # fmt: skip
    finally:
        server.start()  # on the same port and database, for the checks below
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("study run: error: --tracking-uri ") and server.uri in line, line
    assert result.stdout == "" and not (tmp_path / "studies").exists()
    # The team's store outlives its server: every run is back, with its curve.
    after = {r["info"]["run_id"]: r["info"]["status"] for r in runs_of(server.uri, "quick")}
    assert after == before and len(before) == 3
    assert_finished_with_full_curves(server.uri, "quick", trials=2, **SMOKE)
