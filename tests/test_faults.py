"""Faults and bad input (issue #21): two studies starting into one fresh folder, a local Ray's
sockets, a huge grid, a moved folder's report, a killed driver's Ray, Ctrl-C and SIGTERM, a
store in a missing folder, and a name already taken on a tracking server (issue #20)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import printed_study, tiny_copying, write_space
from mlflow import MlflowClient
from runner_fixtures import (
    STUDY,
    children,
    kill_session,
    run,
    running_with_steps,
    session_processes,
    without_ray_address,
)

from study import cli, cli_trial, space, tracking
from study.errors import ConfigError
from study.runner import orphans, resume_study
from study.runner.state import STATE_FILE
from study.spec import load_spec
from study.tracking import stores

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def slow_copying(iterations: int = 800) -> dict:
    """A copying study whose trials take seconds: long enough to stop midway."""
    fixed = {"iterations": iterations, "eval_every": iterations // 20, "batch_size": 50}
    return tiny_copying(model={"hidden_size": 64}, fixed=fixed)


def start_study(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [STUDY, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=without_ray_address(),
            start_new_session=True,  # every process it starts can be found by its session
        )


def wait_running(driver: subprocess.Popen, output: Path, name: str, log: Path) -> str:
    """Wait until a trial of the study runs with 2..12 evaluations logged; its id."""
    uri = tracking.store_uri(output)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if (output / "ray" / name / STATE_FILE).exists():
            found = running_with_steps(uri, name, 2, 12)
            if found is not None:
                return found
    raise AssertionError(log.read_text())


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of each TCP socket in LISTEN state the processes hold, as
    `ss -ltnp` lists them: /proc/net/tcp{,6} joined with the processes' socket inodes."""
    inodes = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[int(target[8:-1])] = pid
        except OSError:
            continue
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or int(fields[9]) not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, words), int(port, 16), inodes[int(fields[9])]))
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-40:]
    except OSError:
        return "?"


# 1. Two studies into a fresh folder at once.


