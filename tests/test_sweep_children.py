"""benchmarks/sweep_children.py: the sweep's measuring children, real processes on the CPU: a
failed point is answered and the child goes on, a hung one is cut off and the next request
gets a fresh child, a child that exits is a lost child."""

from __future__ import annotations

import os
import signal

import pytest
from bench_modules import benchmark_module

REQUEST = {"kind": "pack", "precision": "fp32", "members": 1, "rounds": 1, "steps": 1}


@pytest.fixture(scope="module")
def children():
    return benchmark_module("sweep_children")


def test_a_failed_point_is_reported_and_a_hung_one_is_cut_off(children) -> None:
    runner = children.Runner("cpu")
    try:
        assert runner.start(timeout=120)["device_name"] == "CPU"
        first = runner.child
        failed = runner.ask({**REQUEST, "shape": "no_such_shape"}, timeout=120)
        assert failed["error"].startswith("KeyError")
        assert runner.child is first and first.process.poll() is None  # it goes on
        # Minutes of CPU work: the answer cannot come within the time given.
        hung = runner.ask({**REQUEST, "shape": "copying", "members": 16, "steps": 50}, timeout=2)
        assert "no answer within" in hung["error"]
        assert first.process.poll() == -signal.SIGKILL and first not in children.LIVE
        # The next point runs in a fresh child.
        measured = runner.ask({**REQUEST, "shape": "tiny"}, timeout=120)
        assert measured["ms"] > 0 and runner.child is not first
    finally:
        runner.close()
    assert not children.LIVE


def test_a_child_that_exits_is_lost_and_replaced(children) -> None:
    child = children.Child("cpu")
    try:
        assert child.receive(timeout=120)["device_name"] == "CPU"
        os.kill(child.process.pid, signal.SIGKILL)
        with pytest.raises(children.ChildLost, match="exited with code"):
            child.ask({**REQUEST, "shape": "tiny"}, timeout=120)
    finally:
        child.kill()
    runner = children.Runner("cpu")
    try:
        runner.start(timeout=120)
        os.kill(runner.child.process.pid, signal.SIGKILL)
        runner.child.process.wait()
        # Runner sees the exit before asking, and asks a fresh child instead.
        assert runner.ask({**REQUEST, "shape": "tiny"}, timeout=120)["ms"] > 0
    finally:
        runner.close()
