"""Checks before a study starts: GPUs Ray cannot give, a Ray address nobody answers at, data
missing here; each one line, and nothing made."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FASHION_MNIST, free_port, tiny_copying, write_space
from runner_fixtures import run

from study.errors import ConfigError
from study.runner import run_study
from study.runner.preflight import check_gpus, check_ray_address, refuse_existing
from study.runner.state import STATE_FILE
from study.spec import load_spec
from study.tracking.stores import DRIVER_LOCK


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
    check_gpus(spec, "head:6379", lines.append)  # as after `--address head:6379`
    assert lines == [
        "resources.gpus: 1 per trial, but Ray has 0 GPU(s): trials wait for a GPU node"
    ]


def test_an_address_nobody_answers_at_is_one_line_at_once() -> None:
    closed = free_port()  # nothing listens there
    with pytest.raises(ConfigError, match=rf"--address 127.0.0.1:{closed}: cannot connect"):
        check_ray_address(f"127.0.0.1:{closed}")
    check_ray_address("auto")  # Ray's own forms are Ray's to resolve
    with pytest.raises(ConfigError, match=r"^--address: empty; expected HOST:PORT of a Ray head"):
        check_ray_address(" ")


def test_a_data_dir_missing_here_stops_a_local_study_before_it_starts(tmp_path: Path) -> None:
    body = {
        "task": {"name": "pixel_mnist", "subset": 20},
        "fixed": {"iterations": 2, "eval_every": 1, "batch_size": 10},
        "scientific": {"data_dir": [str(FASHION_MNIST), str(tmp_path / "fashion-mnst")]},
    }
    path = write_space(tmp_path, "typo", body)
    with pytest.raises(ConfigError) as raised:
        run_study(load_spec(path), tmp_path / "out", echo=lambda line: None)
    assert str(raised.value) == (
        f"{path}: task_options.data_dir: {tmp_path}/fashion-mnst is no folder; point data_dir at "
        "a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz), or set download=true to "
        "fetch them"
    )
    assert not (tmp_path / "out").exists()  # nothing made: fixing the file and rerunning works


def test_a_folder_left_with_only_the_driver_lock_is_no_earlier_study(tmp_path: Path) -> None:
    """A run that stopped before its study began (a store error) leaves the lock alone: the
    next run must not take it for an earlier study's Ray state."""
    spec = load_spec(write_space(tmp_path, "locked", tiny_copying()))
    state = tmp_path / "out" / "ray" / "locked"
    state.mkdir(parents=True)
    (state / DRIVER_LOCK).write_text("123\n")
    refuse_existing(spec, tmp_path / "out", "sqlite:///unused.db", store_exists=False)
    (state / STATE_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="holds the Ray state of an earlier run"):
        refuse_existing(spec, tmp_path / "out", "sqlite:///unused.db", store_exists=False)


def test_the_resume_it_names_quotes_a_folder_with_a_space(tmp_path: Path) -> None:
    # The command in the message is pasted as it stands: an unquoted `my runs` would resume
    # a study in `my`.
    spec = load_spec(write_space(tmp_path, "spaced", tiny_copying()))
    output = tmp_path / "my runs"
    state = output / "ray" / "spaced"
    state.mkdir(parents=True)
    (state / STATE_FILE).write_text("{}")
    with pytest.raises(ConfigError) as refused:
        refuse_existing(spec, output, "sqlite:///unused.db", store_exists=False)
    assert f"resume spaced --output '{output}'`" in str(refused.value)