def _first_use(folder: Path, name: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()  # both at once, as two `study run` into one new --output
    tracking.open_store(tracking.store_uri(folder)).ensure_experiment(name, folder)


def test_two_processes_make_a_fresh_store_at_once(tmp_path: Path) -> None:
    # Without the lock, 5 of 5 tries broke one migration (`table ... already exists`).
    context = multiprocessing.get_context("fork")  # MLflow imported once, here
    for attempt in range(5):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        uri = tracking.store_uri(folder)
        barrier = context.Barrier(2)
        makers = [
            context.Process(target=_first_use, args=(folder, f"s{k}", barrier)) for k in range(2)
        ]
        for maker in makers:
            maker.start()
        for maker in makers:
            maker.join(120)
        assert [maker.exitcode for maker in makers] == [0, 0], f"attempt {attempt}"
        assert sorted(tracking.open_store(uri).experiment_names()) == ["Default", "s0", "s1"]


@pytest.mark.slow
def test_two_studies_start_into_a_fresh_folder_at_once(tmp_path: Path) -> None:
    output = tmp_path / "fresh"
    body = tiny_copying(replicates={"seeds": 1}, resources={"max_concurrent": 1})
    drivers = []
    for name in ("first", "second"):
        path = write_space(tmp_path, name, body)
        drivers.append(start_study(["run", str(path), "--output", str(output)], tmp_path / name))
    try:
        codes = [driver.wait(timeout=240) for driver in drivers]
    finally:
        for driver in drivers:
            kill_session(driver.pid)
    logs = [(tmp_path / name).read_text() for name in ("first", "second")]
    assert codes == [0, 0], logs
    assert all("Traceback" not in log for log in logs), logs
    for name in ("first", "second"):
        assert {r.info.status for r in children(tracking.store_uri(output), name).values()} == {
            "FINISHED"
        }


# 2 and 5. A local Ray listens on 127.0.0.1 only; a killed driver's Ray ends with the next command.


@pytest.mark.slow
def test_local_ray_is_loopback_only_and_a_killed_drivers_ray_ends_next_time(
    tmp_path: Path,
) -> None:
    path = write_space(tmp_path, "killed", slow_copying(200))
    output = tmp_path / "out"
    log = tmp_path / "run.log"
    driver = start_study(["run", str(path), "--output", str(output)], log)
    try:
        wait_running(driver, output, "killed", log)
        members = set(session_processes(driver.pid))
        sockets = listening_sockets(members)
        record = (output / "ray" / "killed" / orphans.RECORD).read_text()
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as `kill -9 PID`
        driver.wait()
        time.sleep(3)
        left = session_processes(driver.pid)
    except BaseException:
        kill_session(driver.pid)
        raise
    print("listening:", sorted((a, p, _command(pid)) for a, p, pid in sockets), "left:", left)
    try:
        # gcs_server, raylet, agents, workers, the driver: a dozen servers, none outside.
        assert len(sockets) >= 6, sockets
        assert all(address in LOOPBACK for address, _, _ in sockets), sockets
        session = json.loads(record)["session_dir"]
        assert set(orphans.processes_of(session)) >= set(left)
        resumed = subprocess.run(
            [STUDY, "resume", "killed", "--output", str(output)],
            capture_output=True,
            text=True,
            env=without_ray_address(),
            timeout=300,
            start_new_session=True,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        if left:  # Ray 2.58: its DashboardAgent and RuntimeEnvAgent outlive a killed driver
            assert "left by killed's killed driver" in resumed.stdout, resumed.stdout
        assert session_processes(driver.pid) == [], "the killed driver's Ray outlived resume"
    finally:
        kill_session(driver.pid)


def test_a_live_drivers_ray_and_other_processes_are_left_alone(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], cwd=tmp_path)
    try:
        session = str(tmp_path / "session_x")
        orphans.record(tmp_path / "ray" / "live", session)  # this process: alive
        dead = tmp_path / "ray" / "dead"
        dead.mkdir(parents=True)
        (dead / orphans.RECORD).write_text(
            f'{{"session_dir": "{session}", "driver_pid": {sleeper.pid}, "driver_started": 1}}'
        )
        assert orphans.end_orphans(tmp_path / "ray", print) == 0
        assert sleeper.poll() is None  # in the folder, but not a Ray process of that session
        assert (tmp_path / "ray" / "live" / orphans.RECORD).exists()
        assert not (dead / orphans.RECORD).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# 3. A huge grid is counted, not expanded.


def huge_grid(tmp_path: Path, **resources: int) -> Path:
    ten = list(range(1, 11))
    body = tiny_copying(
        scientific={"method": ["none", "h_detach"], "p_detach": [k / 10 for k in ten]},
        nuisance={"clip_norm": ten, "batch_size": ten, "lr": [k / 1000 for k in ten]},
        replicates={"seeds": 10_000},
        resources=resources,
    )
    return write_space(tmp_path, "huge", body)


def test_a_grid_of_a_hundred_million_trials_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = huge_grid(tmp_path)
    load_spec(write_space(tmp_path, "warm", tiny_copying()))  # torch imported: not timed
    started = time.monotonic()
    code = cli.main(["plan", str(path)])
    seconds = time.monotonic() - started
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and seconds < 5, (code, seconds)
    # none counts p_detach once: (1 + 10) x 10^3 x 10^4
    assert "110,000,000 trials (method 2 x p_detach 10 x clip_norm 10" in line, line
    assert "seeds 10000), more than resources.max_trials 100,000" in line, line
    assert "set resources.max_trials: 110000000" in line, line


def test_max_trials_lets_a_large_grid_through_and_stops_a_small_one(tmp_path: Path) -> None:
    spec = load_spec(huge_grid(tmp_path, max_trials=110_000_000))
    assert space.count_trials(spec)[0] == 110_000_000
    space.check_size(spec)  # allowed: no error (planning it would take hours, so not here)
    small = load_spec(write_space(tmp_path, "small", tiny_copying(resources={"max_trials": 3})))
    with pytest.raises(ConfigError, match=r"4 trials \(method 2 x p_detach 1 x seeds 2\)"):
        space.make_plan(small)


# 4. A moved study folder: report and resume refuse alike.


def test_a_moved_folders_own_store_is_refused_by_name(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "ray" / "x").mkdir(parents=True)
    record = {"tracking_uri": tracking.store_uri(home), "own_store": True}
    (home / "ray" / "x" / STATE_FILE).write_text(json.dumps(record))
    stores.check_own_store(home, "x", "report")  # in place: fine
    moved = tmp_path / "moved"
    home.rename(moved)
    with pytest.raises(ConfigError) as refused:
        stores.check_own_store(moved, "x", "report")
    assert str(refused.value) == (
        f"study x: its MLflow store {home}/mlflow.db belongs to {home}, not {moved} (MLflow "
        f"keeps absolute paths); report it with --output {home}, moving the folder back first "
        "if it was moved"
    )
    stores.check_own_store(moved, "other", "report")  # no record: nothing to check


@pytest.mark.slow
def test_the_report_of_a_moved_folder_touches_nothing_outside_it(
    tmp_path: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Needs study/analysis/report.py's write_report to call
    # stores.check_own_store(output_dir, study_name, "report") when tracking_uri is None.
    spec = load_spec(write_space(tmp_path, "moving", tiny_copying(replicates={"seeds": 1})))
    home = tmp_path / "home"
    assert run(spec, home)[0] == 0
    moved = tmp_path / "moved"
    shutil.move(home, moved)
    capsys.readouterr()
    assert cli.main(["report", "moving", "--output", str(moved)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"report it with --output {home}" in line, line
    assert not home.exists()  # neither mlartifacts nor reports recreated there


# 6. Ctrl-C and SIGTERM: every child run ends in a final status.


@pytest.mark.slow
def test_ctrl_c_leaves_no_child_run_running(tmp_path: Path) -> None:
    # SIGTERM takes the same way (session.py): test_runner_driver's SIGTERM test checks it too.
    signum, name = signal.SIGINT, "stopped"
    path = write_space(tmp_path, name, slow_copying(400))
    output = tmp_path / "out"
    log = tmp_path / "run.log"
    driver = start_study(["run", str(path), "--output", str(output)], log)
    try:
        wait_running(driver, output, name, log)
        driver.send_signal(signum)  # the driver only, as `kill -INT PID` or a scheduler's TERM
        assert driver.wait(timeout=120) == 130, log.read_text()
    finally:
        kill_session(driver.pid)
    uri = tracking.store_uri(output)
    statuses = {trial: r.info.status for trial, r in children(uri, name).items()}
    assert statuses and set(statuses.values()) <= {"FINISHED", "KILLED"}, statuses
    assert "KILLED" in statuses.values(), statuses
    client = MlflowClient(uri)
    parent = client.get_run(children(uri, name)["t0000"].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert f"unfinished; continue with: {printed_study()} resume {name}" in log.read_text()


# 7. A --tracking-uri file in a folder that does not exist.


def test_a_tracking_uri_in_a_missing_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_space(tmp_path, "nowhere", tiny_copying())
    missing = tmp_path / "no" / "such"
    uri = f"sqlite:///{missing}/x.db"
    args = ["run", str(path), "--tracking-uri", uri, "--output", str(tmp_path / "out")]
    assert cli.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"study run: error: --tracking-uri {uri}: no folder {missing} for the database file; "
        "make it first, or name a file in an existing folder"
    )
    assert not (tmp_path / "no").exists() and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="no folder"):
        tracking.open_store(uri)  # nor does any other way to the store make it


# 8. Bad trial flags (the bad spaces are in tests/bad_spaces/).


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--clip-norm", "inf"], "--clip-norm: must be finite, got inf; null is no clipping"),
        (
            ["--iterations", "50", "--eval-every", "100"],
            "--eval-every: must be <= iterations (50), got 100",
        ),
    ],
)
def test_bad_trial_flags_are_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["trial", *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line, line


def test_a_short_trial_evaluates_at_its_end_without_eval_every(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["trial", "--iterations", "30"])
    assert cli_trial._trial_config(args).eval_every == 30  # as before: one evaluation, at the end


# Issue #20: a study name already taken on a tracking server.


@pytest.mark.slow
def test_a_name_taken_on_a_server_says_how_to_go_on(
    tmp_path: Path, ray_cluster: None, mlflow_server: str
) -> None:
    spec = load_spec(write_space(tmp_path, "taken", tiny_copying(replicates={"seeds": 1})))
    first = tmp_path / "first"
    assert run(spec, first, tracking_uri=mlflow_server)[0] == 0
    with pytest.raises(ConfigError) as elsewhere:
        run(spec, tmp_path / "second", tracking_uri=mlflow_server)
    message = str(elsewhere.value)
    assert "study resume taken --output DIR` (DIR: the --output it ran with)" in message
    assert "or run this one as another study with --name NEW" in message
    assert "another --output" not in message  # no use: the name is taken on the server
    with pytest.raises(ConfigError, match=f"study resume taken --output {first}`, or run"):
        run(spec, first, tracking_uri=mlflow_server)
    # The advice works: resume reads the server from the folder's study.json ...
    lines: list[str] = []
    assert resume_study("taken", first, echo=lines.append) == 0
    assert any(line.startswith("taken: 2 trials: 2 completed") for line in lines), lines
    # ... and --name runs the same space as another study on that server.
    renamed = load_spec(write_space(tmp_path, "taken", tiny_copying(replicates={"seeds": 1})),
                        name="taken2")  # fmt: skip
    assert run(renamed, tmp_path / "second", tracking_uri=mlflow_server)[0] == 0
