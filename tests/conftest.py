"""Shared fixtures: a session Ray (2 CPUs), an MLflow server on 127.0.0.1, small study files."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def printed_study() -> str:
    """How a `study` subprocess started by its script's path spells itself in the commands it
    prints (study/invocation.py): the bare name where PATH finds that same script (an activated
    environment), else the path (`.venv/bin/pytest` alone, as the README and CI run the tests)."""
    script = Path(sys.executable).parent / "study"
    found = shutil.which("study")
    if found is not None and Path(found).resolve() == script.resolve():
        return "study"
    return shlex.quote(str(script))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for every in-process study; shut down so no Ray process outlives the tests."""
    import ray

    # "local": our own Ray, even if a `ray start` cluster (or its stale address file) is around.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM then SIGKILL the process group we started (the child is its leader)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An `mlflow server` with a SQLite backend on a free port of 127.0.0.1; yields its URI."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder}/server.db",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(folder / "server.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=90, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(process)
        log.close()


def write_space(folder: Path, name: str, spec: dict[str, Any]) -> Path:
    """A search-space YAML named NAME.yaml (the study name is the file stem)."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_copying(**overrides: Any) -> dict[str, Any]:
    """A copying study that trains in a second per trial: 2 methods x 2 seeds = 4 trials."""
    spec: dict[str, Any] = {
        "task": {"name": "copying", "T": 5, "train_size": 500, "val_size": 100},
        "model": {"hidden_size": 8},
        "fixed": {"lr": 1.0e-2, "iterations": 20, "eval_every": 10, "batch_size": 10},
        "scientific": {"method": ["none", "h_detach"], "p_detach": [0.5]},
        "replicates": {"seeds": 2},
        "resources": {"cpus": 1, "max_concurrent": 2, "max_failures": 1},
    }
    for section, value in overrides.items():
        spec[section] = {**spec.get(section, {}), **value} if isinstance(value, dict) else value
    # A parameter given an axis leaves `fixed` (each parameter has exactly one role).
    for section in ("scientific", "nuisance"):
        for param in spec.get(section, {}):
            spec["fixed"].pop(param, None)
    return spec


@pytest.fixture(params=["compiled", "torch"])
def cell_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test once with the compiled LSTM cells (lstm_cells.c) and once with torch ops."""
    import torch

    from study.models import cpu_cells

    monkeypatch.setenv(cpu_cells.ENV_SWITCH, request.param)
    cpu_cells._compiled_cells.cache_clear()
    in_use = cpu_cells.cells_for(torch.zeros(1))
    assert isinstance(in_use, cpu_cells.CompiledCells) == (request.param == "compiled")
    yield request.param
    cpu_cells._compiled_cells.cache_clear()
