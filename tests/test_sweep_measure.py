"""benchmarks/sweep_measure.py: what the sweep's child measures, called directly on the CPU at
the tiny shape, and the child's protocol (a hello, one answer line per request, a failed
request answered without ending the child)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from bench_modules import BENCHMARKS, benchmark_module

from study.tasks import TASKS

CPU = torch.device("cpu")
REQUEST = {"shape": "tiny", "precision": "fp32", "members": 2, "rounds": 1, "steps": 2}


@pytest.fixture(scope="module")
def measure():
    return benchmark_module("sweep_measure")


def test_a_pack_point_times_the_step_and_its_start_up(measure) -> None:
    answer = measure.measure_pack(REQUEST, CPU)
    assert answer["ms"] > 0 and answer["kernel"] == "per-step"
    # The start-up beyond one step, or None where the first call was no slower than the median
    # step (a loaded machine: CI at ed96486 saw it); never a negative time. Not a timed test.
    assert answer["start_ms"] is None or answer["start_ms"] > 0
    assert answer["note"] == "no GPU: the eager CPU path ran"
    assert measure.warm_pack(REQUEST, CPU) == {"kernel": "per-step"}


def test_the_baselines_cudnn_step_and_one_members_evaluation(measure) -> None:
    assert measure.measure_cudnn(REQUEST, CPU)["ms"] > 0
    evaluation = measure.measure_eval(REQUEST, CPU)
    assert evaluation["ms"] > 0 and evaluation["batch"] == measure.EVAL_BATCH_SIZE


def test_the_check_runs_train_packed_twice_and_unregisters_its_task(measure) -> None:
    answer = measure.check_run(REQUEST | {"iterations": 3}, CPU)
    first, doubled = answer["seconds"]
    assert 0 < first and 0 < doubled
    assert answer["statuses"] == [["completed"], ["completed"]]
    assert measure.RANDOM_TASK not in TASKS


def test_the_child_answers_each_request_on_one_line_and_survives_a_failure() -> None:
    requests = [
        {"kind": "no_such_kind"},
        {"kind": "pack", **REQUEST, "members": 1, "steps": 1},
    ]
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sweep_measure.py"), "--device", "cpu"],
        input="".join(json.dumps(request) + "\n" for request in requests),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line[2:]) for line in done.stdout.splitlines() if line.startswith("@@")]
    hello, failed, measured = answers
    assert hello["device_name"] == "CPU" and hello["sms"] == 0 and hello["torch"]
    assert failed["error"] == "KeyError: 'no_such_kind'" and failed["wall_s"] >= 0
    assert measured["ms"] > 0


def test_a_cuda_child_without_a_gpu_says_so_in_its_hello() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sweep_measure.py"), "--device", "cuda"],
        input="",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.stdout.strip() == '@@{"error": "no CUDA device here"}'
