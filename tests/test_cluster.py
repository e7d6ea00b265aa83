"""Cluster path: `study run --address` on a real two-node Ray cluster, logging to MLflow."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import free_port, stop_process_group, tiny_copying, write_space

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block` in its own process group, so the test can stop exactly this node
    (`ray stop` would also stop the in-process Ray other tests share)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def wait_for_nodes(address: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    while time.monotonic() < deadline:
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes")


def gpu_node_id(address: str) -> str:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(*[n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')])"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def cluster(tmp_path: Path, worker_args: list[str]) -> Iterator[str]:
    """A head and one worker node, each of one CPU; yields the head's address."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # A short temp dir: Ray's socket paths must fit in 107 bytes, pytest's tmp_path may not.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = start_node(
        ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         f"--temp-dir={temp_dir}"],
        tmp_path / "head.log",
    )  # fmt: skip
    nodes = [head]
    try:
        wait_for_nodes(address, 1)
        nodes.append(
            start_node([f"--address={address}", "--node-ip-address=127.0.0.1", *worker_args],
                       tmp_path / "worker.log")
        )  # fmt: skip
        wait_for_nodes(address, 2)
        yield address
    finally:
        for node in reversed(nodes):
            stop_process_group(node, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[str]:
    with cluster(tmp_path, []) as address:
        yield address


@pytest.fixture
def cluster_with_a_gpu_node(tmp_path: Path) -> Iterator[str]:
    # Ray takes a declared GPU count at its word: the worker offers one GPU that torch here
    # cannot see, which is enough to check where Tune places trials that ask for one.
    with cluster(tmp_path, ["--num-gpus=1"]) as address:
        yield address


def study_run(space: Path, address: str, tracking_uri: str, output: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "study.cli", "run", str(space), "--address", address,
         "--tracking-uri", tracking_uri, "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def trial_runs(tracking_uri: str, study: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], "tags.`study.kind` = 'trial'")


def test_study_spreads_trials_over_the_nodes_and_logs_every_run(
    tmp_path: Path, two_node_cluster: str, mlflow_server: str
) -> None:
    # 4 trials of one CPU each on two one-CPU nodes, long enough to overlap: the second
    # concurrent trial has nowhere to go but the other node. (Tune starts a trial's worker in
    # seconds; 6000 steps take 8 s on the 2-core VM, 400 took 0.6 s, too short to overlap on a
    # faster machine.)
    spec = tiny_copying(
        resources={"cpus": 1, "max_concurrent": 2}, fixed={"iterations": 6000, "eval_every": 3000}
    )
    space = write_space(tmp_path, "cluster_smoke", spec)
    output = tmp_path / "out"  # one machine here, so one folder both nodes reach
    study_run(space, two_node_cluster, mlflow_server, output)

    client = mlflow.MlflowClient(mlflow_server)
    runs = trial_runs(mlflow_server, "cluster_smoke")
    assert len(runs) == 4
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(client.get_metric_history(run.info.run_id, "val/accuracy") for run in runs)
    nodes = {run.data.tags.get("ray.node_id") for run in runs}
    assert len(nodes) == 2 and None not in nodes, nodes


def test_gpus_auto_places_every_trial_on_the_gpu_node(
    tmp_path: Path, cluster_with_a_gpu_node: str, mlflow_server: str
) -> None:
    # Two trials at once would fit the two one-CPU nodes; each asks for the one GPU, so they
    # all run on the worker, one after another, and `device: auto` trains on what torch sees.
    spec = tiny_copying(
        resources={"cpus": 1, "gpus": "auto", "max_concurrent": 2},
        fixed={"device": "auto", "iterations": 400, "eval_every": 200},
    )
    space = write_space(tmp_path, "gpu_auto", spec)
    out = study_run(space, cluster_with_a_gpu_node, mlflow_server, tmp_path / "out")
    assert "resources.gpus: auto -> 1 per trial (GPUs in Ray: 1)" in out.splitlines()
    runs = trial_runs(mlflow_server, "gpu_auto")
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    nodes = {run.data.tags["ray.node_id"] for run in runs}
    assert nodes == {gpu_node_id(cluster_with_a_gpu_node)}
    assert {run.data.tags["device.used"] for run in runs} == {"cpu"}
